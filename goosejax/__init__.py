"""goosejax: RWKV-7 "Goose" (x070) language models in JAX / Flax NNX."""
__version__ = "0.1.0"
