"""experiments/state_tracking.py end to end on a tiny grid (a few steps, tiny models): it trains
both architectures on a word problem and MQAR and writes the Markdown table and the plot."""
import os
import subprocess
import sys
from pathlib import Path

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
