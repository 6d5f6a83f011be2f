"""Hugging Face / flash-linear-attention RWKV-7 checkpoints (safetensors + config.json), both ways.

The layout is FLA's `RWKV7ForCausalLM` (fla-hub/*, RWKV/RWKV7-Goose-*-HF;
docs/architecture.md#parameters-and-checkpoint-layout): `model.embeddings`, `model.layers.{i}.{pre_norm,attn_norm,attn,ffn_norm,ffn}`, `model.norm`,
`lm_head`. The LoRAs are `nn.Sequential(Linear, act, Linear)` modules, so their weights are the
transposes of the official [in, out] matrices and the official bias vectors (w0, a0, v0) are
the second Linear's bias; layer 0 has no `v_lora` (each tensor's name and layout is declared
in goosejax.param_table). Conversion goes through the official state dict
(goosejax/convert/official.py), so every shape check and the stacking live in one place.

The recurrent state differs too: FLA keeps the WKV state as [B, H, K, V] (the transpose of
goosejax's and the official [B, H, V, K]); `state_to_fla` / `state_from_fla` convert it.

Safetensors are read and written here without the `safetensors` package (the format is an
8-byte little-endian header length, a JSON header of dtype/shape/byte offsets, then the raw
little-endian data), memory-mapped on read.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from goosejax.config import ModelConfig
from goosejax.convert.official import (CheckpointFormatError, official_to_params,
                                       params_to_official)
from goosejax.errors import GoosejaxError
from goosejax.model.state import RWKV7State
from goosejax.param_table import BY_NAME, parse_hf_key, parse_official_key

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MODEL_TYPES = ("rwkv7", "rwkv7_fla")

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype(bool)}
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 2**20

FLA_EXACT_HEAD_SIZE = 64


class HFExportError(GoosejaxError):
  """A model the Hugging Face / FLA format cannot describe exactly; the message says why."""


# ----------------------------------------------------------------------------- safetensors


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of one .safetensors file (read-only arrays backed by a memory map)."""
  path = Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise CheckpointFormatError(f"{path}: too short to be a safetensors file ({size} bytes)")
    header_len = int.from_bytes(head, "little")
    if header_len > min(_MAX_HEADER_BYTES, size - 8):
      raise CheckpointFormatError(f"{path}: not a safetensors file (header length {header_len} "
                                  f"does not fit in {size} bytes)")
    try:
      header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointFormatError(f"{path}: safetensors header is not valid JSON: {e}") from None
  if not isinstance(header, dict):
    raise CheckpointFormatError(f"{path}: safetensors header is not a JSON object")
  header.pop("__metadata__", None)
  data_start = 8 + header_len
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(size - data_start,)) \
      if size > data_start else np.zeros(0, np.uint8)
  tensors = {}
  for name, entry in header.items():
    try:
      dtype = SAFETENSORS_DTYPES[entry["dtype"]]
      shape = tuple(int(d) for d in entry["shape"])
      begin, end = (int(x) for x in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise CheckpointFormatError(
          f"{path}: tensor {name!r} has a bad header entry {entry!r}; expected dtype (one of "
          f"{sorted(SAFETENSORS_DTYPES)}), shape and data_offsets") from None
    n_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if not 0 <= begin <= end <= data.size or end - begin != n_bytes:
      raise CheckpointFormatError(f"{path}: tensor {name!r} ({entry['dtype']} {list(shape)}) has "
                                  f"byte range [{begin}, {end}) but needs {n_bytes} bytes inside "
                                  f"the {data.size}-byte data section")
    tensors[name] = data[begin:end].view(dtype).reshape(shape)
  return tensors


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Write tensors as one .safetensors file (little-endian, header padded to 8 bytes)."""
  header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
  arrays, offset = [], 0
  for name, value in tensors.items():
    array = np.ascontiguousarray(value)
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    if dtype not in _DTYPE_NAMES:
      raise CheckpointFormatError(f"tensor {name!r}: dtype {array.dtype} cannot be stored in safetensors")
    array = array.astype(dtype, copy=False)
    header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    arrays.append(array)
    offset += array.nbytes
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)
  with open(path, "wb") as f:
    f.write(len(encoded).to_bytes(8, "little"))
    f.write(encoded)
    for array in arrays:
      f.write(array.tobytes())


# ----------------------------------------------------------------------------- names


def official_to_hf(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Official x070 state dict -> FLA tensor dict (layer 0's v0/v1/v2 are dropped)."""
  out = {}
  for key, value in state_dict.items():
    found = parse_official_key(key)
    if found is None:
      raise CheckpointFormatError(f"official key {key!r} has no Hugging Face name")
    param, layer = found
    if layer == 0 and param.unused_in_layer0:
      continue                       # FLA's layer 0 has no value-residual LoRA
    value = param.official_layout.from_file(np.asarray(value))
    out[param.hf_key(layer)] = param.hf_layout.to_file(value)
  return out


def hf_name(official_key: str) -> str:
  """The FLA tensor name that holds an official key (what messages about an HF file say)."""
  found = parse_official_key(official_key)
  return official_key if found is None else found[0].hf_key(found[1])


def hf_to_official(tensors: Mapping[str, np.ndarray], source: str = "checkpoint") -> dict[str, np.ndarray]:
  """FLA tensor dict -> official x070 state dict; unknown names are errors that name them."""
  out = {}
  for key, value in tensors.items():
    value = np.asarray(value)
    if m := re.fullmatch(r"model\.layers\.(\d+)\.attn\.x_x", key):
      # FLA's first layout: the six token-shift mixes stacked [6, C] as r, w, k, v, a, g.
      for mix, row in zip("rwkvag", value):
        out[BY_NAME[f"blocks.att.x_{mix}"].official_key(int(m.group(1)))] = row
      continue
    found = parse_hf_key(key)
    if found is None:
      hint = (" (a hybrid attention layer: goosejax runs pure RWKV-7 only)"
              if re.search(r"\.attn\.(q_proj|qkv)", key) else "")
      raise CheckpointFormatError(f"{source}: unexpected tensor {key!r} for an FLA/HF RWKV-7 "
                                  f"model{hint}")
    param, layer = found
    out[param.official_key(layer)] = param.official_layout.to_file(param.hf_layout.from_file(value))
  if BY_NAME["ln0.weight"].official_key() not in out:
    raise CheckpointFormatError(f"{source}: no 'model.layers.0.pre_norm.*' tensors; RWKV-7 applies "
                                "a LayerNorm to the embeddings (FLA config norm_first=true)")
  return out


# ----------------------------------------------------------------------------- config.json


def hf_config(cfg: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
  """config.json for FLA's RWKV7ForCausalLM (transformers + flash-linear-attention)."""
  d_w, d_a, d_v, d_g = cfg.lora_ranks
  return {
      "architectures": ["RWKV7ForCausalLM"], "model_type": "rwkv7", "attn_mode": "chunk",
      "hidden_size": cfg.n_embd, "hidden_ratio": cfg.ffn_dim / cfg.n_embd,
      "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layer,
      "head_dim": cfg.head_size, "num_heads": None, "decay_low_rank_dim": d_w,
      "a_low_rank_dim": d_a, "v_low_rank_dim": d_v, "gate_low_rank_dim": d_g,
      "value_dim": [cfg.n_embd] * cfg.n_layer, "hidden_act": "sqrelu", "norm_first": True,
      "norm_bias": True, "norm_eps": 1e-5, "attn": None, "use_cache": True,
      "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": None,
      "vocab_size": cfg.vocab_size, "max_position_embeddings": 4096, "initializer_range": 0.02,
      "fuse_norm": True, "fuse_cross_entropy": True, "torch_dtype": torch_dtype,
  }


def _check_config(config: Mapping[str, Any], cfg: ModelConfig, source: str) -> None:
  """config.json must describe a pure RWKV-7 the tensors agree with."""
  model_type = config.get("model_type")
  if model_type not in MODEL_TYPES:
    raise CheckpointFormatError(f"{source}: config.json model_type={model_type!r}; expected one of "
                                f"{list(MODEL_TYPES)} (flash-linear-attention RWKV-7)")
  if config.get("attn"):
    raise CheckpointFormatError(f"{source}: config.json has hybrid attention layers (attn="
                                f"{config['attn']!r}); goosejax runs pure RWKV-7 only")
  if config.get("hidden_act", "sqrelu") != "sqrelu":
    raise CheckpointFormatError(f"{source}: config.json hidden_act={config['hidden_act']!r}; "
                                "RWKV-7's channel mix uses 'sqrelu'")
  if config.get("norm_bias", True) is not True or config.get("norm_first", True) is not True:
    raise CheckpointFormatError(f"{source}: config.json norm_bias/norm_first must be true for RWKV-7")
  eps = config.get("norm_eps", 1e-5)
  if not np.isclose(eps, 1e-5, rtol=1e-6, atol=0):
    raise CheckpointFormatError(f"{source}: config.json norm_eps={eps}; goosejax uses the official "
                                "1e-5 (LayerNorm) and 64e-5 (per-head GroupNorm)")
  d_w, d_a, d_v, d_g = cfg.lora_ranks
  value_dim = config.get("value_dim")
  expected = {"hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer,
              "vocab_size": cfg.vocab_size, "head_dim": cfg.head_size, "intermediate_size": cfg.ffn_dim,
              "decay_low_rank_dim": d_w, "a_low_rank_dim": d_a, "gate_low_rank_dim": d_g}
  if cfg.n_layer > 1:
    expected["v_low_rank_dim"] = d_v
  for key, value in expected.items():
    if config.get(key) is not None and config[key] != value:
      raise CheckpointFormatError(f"{source}: config.json {key}={config[key]!r} but the tensors "
                                  f"give {value}")
  if value_dim is not None:
    dims = value_dim if isinstance(value_dim, list) else [value_dim]
    if any(d != cfg.n_embd for d in dims):
      raise CheckpointFormatError(f"{source}: config.json value_dim={value_dim!r}; goosejax needs "
                                  f"value_dim == hidden_size ({cfg.n_embd})")
  if cfg.head_size != FLA_EXACT_HEAD_SIZE:
    raise CheckpointFormatError(f"{source}: config.json head_dim={cfg.head_size}: "
                                f"{_why_only_head_size_64()}")


def _why_only_head_size_64() -> str:
  # fla/models/rwkv7/modeling_rwkv7.py: LayerNorm(eps=norm_eps); fla/layers/rwkv7.py:
  # GroupNorm(eps=head_dim * norm_eps). RWKV-LM: LayerNorm 1e-5, GroupNorm (1e-5 * 8**2) always.
  return ("FLA has one norm_eps, the LayerNorms' eps, and computes the per-head GroupNorm eps as "
          "head_dim * norm_eps; the official model uses 1e-5 and 64e-5 whatever the head size, "
          "which only head size 64 (norm_eps=1e-5) reproduces")


def check_fla_exact(cfg: ModelConfig) -> None:
  """Refuse a model FLA would run with other GroupNorm numbers than the official runtime."""
  if cfg.head_size != FLA_EXACT_HEAD_SIZE:
    raise HFExportError(f"head size {cfg.head_size} cannot be written for Hugging Face / FLA: "
                        f"{_why_only_head_size_64()}")


# ----------------------------------------------------------------------------- files


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
  path = Path(path)
  return (path.is_dir() and (path / CONFIG_FILE).is_file()
          and ((path / WEIGHTS_FILE).is_file() or (path / INDEX_FILE).is_file()))


def is_hf_directory(path: str | os.PathLike) -> bool:
  """A directory that claims to be a Hugging Face model: safetensors weights, or a config.json
  with a `model_type` (goosejax's own config.json has none), complete or not."""
  path = Path(path)
  if not path.is_dir():
    return False
  if (path / WEIGHTS_FILE).is_file() or (path / INDEX_FILE).is_file():
    return True
  try:
    config = json.loads((path / CONFIG_FILE).read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError):   # absent or unreadable: no claim
    return False
  return isinstance(config, dict) and "model_type" in config


def _weights_source(path: Path) -> str:
  """The file tensor problems are reported against: the shard index, else the weights file."""
  return str(path / INDEX_FILE) if (path / INDEX_FILE).is_file() else str(path / WEIGHTS_FILE)


def read_hf_tensors(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config.json contents, all tensors) of an HF model directory, sharded or not."""
  path = Path(path)
  if not path.is_dir():
    raise CheckpointFormatError(f"{path}: expected a Hugging Face model directory with "
                                f"{CONFIG_FILE} and {WEIGHTS_FILE} (or {INDEX_FILE})")
  config_path = path / CONFIG_FILE
  if not config_path.is_file():
    raise CheckpointFormatError(f"{path}: no {CONFIG_FILE}")
  try:
    config = json.loads(config_path.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointFormatError(f"{config_path}: not valid JSON: {e}") from None
  if (path / INDEX_FILE).is_file():
    try:
      weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    except (KeyError, TypeError, json.JSONDecodeError) as e:
      raise CheckpointFormatError(f"{path / INDEX_FILE}: expected a JSON object with a 'weight_map' "
                                  f"of tensor name -> shard file ({e})") from None
    tensors = {}
    for shard in sorted(set(weight_map.values())):
      if not (path / shard).is_file():
        raise CheckpointFormatError(f"{path / INDEX_FILE} names shard {shard!r}, which is missing")
      tensors.update(read_safetensors(path / shard))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
      raise CheckpointFormatError(f"{path}: tensors listed in {INDEX_FILE} but in no shard: {missing[:8]}")
  elif (path / WEIGHTS_FILE).is_file():
    tensors = read_safetensors(path / WEIGHTS_FILE)
  else:
    raise CheckpointFormatError(f"{path}: no {WEIGHTS_FILE} or {INDEX_FILE} (goosejax reads "
                                "safetensors only, not pytorch_model.bin)")
  return config, tensors


def load_hf(path: str | os.PathLike, dtype=np.float32) -> tuple[ModelConfig, dict[str, np.ndarray]]:
  """A Hugging Face / FLA RWKV-7 directory -> (ModelConfig, goosejax parameter dict)."""
  config, tensors = read_hf_tensors(path)
  if "lm_head.weight" not in tensors and config.get("tie_word_embeddings"):
    tensors = {**tensors, "lm_head.weight": tensors.get("model.embeddings.weight")}
  source = _weights_source(Path(path))
  state_dict = hf_to_official(tensors, source)
  cfg, params = official_to_params(state_dict, source, dtype=dtype, name_in_file=hf_name)
  _check_config(config, cfg, str(path))
  return cfg, params


def save_hf(params: Mapping[str, Any], cfg: ModelConfig, path: str | os.PathLike, *,
            dtype=None) -> None:
  """Write a goosejax parameter dict as an HF / FLA model directory (config.json + safetensors).

  dtype: stored dtype (numpy dtype or name; default: the parameters' own). The directory is
  created if needed; existing config.json / model.safetensors in it are replaced. A head
  size FLA cannot run exactly (see `check_fla_exact`) raises HFExportError, writing nothing.
  """
  check_fla_exact(cfg)
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  state_dict = params_to_official({k: np.asarray(v) for k, v in params.items()}, cfg,
                                  vectors_as_1x1xC=False, include_layer0_value_lora=False)
  tensors = official_to_hf(state_dict)
  if dtype is not None:
    target = np.dtype(ml_dtypes.bfloat16) if str(dtype) == "bfloat16" else np.dtype(dtype)
    tensors = {k: v.astype(target) for k, v in tensors.items()}
  stored = {v.dtype for v in tensors.values()}
  names = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16",
           np.dtype(np.float16): "float16"}
  torch_dtype = names.get(next(iter(stored)), "float32") if len(stored) == 1 else "float32"
  write_safetensors(path / WEIGHTS_FILE, tensors, {"format": "pt"})
  (path / CONFIG_FILE).write_text(json.dumps(hf_config(cfg, torch_dtype), indent=2) + "\n")


# ----------------------------------------------------------------------------- state


def state_to_fla(state: RWKV7State) -> list[dict[str, np.ndarray]]:
  """goosejax state -> FLA's per-layer cache entries: recurrent_state [B,H,K,V] (transposed),
  conv_state (time-mix shift) [B,C], ffn_state (channel-mix shift) [B,C]."""
  att, wkv, ffn = (np.asarray(x) for x in state)
  return [{"recurrent_state": np.swapaxes(wkv[i], -1, -2), "conv_state": att[i], "ffn_state": ffn[i]}
          for i in range(wkv.shape[0])]


def state_from_fla(layers: list[Mapping[str, np.ndarray]]) -> RWKV7State:
  """FLA per-layer cache entries -> goosejax state (the WKV state transposed back to [V, K])."""
  try:
    att = np.stack([np.asarray(entry["conv_state"]) for entry in layers])
    wkv = np.stack([np.swapaxes(np.asarray(entry["recurrent_state"]), -1, -2) for entry in layers])
    ffn = np.stack([np.asarray(entry["ffn_state"]) for entry in layers])
  except KeyError as e:
    raise CheckpointFormatError(f"FLA state entry without {e}; expected recurrent_state, "
                                "conv_state and ffn_state per layer") from None
  return RWKV7State(att, wkv.astype(np.float32), ffn)
