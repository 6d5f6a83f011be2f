"""Two-process jobs on localhost, started by launch/local_cpu.sh exactly as a user would
(CPU processes, gloo collectives, `goosejax train` on the builtin corpus), reach the losses of
one process training over a mesh of the same size:

  data x fsdp x tensor = 2 x 2 x 2  2 processes of 4 devices; each loads its own rows
  sequence = 2                      2 processes of 1 device; each sequence's tokens split
                                    across the processes, which load the same rows
"""
import numpy as np
import pytest

from goosejax.checkpoint.format import checkpoint_steps
from goosejax.cli import main as goosejax_main
from goosejax.train.metrics import read_metrics
from targets import free_port, run_launcher

STEPS = 3
TRAIN = ["--config", "tiny", "--steps", STEPS, "--no-progress-bar", "model.wkv_chunk_size=16",
         "data.ctx_len=32", "data.batch_size=8", "run.log_every=1", f"run.checkpoint_every={STEPS}",
         f"run.eval_every={STEPS}", "run.eval_batches=1", "run.tensorboard=false"]


def losses(run_dir):
  records = read_metrics(run_dir)
  return [r["loss"] for r in records if "loss" in r], [r["val_loss"] for r in records if "val_loss" in r]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """(train losses, validation losses) of this 8-device process on mesh 2 x 2 x 2."""
  run_dir = tmp_path_factory.mktemp("one")
  assert goosejax_main(["train", *map(str, TRAIN), "--run-dir", str(run_dir),
                        "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]) == 0
  return losses(run_dir)


def launch_two(run_dir, devices_per_process, *mesh):
  result = run_launcher("local_cpu.sh", 2, devices_per_process, "--", *TRAIN, "--run-dir", run_dir,
                        *mesh, env={"PORT": str(free_port())})
  logs = [(run_dir / f"process_{i}.log").read_text() for i in range(2)]
  assert result.returncode == 0, result.stderr + "\n".join(logs)
  return logs


def assert_same_training(run_dir, one_process):
  train_losses, val_losses = losses(run_dir)
  assert len(train_losses) == STEPS and len(val_losses) == 1
  np.testing.assert_allclose(train_losses, one_process[0], rtol=1e-5)
  np.testing.assert_allclose(val_losses, one_process[1], rtol=1e-5)
  assert checkpoint_steps(run_dir) == [STEPS]
  data_states = sorted(p.name for p in (run_dir / "checkpoints" / str(STEPS) / "data").glob("process_*"))
  assert data_states == ["process_0-of-2.json", "process_1-of-2.json"]   # each process's iterator


@pytest.mark.slow
def test_data_fsdp_tensor_over_two_processes(tmp_path, one_process):
  logs = launch_two(tmp_path, 4, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2, 'sequence': 1} over 8 devices (cpu), 2 process(es)" in logs[0]
  ours = ("new run", "model:", "MFU against", "compiled train step", "step ", "stopped after")
  assert not [l for l in logs[1].splitlines() if l.startswith(ours)]   # only process 0 reports
  assert_same_training(tmp_path, one_process)


@pytest.mark.slow
def test_sequence_split_across_two_processes(tmp_path, one_process):
  logs = launch_two(tmp_path, 1, "mesh.data=1", "mesh.sequence=2")
  assert "mesh {'data': 1, 'fsdp': 1, 'tensor': 1, 'sequence': 2} over 2 devices (cpu), 2 process(es)" in logs[0]
  assert_same_training(tmp_path, one_process)
