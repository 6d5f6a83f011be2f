"""Official RWKV-7 x070 state dicts (`blocks.{i}.att.x_r`, ...) <-> goosejax parameter dicts.

The official layout is described in spec §1.2: Linear weights are PyTorch [out, in] (goosejax
stores [in, out]); LoRA matrices are [in, out] in both; vectors are [1,1,C] or [C]; layer 0
may or may not carry the unused v0/v1/v2. Every size is inferred from tensor shapes.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping

import numpy as np

from goosejax.config import ModelConfig
from goosejax.errors import GoosejaxError


class CheckpointFormatError(GoosejaxError):
  """The file is not an RWKV-7 x070 checkpoint in the expected layout."""


VECTOR_KEYS = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a")
LORA_KEYS = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")
LINEAR_KEYS = ("receptance", "key", "value", "output")
LAYER0_OPTIONAL = ("v0", "v1", "v2")

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


def expected_official_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every official key with its canonical shape (vectors as [C]); layer 0 with v0..v2."""
  C, V, F, H, N = cfg.n_embd, cfg.vocab_size, cfg.ffn_dim, cfg.n_head, cfg.head_size
  d_w, d_a, d_v, d_g = cfg.lora_ranks
  lora = {"w1": (C, d_w), "w2": (d_w, C), "a1": (C, d_a), "a2": (d_a, C),
          "v1": (C, d_v), "v2": (d_v, C), "g1": (C, d_g), "g2": (d_g, C)}
  shapes = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,),
            "ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)}
  for i in range(cfg.n_layer):
    p = f"blocks.{i}."
    for ln in ("ln1", "ln2"):
      shapes[f"{p}{ln}.weight"] = shapes[f"{p}{ln}.bias"] = (C,)
    for key in VECTOR_KEYS:
      shapes[f"{p}att.{key}"] = (C,)
    for key, shape in lora.items():
      shapes[f"{p}att.{key}"] = shape
    shapes[f"{p}att.r_k"] = (H, N)
    for key in LINEAR_KEYS:
      shapes[f"{p}att.{key}.weight"] = (C, C)
    shapes[f"{p}att.ln_x.weight"] = shapes[f"{p}att.ln_x.bias"] = (C,)
    shapes[f"{p}ffn.x_k"] = (C,)
    shapes[f"{p}ffn.key.weight"] = (F, C)
    shapes[f"{p}ffn.value.weight"] = (C, F)
  return shapes


def _is_vector_key(key: str) -> bool:
  return key.rsplit(".", 1)[-1] in VECTOR_KEYS or key.endswith("ffn.x_k")


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
  expected = expected_official_shapes(cfg)
  optional = {f"blocks.0.att.{k}" for k in LAYER0_OPTIONAL}
  missing = sorted(name_in_file(k) for k in expected if k not in state_dict and k not in optional)
  unexpected = sorted(k for k in state_dict if k not in expected)
  if missing:
    _fail(source, f"missing {len(missing)} key(s) of an x070 checkpoint: {missing[:8]}"
                  + (" ..." if len(missing) > 8 else ""))
  if unexpected:
    _fail(source, f"unexpected key(s) for an x070 checkpoint: {unexpected[:8]}"
                  + (" ..." if len(unexpected) > 8 else ""))
  # Shapes are all checked first; values are then cast straight into the stacked result, so
  # the peak memory is the input plus the output (no per-key fp32 copies: 2.9B in bf16 needs
  # ~18 GB, not ~30 GB).
  tensors = {}
  for key, shape in expected.items():
    if key not in state_dict:
      continue
    value = np.asarray(state_dict[key])
    if _is_vector_key(key) and value.size == shape[0]:
      value = value.reshape(shape)    # [1,1,C] and [C] are both accepted
    if value.shape != shape:
      _fail(source, f"key {key!r} has shape {value.shape}, expected {shape}")
    tensors[key] = value

  L = cfg.n_layer

  def stacked(suffix: str, transpose: bool = False) -> np.ndarray:
    shape = expected[f"blocks.0.{suffix}"]
    out = np.empty((L, *(shape[::-1] if transpose else shape)), dtype)
    for i in range(L):
      value = tensors.get(f"blocks.{i}.{suffix}")
      if value is None:
        out[i] = 0                      # layer 0's absent v0/v1/v2: never used
      else:
        out[i] = value.T if transpose else value
    return out

  single = lambda key: tensors[key].astype(dtype)
  params = {"emb": single("emb.weight"),
            "head": np.ascontiguousarray(tensors["head.weight"].T, dtype),
            "ln0.weight": single("blocks.0.ln0.weight"), "ln0.bias": single("blocks.0.ln0.bias"),
            "ln_out.weight": single("ln_out.weight"), "ln_out.bias": single("ln_out.bias")}
  for ln in ("ln1", "ln2"):
    for part in ("weight", "bias"):
      params[f"blocks.{ln}.{part}"] = stacked(f"{ln}.{part}")
  for key in VECTOR_KEYS + LORA_KEYS + ("r_k",):
    params[f"blocks.att.{key}"] = stacked(f"att.{key}")
  for key in LINEAR_KEYS:
    params[f"blocks.att.{key}"] = stacked(f"att.{key}.weight", transpose=True)
  params["blocks.att.ln_x_weight"] = stacked("att.ln_x.weight")
  params["blocks.att.ln_x_bias"] = stacked("att.ln_x.bias")
  params["blocks.ffn.x_k"] = stacked("ffn.x_k")
  params["blocks.ffn.key"] = stacked("ffn.key.weight", transpose=True)
  params["blocks.ffn.value"] = stacked("ffn.value.weight", transpose=True)
  return cfg, params


def params_to_official(params: Mapping[str, np.ndarray], cfg: ModelConfig, *,
                       vectors_as_1x1xC: bool = True,
                       include_layer0_value_lora: bool = True) -> dict[str, np.ndarray]:
  """goosejax parameter dict -> official state dict (the layout RWKV-LM writes)."""
  p = {k: np.asarray(v) for k, v in params.items()}
  vec = (lambda x: x.reshape(1, 1, -1)) if vectors_as_1x1xC else (lambda x: x)
  out = {"emb.weight": p["emb"], "blocks.0.ln0.weight": p["ln0.weight"],
         "blocks.0.ln0.bias": p["ln0.bias"]}
  for i in range(cfg.n_layer):
    b = f"blocks.{i}."
    for ln in ("ln1", "ln2"):
      out[f"{b}{ln}.weight"] = p[f"blocks.{ln}.weight"][i]
      out[f"{b}{ln}.bias"] = p[f"blocks.{ln}.bias"][i]
    for key in VECTOR_KEYS:
      if i == 0 and key in LAYER0_OPTIONAL and not include_layer0_value_lora:
        continue
      out[f"{b}att.{key}"] = vec(p[f"blocks.att.{key}"][i])
    for key in LORA_KEYS:
      if i == 0 and key in LAYER0_OPTIONAL and not include_layer0_value_lora:
        continue
      out[f"{b}att.{key}"] = p[f"blocks.att.{key}"][i]
    out[f"{b}att.r_k"] = p["blocks.att.r_k"][i]
    for key in LINEAR_KEYS:
      out[f"{b}att.{key}.weight"] = p[f"blocks.att.{key}"][i].T
    out[f"{b}att.ln_x.weight"] = p["blocks.att.ln_x_weight"][i]
    out[f"{b}att.ln_x.bias"] = p["blocks.att.ln_x_bias"][i]
    out[f"{b}ffn.x_k"] = vec(p["blocks.ffn.x_k"][i])
    out[f"{b}ffn.key.weight"] = p["blocks.ffn.key"][i].T
    out[f"{b}ffn.value.weight"] = p["blocks.ffn.value"][i].T
  out["ln_out.weight"] = p["ln_out.weight"]
  out["ln_out.bias"] = p["ln_out.bias"]
  out["head.weight"] = p["head"].T
  return {k: np.ascontiguousarray(v) for k, v in out.items()}
