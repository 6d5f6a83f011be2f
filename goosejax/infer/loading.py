"""Open a model for inference from any path goosejax reads.

A Hugging Face / FLA directory (config.json + safetensors) is read by goosejax.convert.hf;
everything else (official .pth, goosejax checkpoint or run directory) by
`goosejax.load_pretrained`.
"""
from __future__ import annotations

import dataclasses
import os

from goosejax.model.rwkv7 import RWKV7

DTYPES = ("float32", "bfloat16")


def load_model(path: str | os.PathLike, dtype: str = "float32") -> RWKV7:
  """A ready RWKV7 (compute dtype `dtype`, weights stored in it) from any supported path."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}: expected one of {list(DTYPES)}")
  from goosejax.convert.hf import is_hf_checkpoint
  if not is_hf_checkpoint(path):
    from goosejax.convert.pretrained import load_pretrained
    return load_pretrained(path, dtype=dtype)
  from flax import nnx

  from goosejax.convert.hf import load_hf
  from goosejax.model.params import load_param_dict
  cfg, params = load_hf(path)
  cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)
  model = nnx.eval_shape(lambda: RWKV7(cfg, rngs=nnx.Rngs(0)))   # weights come from the file
  load_param_dict(model, params)
  return model
