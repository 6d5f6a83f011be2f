"""goosejax: RWKV-7 "Goose" (x070) language models in JAX / Flax NNX."""
__version__ = "0.1.0"

from goosejax.data.tokenizer import load_tokenizer  # light: tokenizers load on first call
