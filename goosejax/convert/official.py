"""Official RWKV-7 x070 state dicts (`blocks.{i}.att.x_r`, ...) <-> goosejax parameter dicts.

The official layout (docs/architecture.md#parameters-and-checkpoint-layout): Linear weights
are PyTorch [out, in] (goosejax stores [in, out]); LoRA matrices are [in, out] in both; vectors
are [1,1,C] or [C]; layer 0 may or may not carry the unused v0/v1/v2. Every size is inferred
from tensor shapes. Each key and its layout is declared in goosejax.param_table.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping

import numpy as np

from goosejax.config import ModelConfig
from goosejax.errors import GoosejaxError
from goosejax.param_table import PARAMS, Layout, Param, layer_major


class CheckpointFormatError(GoosejaxError):
  """The file is not an RWKV-7 x070 checkpoint in the expected layout."""


# The att.* vectors RWKV-LM stores [1, 1, C] (x_r ... k_a), by their last name part.
VECTOR_KEYS = tuple(p.official.rsplit(".", 1)[-1] for p in PARAMS
                    if p.official_layout is Layout.ROW and ".att." in p.official)

# Keys that identify a different architecture, with what to tell the user.
FOREIGN_PATTERNS = (
    (re.compile(r"ffn\.(s_emb|s_emb_x|s0|s1|s2)\b"), "RWKV-7a 'DeepEmbed' (rwkv7a) keys"),
    (re.compile(r"\.qkv\.|\.att\.(q|qkv)\b"), "RWKV-7b attention (rwkv7b) keys"),
    (re.compile(r"att\.(time_decay|time_faaaa|time_first|time_mix_|time_maa_|time_decay_w)"),
     "RWKV-4/5/6 or pre-release x070 names (time_decay / time_faaaa / time_maa_*)"),
    (re.compile(r"ffn\.receptance\.weight"), "a channel-mix receptance (RWKV-4/5/6, removed in RWKV-7)"),
)


def _own_name(key: str) -> str:
  return key


def _fail(source: str, message: str):
  raise CheckpointFormatError(f"{source}: {message}")


def _layer_count(state_dict: Mapping[str, np.ndarray], source: str) -> int:
  layers = {int(m.group(1)) for key in state_dict if (m := re.match(r"blocks\.(\d+)\.", key))}
  if not layers:
    _fail(source, "no 'blocks.{i}.*' keys found; expected an RWKV-7 x070 state dict "
                  "(emb.weight, blocks.0.ln0.weight, blocks.{i}.att.*, ln_out.*, head.weight)")
  if layers != set(range(max(layers) + 1)):
    _fail(source, f"layer indices are not contiguous from 0: found {sorted(layers)}")
  return max(layers) + 1


def infer_model_config(state_dict: Mapping[str, np.ndarray], source: str = "checkpoint",
                       name_in_file: Callable[[str], str] = _own_name) -> ModelConfig:
  """Sizes of the model from tensor shapes (never from file names).

  name_in_file: the name an official key has in the source file, for messages (a Hugging
  Face file names its tensors differently)."""
  for key in state_dict:
    for pattern, what in FOREIGN_PATTERNS:
      if pattern.search(key):
        _fail(source, f"not an RWKV-7 x070 checkpoint: found {what}, e.g. {key!r}")
  for key in ("emb.weight", "blocks.0.att.r_k", "blocks.0.att.w1", "blocks.0.att.a1",
              "blocks.0.att.g1", "blocks.0.ffn.key.weight"):
    if key not in state_dict:
      _fail(source, f"missing key {name_in_file(key)!r}; expected an RWKV-7 x070 state dict")
  n_layer = _layer_count(state_dict, source)
  vocab, n_embd = _shape(state_dict, "emb.weight", 2, source)
  n_head, head_size = _shape(state_dict, "blocks.0.att.r_k", 2, source)
  value_key = next((k for k in ("blocks.1.att.v1", "blocks.0.att.v1") if k in state_dict), None)
  cfg = ModelConfig(
      vocab_size=vocab, n_layer=n_layer, n_embd=n_embd, head_size=head_size,
      dim_ffn=_shape(state_dict, "blocks.0.ffn.key.weight", 2, source)[0],
      decay_lora=_shape(state_dict, "blocks.0.att.w1", 2, source)[1],
      iclr_lora=_shape(state_dict, "blocks.0.att.a1", 2, source)[1],
      value_lora=_shape(state_dict, value_key, 2, source)[1] if value_key else 32,
      gate_lora=_shape(state_dict, "blocks.0.att.g1", 2, source)[1])
  if n_head * head_size != n_embd:
    _fail(source, f"blocks.0.att.r_k has shape {(n_head, head_size)} but emb.weight has "
                  f"C={n_embd}; expected H*N == C")
  return cfg


def _shape(state_dict, key, ndim, source) -> tuple[int, ...]:
  shape = tuple(np.shape(state_dict[key]))
  if len(shape) != ndim:
    _fail(source, f"key {key!r} has shape {shape}, expected a {ndim}-D tensor")
  return shape


def _file_shape(param: Param, cfg: ModelConfig) -> tuple[int, ...]:
  """One official tensor's canonical shape: Linear weights [out, in], vectors [C]."""
  shape = param.shape(cfg)[1:] if param.stacked else param.shape(cfg)
  return shape[::-1] if param.official_layout is Layout.TRANSPOSED else shape


def expected_official_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every official key with its canonical shape (vectors as [C]); layer 0 with v0..v2."""
  return {param.official_key(layer): _file_shape(param, cfg)
          for param, layer in layer_major(cfg.n_layer)}


def official_to_params(state_dict: Mapping[str, np.ndarray], source: str = "checkpoint",
                       dtype=np.float32, name_in_file: Callable[[str], str] = _own_name,
                       ) -> tuple[ModelConfig, dict[str, np.ndarray]]:
  """Validate an official state dict and convert it to (config, goosejax parameter dict).

  name_in_file: as for `infer_model_config`; missing keys are reported under it."""
  cfg = infer_model_config(state_dict, source, name_in_file)
  try:
    cfg.validate()
  except ValueError as e:
    _fail(source, f"inferred sizes are not a valid RWKV-7 model: {e}")
  entries = [(param, layer, param.official_key(layer)) for param, layer in layer_major(cfg.n_layer)]
  expected = {key for _, _, key in entries}
  optional = {key for param, layer, key in entries if layer == 0 and param.unused_in_layer0}
  missing = sorted(name_in_file(key) for key in expected - optional if key not in state_dict)
  unexpected = sorted(key for key in state_dict if key not in expected)
  if missing:
    _fail(source, f"missing {len(missing)} key(s) of an x070 checkpoint: {missing[:8]}"
                  + (" ..." if len(missing) > 8 else ""))
  if unexpected:
    _fail(source, f"unexpected key(s) for an x070 checkpoint: {unexpected[:8]}"
                  + (" ..." if len(unexpected) > 8 else ""))
  # Shapes are all checked first; values are then cast straight into the stacked result, so
  # the peak memory is the input plus the output (no per-key fp32 copies: 2.9B in bf16 needs
  # ~18 GB, not ~30 GB).
  found = {}
  for param, _, key in entries:
    if key not in state_dict:
      continue
    value, shape = np.asarray(state_dict[key]), _file_shape(param, cfg)
    if param.official_layout is Layout.ROW and value.size == shape[0]:
      value = value.reshape(shape)    # [1,1,C] and [C] are both accepted
    if value.shape != shape:
      _fail(source, f"key {key!r} has shape {value.shape}, expected {shape}")
    found[key] = value
  params = {param.name: np.empty(param.shape(cfg), dtype) for param in PARAMS}
  for param, layer, key in entries:
    out = params[param.name] if layer is None else params[param.name][layer]
    if key in found:
      out[...] = param.official_layout.from_file(found[key])
    else:
      out[...] = 0                      # layer 0's absent v0/v1/v2: never used
  return cfg, params


def params_to_official(params: Mapping[str, np.ndarray], cfg: ModelConfig, *,
                       vectors_as_1x1xC: bool = True,
                       include_layer0_value_lora: bool = True) -> dict[str, np.ndarray]:
  """goosejax parameter dict -> official state dict (the layout RWKV-LM writes)."""
  arrays = {name: np.asarray(value) for name, value in params.items()}
  out = {}
  for param, layer in layer_major(cfg.n_layer):
    if layer == 0 and param.unused_in_layer0 and not include_layer0_value_lora:
      continue
    value = arrays[param.name] if layer is None else arrays[param.name][layer]
    if param.official_layout is not Layout.ROW or vectors_as_1x1xC:
      value = param.official_layout.to_file(value)
    out[param.official_key(layer)] = np.ascontiguousarray(value)
  return out
