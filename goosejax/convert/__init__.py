"""Checkpoint formats: official RWKV-7 .pth (pth.py: torch-free safe reader and writer;
official.py: x070 key layout <-> goosejax parameters), `load_pretrained` (pretrained.py) and
the `goosejax convert` command (cli.py). The goosejax checkpoint directory is goosejax/checkpoint.py."""
