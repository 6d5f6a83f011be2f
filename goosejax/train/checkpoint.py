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

This is the run-directory layout of goosejax/checkpoint.py (a CheckpointManager step with
params/ as a flat dict and meta/metadata): `goosejax.load_pretrained(RUN_DIR)` and
`goosejax.checkpoint.load_checkpoint(RUN_DIR)` read a run's newest checkpoint for inference.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from etils import epath

from goosejax.checkpoint import FORMAT_VERSION, RUN_CHECKPOINTS, CheckpointError
from goosejax.config import Config, ConfigError, config_from_dict

CONFIG_FILE = "config.json"


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

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, params: Any, opt_state: Any, data_state: Any,
           meta: Mapping[str, Any]) -> None:
    """Starts a save of the state after `step` updates; returns once arrays are off-device."""
    meta = {"format_version": FORMAT_VERSION, "step": step, **meta}
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta), data=DataStateSave(data_state))
    self.manager.save(step, args=args, force=True)

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

  def wait(self) -> None:
    """Blocks until background saves are on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def write_run_config(run_dir: str | Path, cfg: Config) -> None:
  path = Path(run_dir) / CONFIG_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
  tmp.replace(path)


def read_run_config(run_dir: str | Path) -> Config | None:
  path = Path(run_dir) / CONFIG_FILE
  if not path.exists():
    return None
  try:
    return config_from_dict(json.loads(path.read_text()), str(path))
  except (json.JSONDecodeError, ConfigError) as e:
    raise CheckpointError(f"{path}: not a goosejax run config ({e}); is this a run "
                          "directory of another program or goosejax version?") from None
