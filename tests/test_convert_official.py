"""Official x070 state dicts read from .pth files: what is accepted, and clear rejections."""
import ml_dtypes
import numpy as np
import pytest

from goosejax.config import ModelConfig
from goosejax.convert.official import (VECTOR_KEYS, CheckpointFormatError,
                                       expected_official_shapes, official_to_params,
                                       params_to_official)
from goosejax.convert.pth import read_pth, write_pth

CFG = ModelConfig(vocab_size=77, n_layer=3, n_embd=128, head_size=64, dim_ffn=256,
                  decay_lora=16, iclr_lora=24, value_lora=8, gate_lora=40)


def official_state_dict(cfg=CFG, *, layer0_value_lora=True, vectors="1x1xC", seed=0):
  rng = np.random.default_rng(seed)
  sd = {}
  for key, shape in expected_official_shapes(cfg).items():
    value = rng.standard_normal(shape).astype(np.float32)
    if vectors == "1x1xC" and (key.rsplit(".", 1)[-1] in VECTOR_KEYS or key.endswith("ffn.x_k")):
      value = value.reshape(1, 1, -1)       # as RWKV-LM writes them
    sd[key] = value
  if not layer0_value_lora:
    for key in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"):
      del sd[key]
  return sd


def load(tmp_path, state_dict, name="model.pth"):
  path = tmp_path / name
  write_pth(path, state_dict)
  return official_to_params(read_pth(path), str(path))


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
@pytest.mark.parametrize("layer0_value_lora", [True, False])
@pytest.mark.parametrize("vectors", ["1x1xC", "C"])
def test_accepted_variants_infer_every_size_and_agree(tmp_path, dtype, layer0_value_lora, vectors):
  sd = official_state_dict(layer0_value_lora=layer0_value_lora, vectors=vectors)
  cfg, params = load(tmp_path, {k: v.astype(dtype) for k, v in sd.items()})
  assert (cfg.vocab_size, cfg.n_layer, cfg.n_embd, cfg.head_size, cfg.ffn_dim) == (77, 3, 128, 64, 256)
  assert cfg.lora_ranks == (16, 24, 8, 40)
  assert all(v.dtype == np.float32 for v in params.values())
  reference_cfg, reference = official_to_params(official_state_dict(), "reference")
  assert cfg == reference_cfg
  for name, value in reference.items():
    if name in ("blocks.att.v0", "blocks.att.v1", "blocks.att.v2") and not layer0_value_lora:
      value = value[1:]     # layer 0's are unused: filled with zeros when absent
      assert not params[name][0].any()
      params_value = params[name][1:]
    else:
      params_value = params[name]
    np.testing.assert_array_equal(params_value, value.astype(dtype).astype(np.float32), err_msg=name)


def test_round_trip_to_official_is_exact_in_both_layouts():
  sd = official_state_dict()
  cfg, params = official_to_params(sd)
  for vectors_as_1x1xC in (True, False):
    back = params_to_official(params, cfg, vectors_as_1x1xC=vectors_as_1x1xC)
    assert set(back) == set(sd)
    for key, value in sd.items():
      assert back[key].size == value.size, key
      np.testing.assert_array_equal(back[key].reshape(value.shape), value, err_msg=key)
  without = params_to_official(params, cfg, include_layer0_value_lora=False)
  assert "blocks.0.att.v0" not in without and "blocks.1.att.v0" in without


def test_files_are_written_embedding_first_then_layer_by_layer():
  cfg, params = official_to_params(official_state_dict())
  keys = list(params_to_official(params, cfg))
  assert keys[:3] == ["emb.weight", "blocks.0.ln0.weight", "blocks.0.ln0.bias"]
  assert keys[-3:] == ["ln_out.weight", "ln_out.bias", "head.weight"]
  layers = [int(key.split(".")[1]) for key in keys if key.startswith("blocks.")]
  assert layers == sorted(layers)
  layer1 = [key[len("blocks.1."):] for key in keys if key.startswith("blocks.1.")]
  assert layer1[:3] == ["ln1.weight", "ln1.bias", "ln2.weight"]
  assert layer1[-4:] == ["att.ln_x.bias", "ffn.x_k", "ffn.key.weight", "ffn.value.weight"]


def _with(sd, **changes):
  """A copy of `sd` with keys set (or removed, for None)."""
  sd = dict(sd)
  for key, value in changes.items():
    if value is None:
      del sd[key]
    else:
      sd[key] = value
  return sd


@pytest.mark.parametrize("edit, message", [
    (lambda sd: _with(sd, **{"blocks.1.ffn.s_emb.weight": np.zeros((77, 32), np.float32)}),
     r"not an RWKV-7 x070 checkpoint: found RWKV-7a 'DeepEmbed' \(rwkv7a\) keys, e\.g\. 'blocks\.1\.ffn\.s_emb\.weight'"),
    (lambda sd: _with(sd, **{"blocks.0.att.time_decay": np.zeros(128, np.float32),
                             "blocks.0.att.time_faaaa": np.zeros((2, 64), np.float32)}),
     r"found RWKV-4/5/6 or pre-release x070 names .*'blocks\.0\.att\.time_decay'"),
    (lambda sd: _with(sd, **{"blocks.2.ffn.receptance.weight": np.zeros((128, 128), np.float32)}),
     r"found a channel-mix receptance \(RWKV-4/5/6, removed in RWKV-7\)"),
    (lambda sd: _with(sd, **{"blocks.1.att.k_a": None}),
     r"missing 1 key\(s\) of an x070 checkpoint: \['blocks\.1\.att\.k_a'\]"),
    (lambda sd: _with(sd, **{"head.weight": None}), r"missing 1 key\(s\).*\['head\.weight'\]"),
    (lambda sd: _with(sd, **{"blocks.0.att.r_k": None}), r"missing key 'blocks\.0\.att\.r_k'"),
    (lambda sd: _with(sd, **{"blocks.2.att.w1": np.zeros((128, 17), np.float32)}),
     r"key 'blocks\.2\.att\.w1' has shape \(128, 17\), expected \(128, 16\)"),
    (lambda sd: _with(sd, **{"blocks.1.att.x_r": np.zeros((1, 1, 64), np.float32)}),
     r"key 'blocks\.1\.att\.x_r' has shape \(1, 1, 64\), expected \(128,\)"),
    (lambda sd: _with(sd, **{"blocks.1.att.extra": np.zeros(3, np.float32)}),
     r"unexpected key\(s\) for an x070 checkpoint: \['blocks\.1\.att\.extra'\]"),
    (lambda sd: {k.replace("blocks.2.", "blocks.4."): v for k, v in sd.items()},
     r"layer indices are not contiguous from 0: found \[0, 1, 4\]"),
    (lambda sd: _with(sd, **{"blocks.0.att.r_k": np.zeros((3, 64), np.float32)}),
     r"blocks\.0\.att\.r_k has shape \(3, 64\) but emb\.weight has C=128; expected H\*N == C"),
])
def test_rejections_say_what_was_found_and_what_was_expected(tmp_path, edit, message):
  with pytest.raises(CheckpointFormatError, match=message) as info:
    load(tmp_path, edit(official_state_dict()))
  assert str(tmp_path / "model.pth") in str(info.value)


def test_an_empty_or_foreign_dict_is_rejected(tmp_path):
  with pytest.raises(CheckpointFormatError, match=r"missing key 'emb\.weight'"):
    load(tmp_path, {"weight": np.zeros(3, np.float32)})
