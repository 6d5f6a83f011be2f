"""Flax NNX modules of RWKV-7 (x070): time mix, channel mix, stacked blocks, the full model."""
from goosejax.model.rwkv7 import RWKV7, Blocks
from goosejax.model.state import RWKV7State, zeros_state

__all__ = ["RWKV7", "Blocks", "RWKV7State", "zeros_state"]
