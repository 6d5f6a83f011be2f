"""goosejax's own checkpoints: the directory format (`format`: params + config + metadata,
written atomically with Orbax) and `load_pretrained` (`pretrained`), which also reads official
.pth files and run directories."""
