"""Two processes on localhost (CPU, 4 fake devices each, gloo collectives) train the tiny
model together over one 8-device mesh and get the losses of one 8-device process.

Run as a script, this file is one of those worker processes.
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from targets import free_port

# Shared with tests/test_sharding.py: the in-process 8-device reference reuses its compile.
TINY = ["model.vocab_size=256", "data.ctx_len=16", "data.batch_size=8", "run.steps=12",
        "run.checkpoint_every=4", "run.log_every=4", "run.eval_every=6", "run.eval_batches=1",
        "run.tensorboard=false", "run.peak_tflops=0.05"]
MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
STEPS = 3


def train_steps(run_dir, mesh=None, process_index=0, process_count=1):
  from goosejax.config import load_config
  from goosejax.train import train
  from goosejax.train.batches import SyntheticBatches
  from goosejax.train.metrics import read_metrics

  cfg = load_config("tiny", TINY + MESH)
  batches = lambda split: SyntheticBatches(256, 16, 8, split=split, process_index=process_index,
                                           process_count=process_count)
  train(cfg, run_dir, mesh=mesh, train_batches=batches("train"),
        open_validation=lambda: batches("validation"), stop_at_step=STEPS, progress_bar=False)
  return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  workers = [subprocess.Popen(
      [sys.executable, __file__, "--port", str(port), "--process-id", str(i),
       "--run-dir", str(tmp_path / "two")],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [w.communicate(timeout=400)[0] for w in workers]
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2, 'sequence': 1} over 8 devices (cpu), 2 process(es)" in outputs[0]
  ours = ("new run", "model:", "MFU against", "compiled train step", "step ", "stopped after")
  assert not [l for l in outputs[1].splitlines() if l.startswith(ours)]   # only process 0 reports
  from goosejax.train.metrics import read_metrics
  two = [r["loss"] for r in read_metrics(tmp_path / "two") if "loss" in r]

  import jax
  from goosejax import sharding
  from goosejax.config import MeshConfig
  assert jax.device_count() == 8
  one = train_steps(tmp_path / "one", sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
  assert len(two) == STEPS
  np.testing.assert_allclose(two, one, rtol=1e-6)
  from goosejax.checkpoint import checkpoint_steps
  assert checkpoint_steps(tmp_path / "two") == [STEPS]
  data_states = sorted(p.name for p in (tmp_path / "two" / "checkpoints" / str(STEPS) / "data").glob("process_*"))
  assert data_states == ["process_0-of-2.json", "process_1-of-2.json"]   # each process's iterator


def worker_main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--run-dir", required=True)
  args = parser.parse_args()
  from goosejax.train import distributed
  how = distributed.initialize(distributed.DistributedSettings(
      coordinator_address=f"127.0.0.1:{args.port}", num_processes=2, process_id=args.process_id,
      timeout_s=120))
  assert how == "explicit"
  import jax
  assert jax.process_count() == 2 and jax.local_device_count() == 4 and jax.device_count() == 8
  train_steps(Path(args.run_dir), process_index=args.process_id, process_count=2)


if __name__ == "__main__":
  worker_main()
