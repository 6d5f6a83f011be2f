"""Open a model for inference from any path goosejax reads (`goosejax.load_pretrained`'s
sources: an official .pth, a Hugging Face / FLA directory, a goosejax checkpoint or a run
directory)."""
from __future__ import annotations

import os

from goosejax.infer.sampling import GenerationError
from goosejax.model.rwkv7 import RWKV7

DTYPES = ("float32", "bfloat16")


def load_model(path: str | os.PathLike, dtype: str = "float32") -> RWKV7:
  """A ready RWKV7 (compute dtype `dtype`, weights stored in it) from any supported path."""
  if dtype not in DTYPES:
    raise GenerationError(f"dtype={dtype!r}: expected one of {list(DTYPES)}")
  from goosejax.convert.pretrained import load_pretrained
  return load_pretrained(path, dtype=dtype)
