"""Open a model for inference from any path goosejax reads (`goosejax.load_pretrained`'s
sources: an official .pth, a Hugging Face / FLA directory, a goosejax checkpoint or a run
directory)."""
from __future__ import annotations

import os

from goosejax.errors import GoosejaxError
from goosejax.infer.sampling import GenerationError
from goosejax.model.rwkv7 import RWKV7

DTYPES = ("float32", "bfloat16")


def load_model(path: str | os.PathLike, dtype: str = "float32") -> RWKV7:
  """A ready RWKV7 (compute dtype `dtype`, weights stored in it) from any supported path."""
  if dtype not in DTYPES:
    raise GenerationError(f"dtype={dtype!r}: expected one of {list(DTYPES)}")
  from goosejax.checkpoint.pretrained import load_pretrained
  return load_pretrained(path, dtype=dtype)


class TokenizerMismatchError(GoosejaxError):
  """The tokenizer produces ids the model has no embedding for."""


def load_model_and_tokenizer(path: str | os.PathLike, dtype: str, tokenizer_name: str):
  """(model, tokenizer) for a command line, refusing a tokenizer with more ids than the model."""
  from goosejax.data.tokenizer import load_tokenizer
  tokenizer = load_tokenizer(tokenizer_name)
  model = load_model(path, dtype)
  vocab_size = model.config.vocab_size
  if tokenizer.vocab_size > vocab_size:
    raise TokenizerMismatchError(
        f"tokenizer {tokenizer_name!r} has {tokenizer.vocab_size} ids but the model only "
        f"{vocab_size}; pass the tokenizer the model was trained with")
  return model, tokenizer
