"""`load_pretrained(path)`: a ready RWKV7 from any checkpoint format goosejax reads.

Accepted paths (`source_kind` tells them apart, `read_params` reads each; every entry point
— load_pretrained, `--model`, training's `--init-from`, `goosejax convert` — goes through them):
  * an official RWKV-7 x070 `.pth` (a torch zip file; read without torch, see convert/pth.py),
    in bf16 / fp16 / fp32, with or without layer 0's v0/v1/v2, vectors [1,1,C] or [C];
  * a Hugging Face / flash-linear-attention directory (config.json + safetensors, convert/hf_checkpoint.py);
  * a goosejax checkpoint directory (goosejax/checkpoint/format.py);
  * a training run directory: its latest complete checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

from goosejax.checkpoint import format as checkpoint_format
from goosejax.config import ModelConfig
from goosejax.convert.hf_checkpoint import is_hf_directory, load_hf
from goosejax.convert.official import CheckpointFormatError, official_to_params
from goosejax.convert.pth import read_pth

SourceKind = Literal["official", "hf", "goosejax"]
SOURCE_NAMES: dict[str, str] = {"official": "official .pth", "hf": "Hugging Face directory",
                                "goosejax": "goosejax checkpoint"}
MODEL_DTYPES = ("float32", "bfloat16")


def source_kind(path: str | os.PathLike) -> SourceKind:
  """'official' for a file, 'hf' for a Hugging Face / FLA directory, 'goosejax' for any other
  directory (a checkpoint or a run); clear errors for anything else."""
  path = Path(path)
  if path.is_file():
    if path.suffix == ".safetensors":
      raise CheckpointFormatError(f"{path}: a bare safetensors file; pass the Hugging Face model "
                                  "directory that holds it with its config.json")
    return "official"
  if is_hf_directory(path):
    return "hf"
  if path.is_dir():
    return "goosejax"
  raise FileNotFoundError(f"{path}: no such file or directory; expected an official RWKV-7 .pth "
                          "file, a Hugging Face / FLA model directory, a goosejax checkpoint "
                          "directory or a training run directory")


def read_params(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, np.ndarray], dict[str, Any]]:
  """(model config, flat goosejax parameter dict, facts about the source) of any checkpoint.

  Official and Hugging Face files are validated as x070 and upcast to fp32; goosejax
  checkpoints come back in their stored dtype. The facts dict has "kind", "path" and, for
  official files, the stored dtypes with their tensor counts.
  """
  kind = source_kind(path)
  if kind == "hf":
    cfg, params = load_hf(path)
    return cfg, params, {"kind": kind, "path": str(path)}
  if kind == "official":
    state_dict = read_pth(path)
    dtypes: dict[str, int] = {}
    for value in state_dict.values():
      dtypes[value.dtype.name] = dtypes.get(value.dtype.name, 0) + 1
    cfg, params = official_to_params(state_dict, str(path), dtype=np.float32)
    return cfg, params, {"kind": kind, "path": str(path), "stored_dtypes": dtypes,
                         "has_layer0_value_lora": "blocks.0.att.v0" in state_dict}
  info, params = checkpoint_format.load_checkpoint(path)
  return info.model, params, {"kind": kind, "path": str(info.path), "step": info.step}


def _dtype_name(dtype: Any, what: str) -> str:
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    name = str(dtype)
  if name not in MODEL_DTYPES:
    raise ValueError(f"load_pretrained: {what}={dtype!r}; expected one of {list(MODEL_DTYPES)}")
  return name


def load_pretrained(path: str | os.PathLike, dtype: Any = "float32", *, param_dtype: Any = None,
                    wkv_impl: str | None = None):
  """A ready `RWKV7` from an official `.pth`, a Hugging Face / FLA directory, a goosejax
  checkpoint or a run directory (any path `source_kind` accepts).

  dtype: compute dtype (decay and WKV state stay fp32 regardless); param_dtype: storage
  dtype of the weights (default: the compute dtype); wkv_impl: override the checkpoint's
  WKV implementation choice. The parameters are written straight into an abstract model,
  so no initialisation is computed.
  """
  from flax import nnx

  from goosejax.model import RWKV7
  from goosejax.model.params import load_param_dict

  cfg, params, _ = read_params(path)
  compute = _dtype_name(dtype, "dtype")
  storage = _dtype_name(param_dtype if param_dtype is not None else compute, "param_dtype")
  cfg = dataclasses.replace(cfg, dtype=compute, param_dtype=storage,
                            wkv_impl=wkv_impl if wkv_impl is not None else cfg.wkv_impl)
  cfg.validate()
  model = nnx.eval_shape(lambda: RWKV7(cfg, rngs=nnx.Rngs(0)))
  try:
    load_param_dict(model, params)
  except ValueError as e:
    raise checkpoint_format.CheckpointError(f"{path}: parameters do not fit the model config: {e}") from None
  return model
