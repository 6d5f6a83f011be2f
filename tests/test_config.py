"""Config: presets, precedence, and clear errors for unknown/duplicate keys and bad values."""
import re
import typing

import pytest

from goosejax.config import (Config, ConfigError, DataConfig, MeshConfig, ModelConfig,
                             OptimizerConfig, config_keys, load_config, config_from_dict,
                             suggested_lora_ranks)

RELEASED = {  # preset: (L, C, H, lora ranks), docs/architecture.md#parameters-and-checkpoint-layout
    "rwkv7-0.1b": (12, 768, 12, (64, 64, 32, 128)),
    "rwkv7-0.4b": (24, 1024, 16, (64, 64, 32, 128)),
    "rwkv7-1.5b": (24, 2048, 32, (96, 96, 64, 256)),
    "rwkv7-2.9b": (32, 2560, 40, (96, 96, 64, 320)),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_presets_have_the_published_shapes(name):
  cfg = load_config(name)
  L, C, H, ranks = RELEASED[name]
  assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head) == (L, C, H)
  assert cfg.model.head_size == 64 and cfg.model.vocab_size == 65536
  assert cfg.model.lora_ranks == ranks
  assert cfg.model.ffn_dim == 4 * C
  assert cfg.optimizer.eps == 1e-18 and (cfg.optimizer.beta1, cfg.optimizer.beta2) == (0.9, 0.99)


def test_default_lora_ranks_are_rwkv_lms_current_suggestion():
  # RWKV-LM @524481d RWKV-v7/train_temp/src/model.py:547,552,557,563 (RWKV_Tmix_x070.__init__):
  # D = max(32, int(round(k * C**0.5 / 32) * 32)), k = 2.5 (decay), 2.5 (a), 1.7 (v), 5 (gate).
  assert suggested_lora_ranks(768) == (64, 64, 32, 128)
  assert suggested_lora_ranks(1024) == (64, 64, 64, 160)      # round(2.5) == 2: Python rounds half to even
  assert suggested_lora_ranks(2048) == (128, 128, 64, 224)    # released 1.5B: 96/96/64/256
  assert suggested_lora_ranks(128) == (32, 32, 32, 64)
  assert ModelConfig(n_embd=2048).lora_ranks == (128, 128, 64, 224)
  assert ModelConfig(n_embd=2048, gate_lora=256).lora_ranks == (128, 128, 64, 256)


def test_tiny_preset_loads_and_is_small():
  cfg = load_config("tiny")
  assert cfg.model.n_layer <= 4 and cfg.model.n_embd <= 256


def test_overrides_beat_yaml_and_flags_are_overrides(tmp_path):
  path = tmp_path / "run.yaml"
  path.write_text("base: tiny\nmodel:\n  n_layer: 3\nrun:\n  steps: 50\n")
  cfg = load_config(path, ["model.n_layer=4", "optimizer.lr_init=1e-3"], flags={"run.checkpoint_every": 7})
  assert cfg.model.n_layer == 4
  assert cfg.model.n_embd == 128            # from the tiny base
  assert cfg.run.steps == 50                # from the file
  assert cfg.run.checkpoint_every == 7      # from the flag
  assert cfg.optimizer.lr_init == 1e-3


def test_yaml_float_strings_are_accepted(tmp_path):
  path = tmp_path / "run.yaml"
  path.write_text("optimizer:\n  eps: 1e-18\n")   # YAML 1.1 reads this as a string
  assert load_config(path).optimizer.eps == 1e-18


@pytest.mark.parametrize("override, fragment", [
    ("model.n_layers=3", "unknown config key 'model.n_layers'"),
    ("modle.n_layer=3", "unknown config section 'modle'"),
    ("model.n_embd=100", "model.n_embd=100 is not divisible by model.head_size=64"),
    ("model.n_layer=-2", "model.n_layer=-2: expected a positive value"),
    ("model.n_layer=two", "model.n_layer='two'"),
    ("model.dtype=float16", "model.dtype='float16'"),
    ("optimizer.beta2=1.5", "optimizer.beta2=1.5"),
    ("mesh.data=0", "mesh.data=0"),
    ("n_layer=3", "expected section.key=value"),
])
def test_bad_overrides_name_the_key(override, fragment):
  with pytest.raises(ConfigError) as e:
    load_config("tiny", [override])
  assert fragment in str(e.value)


def test_key_given_twice_on_the_command_line():
  with pytest.raises(ConfigError, match="'model.n_layer' is given twice"):
    load_config("tiny", ["model.n_layer=2", "model.n_layer=3"])


def test_key_given_as_flag_and_override():
  with pytest.raises(ConfigError, match="'run.steps' is given twice"):
    load_config("tiny", ["run.steps=5"], flags={"run.steps": 6})


def test_key_given_twice_in_yaml(tmp_path):
  path = tmp_path / "dup.yaml"
  path.write_text("model:\n  n_layer: 2\n  n_layer: 3\n")
  with pytest.raises(ConfigError, match="'n_layer' is given twice"):
    load_config(path)


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
  path = tmp_path / "bad.yaml"
  path.write_text("model:\n  n_lyer: 2\n")
  with pytest.raises(ConfigError) as e:
    load_config(path)
  assert "model.n_lyer" in str(e.value) and str(path) in str(e.value)


def test_missing_preset_lists_presets():
  with pytest.raises(ConfigError, match="neither a file nor a preset.*tiny"):
    load_config("no-such-preset")


def test_mesh_shapes():
  assert MeshConfig(data=-1, fsdp=2).shape(8) == {"data": 4, "fsdp": 2, "tensor": 1, "sequence": 1}
  assert MeshConfig(data=2, fsdp=2, tensor=2).shape(8) == {"data": 2, "fsdp": 2, "tensor": 2,
                                                          "sequence": 1}
  with pytest.raises(ConfigError, match="not divisible"):
    MeshConfig(data=-1, fsdp=3).shape(8)
  with pytest.raises(ConfigError, match="at most one"):
    load_config("tiny", ["mesh.data=-1", "mesh.fsdp=-1"])
  # mesh.data unset: the rest of the devices, or 1 when another axis takes the rest.
  assert MeshConfig().shape(8) == {"data": 8, "fsdp": 1, "tensor": 1, "sequence": 1}
  assert MeshConfig(fsdp=-1).shape(8) == {"data": 1, "fsdp": 8, "tensor": 1, "sequence": 1}
  assert MeshConfig(tensor=-1, fsdp=2).shape(8) == {"data": 1, "fsdp": 2, "tensor": 4, "sequence": 1}
  assert MeshConfig(sequence=-1).shape(8) == {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 8}
  assert MeshConfig(sequence=2).shape(8) == {"data": 4, "fsdp": 1, "tensor": 1, "sequence": 2}
  with pytest.raises(ConfigError, match="mesh.sequence=0"):
    load_config("tiny", ["mesh.sequence=0"])
  assert load_config("tiny", ["mesh.data=null"]).mesh.data is None
  with pytest.raises(ConfigError, match="mesh.data=0"):
    load_config("tiny", ["mesh.data=0"])


def test_round_trip_through_dict():
  cfg = load_config("rwkv7-0.4b")
  assert config_from_dict(cfg.to_dict()) == cfg
  assert Config().validate() == Config()


# ----------------------------------------------------------------------------- bad files and values


def _config_error(path) -> str:
  with pytest.raises(ConfigError) as e:
    load_config(path)
  message = str(e.value)
  assert "\n" not in message, message
  return message


def test_duplicate_key_names_the_file(tmp_path):
  path = tmp_path / "dup.yaml"
  path.write_text("model:\n  n_layer: 2\n  n_layer: 3\n")
  message = _config_error(path)
  assert str(path) in message and "<unicode string>" not in message and "lines 2 and 3" in message


@pytest.mark.parametrize("content, fragment", [
    (b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary", "not a YAML text file"),
    (b"model:\n  n_layer: 2\x00\n", "not a YAML text file"),
    (b"model: [1, 2\n", "not valid YAML"),
])
def test_unreadable_file_names_the_file(tmp_path, content, fragment):
  path = tmp_path / "bad.yaml"
  path.write_bytes(content)
  message = _config_error(path)
  assert message.startswith(f"{path}: {fragment}"), message


@pytest.mark.parametrize("content", ["", "# only a comment\n\n", "{}\n"])
def test_empty_file_is_refused_not_trained_as_the_default(tmp_path, content):
  path = tmp_path / "empty.yaml"
  path.write_text(content)
  message = _config_error(path)
  assert message.startswith(f"{path}: the config file is empty") and "base: <preset>" in message


@pytest.mark.parametrize("base, fragment", [
    ("5", "base=5: expected a preset name or a YAML path"),
    ("[tiny]", "base=['tiny']: expected a preset name"),
    ("null", "base=None: expected a preset name"),
    ("no-such-preset", "base: config 'no-such-preset' is neither a file nor a preset"),
])
def test_bad_base_names_the_file_and_the_key(tmp_path, base, fragment):
  path = tmp_path / "run.yaml"
  path.write_text(f"base: {base}\nrun:\n  steps: 5\n")
  message = _config_error(path)
  assert message.startswith(f"{path}: {fragment}"), message


@pytest.mark.parametrize("override, shown", [
    ("optimizer.lr_init=nan", "nan"),
    ("optimizer.lr_final=.inf", "inf"),
    ("optimizer.weight_decay=1e999", "inf"),
    ("optimizer.grad_clip=.nan", "nan"),
    ("optimizer.beta1=nan", "nan"),
    ("optimizer.eps=-.inf", "-inf"),
    ("optimizer.w0_lr_scale=inf", "inf"),
    ("data.validation_fraction=nan", "nan"),
    ("data.weights=[1.0, .nan]", "[1.0, nan]"),
    ("run.peak_tflops=.inf", "inf"),
])
def test_non_finite_values_are_refused(override, shown):
  key = override.partition("=")[0]
  overrides = [override, "data.paths=[a, b]"] if key == "data.weights" else [override]
  with pytest.raises(ConfigError, match=re.escape(f"{key}={shown}: expected a finite number")):
    load_config("tiny", overrides)


def test_non_finite_values_are_refused_in_a_section_validated_alone():
  with pytest.raises(ConfigError, match=r"optimizer\.lr_init=nan"):
    OptimizerConfig(lr_init=float("nan")).validate()
  with pytest.raises(ConfigError, match=r"data\.validation_fraction=inf"):
    DataConfig(validation_fraction=float("inf")).validate()


INTEGER_KEYS = [key.name for key in config_keys()
                if key.type is int or int in typing.get_args(key.type)]


@pytest.mark.parametrize("value", [2**31, -2**31 - 1, 10**20])
@pytest.mark.parametrize("key", INTEGER_KEYS)
def test_every_integer_setting_is_bounded_to_int32(key, value):
  with pytest.raises(ConfigError, match=re.escape(f"{key}={value}: expected an integer of "
                                                  "magnitude at most 2147483647")):
    load_config("tiny", [f"{key}={value}"])


def test_an_integer_at_the_bound_is_accepted():
  assert load_config("tiny", ["run.steps=2147483647"]).run.steps == 2**31 - 1
  assert INTEGER_KEYS[:2] == ["model.vocab_size", "model.n_layer"] and "run.steps" in INTEGER_KEYS


def test_an_integer_of_thousands_of_digits_is_refused_not_a_traceback(tmp_path):
  huge = "9" * 5000
  with pytest.raises(ConfigError, match=r"^override run\.steps=\.\.\. \(command line\): an "
                                        r"integer has more than 4300 digits"):
    load_config("tiny", [f"run.steps={huge}"])
  path = tmp_path / "huge.yaml"
  path.write_text(f"base: tiny\nrun:\n  steps: {huge}\n")
  with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: an integer has more than"):
    load_config(path)
  path.write_text(f"base: tiny\nrun:\n  steps: {huge[:60]}\n")   # parsed, then refused, shortened
  with pytest.raises(ConfigError, match=r"run\.steps=999999999999\.\.\. \(60 digits\): expected"):
    load_config(path)


def test_train_cli_reports_a_bad_config_on_one_line_with_status_2(tmp_path, capsys, monkeypatch):
  from goosejax import cli
  from goosejax.train import loop

  def train(*args, **kwargs):   # reached only if the config was accepted: fail fast, do not train
    raise AssertionError("an empty config file reached training")

  monkeypatch.setattr(loop, "train", train)
  path = tmp_path / "empty.yaml"
  path.write_text("# nothing yet\n")
  assert cli.main(["train", "--config", str(path), "--run-dir", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "the config file is empty" in err
  assert not (tmp_path / "run").exists()
