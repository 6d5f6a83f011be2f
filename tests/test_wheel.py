"""A wheel built from the checkout works without it: presets ship inside the package."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_installs_presets_and_trains_from_another_directory(tmp_path):
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                  str(ROOT)], check=True, capture_output=True)
  wheel, = (tmp_path / "dist").glob("goosejax-*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  presets = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
  assert sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("goosejax/presets/")) == presets
  # The wheel's files ahead of the editable checkout on sys.path, run from an empty directory.
  site = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                  str(wheel)], check=True, capture_output=True)
  workdir = tmp_path / "elsewhere"
  workdir.mkdir()
  env = {**os.environ, "PYTHONPATH": str(site)}
  where = subprocess.run([sys.executable, "-c", "import goosejax.config as c; print(c.PRESETS_DIR)"],
                         cwd=workdir, env=env, check=True, capture_output=True, text=True)
  assert Path(where.stdout.strip()) == site / "goosejax" / "presets"
  run = subprocess.run([sys.executable, "-m", "goosejax.cli", "train", "--config", "tiny",
                        "--run-dir", "run", "--steps", "1", "--no-progress-bar",
                        "--compilation-cache", "", "data.ctx_len=32", "data.batch_size=8"],
                       cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  assert (workdir / "run" / "checkpoints" / "1").is_dir()
