"""The goosejax checkpoint directory: what `goosejax convert` writes, training saves and
`goosejax.load_pretrained` reads.

One checkpoint (format version 1):

  CKPT/
    config.json     {"format": "goosejax-checkpoint", "format_version": 1,
                     "model": {every ModelConfig field}, "step": int or null,
                     "metadata": {free-form JSON: source file, run config, ...}}
    params/         Orbax checkpoint (StandardCheckpointHandler) of the parameter pytree:
                    nested dicts following the model's attribute paths, layers stacked [L, ...]
                    ({"emb": [V,C], "ln0": {"weight", "bias"}, "blocks": {"att": {"w1": [L,C,D],
                    ...}, "ffn": {...}, "ln1": {...}, "ln2": {...}}, "ln_out": {...},
                    "head": [C,V]}), stored in the dtype of model.param_dtype
    <item>/         optional further Orbax items saved in the same step (e.g. training's
                    "opt_state"), read back with `restore_item`

A training run keeps its checkpoints as RUN/checkpoints/<step>/ (the step as a plain
integer); `resolve_checkpoint(RUN)` and `load_pretrained(RUN)` take the highest complete step.
A step directory may be a checkpoint directory as above, or one written by an Orbax
CheckpointManager with the items params/ (the same parameter names, nested or as a flat
{dotted name: array} dict) and meta/ (a JsonSave item: meta/metadata holds
{"format_version": 1, "step": int, "model": {ModelConfig fields}, ...}); both read the same.

Writing is crash-safe: everything is written into CKPT's sibling `.CKPT.tmp/` (Orbax items
first, config.json last) and that folder is renamed to CKPT only when complete, so a
directory named CKPT always holds a whole checkpoint and a crash leaves only the temp folder,
which the next save to CKPT removes. In a multi-process run every process calls
`save_checkpoint` (Orbax coordinates the array writes); only process 0 touches the folders.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from goosejax.config import ConfigError, ModelConfig, model_config_from_dict
from goosejax.errors import GoosejaxError

FORMAT_NAME = "goosejax-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MANAGER_META_FILE = os.path.join("meta", "metadata")   # an Orbax CheckpointManager JsonSave item
PARAMS_ITEM = "params"
RUN_CHECKPOINTS = "checkpoints"


class CheckpointError(GoosejaxError):
  """A path that is not a (complete, supported) goosejax checkpoint or run directory."""


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
  path: Path
  model: ModelConfig
  step: int | None
  format_version: int
  metadata: dict[str, Any]


# ----------------------------------------------------------------------------- pytrees


def nest_params(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{"blocks.att.w1": x} -> {"blocks": {"att": {"w1": x}}}."""
  nested: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split(".")
    node = nested
    for part in parents:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ValueError(f"parameter name {name!r} nests below another parameter")
    if leaf in node:
      raise ValueError(f"parameter name {name!r} is given twice or also as a prefix")
    node[leaf] = value
  return nested


def flatten_params(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """The inverse of `nest_params`; a flat dict is returned unchanged."""
  flat: dict[str, Any] = {}
  for key, value in nested.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten_params(value, name + "."))
    else:
      flat[name] = value
  return flat


# ----------------------------------------------------------------------------- finding


def _metadata_file(path: Path) -> Path | None:
  for name in (CONFIG_FILE, MANAGER_META_FILE):
    if (path / name).is_file():
      return path / name
  return None


def is_checkpoint(path: str | os.PathLike) -> bool:
  path = Path(path)
  return _metadata_file(path) is not None and (path / PARAMS_ITEM).is_dir()


def checkpoint_steps(run_dir: str | os.PathLike) -> list[int]:
  """Complete checkpoint steps of a run directory, ascending."""
  folder = Path(run_dir) / RUN_CHECKPOINTS
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and is_checkpoint(p))


def step_directory(run_dir: str | os.PathLike, step: int) -> Path:
  return Path(run_dir) / RUN_CHECKPOINTS / str(int(step))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
  """A checkpoint directory itself, or the latest complete step of a run directory."""
  path = Path(path)
  if is_checkpoint(path):
    return path
  if not path.is_dir():
    raise CheckpointError(f"{path}: not a directory, so neither a goosejax checkpoint nor a run "
                          "directory")
  steps = checkpoint_steps(path)
  if steps:
    return step_directory(path, steps[-1])
  if (path / RUN_CHECKPOINTS).is_dir():
    raise CheckpointError(f"{path}: run directory without a complete checkpoint: expected "
                          f"{path / RUN_CHECKPOINTS}/<step>/ holding {CONFIG_FILE} and {PARAMS_ITEM}/")
  raise CheckpointError(f"{path}: not a goosejax checkpoint (expected {CONFIG_FILE} and "
                        f"{PARAMS_ITEM}/) nor a run directory (expected {RUN_CHECKPOINTS}/<step>/)")


def read_info(path: str | os.PathLike) -> CheckpointInfo:
  """config.json (or a CheckpointManager step's meta/metadata) of a checkpoint, validated."""
  path = Path(path)
  config_path = _metadata_file(path)
  if config_path is None:
    raise CheckpointError(f"{path}: no {CONFIG_FILE} (nor {MANAGER_META_FILE}); not a goosejax "
                          "checkpoint")
  try:
    tree = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{config_path}: not valid JSON: {e}") from None
  if not isinstance(tree, dict):
    raise CheckpointError(f"{config_path}: expected a JSON object, got {tree!r}")
  if config_path.name == CONFIG_FILE and tree.get("format") != FORMAT_NAME:
    raise CheckpointError(f"{config_path}: expected \"format\": \"{FORMAT_NAME}\", got "
                          f"{tree.get('format')!r}")
  version = tree.get("format_version")
  if version != FORMAT_VERSION:
    raise CheckpointError(f"{config_path}: format_version {version!r} is not supported; this "
                          f"goosejax reads version {FORMAT_VERSION}")
  if not isinstance(tree.get("model"), dict):
    raise CheckpointError(f"{config_path}: expected a \"model\" object with the model config")
  try:
    model = model_config_from_dict(tree["model"], str(config_path))
  except ConfigError as e:
    raise CheckpointError(f"{config_path}: invalid model config: {e}") from None
  step = tree.get("step")
  if step is not None and not isinstance(step, int):
    raise CheckpointError(f"{config_path}: \"step\" must be an integer or null, got {step!r}")
  metadata = tree.get("metadata") if config_path.name == CONFIG_FILE else {
      k: v for k, v in tree.items() if k not in ("format_version", "model", "step")}
  return CheckpointInfo(path, model, step, version, dict(metadata or {}))


# ----------------------------------------------------------------------------- saving


def _primary() -> bool:
  return jax.process_index() == 0


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    import orbax.checkpoint as ocp
    ocp.multihost.sync_global_processes(name)


def _check_leaves(name: str, tree: Any) -> None:
  """Only arrays and numbers: checked up front, because a save that Orbax rejects midway can
  still create folders from a background thread after it has failed."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if not isinstance(leaf, (np.ndarray, np.generic, jax.Array, int, float)):
      raise TypeError(f"save_checkpoint: item {name!r} has a {type(leaf).__name__} at "
                      f"{jax.tree_util.keystr(path)}; expected arrays or numbers")


def _save_item(path: Path, tree: Any) -> None:
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()


def save_checkpoint(directory: str | os.PathLike, params: Mapping[str, Any], model: ModelConfig, *,
                    step: int | None = None, metadata: Mapping[str, Any] | None = None,
                    extra_items: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
  """Write a checkpoint directory atomically; returns its path.

  params: flat {dotted name: array} (as `param_dict(model)` gives) or the nested pytree.
  extra_items: further pytrees to save beside params, e.g. {"opt_state": ...}.
  An existing `directory` is an error unless `overwrite` (then it is replaced whole).
  """
  directory = Path(directory).absolute()    # Orbax requires absolute paths
  model.validate()
  names = {PARAMS_ITEM, *(extra_items or {})}
  if CONFIG_FILE in names or any("/" in n or n.startswith(".") for n in names):
    raise ValueError(f"save_checkpoint: invalid item names {sorted(names)}")
  if directory.exists() and not overwrite:
    raise CheckpointError(f"{directory} already exists; pass overwrite=True to replace it")
  params = nest_params(flatten_params(params))
  for name, tree in {PARAMS_ITEM: params, **(extra_items or {})}.items():
    _check_leaves(name, tree)
  tmp = directory.with_name(f".{directory.name}.tmp")
  document = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
              "model": dataclasses.asdict(model), "step": step, "metadata": dict(metadata or {})}
  text = json.dumps(document, indent=2, sort_keys=True) + "\n"   # fails early if not JSON
  if _primary():
    directory.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)    # left by a crash
    tmp.mkdir()
  _sync(f"goosejax_checkpoint_start:{directory}")
  try:
    _save_item(tmp / PARAMS_ITEM, params)
    for name, tree in (extra_items or {}).items():
      _save_item(tmp / name, tree)
    _sync(f"goosejax_checkpoint_items:{directory}")
    if _primary():
      with open(tmp / CONFIG_FILE, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
      if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
      else:
        os.replace(tmp, directory)
  finally:
    if _primary():
      shutil.rmtree(tmp, ignore_errors=True)
  _sync(f"goosejax_checkpoint_done:{directory}")
  return directory


# ----------------------------------------------------------------------------- loading


def restore_item(path: str | os.PathLike, name: str = PARAMS_ITEM, target: Any = None) -> Any:
  """One Orbax item of a checkpoint directory as a pytree.

  Without `target` the arrays come back as host numpy arrays in their stored dtypes; with a
  target pytree (jax.ShapeDtypeStruct leaves carrying shardings, or arrays) Orbax restores
  onto those shardings, e.g. straight onto a device mesh.
  """
  import orbax.checkpoint as ocp
  item = Path(path).absolute() / name
  if not item.is_dir():
    raise CheckpointError(f"{path}: checkpoint has no item {name!r} (no folder {item})")
  try:
    if target is not None:
      with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(item, target)
    with ocp.StandardCheckpointer() as checkpointer:
      tree = checkpointer.metadata(item).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    with ocp.PyTreeCheckpointer() as checkpointer:
      return checkpointer.restore(item, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  except (OSError, ValueError, KeyError) as e:
    raise CheckpointError(f"{item}: cannot restore Orbax item: {type(e).__name__}: {e}") from None


def load_checkpoint(path: str | os.PathLike) -> tuple[CheckpointInfo, dict[str, np.ndarray]]:
  """(info, flat {dotted name: numpy array}) of a checkpoint directory or a run's latest step."""
  info = read_info(resolve_checkpoint(path))
  return info, flatten_params(restore_item(info.path, PARAMS_ITEM))
