"""goosejax: RWKV-7 "Goose" (x070) language models in JAX / Flax NNX."""
__version__ = "0.1.0"

from goosejax.data.tokenizer import load_tokenizer  # light: tokenizers load on first call


def __getattr__(name: str):
  # load_pretrained pulls in flax and orbax: imported on first use to keep `import goosejax` light.
  if name == "load_pretrained":
    from goosejax.checkpoint.pretrained import load_pretrained
    return load_pretrained
  if name == "generate":     # jitted prefill + decode loop (goosejax/infer)
    from goosejax.infer.generate import generate
    return generate
  raise AttributeError(f"module 'goosejax' has no attribute {name!r}")
