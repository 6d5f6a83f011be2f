"""`train(cfg, run_dir)`: one pretraining run, start to finish, resumable at any point.

    mesh -> run dir check -> fresh sharded state, --init-from weights, or the latest
    checkpoint (params, optimizer, data position) -> compile (memory printed) -> steps:
    dispatch step k+1, then read step k's metrics (the host never stalls the device),
    log, evaluate, checkpoint -> final checkpoint.

Stopping: the run ends after `run.steps` updates, on SIGTERM/SIGINT (preemption: a
checkpoint is written first), or with `NonFiniteLossError` when a loss or gradient norm is
NaN/inf; no checkpoint is written from a non-finite step, so the newest one on disk is the
last good state. Re-running the same command resumes from the newest checkpoint and
reproduces the uninterrupted run's losses bit for bit.

The run directory is safe from the run itself: one `train` at a time holds it (run_dir);
everything is checked (the directory, the model and data settings against config.json or
the checkpoints, --init-from) before config.json is written; a checkpoint that cannot be
written (full disk) stops the run at the next step with CheckpointSaveError; a newest
checkpoint that does not restore is moved aside and the one before it resumes.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TextIO

import jax
import numpy as np

from goosejax import sharding
from goosejax.checkpoint.format import checkpoint_steps
from goosejax.config import EXECUTION_SETTINGS, Config, ConfigError, ModelConfig
from goosejax.config.text import write_config_yaml
from goosejax.sharding import SEQUENCE_AXIS
from goosejax.train import recipe, run_dir as run_dir_lock
from goosejax.train.batches import ResumableBatches, open_batches
from goosejax.train.run_checkpoints import (CheckpointError, TrainCheckpointer, read_checkpoint_config,
                                       read_run_config, write_run_config)
from goosejax.train.compiled_steps import CompiledSteps
from goosejax.train.metrics import (MetricsLogger, flops_per_token, memory_summary,
                                    peak_flops_per_device)
from goosejax.wkv.dispatch import startup_line


# The config as YAML for people (`goosejax config`'s output, each value's source noted);
# resuming reads config.json.
RESOLVED_CONFIG_FILE = "config.yaml"


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/inf loss or gradient; the message names the step and the last
  good checkpoint."""


@dataclasses.dataclass
class RunResult:
  step: int                      # updates completed (and checkpointed)
  reason: str                    # "finished", "signal" or "stop_at_step"
  losses: dict[int, float]       # this invocation's training losses by step
  val_loss: float | None


class StopRequest:
  """Set from signal handlers; read by the loop between steps."""

  def __init__(self):
    self.reason: str | None = None

  def request(self, reason: str) -> None:
    self.reason = self.reason or reason


def _install_signal_handlers(stop: StopRequest) -> Callable[[], None]:
  """SIGTERM / first SIGINT -> checkpoint and stop; a second SIGINT aborts at once."""
  if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
    return lambda: None  # multi-process: JAX's preemption sync point handles SIGTERM
  previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

  def on_signal(signum, frame):
    if signum == signal.SIGINT and stop.reason == "signal":
      raise KeyboardInterrupt
    stop.request("signal")

  for sig in previous:
    signal.signal(sig, on_signal)
  return lambda: [signal.signal(sig, handler) for sig, handler in previous.items()]


def _check_batch_layout(cfg: Config, mesh) -> None:
  problem = sharding.batch_layout_problem(cfg, mesh.shape)
  if problem:
    raise ConfigError(problem)
  try:
    sharding.process_row_block(mesh)  # each process loads whole rows (batch_size divides: above)
  except sharding.ShardingError as e:
    raise ConfigError(str(e)) from None


# Data settings the saved data position depends on. data.paths is left to the data
# pipeline's own check (file names and sizes), so a corpus may move to another directory.
_DATA_POSITION_SETTINGS = ("source", "tokenizer", "ctx_len", "batch_size", "order", "seed",
                           "weights", "pack_documents", "validation_fraction", "magic_prime")


def _changes(section: str, before: Any, now: Any, keys: Sequence[str]) -> list[str]:
  """['model.n_layer 2 -> 3', ...] for the `keys` of two config dataclasses that differ."""
  return [f"{section}.{k} {getattr(before, k)!r} -> {getattr(now, k)!r}" for k in keys
          if getattr(before, k) != getattr(now, k)]


def _check_run_dir(run_dir: Path, cfg: Config) -> list[str]:
  """The config must continue what the run directory holds: the same model, and the same
  data settings once a checkpoint records a data position. Reads config.json, or the
  newest checkpoint's saved config when config.json is gone. Returns the execution settings
  (EXECUTION_SETTINGS: compute dtype, WKV implementation and chunk size) that changed,
  which are allowed."""
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


def _take_run_dir_lock(run_dir: Path, say: Callable[[str], None]) -> "run_dir_lock.RunLock | None":
  """Process 0 takes the lock; every process raises if it could not."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = run_dir_lock.acquire(run_dir, say)
    except run_dir_lock.RunDirError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    taken = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not taken and error is None:
      error = run_dir_lock.RunDirError(f"{run_dir}: process 0 could not take the run-directory "
                                   "lock (its message says why)")
  if error is not None:
    raise error
  return lock


def load_init_params(path: str | Path, cfg: Config) -> dict[str, np.ndarray]:
  """Starting weights: an official .pth, a goosejax checkpoint or a run directory's latest
  step (goosejax.checkpoint.pretrained.read_params), checked against the model config."""
  from goosejax.checkpoint.pretrained import read_params
  if not Path(path).exists():
    raise CheckpointError(f"--init-from {path}: no such file or directory")
  _, params, _ = read_params(path)
  params = {name: np.asarray(value, np.float32) for name, value in params.items()}
  _, expected = recipe.abstract_model(cfg)
  wrong = {name: (tuple(params[name].shape) if name in params else None, tuple(s.shape))
           for name, s in expected.items() if name not in params or params[name].shape != s.shape}
  extra = sorted(set(params) - set(expected))
  if wrong or extra:
    raise CheckpointError(f"--init-from {path}: the weights do not fit the configured model "
                          f"(model.* settings): (found, expected) shapes {wrong}, unexpected {extra}")
  return params


def _restore_or_init(cfg: Config, run_dir: Path, init_from: str | Path | None, tx: Any,
                     mesh: jax.sharding.Mesh,
                     checkpointer: TrainCheckpointer, train_batches: ResumableBatches,
                     say: Callable[[str], None]) -> tuple[recipe.TrainState, Any, int | None]:
  """(state, its shardings, the restored step or None): the newest checkpoint that restores
  (with its data position), else fresh or --init-from weights."""
  if checkpointer.all_steps():
    abstract, shardings = recipe.abstract_train_state(cfg, tx, mesh)
    restored = checkpointer.restore_newest(abstract.params, abstract.opt_state, say)
    if restored is not None:
      latest, params, opt_state, data_state, _ = restored
      step0 = recipe.place_on_mesh({"step": np.int32(latest)}, {"step": shardings.step})["step"]
      train_batches.set_state(data_state)
      say(f"resumed {run_dir} from step {latest}")
      return recipe.TrainState(step0, params, opt_state), shardings, latest
  init_params = load_init_params(init_from, cfg) if init_from is not None else None
  state, shardings = recipe.init_train_state(cfg, tx, mesh, init_params)
  say(f"new run in {run_dir}" + (f", weights from {init_from}" if init_from else ""))
  return state, shardings, None


def _finite(*values: float) -> bool:
  return all(math.isfinite(v) for v in values)


def train(cfg: Config, run_dir: str | Path, *, init_from: str | Path | None = None,
          train_batches: ResumableBatches | None = None,
          open_validation: Callable[[], ResumableBatches | None] | None = None,
          mesh: jax.sharding.Mesh | None = None, stop_at_step: int | None = None,
          out: TextIO | None = None, progress_bar: bool | None = None,
          compiled_steps: CompiledSteps | None = None,
          config_sources: Mapping[str, str] | None = None) -> RunResult:
  """Run (or resume) training in `run_dir`. Batches default to `open_batches(cfg, ...)`;
  `stop_at_step` ends the run cleanly after that step, as a preemption would;
  `compiled_steps` lets several runs in one process share their compiled steps;
  `config_sources` (config.ResolvedConfig.sources) annotates RUN_DIR/config.yaml."""
  recipe.check_trainable(cfg)
  run_dir = Path(run_dir)
  primary = jax.process_index() == 0
  out = out or sys.stdout
  say = (lambda line: print(line, file=out, flush=True)) if primary else (lambda line: None)
  mesh = mesh or sharding.make_mesh(cfg.mesh)
  _check_batch_layout(cfg, mesh)
  lock = _take_run_dir_lock(run_dir, say)
  try:
    return _train_holding_lock(cfg, run_dir, init_from, train_batches, open_validation, mesh,
                               stop_at_step, out, say, progress_bar,
                               compiled_steps if compiled_steps is not None else CompiledSteps(),
                               config_sources)
  finally:
    if lock is not None:
      lock.release()


def _train_holding_lock(cfg: Config, run_dir: Path, init_from: str | Path | None,
                        train_batches: ResumableBatches | None,
                        open_validation: Callable[[], ResumableBatches | None] | None,
                        mesh: jax.sharding.Mesh, stop_at_step: int | None, out: TextIO,
                        say: Callable[[str], None], progress_bar: bool | None,
                        compiled_steps: CompiledSteps,
                        config_sources: Mapping[str, str] | None) -> RunResult:
  primary = jax.process_index() == 0
  switched = _check_run_dir(run_dir, cfg)
  if switched:
    say(f"{run_dir}: execution settings changed since the last run ({', '.join(switched)}); "
        "the model and its checkpoints are the same")
  pcount = jax.process_count()
  rows = sharding.process_row_block(mesh)  # processes that hold the same rows load the same data
  if train_batches is None:
    train_batches = open_batches(cfg, "train", rows.index, rows.count)
  if open_validation is None:
    open_validation = lambda: open_batches(cfg, "validation", rows.index, rows.count)

  graphdef, shapes = recipe.abstract_model(cfg)
  tx = recipe.make_optimizer(cfg.optimizer, cfg.run.steps, list(shapes))
  checkpointer = TrainCheckpointer(run_dir, cfg.run.keep_checkpoints, cfg.run.async_checkpointing)
  try:
    state, shardings, latest = _restore_or_init(cfg, run_dir, init_from, tx, mesh, checkpointer,
                                                train_batches, say)
    if primary:
      write_run_config(run_dir, cfg)  # only now: everything above has accepted this config
      write_config_yaml(run_dir / RESOLVED_CONFIG_FILE, cfg, config_sources)
      say(f"resolved config: {run_dir / RESOLVED_CONFIG_FILE} (`--config` reads it back)")
  except BaseException:
    checkpointer.close()
    raise
  start = latest or 0
  total = cfg.run.steps
  n_params = sum(math.prod(s.shape) for s in shapes.values())
  say(f"model: {n_params / 1e6:.2f}M parameters, mesh {dict(mesh.shape)} over {mesh.devices.size} "
      f"devices ({jax.devices()[0].device_kind}), {pcount} process(es)")
  say(startup_line(cfg.model.wkv_impl, cfg.model.wkv_chunk_size, mesh.shape[SEQUENCE_AXIS]))

  eval_step = compiled_steps.get_or_build(
      ("eval", cfg.model, cfg.run.remat, mesh),
      lambda: recipe.jit_eval_step(recipe.make_eval_step(graphdef, mesh), shardings, mesh))
  tokens_per_step = cfg.data.batch_size * cfg.data.ctx_len
  peak, peak_source = peak_flops_per_device(cfg.run.peak_tflops)
  logger = MetricsLogger(
      run_dir, total_steps=total, tokens_per_step=tokens_per_step,
      train_flops_per_token=flops_per_token(cfg.model)["train"],
      peak_flops_total=peak * mesh.devices.size, n_devices=mesh.devices.size,
      resume_step=start, tensorboard=cfg.run.tensorboard, out=out, enabled=primary,
      progress_bar=progress_bar)
  say(f"MFU against {peak / 1e12:.3g} TFLOP/s per device ({peak_source})")

  stop = StopRequest()
  restore_signals = _install_signal_handlers(stop)
  losses: dict[int, float] = {}
  val_loss = None
  last_saved = latest

  def save(step: int, data_state: Any) -> None:
    nonlocal last_saved
    checkpointer.save(step, state.params, state.opt_state, data_state,
                      {"model": dataclasses.asdict(cfg.model), "config": cfg.to_dict()})
    last_saved = step

  def flush(pending) -> None:
    step, metrics = pending
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not _finite(values["loss"], values["grad_norm"], values["param_norm"]):
      where = (f"the last good checkpoint is step {last_saved} in {checkpointer.directory}; "
               "rerunning resumes from it" if last_saved is not None else
               "no checkpoint was written yet; rerunning starts over")
      raise NonFiniteLossError(
          f"step {step}: loss {values['loss']}, gradient norm {values['grad_norm']}, parameter "
          f"norm {values['param_norm']} (lr {values['lr']:.3g}); stopping. {where} (lower "
          "optimizer.lr_init or check the data)")
    losses[step] = values["loss"]
    logger.log_step(step, values)
    if step % cfg.run.log_every == 0 or step == total:
      logger.end_interval(step)

  def evaluate(step: int) -> float | None:
    batches = open_validation()
    if batches is None:
      return None
    batch_losses = [float(eval_step(state.params, sharding.host_to_global(batch, mesh)))
                    for _, batch in zip(range(cfg.run.eval_batches), batches)]
    if not batch_losses:
      return None
    result = float(np.mean(batch_losses))
    logger.log_eval(step, result)
    say(f"step {step}: validation loss {result:.4f}")
    return result

  try:
    step = start
    if step < total:
      batch = sharding.host_to_global(next(train_batches), mesh)
      signature = tuple((k, v.shape, v.dtype.name) for k, v in sorted(batch.items()))
      compiled = compiled_steps.get_or_build(
          ("train", cfg.model, cfg.optimizer, cfg.run.steps, cfg.run.remat, mesh, signature),
          lambda: recipe.jit_train_step(recipe.make_train_step(graphdef, tx, cfg, mesh),
                                        shardings, mesh).lower(state, batch).compile())
      say(memory_summary(compiled))
    logger.restart_clock()
    pending = None
    while step < total and stop.reason is None:
      state, metrics = compiled(state, batch)
      step += 1
      checkpointer.raise_if_save_failed()  # a full disk stops the run now, not a save later
      # The data position a checkpoint of this step records, taken before the next batch is
      # read (which overlaps with the step running on the devices).
      data_state = train_batches.get_state()
      if step < total:
        batch = sharding.host_to_global(next(train_batches), mesh)
      if pending is not None:
        flush(pending)
      pending = (step, metrics)
      if step == stop_at_step:
        stop.request("stop_at_step")
      if pcount > 1 and _preemption_reached(step):
        stop.request("signal")
      eval_due = step % cfg.run.eval_every == 0 or step == total
      save_due = step % cfg.run.checkpoint_every == 0 or step == total or stop.reason is not None
      if eval_due or save_due:
        flush(pending)
        pending = None
        if eval_due:
          val_loss = evaluate(step)
        if save_due:
          save(step, data_state)
        logger.restart_clock()
    if pending is not None:
      flush(pending)
    if stop.reason is not None and step > start and last_saved != step:
      save(step, data_state)  # the signal came after this step's checkpoint decision
    checkpointer.wait()  # the final checkpoint is on disk before the run says so
    if start >= total:
      say(f"{run_dir} already finished {start} of run.steps={total} steps; raise --steps to continue")
    reason = stop.reason or "finished"
    if reason != "finished" and step > start:
      say(f"stopped after step {step} ({reason}); checkpoint saved, rerun the same command to resume")
    elif reason != "finished":
      say(f"stopped before the first step ({reason}); nothing new to save")
    return RunResult(step, reason, losses, val_loss)
  finally:
    restore_signals()
    logger.close()
    checkpointer.close()


def _preemption_reached(step: int) -> bool:
  from jax.experimental import multihost_utils
  return multihost_utils.reached_preemption_sync_point(step)
