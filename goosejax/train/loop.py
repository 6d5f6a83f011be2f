"""`train(cfg, run_dir)`: one pretraining run, start to finish, resumable at any point.

    open the run: mesh -> run-directory lock and checks (run_dir) -> fresh sharded state,
        --init-from weights, or the latest checkpoint (params, optimizer, data position)
        -> config.json -> logger
    run steps: compile (memory printed), then dispatch step k+1 before reading step k's
        metrics (the host never stalls the device); log (metrics.jsonl, TensorBoard, W&B),
        evaluate (validation loss, run.eval_tasks), checkpoint; profile run.profile_steps
    finish: the final checkpoint, on disk before the run says how it ended

`train` gathers its arguments into one `RunOptions`; the open run (`_Run`) holds what the
steps use and the run's mutable state, and is closed on every way out.

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
import functools
import math
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, TextIO

import jax
import numpy as np

from goosejax import sharding
from goosejax.config import Config, ConfigError, ModelConfig
from goosejax.sharding import SEQUENCE_AXIS
from goosejax.train import recipe, run_dir as run_dir_module, wandb_log
from goosejax.train.batches import ResumableBatches, open_batches
from goosejax.train.compiled_steps import CompiledSteps
from goosejax.train.eval_tasks import EvalTask, load_eval_tasks, run_eval_tasks, summary_line
from goosejax.train.metrics import (MetricsLogger, flops_per_token, memory_summary,
                                    peak_flops_per_device)
from goosejax.train.profile import StepProfiler
from goosejax.train.run_checkpoints import CheckpointError, TrainCheckpointer
from goosejax.wkv import self_check
from goosejax.wkv.dispatch import kernel_chunk_sizes, startup_line


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


def load_init_params(path: str | Path, cfg: Config) -> dict[str, np.ndarray]:
  """Starting weights: an official .pth, a goosejax checkpoint or a run directory's latest
  step (goosejax.checkpoint.pretrained.read_params), checked against the model config."""
  from goosejax.checkpoint.pretrained import read_params
  if not Path(path).exists():
    raise CheckpointError(f"--init-from {path}: no such file or directory")
  found_model, params, _ = read_params(path)
  params = {name: np.asarray(value, np.float32) for name, value in params.items()}
  _, expected = recipe.abstract_model(cfg)
  wrong = [f"{name} {tuple(params[name].shape) if name in params else 'missing'} vs "
           f"{tuple(s.shape)}" for name, s in expected.items()
           if name not in params or params[name].shape != s.shape]
  wrong += [f"{name} unexpected" for name in sorted(set(params) - set(expected))]
  if wrong:   # a summary: one line, not every parameter of a model of another shape
    differences = _shape_differences(found_model, cfg.model) or [
        *wrong[:3], *([f"and {len(wrong) - 3} more"] if len(wrong) > 3 else [])]
    raise CheckpointError(f"--init-from {path}: the weights are of another model than the "
                          f"configured one ({', '.join(differences)}: the weights' vs model.*)")
  return params


def _shape_differences(found: ModelConfig, configured: ModelConfig) -> list[str]:
  """['n_layer 2 vs 1', ...]: the settings that decide parameter shapes and differ."""
  settings = lambda m: {"vocab_size": m.vocab_size, "n_layer": m.n_layer, "n_embd": m.n_embd,
                        "head_size": m.head_size, "dim_ffn": m.ffn_dim,
                        **dict(zip(("decay_lora", "iclr_lora", "value_lora", "gate_lora"),
                                   m.lora_ranks))}
  found, configured = settings(found), settings(configured)
  return [f"{key} {found[key]} vs {configured[key]}" for key in found if found[key] != configured[key]]


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


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """`train`'s keyword arguments, the mesh, output and compiled-step cache defaulted; the batches
  stay None until the run directory has accepted the config (opening them reads the data)."""
  init_from: str | Path | None
  batches: ResumableBatches | None
  open_validation: Callable[[], ResumableBatches | None] | None
  mesh: jax.sharding.Mesh
  stop_at_step: int | None
  out: TextIO
  progress_bar: bool | None
  compiled_steps: CompiledSteps
  config_sources: Mapping[str, str] | None


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
  options = RunOptions(
      init_from=init_from, batches=train_batches, open_validation=open_validation,
      mesh=mesh or sharding.make_mesh(cfg.mesh), stop_at_step=stop_at_step,
      out=out or sys.stdout, progress_bar=progress_bar,
      compiled_steps=compiled_steps if compiled_steps is not None else CompiledSteps(),
      config_sources=config_sources)
  say = _say_on_process_0(options.out)
  _check_batch_layout(cfg, options.mesh)
  lock = run_dir_module.take_lock(run_dir, say)
  try:
    return _train_holding_lock(cfg, run_dir, options, say)
  finally:
    if lock is not None:
      lock.release()


def _say_on_process_0(out: TextIO) -> Callable[[str], None]:
  if jax.process_index() != 0:
    return lambda line: None
  return lambda line: print(line, file=out, flush=True)


def _train_holding_lock(cfg: Config, run_dir: Path, options: RunOptions,
                        say: Callable[[str], None]) -> RunResult:
  """Open the run, run its steps, finish it; the run is closed on every way out. The WKV
  kernels' self-check runs once, here, for every step compiled below (not at each trace)."""
  kernel_chunks = kernel_chunk_sizes(cfg.model.wkv_impl, cfg.model.wkv_chunk_size)
  with self_check.use(self_check.checks_for(kernel_chunks)):
    run = _open_run(cfg, run_dir, options, say)
    try:
      step, data_state = _run_steps(run)
      return _finish(run, step, data_state)
    finally:
      run.close()


@dataclasses.dataclass
class _Run:
  """An open run: what its steps use, and its mutable state (the train state, the newest
  checkpoint's step, metrics not read yet, this invocation's losses, the latest validation
  loss). `close()` restores the signal handlers and closes the logger and checkpointer."""
  cfg: Config
  run_dir: Path
  options: RunOptions
  say: Callable[[str], None]
  batches: ResumableBatches
  open_validation: Callable[[], ResumableBatches | None]
  graphdef: Any
  tx: Any
  shardings: Any
  eval_step: Callable[..., Any]
  eval_tasks: list[EvalTask]
  checkpointer: TrainCheckpointer
  logger: MetricsLogger
  profiler: StepProfiler
  stop: StopRequest
  restore_signals: Callable[[], None]
  state: recipe.TrainState
  start: int                        # the step this invocation starts from
  last_saved: int | None
  pending: tuple[int, Any] | None = None     # (step, metrics on the devices)
  losses: dict[int, float] = dataclasses.field(default_factory=dict)
  val_loss: float | None = None

  def next_batch(self) -> dict[str, jax.Array]:
    return sharding.host_to_global(next(self.batches), self.options.mesh)

  def compile_train_step(self, batch: dict[str, jax.Array]) -> Callable[..., Any]:
    """The train step for `batch`'s shapes, compiled or taken from options.compiled_steps;
    its memory use printed."""
    cfg, mesh = self.cfg, self.options.mesh
    signature = tuple((k, v.shape, v.dtype.name) for k, v in sorted(batch.items()))
    compiled = self.options.compiled_steps.get_or_build(
        ("train", cfg.model, cfg.optimizer, cfg.run.steps, cfg.run.remat, cfg.run.loss_vocab_tile,
         mesh, signature),
        lambda: recipe.jit_train_step(recipe.make_train_step(self.graphdef, self.tx, cfg, mesh),
                                      self.shardings, mesh).lower(self.state, batch).compile())
    self.say(memory_summary(compiled))
    return compiled

  def flush(self) -> None:
    """Read the pending step's metrics (waiting for that step), refuse non-finite ones, log."""
    if self.pending is None:
      return
    (step, metrics), self.pending = self.pending, None
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not _finite(values["loss"], values["grad_norm"], values["param_norm"]):
      raise _non_finite_error(step, values, self.last_saved, self.checkpointer.directory)
    self.losses[step] = values["loss"]
    self.logger.log_step(step, values)
    if step % self.cfg.run.log_every == 0 or step == self.cfg.run.steps:
      self.logger.end_interval(step)

  def evaluate(self, step: int) -> None:
    """The validation loss, then run.eval_tasks, each logged."""
    self.validate(step)
    if self.eval_tasks:
      scalars = run_eval_tasks(self.eval_tasks, recipe.merge_params(self.graphdef, self.state.params))
      self.logger.log_eval_tasks(step, scalars)
      self.say(summary_line(step, scalars))

  def validate(self, step: int) -> None:
    """val_loss: the mean over run.eval_batches validation batches, logged; None without
    validation data."""
    self.val_loss = None
    batches = self.open_validation()
    if batches is None:
      return
    mesh = self.options.mesh
    batch_losses = [float(self.eval_step(self.state.params, sharding.host_to_global(batch, mesh)))
                    for _, batch in zip(range(self.cfg.run.eval_batches), batches)]
    if not batch_losses:
      return
    self.val_loss = float(np.mean(batch_losses))
    self.logger.log_eval(step, self.val_loss)
    self.say(f"step {step}: validation loss {self.val_loss:.4f}")

  def save(self, step: int, data_state: Any) -> None:
    self.checkpointer.save(step, self.state.params, self.state.opt_state, data_state,
                           {"model": dataclasses.asdict(self.cfg.model),
                            "config": self.cfg.to_dict()})
    self.last_saved = step

  def close(self) -> None:
    self.restore_signals()
    self.profiler.stop(None)   # still tracing: the run stopped inside run.profile_steps
    self.logger.close()
    self.checkpointer.close()


def _open_run(cfg: Config, run_dir: Path, options: RunOptions,
              say: Callable[[str], None]) -> _Run:
  """Everything before the first step but its compilation: the checks, the state (restored or
  new), config.json, the startup lines, the logger, the signal handlers. The checkpointer is
  closed if any of it fails."""
  switched = run_dir_module.check_compatible(run_dir, cfg)
  if switched:
    say(f"{run_dir}: execution settings changed since the last run ({', '.join(switched)}); "
        "the model and its checkpoints are the same")
  wandb_log.check_installed(cfg)
  batches, open_validation = _open_data(cfg, options)
  eval_tasks = _open_eval_tasks(cfg)
  graphdef, shapes = recipe.abstract_model(cfg)
  tx = recipe.make_optimizer(cfg.optimizer, cfg.run.steps, list(shapes))
  checkpointer = TrainCheckpointer(run_dir, cfg.run.keep_checkpoints, cfg.run.async_checkpointing)
  try:
    state, shardings, latest = _restore_or_init(cfg, run_dir, options.init_from, tx, options.mesh,
                                                checkpointer, batches, say)
    finished = latest is not None and latest >= cfg.run.steps   # nothing trains: files stay
    if jax.process_index() == 0 and not finished:  # only now: everything above accepted cfg
      run_dir_module.write_config_files(run_dir, cfg, options.config_sources, say)
    _say_model(cfg, options.mesh, shapes, say)
    eval_step = options.compiled_steps.get_or_build(
        ("eval", cfg.model, cfg.run.remat, cfg.run.loss_vocab_tile, options.mesh),
        lambda: recipe.jit_eval_step(recipe.make_eval_step(graphdef, options.mesh,
                                                           cfg.run.loss_vocab_tile),
                                     shardings, options.mesh))
    logger = _open_logger(cfg, run_dir, options, latest or 0, say)
  except BaseException:
    checkpointer.close()
    raise
  stop = StopRequest()
  return _Run(
      cfg=cfg, run_dir=run_dir, options=options, say=say, batches=batches,
      open_validation=open_validation, graphdef=graphdef, tx=tx, shardings=shardings,
      eval_step=eval_step, eval_tasks=eval_tasks, checkpointer=checkpointer, logger=logger,
      profiler=StepProfiler(run_dir, cfg.run.profile_steps, cfg.run.profile_all_hosts, say),
      stop=stop, restore_signals=_install_signal_handlers(stop), state=state,
      start=latest or 0, last_saved=latest)


def _open_data(cfg: Config, options: RunOptions
               ) -> tuple[ResumableBatches, Callable[[], ResumableBatches | None]]:
  """The given batches, else the configured data; processes that hold the same rows of the
  batch load the same data."""
  rows = sharding.process_row_block(options.mesh)
  batches = options.batches
  if batches is None:
    batches = open_batches(cfg, "train", rows.index, rows.count)
  open_validation = options.open_validation
  if open_validation is None:
    open_validation = functools.partial(open_batches, cfg, "validation", rows.index, rows.count)
  return batches, open_validation


def _open_eval_tasks(cfg: Config) -> list[EvalTask]:
  """run.eval_tasks, read and tokenized (a bad file stops the run before it starts)."""
  if cfg.run.eval_tasks and jax.process_count() > 1:
    raise ConfigError("run.eval_tasks: evaluation during training runs in single-process runs "
                      "only; evaluate the checkpoints with `goosejax eval` instead")
  return load_eval_tasks(cfg.run.eval_tasks, cfg.data.tokenizer, cfg.model.vocab_size,
                         cfg.run.eval_max_documents)


def _say_model(cfg: Config, mesh: jax.sharding.Mesh, shapes: Mapping[str, Any],
               say: Callable[[str], None]) -> None:
  n_params = sum(math.prod(s.shape) for s in shapes.values())
  say(f"model: {n_params / 1e6:.2f}M parameters, mesh {dict(mesh.shape)} over {mesh.devices.size} "
      f"devices ({jax.devices()[0].device_kind}), {jax.process_count()} process(es)")
  say(startup_line(cfg.model.wkv_impl, cfg.model.wkv_chunk_size, mesh.shape[SEQUENCE_AXIS]))


def _open_logger(cfg: Config, run_dir: Path, options: RunOptions, start: int,
                 say: Callable[[str], None]) -> MetricsLogger:
  """The metrics logger (process 0 writes), MFU measured against the devices' peak."""
  peak, peak_source = peak_flops_per_device(cfg.run.peak_tflops)
  n_devices = options.mesh.devices.size
  writes = jax.process_index() == 0
  logger = MetricsLogger(
      run_dir, total_steps=cfg.run.steps, tokens_per_step=cfg.data.batch_size * cfg.data.ctx_len,
      train_flops_per_token=flops_per_token(cfg.model)["train"],
      peak_flops_total=peak * n_devices, n_devices=n_devices, resume_step=start,
      tensorboard=cfg.run.tensorboard, out=options.out, enabled=writes,
      progress_bar=options.progress_bar,
      wandb_run=wandb_log.open_wandb_run(cfg, run_dir, say) if writes else None)
  say(f"MFU against {peak / 1e12:.3g} TFLOP/s per device ({peak_source})")
  return logger


def _run_steps(run: _Run) -> tuple[int, Any]:
  """Compile (under the signal handlers: a long compile stops cleanly), then step until
  run.steps or a stop request. Step k+1 is dispatched before step k's metrics are read, so
  the host never stalls the devices. Returns the last step and the data position a
  checkpoint of it records."""
  step, total = run.start, run.cfg.run.steps
  data_state = None
  if step < total:
    batch = run.next_batch()
    compiled = run.compile_train_step(batch)
  run.logger.restart_clock()
  while step < total and run.stop.reason is None:
    run.profiler.before_step(step + 1)
    with run.profiler.annotate(step + 1):
      run.state, metrics = compiled(run.state, batch)
    step += 1
    run.profiler.after_step(step, metrics)
    run.checkpointer.raise_if_save_failed()  # a full disk stops the run now, not a save later
    # The data position a checkpoint of this step records, taken before the next batch is
    # read (which overlaps with the step running on the devices).
    data_state = run.batches.get_state()
    if step < total:
      batch = run.next_batch()
    run.flush()  # the step before: one step behind, while this one runs
    run.pending = (step, metrics)
    _note_stop_requests(run, step)
    _evaluate_and_save_if_due(run, step, data_state)
  run.flush()
  run.profiler.stop(step, run.state)   # the run ended inside run.profile_steps
  return step, data_state


def _note_stop_requests(run: _Run, step: int) -> None:
  if step == run.options.stop_at_step:
    run.stop.request("stop_at_step")
  if jax.process_count() > 1 and _preemption_reached(step):
    run.stop.request("signal")


def _evaluate_and_save_if_due(run: _Run, step: int, data_state: Any) -> None:
  """Evaluate and checkpoint where due, after reading this step's metrics; the step clock
  restarts after, so neither counts as step time."""
  settings = run.cfg.run
  eval_due = step % settings.eval_every == 0 or step == settings.steps
  save_due = (step % settings.checkpoint_every == 0 or step == settings.steps
              or run.stop.reason is not None)
  if not (eval_due or save_due):
    return
  run.flush()
  if eval_due:
    run.evaluate(step)
  if save_due:
    run.save(step, data_state)
  run.logger.restart_clock()


def _finish(run: _Run, step: int, data_state: Any) -> RunResult:
  """The last checkpoint, on disk before the run says how it ended."""
  if run.stop.reason is not None and step > run.start and run.last_saved != step:
    run.save(step, data_state)  # the signal came after this step's checkpoint decision
  run.checkpointer.wait()
  total = run.cfg.run.steps
  if run.start >= total:
    run.say(f"{run.run_dir} already finished {run.start} of run.steps={total} steps; raise --steps "
            "to continue")
  reason = run.stop.reason or "finished"
  if reason != "finished" and step > run.start:
    run.say(f"stopped after step {step} ({reason}); checkpoint saved, rerun the same command to "
            "resume")
  elif reason != "finished":
    run.say(f"stopped before the first step ({reason}); nothing new to save")
  return RunResult(step, reason, run.losses, run.val_loss)


def _finite(*values: float) -> bool:
  return all(math.isfinite(v) for v in values)


def _non_finite_error(step: int, values: Mapping[str, float], last_saved: int | None,
                      checkpoints: Path) -> NonFiniteLossError:
  where = (f"the last good checkpoint is step {last_saved} in {checkpoints}; "
           "rerunning resumes from it" if last_saved is not None else
           "no checkpoint was written yet; rerunning starts over")
  return NonFiniteLossError(
      f"step {step}: loss {values['loss']}, gradient norm {values['grad_norm']}, parameter "
      f"norm {values['param_norm']} (lr {values['lr']:.3g}); stopping. {where} (lower "
      "optimizer.lr_init or check the data)")


def _preemption_reached(step: int) -> bool:
  from jax.experimental import multihost_utils
  return multihost_utils.reached_preemption_sync_point(step)
