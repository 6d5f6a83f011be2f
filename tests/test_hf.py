"""Hugging Face / FLA safetensors + config.json: round trips, FLA names, interop, errors."""
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from goosejax.convert.hf_checkpoint import (CheckpointFormatError, load_hf, read_safetensors, save_hf,
                                 state_from_fla, state_to_fla, write_safetensors)
from goosejax.convert.official import official_to_params
from goosejax.model import RWKV7
from goosejax.model.params import load_param_dict

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
from make_generate_fixtures import random_checkpoint  # noqa: E402

SMALL = dict(seed=5, n_layer=2, n_embd=128, vocab_size=80, lora=(32, 32, 32, 64))


@pytest.fixture(scope="module")
def checkpoint():
  return official_to_params(random_checkpoint(**SMALL))


@pytest.fixture(scope="module")
def hf_dir(checkpoint, tmp_path_factory):
  path = tmp_path_factory.mktemp("hf") / "model"
  cfg, params = checkpoint
  save_hf(params, cfg, path)
  return path


def _model(cfg, params):
  model = nnx.eval_shape(lambda: RWKV7(cfg, rngs=nnx.Rngs(0)))
  load_param_dict(model, params)
  return model


def test_round_trip_is_bit_exact_and_keeps_logits(checkpoint, hf_dir):
  cfg, params = checkpoint
  cfg2, params2 = load_hf(hf_dir)
  assert cfg2 == cfg
  assert sorted(params2) == sorted(params)
  for name, value in params.items():
    assert params2[name].dtype == np.float32 and np.array_equal(params2[name], value), name
  graphdef, state = nnx.split(_model(cfg, params))
  _, state2 = nnx.split(_model(cfg2, params2))
  forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens)[0])
  tokens = jnp.asarray([[0, 5, 79, 3, 3, 1]])
  assert np.array_equal(np.asarray(forward(state, tokens)), np.asarray(forward(state2, tokens)))


def test_files_use_fla_names_shapes_and_config(checkpoint, hf_dir):
  cfg, _ = checkpoint
  C, V, F = cfg.n_embd, cfg.vocab_size, cfg.ffn_dim
  d_w, d_a, d_v, d_g = cfg.lora_ranks
  tensors = safetensors.numpy.load_file(hf_dir / "model.safetensors")
  expected = {
      "model.embeddings.weight": (V, C), "lm_head.weight": (V, C), "model.norm.weight": (C,),
      "model.layers.0.pre_norm.bias": (C,), "model.layers.1.attn_norm.weight": (C,),
      "model.layers.0.attn.x_r": (1, 1, C), "model.layers.1.attn.x_g": (1, 1, C),
      "model.layers.0.attn.k_k": (C,), "model.layers.0.attn.r_k": (C // 64, 64),
      "model.layers.0.attn.w_lora.lora.0.weight": (d_w, C),
      "model.layers.0.attn.w_lora.lora.2.weight": (C, d_w),
      "model.layers.0.attn.w_lora.lora.2.bias": (C,), "model.layers.1.attn.a_lora.lora.0.weight": (d_a, C),
      "model.layers.1.attn.v_lora.lora.2.bias": (C,), "model.layers.1.attn.v_lora.lora.0.weight": (d_v, C),
      "model.layers.1.attn.g_lora.lora.2.weight": (C, d_g), "model.layers.0.attn.r_proj.weight": (C, C),
      "model.layers.0.attn.o_proj.weight": (C, C), "model.layers.0.attn.g_norm.bias": (C,),
      "model.layers.0.ffn.x_k": (C,), "model.layers.0.ffn.key.weight": (F, C),
      "model.layers.0.ffn.value.weight": (C, F)}
  for name, shape in expected.items():
    assert tensors[name].shape == shape, name
  assert not any(k.startswith("model.layers.0.attn.v_lora") for k in tensors)
  assert "model.layers.1.pre_norm.weight" not in tensors
  assert "model.layers.1.attn.g_lora.lora.2.bias" not in tensors
  params_key = official_to_params(random_checkpoint(**SMALL))[1]["blocks.att.w1"][0]
  np.testing.assert_array_equal(tensors["model.layers.0.attn.w_lora.lora.0.weight"], params_key.T)
  config = json.loads((hf_dir / "config.json").read_text())
  assert config["model_type"] == "rwkv7" and config["architectures"] == ["RWKV7ForCausalLM"]
  assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (C, 2, V)
  assert (config["decay_low_rank_dim"], config["a_low_rank_dim"], config["v_low_rank_dim"],
          config["gate_low_rank_dim"], config["intermediate_size"]) == (d_w, d_a, d_v, d_g, F)
  with open(hf_dir / "model.safetensors", "rb") as f:
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
  assert header["__metadata__"] == {"format": "pt"}   # transformers refuses files without it


def test_safetensors_interop_with_the_reference_library(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32),
             "b": rng.standard_normal(7).astype(ml_dtypes.bfloat16),
             "c": np.arange(6, dtype=np.int64).reshape(2, 3), "d": np.zeros((0, 4), np.float16)}
  write_safetensors(tmp_path / "ours.safetensors", tensors)
  theirs = safetensors.numpy.load_file(tmp_path / "ours.safetensors")
  safetensors.numpy.save_file(tensors, tmp_path / "theirs.safetensors")
  ours = read_safetensors(tmp_path / "theirs.safetensors")
  for name, value in tensors.items():
    for loaded in (theirs[name], ours[name]):
      assert loaded.dtype == value.dtype and np.array_equal(loaded, value), name


def test_bfloat16_export_and_sharded_read(checkpoint, tmp_path):
  cfg, params = checkpoint
  save_hf(params, cfg, tmp_path / "bf16", dtype="bfloat16")
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
  _, params_bf16 = load_hf(tmp_path / "bf16")
  for name, value in params.items():
    assert np.array_equal(params_bf16[name], value.astype(ml_dtypes.bfloat16).astype(np.float32)), name
  # Split the fp32 file into two shards with an index, as save_pretrained does for big models.
  tensors = read_safetensors(tmp_path / "bf16" / "model.safetensors")
  sharded = tmp_path / "sharded"
  sharded.mkdir()
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  for file, keys in shards.items():
    write_safetensors(sharded / file, {k: tensors[k] for k in keys}, {"format": "pt"})
  (sharded / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}))
  (sharded / "config.json").write_text((tmp_path / "bf16" / "config.json").read_text())
  _, params_sharded = load_hf(sharded)
  assert all(np.array_equal(params_sharded[k], params_bf16[k]) for k in params)


def test_old_stacked_token_shift_mixes_are_migrated(checkpoint, hf_dir, tmp_path):
  tensors = dict(read_safetensors(hf_dir / "model.safetensors"))
  for layer in range(2):
    p = f"model.layers.{layer}.attn."
    tensors[p + "x_x"] = np.stack([tensors.pop(p + f"x_{m}").reshape(-1) for m in "rwkvag"])
  (tmp_path / "old").mkdir()
  write_safetensors(tmp_path / "old" / "model.safetensors", tensors)
  (tmp_path / "old" / "config.json").write_text((hf_dir / "config.json").read_text())
  _, params = load_hf(tmp_path / "old")
  assert np.array_equal(params["blocks.att.x_a"], checkpoint[1]["blocks.att.x_a"])


def _edited(hf_dir, tmp_path, edit_tensors=None, edit_config=None):
  tensors = dict(read_safetensors(hf_dir / "model.safetensors"))
  config = json.loads((hf_dir / "config.json").read_text())
  if edit_tensors:
    edit_tensors(tensors)
  if edit_config:
    edit_config(config)
  out = tmp_path / "edited"
  out.mkdir()
  write_safetensors(out / "model.safetensors", tensors)
  (out / "config.json").write_text(json.dumps(config))
  return out


@pytest.mark.parametrize("edit_tensors, edit_config, message", [
    (lambda t: t.pop("model.layers.1.attn.k_proj.weight"), None,
     r"model\.safetensors: missing 1 key\(s\) .*\['model\.layers\.1\.attn\.k_proj\.weight'\]"),
    (lambda t: t.pop("model.layers.0.attn.r_k"), None, r"missing key 'model\.layers\.0\.attn\.r_k'"),
    (lambda t: t.pop("model.layers.0.attn.w_lora.lora.0.weight"), None,
     r"missing key 'model\.layers\.0\.attn\.w_lora\.lora\.0\.weight'"),
    (lambda t: t.pop("model.layers.1.attn.v_lora.lora.2.bias"), None,
     r"\['model\.layers\.1\.attn\.v_lora\.lora\.2\.bias'\]"),
    (lambda t: t.update({"model.layers.1.attn.q_proj.weight": np.zeros((2, 2), np.float32)}), None,
     "q_proj.weight.*hybrid attention"),
    (lambda t: t.pop("model.layers.0.pre_norm.weight"), None, "pre_norm"),
    (lambda t: t.update({"model.layers.1.pre_norm.weight": np.ones(128, np.float32)}), None,
     r"unexpected tensor 'model\.layers\.1\.pre_norm\.weight'"),
    (None, lambda c: c.update(model_type="llama"), "model_type='llama'"),
    (None, lambda c: c.update(hidden_size=256), "hidden_size=256 but the tensors give 128"),
    (None, lambda c: c.update(attn={"layers": [1], "num_heads": 2}), "hybrid attention layers"),
    (None, lambda c: c.update(norm_eps=1e-6), "norm_eps=1e-06"),
])
def test_bad_checkpoints_are_named(hf_dir, tmp_path, edit_tensors, edit_config, message):
  with pytest.raises(CheckpointFormatError, match=message):
    load_hf(_edited(hf_dir, tmp_path, edit_tensors, edit_config))


def test_truncated_and_missing_files(hf_dir, tmp_path):
  (tmp_path / "cut").mkdir()
  data = (hf_dir / "model.safetensors").read_bytes()
  (tmp_path / "cut" / "model.safetensors").write_bytes(data[:len(data) // 2])
  (tmp_path / "cut" / "config.json").write_text((hf_dir / "config.json").read_text())
  with pytest.raises(CheckpointFormatError, match="byte range"):
    load_hf(tmp_path / "cut")
  with pytest.raises(CheckpointFormatError, match="expected a Hugging Face model directory"):
    load_hf(tmp_path / "nothing-here")


def test_fla_state_layout_is_the_transpose():
  rng = np.random.default_rng(1)
  L, B, H, N, C = 2, 3, 2, 64, 128
  state = (rng.standard_normal((L, B, C)).astype(np.float32),
           rng.standard_normal((L, B, H, N, N)).astype(np.float32),
           rng.standard_normal((L, B, C)).astype(np.float32))
  fla = state_to_fla(state)
  r = rng.standard_normal((B, H, N)).astype(np.float32)
  # Both layouts give the same readout y = S r: official sums over the key (last) axis,
  # FLA over its key (first) axis.
  ours = np.einsum("bhvk,bhk->bhv", state[1][0], r)
  theirs = np.einsum("bhkv,bhk->bhv", fla[0]["recurrent_state"], r)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
  back = state_from_fla(fla)
  assert all(np.array_equal(a, b) for a, b in zip(back, state))


def test_convert_cli_to_and_from_hf(checkpoint, tmp_path, capsys):
  from goosejax import cli
  from goosejax.convert.official import params_to_official
  from goosejax.convert.pth import read_pth, write_pth

  cfg, params = checkpoint
  official = params_to_official(params, cfg)
  write_pth(tmp_path / "model.pth", official)
  assert cli.main(["convert", str(tmp_path / "model.pth"), str(tmp_path / "hf"), "--to", "hf"]) == 0
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["hidden_size"] == cfg.n_embd
  assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "back.pth")]) == 0
  back = read_pth(tmp_path / "back.pth")
  assert sorted(back) == sorted(official)
  assert all(np.array_equal(back[k], official[k]) for k in official)
  assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "hf")]) == 2   # exists, no --force
  (tmp_path / "plain").mkdir()
  assert cli.main(["convert", str(tmp_path / "model.pth"), str(tmp_path / "plain"), "--to", "hf",
                   "--force"]) == 2
  assert "not a Hugging Face model directory" in capsys.readouterr().err
  assert cli.main(["convert", str(tmp_path / "model.pth"), str(tmp_path / "hf"), "--to", "hf",
                   "--force", "--dtype", "bfloat16"]) == 0
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
  assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_missing_tensor_reaches_the_cli_as_one_line_naming_file_and_tensor(hf_dir, tmp_path, capsys):
  from goosejax import cli
  edited = _edited(hf_dir, tmp_path, lambda t: t.pop("model.layers.1.ffn.value.weight"))
  assert cli.main(["convert", str(edited), str(tmp_path / "out.pth")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and str(edited / "model.safetensors") in err, err
  assert "'model.layers.1.ffn.value.weight'" in err and "blocks." not in err, err
  assert not (tmp_path / "out.pth").exists()


def test_every_entry_point_reads_hf_directories(checkpoint, hf_dir):
  import goosejax
  from goosejax.checkpoint.pretrained import read_params, source_kind
  from goosejax.model.params import param_dict

  cfg, params = checkpoint
  assert source_kind(hf_dir) == "hf"
  cfg2, params2, facts = read_params(hf_dir)        # what training's --init-from calls
  assert cfg2 == cfg and facts["kind"] == "hf"
  assert all(np.array_equal(params2[k], v) for k, v in params.items())
  model = goosejax.load_pretrained(hf_dir, "bfloat16", param_dtype="float32")
  assert model.config.dtype == "bfloat16" and model.config.n_layer == cfg.n_layer
  loaded = param_dict(model)
  assert sorted(loaded) == sorted(params)
  assert all(np.array_equal(np.asarray(loaded[k]), v) for k, v in params.items())


def test_hf_directories_without_safetensors_and_bare_safetensors_files(hf_dir, tmp_path):
  import goosejax
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "config.json").write_text((hf_dir / "config.json").read_text())
  (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(CheckpointFormatError, match=r"no model\.safetensors .*not pytorch_model\.bin"):
    goosejax.load_pretrained(tmp_path / "bin")
  with pytest.raises(CheckpointFormatError, match=r"model\.safetensors: a bare safetensors file; "
                                                  r"pass the Hugging Face model directory"):
    goosejax.load_pretrained(hf_dir / "model.safetensors")
