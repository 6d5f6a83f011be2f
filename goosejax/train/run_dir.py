"""One `goosejax train` per run directory: RUN_DIR/train.lock.

The lock is an exclusive `fcntl.flock` on RUN_DIR/train.lock, which the kernel releases
when the holder dies, even by kill -9; the file also names the holder (host, pid, start
time) for the refusal message. A clean exit empties the file, so a non-empty file found
unlocked was left by a process that died: it is taken over with a one-line notice.

Where the filesystem has no flock (some NFS/Lustre mounts), the file alone decides: a
holder that is still running on this host, or any holder on another host (whose pid
cannot be checked from here), refuses the start; a dead holder on this host is taken over.
In a multi-process job only process 0 takes the lock (it alone writes config.json and
metrics); the others learn its outcome from `train`.
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
from typing import Callable

from goosejax.errors import GoosejaxError

LOCK_FILE = "train.lock"
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
