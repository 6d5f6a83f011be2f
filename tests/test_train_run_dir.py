"""A multi-day run is safe from its own run directory: one `train` at a time (lock, stale
lock after kill -9), a full disk (a save refused up front, a background save failing), a
corrupt newest checkpoint (fall back, or refuse naming it), every check before config.json
is written, metrics.jsonl deleted mid-run, bad --run-dir/--init-from as one line and exit 2.

The full-disk and read-only tests mount small tmpfs filesystems: they need root
(CAP_SYS_ADMIN), as in the project's test machines; read-only falls back to chmod when not
root, where it binds."""
import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import goosejax
from goosejax.checkpoint.format import checkpoint_steps
from goosejax.cli import main as goosejax_main
from goosejax.train import NonFiniteLossError, run_dir as run_dir_module
from goosejax.train.batches import SyntheticBatches
from goosejax.train.run_checkpoints import CheckpointError, CheckpointSaveError
from goosejax.train.metrics import MetricsLogger, read_metrics

from test_train_loop import PoisonedBatches, losses_of, run

HOLD_LOCK = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("run_lock", sys.argv[1])
run_lock = sys.modules["run_lock"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_lock)
run_lock.acquire(sys.argv[2], print)
print("held", flush=True)
time.sleep(120)
"""


def hold_lock(run_dir):
  """Another process holding `run_dir`'s lock (imports only train/run_dir.py: no JAX)."""
  process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, run_dir_module.__file__, str(run_dir)],
                             stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline().strip() == "held"
  return process


@contextlib.contextmanager
def tmpfs(path, options):
  """A real small filesystem at `path` (a full disk, a read-only one)."""
  path.mkdir(parents=True, exist_ok=True)
  subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=True)


@contextlib.contextmanager
def read_only(path):
  """A directory the kernel refuses writes into: chmod binds non-root users, root needs a
  read-only mount."""
  if os.geteuid() == 0:
    with tmpfs(path, "ro,size=1m"):
      yield path
    return
  path.mkdir(parents=True, exist_ok=True)
  path.chmod(0o555)
  try:
    yield path
  finally:
    path.chmod(0o755)


def dead_pid():
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def one_line_error(capsys):
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("goosejax train: error: "), err
  return err


# ----------------------------------------------------------------------------- the lock


def test_second_train_is_refused_and_a_killed_holders_lock_is_taken_over(tmp_path, capsys):
  holder = hold_lock(tmp_path)
  try:
    with pytest.raises(run_dir_module.RunDirLockedError,
                       match=rf"in use by another goosejax train: pid {holder.pid} on host "
                             rf"{socket.gethostname()} \(since 20"):
      run(tmp_path)
    assert goosejax_main(["train", "--config", "tiny", "--run-dir", str(tmp_path)]) == 2
    assert f"pid {holder.pid}" in one_line_error(capsys)
    assert not (tmp_path / "config.json").exists()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # kill -9 left its name in the lock file; the kernel dropped its flock.
  assert str(holder.pid) in (tmp_path / run_dir_module.LOCK_FILE).read_text()
  result, output = run(tmp_path, stop_at_step=1)
  assert result.step == 1
  assert f"taking over the lock left by pid {holder.pid}" in output
  assert (tmp_path / run_dir_module.LOCK_FILE).read_text() == ""          # released on the way out
  with pytest.raises(NonFiniteLossError):                            # released on errors too
    run(tmp_path, batches=PoisonedBatches(bad=1))
  assert (tmp_path / run_dir_module.LOCK_FILE).read_text() == ""


def test_without_flock_the_lock_file_decides(tmp_path, monkeypatch):
  def no_flock(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(run_dir_module.fcntl, "flock", no_flock)
  lock_file = tmp_path / run_dir_module.LOCK_FILE
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid, "since": "x"}))
    with pytest.raises(run_dir_module.RunDirLockedError, match=rf"pid {sleeper.pid} .* delete {lock_file}"):
      run_dir_module.acquire(tmp_path)
  finally:
    sleeper.kill()
    sleeper.wait()
  lock_file.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "x"}))
  with pytest.raises(run_dir_module.RunDirLockedError, match="pid 1 on host elsewhere"):
    run_dir_module.acquire(tmp_path)                      # a pid on another host cannot be checked
  gone = dead_pid()
  lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": gone, "since": "x"}))
  said = []
  with run_dir_module.acquire(tmp_path, said.append):
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
  assert said == [f"{lock_file}: taking over the lock left by pid {gone} on host "
                  f"{socket.gethostname()} (since x), which ended without releasing it"]


# ----------------------------------------------------------------------------- full disk


def test_a_save_that_does_not_fit_is_refused_and_older_checkpoints_kept(tmp_path):
  # Checkpoints of the tiny model take ~6 MiB: the first fits in 9 MiB, the second does not.
  with tmpfs(tmp_path / "checkpoints", "size=9m"):
    with pytest.raises(CheckpointSaveError) as refused:
      run(tmp_path)
    message = str(refused.value)
    assert "\n" not in message
    assert f"checkpoint {tmp_path.absolute()}/checkpoints/8 not started: the state needs about 6." in message
    assert "MiB free; the newest complete checkpoint, step 4, is kept" in message
    assert checkpoint_steps(tmp_path) == [4]
  assert max(losses_of(tmp_path)) == 8


class SlowBatches(SyntheticBatches):
  """Steps of >= 0.1 s, so that "stopped at the next step" is measured, not raced."""

  def __next__(self):
    time.sleep(0.1)
    return super().__next__()


def test_a_background_save_that_fills_the_disk_stops_the_run_at_the_next_step(tmp_path, monkeypatch,
                                                                            caplog, capfd):
  from goosejax.train import run_checkpoints
  # The free-space check would refuse up front; pretend there is room so that the
  # asynchronous write itself runs into ENOSPC.
  monkeypatch.setattr(run_checkpoints.TrainCheckpointer, "_check_room", lambda self, step: None)
  with tmpfs(tmp_path / "checkpoints", "size=3m"):
    with pytest.raises(CheckpointSaveError) as failed:
      run(tmp_path, batches=SlowBatches(256, 16, 8))
    message = str(failed.value)
    assert "\n" not in message
    assert f"checkpoint {tmp_path.absolute()}/checkpoints/4 failed (" in message
    assert "No space left on device" in message and "no complete checkpoint exists yet" in message
    assert os.listdir(tmp_path / "checkpoints") == []         # the partial save is removed
  assert max(losses_of(tmp_path)) < 8        # noticed before the next checkpoint was due
  # Reported once, by the error: no Orbax tracebacks, no 'Event loop is closed' from TensorStore.
  assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
  assert "Traceback" not in capfd.readouterr().err


# ----------------------------------------------------------------------------- corrupt checkpoints


@pytest.fixture(scope="module")
def stopped_at_8(tmp_path_factory):
  """A run directory with checkpoints 4 and 8 (of 12 steps)."""
  run_dir = tmp_path_factory.mktemp("stopped")
  run(run_dir, stop_at_step=8)
  assert checkpoint_steps(run_dir) == [4, 8]
  return run_dir


def copy_of(run_dir, tmp_path):
  shutil.copytree(run_dir, tmp_path / "run")
  return tmp_path / "run"


def truncate_largest_array_file(step_dir):
  files = [p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
  largest = max(files, key=lambda p: p.stat().st_size)
  os.truncate(largest, largest.stat().st_size // 2)


def test_a_corrupt_newest_checkpoint_is_moved_aside_and_the_one_before_resumes(
    stopped_at_8, tmp_path, monkeypatch, caplog):
  straight, _ = run(tmp_path / "straight")
  run_dir = copy_of(stopped_at_8, tmp_path)
  truncate_largest_array_file(run_dir / "checkpoints" / "8")
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  result, output = run(run_dir)
  # The one line below is all: no Orbax error logs, no tracebacks of abandoned reads.
  assert unraisable == [] and [r for r in caplog.records if r.levelno >= logging.ERROR] == []
  aside = [p.name for p in (run_dir / "checkpoints").iterdir() if ".corrupt-" in p.name]
  assert len(aside) == 1 and aside[0].startswith("8.corrupt-")
  lines = [l for l in output.splitlines() if "does not restore" in l]
  assert len(lines) == 1 and lines[0].startswith("checkpoint step 8 does not restore (")
  assert f"moved it to {run_dir.absolute()}/checkpoints/{aside[0]} and resuming from step 4" in lines[0]
  assert "is not valid for value of size" in lines[0]               # TensorStore's reason, short
  assert result.step == 12 and checkpoint_steps(run_dir) == [4, 8, 12]
  assert losses_of(run_dir) == losses_of(tmp_path / "straight")      # exact, from step 4
  goosejax.load_pretrained(run_dir)                                  # the renamed step is ignored


def test_no_checkpoint_that_restores_is_refused_naming_each(stopped_at_8, tmp_path, capsys):
  run_dir = copy_of(stopped_at_8, tmp_path)
  truncate_largest_array_file(run_dir / "checkpoints" / "8")
  shutil.rmtree(run_dir / "checkpoints" / "4" / "opt_state" / "d")
  with pytest.raises(CheckpointError, match=r"no checkpoint restores \(step 8: .*; step 4: .*\); "
                                            "nothing was moved or deleted") as refused:
    run(run_dir)
  assert "\n" not in str(refused.value)
  assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["4", "8"]


# ----------------------------------------------------------------------------- config checks


def test_config_is_checked_against_the_run_before_config_json_is_written(stopped_at_8, tmp_path):
  run_dir = copy_of(stopped_at_8, tmp_path)
  saved = (run_dir / "config.json").read_bytes()
  with pytest.raises(CheckpointError, match=r"data position .* \(.*config.json vs now: "
                                            r"data.ctx_len 16 -> 32\)"):
    run(run_dir, ["data.ctx_len=32"], batches=SyntheticBatches(256, 32, 8))
  assert (run_dir / "config.json").read_bytes() == saved
  # Without config.json the newest checkpoint's saved config says what the run is.
  (run_dir / "config.json").unlink()
  with pytest.raises(CheckpointError, match=r"holds a different model \(.*checkpoints/8/meta/"
                                            r"metadata vs now: model.n_layer 2 -> 3\)"):
    run(run_dir, ["model.n_layer=3"])
  assert not (run_dir / "config.json").exists()
  # An unreadable newest saved config (binary, an integer of 5000 digits): the one before says.
  for junk in (b"\xff\xfe\x00", b'{"config": {"run": {"steps": ' + b"9" * 5000 + b"}}}"):
    (run_dir / "checkpoints" / "8" / "meta" / "metadata").write_bytes(junk)
    with pytest.raises(CheckpointError, match=r"checkpoints/4/meta/metadata vs now: model.n_layer"):
      run(run_dir, ["model.n_layer=3"])


def test_a_refused_data_position_names_the_changed_settings(tmp_path):
  from goosejax.config import DataConfig
  from goosejax.data import BinIdxWriter, DataError, make_train_iterator
  with BinIdxWriter(tmp_path / "corpus", np.uint16) as writer:
    for _ in range(40):
      writer.add_document(np.arange(1, 30))
  config = DataConfig(source="binidx", paths=(str(tmp_path / "corpus"),), ctx_len=16,
                      batch_size=4, validation_fraction=0.0)
  state = make_train_iterator(config, 0, 1).get_state()
  with pytest.raises(DataError, match=r"different data or data settings \(data.ctx_len 16 -> 8, "
                                      r"files .*\[\['corpus', 1160, 72, None\]\]"):
    make_train_iterator(dataclasses.replace(config, ctx_len=8), 0, 1).set_state(state)


# ----------------------------------------------------------------------------- metrics, bad input


def test_metrics_jsonl_deleted_mid_run_is_recreated(tmp_path):
  logger = MetricsLogger(tmp_path, total_steps=3, tokens_per_step=1, train_flops_per_token=1.0,
                         peak_flops_total=1.0, n_devices=1, resume_step=0, tensorboard=False,
                         progress_bar=False)
  metrics = {"loss": 1.0, "lr": 0.1, "grad_norm": 1.0}
  logger.log_step(1, metrics)
  (tmp_path / "metrics.jsonl").unlink()
  logger.log_step(2, metrics)
  logger.log_eval(2, 0.5)
  logger.close()
  assert read_metrics(tmp_path) == [{"step": 2, **metrics}, {"step": 2, "val_loss": 0.5}]


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00binary",
                                     b'{"run": {"steps": ' + b"9" * 5000 + b"}}",
                                     b'{"run": {"steps": 99999999999999999999}}'])
def test_a_foreign_config_json_in_the_run_dir_is_one_line(content, tmp_path, capsys):
  (tmp_path / "config.json").write_bytes(content)
  assert goosejax_main(["train", "--config", "tiny", "--run-dir", str(tmp_path)]) == 2
  assert f"{tmp_path / 'config.json'}: not a goosejax run config (" in one_line_error(capsys)
  assert (tmp_path / "config.json").read_bytes() == content


def test_bad_run_dir_or_init_from_is_one_line_and_exit_2(tmp_path, capsys):
  train = lambda *args: goosejax_main(["train", "--config", "tiny", "--no-progress-bar", *args])
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  assert train("--run-dir", str(a_file)) == 2
  assert f"--run-dir {a_file}: exists and is not a directory" in one_line_error(capsys)
  assert train("--run-dir", str(a_file / "run")) == 2
  assert f"--run-dir {a_file / 'run'}: cannot create it (Not a directory)" in one_line_error(capsys)
  with read_only(tmp_path / "read_only") as directory:
    assert train("--run-dir", str(directory)) == 2
    err = one_line_error(capsys)
    assert f"--run-dir {directory}: cannot write in it ({directory / 'train.lock'}: " in err
  missing = tmp_path / "no_such_weights.pth"
  assert train("--run-dir", str(tmp_path / "new"), "--init-from", str(missing)) == 2
  assert f"--init-from {missing}: no such file or directory" in one_line_error(capsys)
  assert not (tmp_path / "new" / "config.json").exists()


def test_nan_before_the_first_checkpoint_says_rerunning_starts_over(tmp_path):
  with pytest.raises(NonFiniteLossError, match="step 2: loss nan.*no checkpoint was written yet; "
                                               "rerunning starts over"):
    run(tmp_path, batches=PoisonedBatches(bad=1))
  assert checkpoint_steps(tmp_path) == []
