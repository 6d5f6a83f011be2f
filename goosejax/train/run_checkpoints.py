"""Training checkpoints in a run directory (Orbax), and reading their parameters back.

    RUN_DIR/config.json                the run's full config (Config.to_dict())
    RUN_DIR/checkpoints/<step>/        one Orbax checkpoint per saved step
        params/                        {dotted name: fp32 array}, layers stacked [L, ...]
                                       (goosejax.model.params names)
        opt_state/                     optax state over the same dict
        meta/metadata                  JSON: format_version, step, model config, full config
        data/process_<i>-of-<n>.json   each process's data-iterator state

`<step>` counts completed updates. Orbax writes each checkpoint into a temporary directory
and renames it into place only when every item is complete, so a crash (even kill -9)
mid-save leaves the previous checkpoints as the latest; incomplete temporaries are never
listed. Saves are asynchronous: arrays are copied off the devices, then written while
training continues. The newest `keep` checkpoints are kept.

Failures: a save is refused before it starts when the filesystem has less free space than
the state's size, and a background save that fails (a full disk, an I/O error) is reported
by `raise_if_save_failed()` at the next step boundary; both raise CheckpointSaveError
naming the step, the space needed and free, and the newest complete checkpoint, which is
kept (the failed save's partial files are removed). `restore_newest` falls back past checkpoints that do not restore (a truncated or
deleted array file): it renames each to `<step>.corrupt-<time>`, a name Orbax and goosejax
never read as a step, and says so; when none restores it refuses, naming each, and renames
nothing.

This is the run-directory layout of goosejax/checkpoint/format.py (a CheckpointManager step with
params/ as a flat dict and meta/metadata): `goosejax.load_pretrained(RUN_DIR)` and
`goosejax.checkpoint.format.load_checkpoint(RUN_DIR)` read a run's newest checkpoint for inference.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from goosejax.checkpoint.format import (FORMAT_VERSION, RUN_CHECKPOINTS, CheckpointError, checkpoint_steps,
                                 step_directory)
from goosejax.config import Config, config_from_dict

CONFIG_FILE = "config.json"
CORRUPT_SUFFIX = ".corrupt-"


class CheckpointSaveError(CheckpointError):
  """A checkpoint could not be written (e.g. the disk is full); older ones are kept."""


class DataStateHandler(ocp.CheckpointHandler):
  """Saves each process's data-iterator state (a JSON-serialisable value) to its own file."""

  @staticmethod
  def _file(directory: epath.Path) -> epath.Path:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

  def save(self, directory: epath.Path, args: "DataStateSave"):
    self._file(directory).write_text(json.dumps(args.state))

  def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None) -> Any:
    path = self._file(directory)
    if not path.exists():
      # Saved by another process count: goosejax's iterators keep a global position, the
      # same in every process's file, so process 0's restores any process count.
      candidates = sorted(directory.glob("process_0-of-*.json"))
      if not candidates:
        raise CheckpointError(f"{directory}: no data-iterator state (process_<i>-of-<n>.json)")
      path = candidates[0]
    return json.loads(path.read_text())

  def metadata(self, directory: epath.Path) -> None:
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs carrying each leaf's sharding: the restore target (any mesh)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class TrainCheckpointer:
  """Saves and restores (params, opt_state, data state, meta) under RUN_DIR/checkpoints."""

  def __init__(self, run_dir: str | Path, keep: int, async_save: bool = True):
    self.directory = Path(run_dir).absolute() / RUN_CHECKPOINTS
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("params", "opt_state", "meta", "data"), options=options)
    self.pending_step: int | None = None    # a save started and not yet known to be complete
    self.state_bytes = 0                    # size of the arrays of the last save
    self._quiet = _QuietOrbaxFailures(self)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, params: Any, opt_state: Any, data_state: Any,
           meta: Mapping[str, Any]) -> None:
    """Starts a save of the state after `step` updates; returns once arrays are off-device.
    Raises CheckpointSaveError when there is no room for it or the previous save failed."""
    self.state_bytes = _tree_bytes(params) + _tree_bytes(opt_state)
    # Orbax would wait for the previous save inside manager.save anyway; waiting first makes
    # the free space final and the previous checkpoint complete before the room is judged.
    self.wait()
    self._check_room(step)
    meta = {"format_version": FORMAT_VERSION, "step": step, **meta}
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta), data=DataStateSave(data_state))
    self.pending_step = step
    try:
      self.manager.save(step, args=args, force=True)
    except Exception as e:  # Orbax reports I/O failures as ValueError or bare Exception
      error = self._save_failed(step, e)
      self.pending_step = None
      raise error from None

  def raise_if_save_failed(self) -> None:
    """Without blocking: raise CheckpointSaveError if the background save has failed."""
    if self.pending_step is not None and not self.manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Blocks until background saves are on disk; CheckpointSaveError if one failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._save_failed(self.pending_step, e) from None
    finally:
      self.pending_step = None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()  # Orbax raises a failed save once per thread: not again here
      self._quiet.remove()

  def _check_room(self, step: int) -> None:
    free = shutil.disk_usage(self.directory).free
    if not _all_processes(free >= self.state_bytes):
      raise CheckpointSaveError(self._no_room_message(step, "not started", free))

  def _save_failed(self, step: int | None, error: BaseException) -> CheckpointSaveError:
    gc.collect()  # the failed write's abandoned futures complain now, while quieted
    if step is not None and jax.process_index() == 0:
      for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
        shutil.rmtree(partial, ignore_errors=True)  # give the space back now, not at restart
    free = shutil.disk_usage(self.directory).free
    return CheckpointSaveError(self._no_room_message(step, f"failed ({short_reason(error)})", free))

  def _no_room_message(self, step: int | None, what: str, free: int) -> str:
    kept = [s for s in checkpoint_steps(self.directory.parent) if s != step]
    then = (f"the newest complete checkpoint, step {kept[-1]}, is kept. Free space (or lower "
            "run.keep_checkpoints) and rerun the same command to resume from it") if kept else (
            "no complete checkpoint exists yet. Free space and rerun the same command (it "
            "starts over)")
    where = self.directory / str(step) if step is not None else self.directory
    return (f"checkpoint {where} {what}: the state needs about {_mib(self.state_bytes)}, the "
            f"filesystem has {_mib(free)} free; {then}")

  def restore(self, step: int, params_like: Any, opt_state_like: Any) -> tuple[Any, Any, Any, dict]:
    """(params, opt_state, data state, meta) of `step`, placed like the `*_like` arrays
    (their shardings may belong to a different mesh than the one that saved them)."""
    args = ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(params_like)),
        opt_state=ocp.args.StandardRestore(_abstract(opt_state_like)),
        meta=ocp.args.JsonRestore(), data=DataStateRestore())
    restored = self.manager.restore(step, args=args)
    meta = dict(restored.meta)
    if meta.get("format_version") != FORMAT_VERSION:
      raise CheckpointError(f"{self.directory / str(step)}: format_version "
                            f"{meta.get('format_version')!r}, this goosejax reads {FORMAT_VERSION}")
    return restored.params, restored.opt_state, restored.data, meta

  def restore_newest(self, params_like: Any, opt_state_like: Any,
                     say: Callable[[str], None]) -> tuple[int, Any, Any, Any, dict] | None:
    """(step, params, opt_state, data state, meta) of the newest checkpoint that restores,
    None when there is none. Newer ones that do not restore are renamed aside (see module
    doc); if none restores, CheckpointError names each and nothing is renamed."""
    failed: list[tuple[int, str]] = []
    for step in sorted(self.all_steps(), reverse=True):
      restored, reason = self._try_restore(step, params_like, opt_state_like)
      if _all_processes(reason is None):
        self._set_aside(failed, step, say)
        return (step, *restored)
      failed.append((step, reason or "failed on another process"))
    if failed:
      listed = "; ".join(f"step {s}: {r}" for s, r in failed)
      raise CheckpointError(f"{self.directory}: no checkpoint restores ({listed}); nothing was "
                            "moved or deleted. Remove the broken step directories to start over")
    return None

  def _try_restore(self, step: int, params_like: Any, opt_state_like: Any) -> tuple[Any, str | None]:
    """(restored, None), or (None, why not) for a checkpoint that does not restore."""
    self._quiet.restoring = True
    try:
      try:
        return self.restore(step, params_like, opt_state_like), None
      except Exception as e:  # any read failure (TensorStore raises a bare Exception)
        reason = short_reason(e)
      gc.collect()  # the failed read's abandoned coroutines complain now, while quieted
      return None, reason
    finally:
      self._quiet.restoring = False

  def _set_aside(self, failed: list[tuple[int, str]], restored_step: int,
                 say: Callable[[str], None]) -> None:
    """Rename the checkpoints in `failed` so that no later run reads them as steps."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for step, reason in failed:
      aside = self.directory / f"{step}{CORRUPT_SUFFIX}{stamp}"
      if jax.process_index() == 0:
        (self.directory / str(step)).rename(aside)
      say(f"checkpoint step {step} does not restore ({reason}); moved it to {aside} and "
          f"resuming from step {restored_step}")
    if failed:
      _sync("goosejax_set_aside_corrupt_checkpoints")
      self.manager.reload()


class _QuietOrbaxFailures(logging.Filter):
  """Failed saves and restores are reported once, in one line (CheckpointSaveError, the
  fallback notice). Without this, Orbax logs every failing write with a traceback and
  asyncio logs the failed operation's futures ('exception was never retrieved'); such
  error records are dropped while a save is in flight or a restore is being tried."""

  LOGGERS = ("absl", "asyncio")

  def __init__(self, checkpointer: TrainCheckpointer):
    super().__init__()
    self.checkpointer = checkpointer
    self.restoring = False
    for name in self.LOGGERS:
      logging.getLogger(name).addFilter(self)
    _drop_orbax_unraisables()

  def active(self) -> bool:
    return self.restoring or self.checkpointer.pending_step is not None

  def filter(self, record: logging.LogRecord) -> bool:
    if not (self.active() and record.levelno >= logging.ERROR):
      return True
    from_orbax = "/orbax/" in record.pathname and record.exc_info is not None
    unretrieved = record.name == "asyncio" and "exception was never retrieved" in record.getMessage()
    return not (from_orbax or unretrieved)

  def remove(self) -> None:
    for name in self.LOGGERS:
      logging.getLogger(name).removeFilter(self)


def _drop_orbax_unraisables() -> None:
  """After a failed save or restore, TensorStore keeps calling back into the failed
  operation's closed event loop and abandoned coroutines, printing dozens of
  'Exception ignored' tracebacks, some after the checkpointer is closed: the process drops
  those (and only those) from the first TrainCheckpointer on."""
  if getattr(sys.unraisablehook, "_goosejax_orbax_filter", False):
    return
  previous = sys.unraisablehook

  def hook(info: Any) -> None:
    closed_loop = isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == "Event loop is closed"
    if not (closed_loop or _raised_in_orbax(info.exc_traceback)):
      previous(info)

  hook._goosejax_orbax_filter = True
  sys.unraisablehook = hook


def _raised_in_orbax(traceback: Any) -> bool:
  while traceback is not None:
    if "/orbax/" in traceback.tb_frame.f_code.co_filename:
      return True
    traceback = traceback.tb_next
  return False


def short_reason(error: BaseException) -> str:
  """The gist of an Orbax/TensorStore error, on one line: its innermost cause, without the
  TensorStore spec dump, e.g. 'blocks.ffn.value/0.0.0: Requested byte range ...'."""
  chain = [error]
  while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  for e in chain:
    if isinstance(e, OSError) and e.strerror:
      return e.strerror + (f": {e.filename}" if e.filename else "")
  text = str(chain[-1]).strip().splitlines()[0] if str(chain[-1]).strip() else type(chain[-1]).__name__
  text = re.sub(r"\s*\[os_error_code='?\d+'?\]", "", text)
  array = re.search(r'Error (?:reading|writing) "([^"]+)"', text)
  gist = text.rsplit(": ", 1)[-1]
  return (f"{array.group(1)}: {gist}" if array else gist)[:240]


def _tree_bytes(tree: Any) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
             if hasattr(x, "shape"))


def _mib(n: int) -> str:
  return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def _all_processes(ok: bool) -> bool:
  """`ok` on every process (a collective in multi-process runs: all must call it)."""
  if jax.process_count() == 1:
    return bool(ok)
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(name)


def write_run_config(run_dir: str | Path, cfg: Config) -> None:
  path = Path(run_dir) / CONFIG_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
  tmp.replace(path)


def read_checkpoint_config(run_dir: str | Path) -> tuple[Config, Path] | None:
  """(config, its file) saved in the newest checkpoint whose meta reads (what config.json
  held when it was written); None without checkpoints."""
  for step in reversed(checkpoint_steps(run_dir)):
    path = step_directory(run_dir, step) / "meta" / "metadata"
    try:
      return config_from_dict(json.loads(path.read_text())["config"], str(path)), path
    except (OSError, KeyError, TypeError, ValueError):   # ValueError: bad JSON, bytes or config
      continue  # unreadable: an older checkpoint may still say
  return None


def read_run_config(run_dir: str | Path) -> Config | None:
  path = Path(run_dir) / CONFIG_FILE
  if not path.exists():
    return None
  try:
    return config_from_dict(json.loads(path.read_text()), str(path))
  except ValueError as e:   # not JSON, not UTF-8, an integer of 4300+ digits, a bad config
    raise CheckpointError(f"{path}: not a goosejax run config ({e}); is this a run "
                          "directory of another program or goosejax version?") from None
