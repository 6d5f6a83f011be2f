"""experiments/state_tracking.py end to end on a tiny grid (a few steps, tiny models): it trains
both architectures on a word problem and MQAR and writes the Markdown table and the plot."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "experiments" / "state_tracking.py"

TINY_GRID = {
    "seed": 0,
    "optimizer": {"lr_init": 3.0e-3, "lr_final": 3.0e-4, "warmup_steps": 1},
    "word_problems": {"groups": ["A5"], "layers": [1], "n_embd": 32, "head_size": 16,
                      "train_length": 4, "eval_lengths": [2, 4], "steps": 2, "batch_size": 4,
                      "eval_examples": 8},
    "mqar": {"n_layer": 1, "shapes": [[32, 16]], "num_pairs": 2, "num_keys": 4, "num_values": 4,
             "steps": 2, "batch_size": 4, "eval_examples": 8},
}


def test_tiny_grid_writes_table_and_plot(tmp_path):
  grid = tmp_path / "tiny.yaml"
  grid.write_text(yaml.safe_dump(TINY_GRID))
  out = tmp_path / "out"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = subprocess.run([sys.executable, str(SCRIPT), "--grid", str(grid), "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  table = (out / "state_tracking.md").read_text()
  assert "| A5 | RWKV-7 |" in table and "| A5 | Transformer |" in table
  assert "| group | model | T=2 | T=4 |" in table
  assert "| RWKV-7 | 32 | 16 | 512 |" in table           # WKV state: L * n_embd * head_size
  assert "| Transformer | 32 | 16 | 512 |" in table      # KV cache: 2 * L * T * n_embd at T = 8
  assert (out / "state_tracking.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_committed_grids_load():
  sys.path.insert(0, str(SCRIPT.parent))
  from state_tracking import CONFIGS, load_grid
  reduced = load_grid(CONFIGS / "state_tracking_reduced.yaml")
  full = load_grid(CONFIGS / "state_tracking_full.yaml")
  assert reduced.source == "experiments/configs/state_tracking_reduced.yaml"
  assert "A5" in reduced.word_problems.groups
  assert set(full.word_problems.groups) == {"Z60", "A4xZ5", "A5", "S5"}
  assert full.word_problems.layers == (1, 2, 3, 4)


def state_tracking():
  sys.path.insert(0, str(SCRIPT.parent))
  import state_tracking
  return state_tracking


def tiny_grid(tmp_path, section=None, **settings):
  """TINY_GRID with `settings` in `section` (None: at the top), written to a file."""
  tree = {key: dict(value) if isinstance(value, dict) else value for key, value in TINY_GRID.items()}
  (tree[section] if section else tree).update(settings)
  path = tmp_path / "grid.yaml"
  path.write_text(yaml.safe_dump(tree))
  return path


@pytest.mark.parametrize("section, settings, message", [
    ("word_problems", {"groups": ["Z61"]}, "word_problems.groups: unknown ['Z61']; known: ['Z60'"),
    ("word_problems", {"groups": []}, "word_problems.groups=[]: expected a non-empty list"),
    ("word_problems", {"layers": [1, 1]}, "word_problems.layers=[1, 1]: expected distinct items"),
    ("word_problems", {"eval_lengths": [2, 8]}, "eval_lengths [2, 8] exceed train_length 4"),
    ("word_problems", {"steps": 0}, "word_problems.steps=0: expected a positive integer"),
    ("word_problems", {"n_embd": 33}, "word_problems: model.n_embd=33 is not divisible"),
    ("word_problems", {"eval_examples": 2}, "word_problems.eval_examples=2: expected at least one batch"),
    ("word_problems", {"typo": 1}, "word_problems: expected exactly the keys"),
    ("mqar", {"num_keys": 1}, "mqar.num_pairs=2 needs as many distinct keys, but mqar.num_keys=1"),
    ("mqar", {"shapes": [[32]]}, "mqar.shapes[0]=[32]: expected a list of 2"),
    ("mqar", {"shapes": [[32, 5]]}, "mqar.shapes [32, 5]: model.n_embd=32 is not divisible"),
    ("mqar", {"batch_size": 2**31}, "mqar.batch_size=2147483648: expected a positive integer"),
    ("optimizer", {"lr_init": float("nan")}, "optimizer.lr_init=nan: expected a finite number"),
    ("optimizer", {"lr": 1}, "unknown config key 'optimizer.lr'"),
    (None, {"seed": -1}, "seed=-1: expected an integer from 0"),
    (None, {"extra": 1}, "expected a mapping with exactly the keys"),
])
def test_a_bad_grid_is_one_line_before_anything_trains(section, settings, message, tmp_path,
                                                       capsys, monkeypatch):
  module = state_tracking()
  monkeypatch.setattr(module, "run_word_problems", lambda grid: pytest.fail("trained"))
  path = tiny_grid(tmp_path, section, **settings)
  assert module.main(["--grid", str(path), "--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith(f"state_tracking.py: error: {path}: ")
  assert message in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    (b"", "the grid file is empty"), (b"\x00\x01binary", "not a YAML text file"),
    (b"seed: [\n", "not valid YAML"), (b"- 1\n- 2\n", "expected a mapping with exactly the keys"),
    (b"seed: " + b"9" * 5000 + b"\n", "a value cannot be read"),
])
def test_an_unreadable_grid_file_is_one_line(content, message, tmp_path, capsys):
  path = tmp_path / "grid.yaml"
  path.write_bytes(content)
  assert state_tracking().main(["--grid", str(path), "--out", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and message in err


def test_an_unknown_grid_or_unwritable_out_is_one_line_before_training(tmp_path, capsys,
                                                                       monkeypatch):
  module = state_tracking()
  monkeypatch.setattr(module, "run_word_problems", lambda grid: pytest.fail("trained"))
  assert module.main(["--grid", "fulll"]) == 2
  assert "--grid 'fulll': expected reduced or full or a grid YAML file" in capsys.readouterr().err
  assert module.main(["--grid", str(tmp_path / "missing.yaml")]) == 2
  assert f"{tmp_path / 'missing.yaml'}: No such file or directory" in capsys.readouterr().err
  blocker = tmp_path / "file"
  blocker.write_text("")
  assert module.main(["--grid", str(tiny_grid(tmp_path)), "--out", str(blocker / "out")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"{blocker / 'out'}: Not a directory" in err
