"""Other projects' checkpoint formats: official RWKV-7 .pth (pth.py: torch-free safe reader and
writer; official.py: x070 key layout <-> goosejax parameters), Hugging Face / flash-linear-attention
safetensors (hf_checkpoint.py), and the `goosejax convert` command (cli.py). goosejax's own
checkpoint directory and `load_pretrained` are goosejax/checkpoint/."""
