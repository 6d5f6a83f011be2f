"""The run directory before training: one `goosejax train` at a time holds it, the config
must continue what it holds, and only then are config.json and config.yaml written.

Lock: RUN_DIR/train.lock, an exclusive `fcntl.flock`, which the kernel releases when the
holder dies, even by kill -9; the file also names the holder (host, pid, start time) for the
refusal message. A clean exit empties the file, so a non-empty file found unlocked was left
by a process that died: it is taken over with a one-line notice.

Where the filesystem has no flock (some NFS/Lustre mounts), the file alone decides: a
holder that is still running on this host, or any holder on another host (whose pid
cannot be checked from here), refuses the start; a dead holder on this host is taken over.
In a multi-process job only process 0 takes the lock (it alone writes config.json and
metrics); `take_lock` tells every process its outcome.

Compatibility (`check_compatible`): the same model as config.json (or the newest
checkpoint's saved config), and the same data settings once a checkpoint records a data
position; execution settings may change.

The lock needs only the standard library and goosejax.config: what reads checkpoints or talks
to other processes imports JAX inside the function, so a bare process can hold the lock.
"""
from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from goosejax.config import EXECUTION_SETTINGS, Config, ModelConfig
from goosejax.config.text import write_config_yaml
from goosejax.errors import GoosejaxError

LOCK_FILE = "train.lock"
# The config as YAML for people (`goosejax config`'s output, each value's source noted);
# resuming reads config.json.
RESOLVED_CONFIG_FILE = "config.yaml"
# flock errors that mean "this filesystem cannot lock", not "someone holds it".
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


class RunDirError(GoosejaxError):
  """A --run-dir that cannot be used: not a directory, not writable."""


class RunDirLockedError(RunDirError):
  """Another `goosejax train` holds the run directory."""


@dataclasses.dataclass(frozen=True)
class Holder:
  host: str
  pid: int
  since: str

  def describe(self) -> str:
    return f"pid {self.pid} on host {self.host} (since {self.since})"

  def is_dead_here(self) -> bool:
    """True when the holder ran on this host and its pid no longer exists."""
    return self.host == socket.gethostname() and not _pid_alive(self.pid)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # exists, owned by another user
  return True


def _read_holder(fd: int) -> Holder | None:
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 4096).decode(errors="replace").strip()
  if not text:
    return None
  try:
    fields = json.loads(text)
    return Holder(str(fields["host"]), int(fields["pid"]), str(fields["since"]))
  except (ValueError, KeyError, TypeError):
    return Holder("?", -1, f"unreadable lock file: {text[:60]!r}")


def _write_holder(fd: int) -> None:
  since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  text = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": since})
  os.ftruncate(fd, 0)
  os.pwrite(fd, (text + "\n").encode(), 0)
  os.fsync(fd)


def prepare_run_dir(run_dir: Path) -> None:
  """Create `run_dir` if needed; a one-line RunDirError when it is not a usable directory."""
  if run_dir.exists() and not run_dir.is_dir():
    raise RunDirError(f"--run-dir {run_dir}: exists and is not a directory")
  try:
    run_dir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise RunDirError(f"--run-dir {run_dir}: cannot create it ({e.strerror or e})") from None


class RunLock:
  """The held lock of one run directory; `release()` (idempotent) gives it back."""

  def __init__(self, path: Path, fd: int, flocked: bool):
    self.path, self.fd, self.flocked = path, fd, flocked

  def release(self) -> None:
    if self.fd < 0:
      return
    try:
      os.ftruncate(self.fd, 0)  # an empty file says "released cleanly"
    except OSError:
      pass  # e.g. a full disk; dropping the flock below is what matters
    if self.flocked:
      fcntl.flock(self.fd, fcntl.LOCK_UN)
    os.close(self.fd)
    self.fd = -1

  def __enter__(self) -> "RunLock":
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def acquire(run_dir: str | os.PathLike, say: Callable[[str], None] = print) -> RunLock:
  """Take RUN_DIR/train.lock or raise RunDirLockedError naming its holder."""
  run_dir = Path(run_dir)
  prepare_run_dir(run_dir)
  path = run_dir / LOCK_FILE
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise RunDirError(f"--run-dir {run_dir}: cannot write in it ({path}: {e.strerror or e})") from None
  try:
    lock = _lock(path, fd)
    previous = _read_holder(fd)
    if previous is not None and previous.pid != os.getpid():
      say(f"{path}: taking over the lock left by {previous.describe()}, which ended without "
          "releasing it")
    _write_holder(fd)
    return lock
  except BaseException:
    os.close(fd)  # closing drops a flock taken above
    raise


def _lock(path: Path, fd: int) -> RunLock:
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    raise RunDirLockedError(_held_message(path, _read_holder(fd))) from None
  except OSError as e:
    if e.errno not in _NO_FLOCK:
      raise RunDirError(f"{path}: cannot lock it ({e.strerror or e})") from None
    return _lock_without_flock(path, fd)
  return RunLock(path, fd, flocked=True)


def _lock_without_flock(path: Path, fd: int) -> RunLock:
  """The lock file's content alone decides (see the module doc)."""
  holder = _read_holder(fd)
  if holder is not None and holder.pid != os.getpid() and not holder.is_dead_here():
    raise RunDirLockedError(_held_message(path, holder) + "; this filesystem has no flock, so "
                            f"if that process is gone, delete {path}")
  return RunLock(path, fd, flocked=False)


def _held_message(path: Path, holder: Holder | None) -> str:
  who = holder.describe() if holder is not None else "a process that has not written its name yet"
  return (f"{path.parent} is in use by another goosejax train: {who}; wait for it to finish or "
          f"stop it, or use another --run-dir")


def take_lock(run_dir: Path, say: Callable[[str], None]) -> RunLock | None:
  """Process 0 takes the lock (the others get None); every process raises if it could not."""
  import jax  # here, not at the top: a bare process holds the lock without JAX
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = acquire(run_dir, say)
    except RunDirError as e:
      error = e
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils
    taken = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not taken and error is None:
      error = RunDirError(f"{run_dir}: process 0 could not take the run-directory lock (its "
                          "message says why)")
  if error is not None:
    raise error
  return lock


# Data settings the saved data position depends on. data.paths is left to the data
# pipeline's own check (file names and sizes), so a corpus may move to another directory.
_DATA_POSITION_SETTINGS = ("source", "tokenizer", "ctx_len", "batch_size", "order", "seed",
                           "weights", "pack_documents", "validation_fraction", "magic_prime")


def _changes(section: str, before: Any, now: Any, keys: Sequence[str]) -> list[str]:
  """['model.n_layer 2 -> 3', ...] for the `keys` of two config dataclasses that differ."""
  return [f"{section}.{k} {getattr(before, k)!r} -> {getattr(now, k)!r}" for k in keys
          if getattr(before, k) != getattr(now, k)]


def check_compatible(run_dir: Path, cfg: Config) -> list[str]:
  """The config must continue what the run directory holds: the same model, and the same
  data settings once a checkpoint records a data position. Reads config.json, or the
  newest checkpoint's saved config when config.json is gone. Returns the execution settings
  (EXECUTION_SETTINGS: compute dtype, WKV implementation and chunk size) that changed,
  which are allowed."""
  # Checkpoint reading imports JAX and Orbax: here, so the lock alone does not.
  from goosejax.checkpoint.format import CheckpointError, checkpoint_steps
  from goosejax.train.run_checkpoints import read_checkpoint_config, read_run_config
  previous, source = read_run_config(run_dir), run_dir / "config.json"
  if previous is None:
    from_checkpoint = read_checkpoint_config(run_dir)
    if from_checkpoint is None:
      return []
    previous, source = from_checkpoint
  identity = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in EXECUTION_SETTINGS]
  changed = _changes("model", previous.model, cfg.model, identity)
  if changed:
    raise CheckpointError(f"{run_dir} holds a different model ({source} vs now: "
                          f"{', '.join(changed)}); use a new --run-dir")
  switched = _changes("model", previous.model, cfg.model, EXECUTION_SETTINGS)
  if not checkpoint_steps(run_dir):
    return switched
  changed = _changes("data", previous.data, cfg.data, _DATA_POSITION_SETTINGS)
  if changed:
    raise CheckpointError(f"{run_dir}: its checkpoints resume a data position that depends on "
                          f"the data settings, which changed ({source} vs now: "
                          f"{', '.join(changed)}); set them back or use a new --run-dir")
  return switched


def write_config_files(run_dir: Path, cfg: Config, sources: Mapping[str, str] | None,
                       say: Callable[[str], None]) -> None:
  """config.json (what a resumed run checks against) and config.yaml (for people, each value's
  source noted). Call it only once everything has accepted `cfg`."""
  from goosejax.train.run_checkpoints import write_run_config  # imports Orbax: see check_compatible
  write_run_config(run_dir, cfg)
  write_config_yaml(run_dir / RESOLVED_CONFIG_FILE, cfg, sources)
  say(f"resolved config: {run_dir / RESOLVED_CONFIG_FILE} (`--config` reads it back)")
