"""`goosejax convert`: both directions, overwrite rules, failures leave nothing behind."""
import dataclasses
import json

import ml_dtypes
import numpy as np
import pytest

from goosejax import cli
from goosejax.checkpoint import format as checkpoint_format
from goosejax.config import ModelConfig
from goosejax.convert import pth
from goosejax.convert.hf_checkpoint import HFExportError, save_hf
from goosejax.convert.official import expected_official_shapes, official_to_params
from goosejax.convert.pth import read_pth, write_pth

CFG = ModelConfig(vocab_size=50, n_layer=2, n_embd=64, head_size=64, dim_ffn=128,
                  decay_lora=8, iclr_lora=8, value_lora=8, gate_lora=16)


@pytest.fixture
def official(tmp_path):
  """An official-layout bf16 .pth (vectors [1,1,C], layer-0 v0..v2 present)."""
  rng = np.random.default_rng(0)
  sd = {}
  for key, shape in expected_official_shapes(CFG).items():
    value = rng.standard_normal(shape).astype(ml_dtypes.bfloat16)
    sd[key] = value.reshape(1, 1, -1) if len(shape) == 1 and ".att.x_" in key else value
  path = tmp_path / "model.pth"
  write_pth(path, sd)
  return path, sd


def convert(*args) -> int:
  return cli.main(["convert", *map(str, args)])


def test_official_to_goosejax_and_back_is_exact(tmp_path, official, capsys):
  src, sd = official
  assert convert(src, tmp_path / "ckpt") == 0
  out = capsys.readouterr().out
  assert "reading" in out and "L=2 C=64 H=1x64 V=50 F=128 LoRA w/a/v/g=8/8/8/16" in out
  assert "stored dtypes: {'bfloat16':" in out and "layer-0 v0/v1/v2 present" in out
  assert "done:" in out and "goosejax, float32" in out
  info = checkpoint_format.read_info(tmp_path / "ckpt")
  assert info.model.vocab_size == 50 and info.model.param_dtype == "float32"
  assert info.metadata["converted_from"] == str(src.resolve())

  assert convert(tmp_path / "ckpt", tmp_path / "back.pth", "--dtype", "bfloat16") == 0
  back = read_pth(tmp_path / "back.pth")
  assert set(back) == set(sd)
  for key, value in sd.items():
    assert back[key].dtype == ml_dtypes.bfloat16, key
    np.testing.assert_array_equal(back[key].reshape(value.shape), value, err_msg=key)


def test_official_output_options(tmp_path, official):
  src, _ = official
  assert convert(src, tmp_path / "a.pth", "--to", "official", "--vectors", "C",
                 "--no-layer0-value-lora") == 0
  out = read_pth(tmp_path / "a.pth")
  assert out["blocks.1.att.x_r"].shape == (64,) and "blocks.0.att.v0" not in out
  assert out["blocks.1.att.v0"].dtype == np.float32       # default: the source's param dtype
  assert convert(src, tmp_path / "b.pth", "--to", "official", "--dtype", "float16") == 0
  assert read_pth(tmp_path / "b.pth")["emb.weight"].dtype == np.float16


def test_goosejax_bf16_checkpoint_and_run_directory_source(tmp_path, official):
  src, _ = official
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  assert convert(src, tmp_path / "run" / "checkpoints" / "12", "--dtype", "bfloat16") == 0
  info, params = checkpoint_format.load_checkpoint(tmp_path / "run")
  assert info.model.param_dtype == "bfloat16" and params["emb"].dtype == ml_dtypes.bfloat16
  assert convert(tmp_path / "run", tmp_path / "out.pth") == 0
  assert read_pth(tmp_path / "out.pth")["emb.weight"].dtype == ml_dtypes.bfloat16


def test_refuses_to_overwrite_without_force(tmp_path, official, capsys):
  src, _ = official
  (tmp_path / "taken.pth").write_text("keep me")
  assert convert(src, tmp_path / "taken.pth", "--to", "official") == 2
  assert "already exists; pass --force to replace it" in capsys.readouterr().err
  assert (tmp_path / "taken.pth").read_text() == "keep me"
  assert convert(src, tmp_path / "taken.pth", "--to", "official", "--force") == 0
  assert "emb.weight" in read_pth(tmp_path / "taken.pth")

  assert convert(src, tmp_path / "ckpt") == 0
  assert convert(src, tmp_path / "ckpt") == 2
  assert convert(src, tmp_path / "ckpt", "--force", "--dtype", "bfloat16") == 0
  assert checkpoint_format.read_info(tmp_path / "ckpt").model.param_dtype == "bfloat16"


def test_force_never_replaces_something_of_another_kind(tmp_path, official, capsys):
  src, _ = official
  precious = tmp_path / "precious"
  precious.mkdir()
  (precious / "thesis.txt").write_text("do not delete")
  assert convert(src, precious, "--force") == 2
  assert "is not a goosejax checkpoint directory" in capsys.readouterr().err
  assert convert(src, precious, "--to", "official", "--force") == 2
  assert "is not a file" in capsys.readouterr().err
  assert (precious / "thesis.txt").read_text() == "do not delete"


def test_bad_source_leaves_nothing(tmp_path, capsys):
  bad = tmp_path / "bad.pth"
  bad.write_bytes(b"PK\x03\x04 truncated")
  assert convert(bad, tmp_path / "out") == 2
  assert "truncated or corrupted zip archive" in capsys.readouterr().err
  assert convert(tmp_path / "absent.pth", tmp_path / "out") == 2
  assert "no such file or directory" in capsys.readouterr().err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth"]


def test_failure_while_writing_leaves_nothing(tmp_path, official, monkeypatch, capsys):
  src, _ = official
  calls = []

  def failing_record(archive, name, data):
    calls.append(name)
    if len(calls) == 5:
      raise OSError("No space left on device (simulated)")
    real_record(archive, name, data)

  real_record = pth._write_record
  monkeypatch.setattr(pth, "_write_record", failing_record)
  assert convert(src, tmp_path / "out.pth", "--to", "official") == 2
  assert "simulated" in capsys.readouterr().err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth"]


def test_goosejax_dtype_restriction_and_missing_parent(tmp_path, official, capsys):
  src, _ = official
  assert convert(src, tmp_path / "c", "--dtype", "float16") == 2
  assert "a goosejax checkpoint stores float32 or bfloat16" in capsys.readouterr().err
  assert convert(src, tmp_path / "no" / "such" / "out.pth", "--to", "official") == 2
  assert "parent folder" in capsys.readouterr().err
  assert convert(src, src / "out", "--to", "hf") == 2
  assert f"{src}/out: {src} is a file, not a folder" in capsys.readouterr().err


def test_help_and_usage_errors(capsys):
  with pytest.raises(SystemExit) as info:
    convert("--help")
  assert info.value.code == 0 and "--to {goosejax,official,hf}" in capsys.readouterr().out
  with pytest.raises(SystemExit) as info:
    convert("only-one-argument")
  assert info.value.code == 2


def test_config_json_written_by_convert_is_plain_json(tmp_path, official):
  src, _ = official
  assert convert(src, tmp_path / "c") == 0
  document = json.loads((tmp_path / "c" / "config.json").read_text())
  assert document["model"]["n_layer"] == 2 and document["step"] is None


def test_hf_export_refuses_head_sizes_fla_cannot_run_exactly(tmp_path, capsys):
  cfg = dataclasses.replace(CFG, head_size=32)
  rng = np.random.default_rng(1)
  write_pth(tmp_path / "h32.pth", {key: rng.standard_normal(shape).astype(np.float32)
                                   for key, shape in expected_official_shapes(cfg).items()})
  assert convert(tmp_path / "h32.pth", tmp_path / "hf", "--to", "hf") == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "error: head size 32 cannot be written for Hugging Face / FLA" in err
  assert "head_dim * norm_eps" in err and "64e-5" in err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["h32.pth"]
  _, params = official_to_params(read_pth(tmp_path / "h32.pth"))
  with pytest.raises(HFExportError, match="head size 32"):
    save_hf(params, cfg, tmp_path / "direct")
  assert not (tmp_path / "direct").exists()
