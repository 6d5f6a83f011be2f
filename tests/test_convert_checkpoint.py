"""The goosejax checkpoint directory and `load_pretrained` over every accepted source."""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import goosejax
from goosejax.checkpoint import format as checkpoint_format
from goosejax.checkpoint.format import CheckpointError
from goosejax.config import ModelConfig
from goosejax.convert.official import (CheckpointFormatError, expected_official_shapes,
                                       official_to_params)
from goosejax.convert.pth import write_pth

CFG = ModelConfig(vocab_size=70, n_layer=2, n_embd=64, head_size=64, dim_ffn=128,
                  decay_lora=8, iclr_lora=8, value_lora=8, gate_lora=16)


def official_state_dict(seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return {k: (rng.standard_normal(s) * 0.3).astype(dtype)
          for k, s in expected_official_shapes(CFG).items()}


def params(seed=0):
  return official_to_params(official_state_dict(seed))[1]


def assert_same_params(a, b):
  assert set(a) == set(b)
  for name in a:
    assert np.asarray(a[name]).dtype == np.asarray(b[name]).dtype, name
    np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)


# ----------------------------------------------------------------------------- directory format


def test_save_and_load_round_trip_with_documented_layout(tmp_path):
  target = tmp_path / "ckpt"
  p = params()
  assert checkpoint_format.save_checkpoint(target, p, CFG, step=7, metadata={"note": "x"}) == target
  assert sorted(x.name for x in target.iterdir()) == ["config.json", "params"]
  document = json.loads((target / "config.json").read_text())
  assert document["format"] == "goosejax-checkpoint" and document["format_version"] == 1
  assert document["model"] == dataclasses.asdict(CFG) and document["step"] == 7
  info, loaded = checkpoint_format.load_checkpoint(target)
  assert info.model == CFG and info.step == 7 and info.metadata == {"note": "x"}
  assert_same_params(loaded, p)
  nested = checkpoint_format.restore_item(target)
  assert set(nested) == {"emb", "head", "ln0", "ln_out", "blocks"}
  assert nested["blocks"]["att"]["w1"].shape == (2, 64, 8)    # stacked [L, ...]
  assert [x.name for x in tmp_path.iterdir()] == ["ckpt"]     # no temp folder left


def test_nested_params_and_bf16_are_stored_as_given(tmp_path):
  p = {k: v.astype(ml_dtypes.bfloat16) for k, v in params().items()}
  cfg = dataclasses.replace(CFG, param_dtype="bfloat16")
  checkpoint_format.save_checkpoint(tmp_path / "c", checkpoint_format.nest_params(p), cfg)
  info, loaded = checkpoint_format.load_checkpoint(tmp_path / "c")
  assert info.model.param_dtype == "bfloat16"
  assert_same_params(loaded, p)


def test_existing_directory_is_refused_unless_overwrite(tmp_path):
  target = tmp_path / "c"
  checkpoint_format.save_checkpoint(target, params(0), CFG)
  with pytest.raises(CheckpointError, match=r"already exists; pass overwrite=True"):
    checkpoint_format.save_checkpoint(target, params(1), CFG)
  checkpoint_format.save_checkpoint(target, params(1), CFG, overwrite=True)
  assert_same_params(checkpoint_format.load_checkpoint(target)[1], params(1))
  assert sorted(x.name for x in tmp_path.iterdir()) == ["c"]


def test_unsavable_leaves_are_rejected_before_anything_is_written(tmp_path):
  with pytest.raises(TypeError, match=r"item 'bad' has a object at \['x'\]; expected arrays or numbers"):
    checkpoint_format.save_checkpoint(tmp_path / "c", params(), CFG, extra_items={"bad": {"x": object()}})
  assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_nothing_and_stale_temp_is_cleared(tmp_path, monkeypatch):
  target = tmp_path / "c"
  real_save = checkpoint_format._save_item

  def fail_on_second_item(path, tree):
    if path.name == "opt_state":
      raise OSError("disk full (simulated)")
    real_save(path, tree)

  monkeypatch.setattr(checkpoint_format, "_save_item", fail_on_second_item)
  with pytest.raises(OSError, match="simulated"):
    checkpoint_format.save_checkpoint(target, params(), CFG, extra_items={"opt_state": {"m": np.ones(2)}})
  assert list(tmp_path.iterdir()) == []
  monkeypatch.undo()
  (tmp_path / ".c.tmp").mkdir()                   # as a crash would leave it
  (tmp_path / ".c.tmp" / "junk").write_text("x")
  checkpoint_format.save_checkpoint(target, params(), CFG)
  assert sorted(x.name for x in tmp_path.iterdir()) == ["c"]


def test_extra_items_restore_and_target_restore(tmp_path):
  opt_state = {"mu": np.arange(6, dtype=np.float32).reshape(2, 3), "count": np.array(3, np.int32)}
  checkpoint_format.save_checkpoint(tmp_path / "c", params(), CFG, step=5, extra_items={"opt_state": opt_state})
  restored = checkpoint_format.restore_item(tmp_path / "c", "opt_state")
  np.testing.assert_array_equal(restored["mu"], opt_state["mu"])
  device = jax.devices()[0]
  target = {"mu": jax.ShapeDtypeStruct((2, 3), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(device)),
            "count": jax.ShapeDtypeStruct((), jnp.int32, sharding=jax.sharding.SingleDeviceSharding(device))}
  on_device = checkpoint_format.restore_item(tmp_path / "c", "opt_state", target)
  assert isinstance(on_device["mu"], jax.Array) and on_device["mu"].sharding.device_set == {device}
  np.testing.assert_array_equal(np.asarray(on_device["mu"]), opt_state["mu"])
  with pytest.raises(CheckpointError, match=r"has no item 'ema'"):
    checkpoint_format.restore_item(tmp_path / "c", "ema")


def test_run_directory_resolves_to_the_latest_complete_step(tmp_path):
  run = tmp_path / "run"
  for step in (10, 200, 30):
    checkpoint_format.save_checkpoint(checkpoint_format.step_directory(run, step), params(step), CFG, step=step)
  (run / "checkpoints" / "300").mkdir()               # incomplete: no config.json
  (run / "checkpoints" / ".400.tmp").mkdir()          # a save in progress
  (run / "checkpoints" / "notes").mkdir()
  assert checkpoint_format.checkpoint_steps(run) == [10, 30, 200]
  assert checkpoint_format.resolve_checkpoint(run) == run / "checkpoints" / "200"
  info, loaded = checkpoint_format.load_checkpoint(run)
  assert info.step == 200
  assert_same_params(loaded, params(200))


def test_checkpoint_manager_steps_with_meta_item_load_the_same_way(tmp_path):
  """A run saved by an Orbax CheckpointManager: items params/ (flat dotted names) and meta/."""
  import orbax.checkpoint as ocp
  run = tmp_path / "run"
  flat = params(5)
  with ocp.CheckpointManager((run / "checkpoints").absolute(), item_names=("params", "meta")) as manager:
    for step in (3, 5):
      meta = {"format_version": 1, "step": step, "model": dataclasses.asdict(CFG), "loss": 2.5}
      manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(flat),
                                                 meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()
  assert checkpoint_format.checkpoint_steps(run) == [3, 5]
  info, loaded = checkpoint_format.load_checkpoint(run)
  assert info.step == 5 and info.model == CFG and info.metadata == {"loss": 2.5}
  assert_same_params(loaded, flat)
  meta_file = run / "checkpoints" / "5" / "meta" / "metadata"
  meta_file.write_text(json.dumps({"format_version": 9, "step": 5, "model": dataclasses.asdict(CFG)}))
  with pytest.raises(CheckpointError, match=r"meta/metadata: format_version 9 is not supported"):
    checkpoint_format.load_checkpoint(run)


@pytest.mark.parametrize("setup, message", [
    (lambda p: p / "missing", r"not a directory, so neither a goosejax checkpoint nor a run directory"),
    (lambda p: p.mkdir() or p, r"not a goosejax checkpoint \(expected config\.json and params/\) nor a "
                               r"run directory"),
    (lambda p: (p / "checkpoints" / "12").mkdir(parents=True) or p,
     r"run directory without a complete checkpoint"),
])
def test_paths_that_are_not_checkpoints(tmp_path, setup, message):
  with pytest.raises(CheckpointError, match=message):
    checkpoint_format.resolve_checkpoint(setup(tmp_path / "x"))


@pytest.mark.parametrize("edit, message", [
    (lambda d: "{not json", r"config\.json: not valid JSON"),
    (lambda d: json.dumps({**d, "format": "other"}), r"expected \"format\": \"goosejax-checkpoint\""),
    (lambda d: json.dumps({**d, "format_version": 2}), r"format_version 2 is not supported"),
    (lambda d: json.dumps({**d, "model": {**d["model"], "n_embd": 100}}),
     r"invalid model config: model\.n_embd=100 is not divisible by model\.head_size=64"),
    (lambda d: json.dumps({**d, "model": {**d["model"], "layers": 3}}),
     r"invalid model config: unknown config key 'model\.layers'"),
    (lambda d: json.dumps({**d, "step": "7"}), r"\"step\" must be an integer or null"),
])
def test_bad_config_json_is_rejected_with_the_file_named(tmp_path, edit, message):
  target = tmp_path / "c"
  checkpoint_format.save_checkpoint(target, params(), CFG)
  document = json.loads((target / "config.json").read_text())
  (target / "config.json").write_text(edit(document))
  with pytest.raises(CheckpointError, match=message) as info:
    checkpoint_format.load_checkpoint(target)
  assert str(target / "config.json") in str(info.value)


def test_nest_and_flatten_are_inverse_and_reject_clashes():
  flat = {"a.b.c": 1, "a.d": 2, "e": 3}
  assert checkpoint_format.nest_params(flat) == {"a": {"b": {"c": 1}, "d": 2}, "e": 3}
  assert checkpoint_format.flatten_params(checkpoint_format.nest_params(flat)) == flat
  with pytest.raises(ValueError, match="nests below another parameter"):
    checkpoint_format.nest_params({"a": 1, "a.b": 2})


# ----------------------------------------------------------------------------- load_pretrained


TOKENS = jnp.asarray([[1, 5, 0, 69, 7, 3]], jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, tokens_BT):
  return nnx.merge(graphdef, state)(tokens_BT)[0]


def logits(model):
  """One compile for every model of the same config."""
  return np.asarray(_logits(*nnx.split(model), TOKENS))


def test_load_pretrained_gives_the_same_model_from_pth_checkpoint_and_run(tmp_path):
  sd = official_state_dict(seed=3, dtype=ml_dtypes.bfloat16)
  pth = tmp_path / "m.pth"
  write_pth(pth, sd)
  from_pth = goosejax.load_pretrained(pth)
  assert from_pth.config.vocab_size == 70 and from_pth.config.lora_ranks == (8, 8, 8, 16)
  _, p = official_to_params(sd)
  checkpoint_format.save_checkpoint(tmp_path / "ckpt", p, from_pth.config)
  checkpoint_format.save_checkpoint(checkpoint_format.step_directory(tmp_path / "run", 4), p, from_pth.config, step=4)
  reference = logits(from_pth)
  assert np.isfinite(reference).all() and reference.std() > 0
  for source in (tmp_path / "ckpt", tmp_path / "run"):
    np.testing.assert_array_equal(logits(goosejax.load_pretrained(source)), reference, err_msg=str(source))


def test_load_pretrained_dtypes(tmp_path):
  pth = tmp_path / "m.pth"
  write_pth(pth, official_state_dict(seed=4))
  model = goosejax.load_pretrained(pth, dtype=jnp.bfloat16)
  assert model.config.dtype == "bfloat16" and model.config.param_dtype == "bfloat16"
  assert model.emb[...].dtype == jnp.bfloat16
  mixed = goosejax.load_pretrained(pth, "bfloat16", param_dtype="float32", wkv_impl="reference")
  assert mixed.head[...].dtype == jnp.float32 and mixed.config.wkv_impl == "reference"
  with pytest.raises(ValueError, match=r"dtype='float16'; expected one of \['float32', 'bfloat16'\]"):
    goosejax.load_pretrained(pth, dtype="float16")


def test_load_pretrained_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nothing\.pth: no such file or directory; expected an "
                                              r"official RWKV-7 \.pth file"):
    goosejax.load_pretrained(tmp_path / "nothing.pth")
  text = tmp_path / "notes.txt"
  text.write_text("not a model")
  with pytest.raises(CheckpointFormatError, match=r"notes\.txt: not a PyTorch \.pth file"):
    goosejax.load_pretrained(text)
  with pytest.raises(CheckpointError, match=r"not a goosejax checkpoint"):
    goosejax.load_pretrained(tmp_path)
  pth = tmp_path / "rwkv6.pth"
  write_pth(pth, {**official_state_dict(), "blocks.0.att.time_maa_x": np.zeros((1, 1, 64), np.float32)})
  with pytest.raises(CheckpointFormatError, match=r"RWKV-4/5/6 or pre-release x070 names"):
    goosejax.load_pretrained(pth)


def test_checkpoint_whose_params_do_not_fit_its_config(tmp_path):
  p = params()
  p["blocks.att.w1"] = p["blocks.att.w1"][:, :, :4]
  checkpoint_format.save_checkpoint(tmp_path / "c", p, CFG)
  with pytest.raises(CheckpointError, match=r"parameters do not fit the model config: parameter "
                                            r"'blocks\.att\.w1' has shape \(2, 64, 4\)"):
    goosejax.load_pretrained(tmp_path / "c")
