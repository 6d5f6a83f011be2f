"""`goosejax config`: the resolved YAML reads back to the same config (every preset, odd
values), --explain names each value's source through `base:` chains, overrides stand
anywhere, a refused config is still shown; the key reference."""
import re

import pytest
import yaml

from goosejax.cli import main as goosejax_main
from goosejax.config import PRESETS_DIR, config_keys, load_config, resolve_config
from goosejax.config.text import keys_table, to_yaml

PRESETS = sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


def config_command(capsys, *argv):
  """(exit status, stdout, stderr) of `goosejax config ARGV`."""
  status = goosejax_main(["config", *argv])
  out, err = capsys.readouterr()
  return status, out, err


def test_every_preset_is_found():
  assert {"tiny", "rwkv7-0.1b", "rwkv7-0.4b", "rwkv7-1.5b", "rwkv7-2.9b"} <= set(PRESETS)


@pytest.mark.parametrize("explain", [[], ["--explain"]])
@pytest.mark.parametrize("preset", PRESETS)
def test_printed_yaml_reads_back_to_the_same_config(preset, explain, tmp_path, capsys):
  status, out, err = config_command(capsys, "--config", preset, "mesh.data=1", *explain)
  assert status == 0 and err == ""
  path = tmp_path / "resolved.yaml"
  path.write_text(out)
  assert load_config(path) == load_config(preset, ["mesh.data=1"])
  tree = yaml.safe_load(out)
  assert [f"{section}.{key}" for section, values in tree.items() for key in values] == \
      [key.name for key in config_keys()]


def test_awkward_values_survive_the_round_trip(tmp_path):
  overrides = ["data.source=text", "data.paths=['a b', 'c#d', 'x: y', 'null', 'yes', '1e5', '~']",
               "data.weights=[1, 2.5e-30, 7, 0, 1e30, 0.1, 3]", "data.tokenizer='0x10'",
               "optimizer.eps=1e-18", "optimizer.lr_init=1", "run.peak_tflops=989.5",
               "model.dim_ffn=null", "model.wkv_chunk_size=32", "optimizer.l2wrap=false"]
  cfg = load_config("tiny", overrides)
  path = tmp_path / "resolved.yaml"
  path.write_text(to_yaml(cfg))
  assert load_config(path) == cfg
  assert cfg.data.paths == ("a b", "c#d", "x: y", "null", "yes", "1e5", "~")


def explained(out):
  """{'section.key': source} from --explain output."""
  sources, section = {}, None
  for line in out.splitlines():
    if re.match(r"\w+:$", line):
      section = line[:-1]
    elif line.startswith("  "):
      key, source = re.fullmatch(r"  (\w+): .*?  # (.+)", line).groups()
      sources[f"{section}.{key}"] = source
  return sources


def test_explain_names_every_source_through_a_base_chain(tmp_path, capsys):
  (tmp_path / "base.yaml").write_text("base: tiny\nmodel:\n  n_layer: 3\n")
  (tmp_path / "run.yaml").write_text("base: base.yaml\nrun:\n  steps: 50\n  log_every: 5\n")
  status, out, _ = config_command(capsys, "--config", str(tmp_path / "run.yaml"), "--explain",
                                  "--steps", "60", "mesh.data=2", "data.ctx_len=32")
  assert status == 0
  sources = explained(out)
  assert list(sources) == [key.name for key in config_keys()]
  assert sources["model.n_layer"] == f"file {tmp_path / 'base.yaml'}"
  assert sources["model.n_embd"] == "preset tiny"
  assert sources["run.log_every"] == f"file {tmp_path / 'run.yaml'}"
  assert sources["run.steps"] == "command line"           # --steps beats the file
  assert sources["data.ctx_len"] == sources["mesh.data"] == "command line"
  assert sources["mesh.tensor"] == sources["run.seed"] == "default"
  assert yaml.safe_load(out)["run"]["steps"] == 60


def test_resolve_config_sources_match_the_precedence():
  resolved = resolve_config("tiny", ["model.n_layer=4"], {"run.steps": 9, "run.seed": None})
  assert resolved.sources["model.n_layer"] == "command line"
  assert resolved.sources["run.steps"] == "command line"
  assert resolved.sources["run.seed"] == "default"        # a flag not given sets nothing
  assert resolved.sources["model.n_embd"] == "preset tiny"
  assert set(resolved.sources) == {key.name for key in config_keys()}


def test_overrides_stand_anywhere_among_the_flags(capsys):
  status, out, _ = config_command(capsys, "data.ctx_len=256", "--config", "tiny", "mesh.data=8",
                                  "--explain", "run.seed=3", "--steps", "7", "model.n_layer=3")
  assert status == 0
  cfg = yaml.safe_load(out)
  assert (cfg["data"]["ctx_len"], cfg["mesh"]["data"], cfg["run"]["seed"], cfg["run"]["steps"],
          cfg["model"]["n_layer"]) == (256, 8, 3, 7, 3)


def test_a_refused_config_is_shown_then_refused_on_one_line(capsys):
  status, out, err = config_command(capsys, "--config", "rwkv7-1.5b", "mesh.data=-1",
                                    "mesh.fsdp=-1", "--explain")
  assert status == 2
  assert explained(out)["mesh.data"] == explained(out)["mesh.fsdp"] == "command line"
  assert err.count("\n") == 1 and "mesh.data and mesh.fsdp are -1" in err


def test_fsdp_alone_takes_the_devices_data_leaves_by_default(capsys):
  status, out, _ = config_command(capsys, "--config", "rwkv7-1.5b", "mesh.fsdp=-1", "--explain")
  assert status == 0 and explained(out)["mesh.data"] == "default"


@pytest.mark.parametrize("argv, fragment", [
    (["--config", "tiny", "model.n_layers=3"], "unknown config key 'model.n_layers'"),
    (["--config", "no-such-preset"], "neither a file nor a preset"),
    (["--config", "tiny", f"run.steps={'9' * 5000}"], "an integer has more than 4300 digits"),
])
def test_bad_keys_and_files_exit_2_with_one_line(capsys, argv, fragment):
  status, out, err = config_command(capsys, *argv)
  assert status == 2 and out == ""
  assert err.count("\n") == 1 and fragment in err


@pytest.mark.parametrize("argv, fragment", [
    ([], "--config is required (or --keys"),
    (["--keys", "--config", "tiny"], "--keys lists the keys of every config"),
    (["--config", "tiny", "--markdown"], "--markdown goes with --keys"),
    (["--config", "tiny", "--run-dir", "x"], "unrecognized arguments: --run-dir"),
    (["--config", "tiny", "--config", "rwkv7-0.1b"],
     "--config is given twice ('tiny' and 'rwkv7-0.1b'); give it once"),
    (["--config", "tiny", "--steps", "3", "--checkpoint-every", "1", "--steps", "4"],
     "--steps is given twice (3 and 4)"),
    (["--config", "tiny", "--steps", "9" * 5000],
     "argument --steps: expected an integer, got '999999999999... (5000 characters)'"),
    (["--config", "tiny", "--checkpoint-every", "1e3"],
     "argument --checkpoint-every: expected an integer, got '1e3'"),
])
def test_bad_arguments_are_usage_errors(capsys, argv, fragment):
  with pytest.raises(SystemExit) as e:
    goosejax_main(["config", *argv])
  last = capsys.readouterr().err.splitlines()[-1]
  assert e.value.code == 2 and fragment in last and len(last) < 200


def test_keys_lists_every_key_with_type_default_and_description(capsys):
  status, out, _ = config_command(capsys, "--keys")
  assert status == 0
  for key in config_keys():
    assert re.search(rf"^{re.escape(key.name)}\s", out, re.M), key.name
  assert re.search(r"^model\.dim_ffn +int \| null +null +channel-mix hidden width", out, re.M)
  assert re.search(r"^optimizer\.eps +float +1\.0e-18 +Adam epsilon", out, re.M)


@pytest.mark.parametrize("width", [80, 100, 160])
def test_keys_table_fits_the_terminal(width):
  lines = keys_table(width).splitlines()
  assert max(len(line) for line in lines) <= width
  assert sum(line.startswith("model.") for line in lines) == \
      sum(key.name.startswith("model.") for key in config_keys())


def test_train_writes_the_resolved_yaml_next_to_config_json(tmp_path):
  import io

  from goosejax.train import train
  from goosejax.train.batches import SyntheticBatches
  from goosejax.train.run_checkpoints import read_run_config
  from test_train_loop import COMPILED_STEPS, TINY, one_device

  resolved = resolve_config("tiny", TINY)
  out = io.StringIO()
  train(resolved.config, tmp_path, mesh=one_device(), train_batches=SyntheticBatches(256, 16, 8),
        open_validation=lambda: SyntheticBatches(256, 16, 8, split="validation"), out=out,
        progress_bar=False, compiled_steps=COMPILED_STEPS, stop_at_step=1,
        config_sources=resolved.sources)
  path = tmp_path / "config.yaml"
  assert f"resolved config: {path}" in out.getvalue()
  assert load_config(path) == resolved.config == read_run_config(tmp_path)
  assert explained(path.read_text()) == resolved.sources
