"""`run.profile_steps: [start, stop]`: a JAX profiler trace of training steps start..stop.

The trace goes to RUN_DIR/profile/plugins/profile/<time>/: `<host>.xplane.pb` (XProf: open
with `tensorboard --logdir RUN_DIR/profile`, Profile tab, or `xprof --logdir ...`) and
`perfetto_trace.json.gz` (drop it on ui.perfetto.dev). Only process 0 traces, every
process with `run.profile_all_hosts`. Each traced step is a `StepTraceAnnotation("train",
step_num=k)`, so the profile's step view splits the timeline by training step. Tracing
starts before step `start` is dispatched and stops once step `stop` has run on the devices;
a run that resumes inside the range traces the rest of it, one that ends inside it (a
signal, run.steps) stops the trace where it ends.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import jax


class StepProfiler:
  """Starts and stops the trace around the configured steps; `annotate(k)` marks step k."""

  def __init__(self, run_dir: Path, steps: Sequence[int], all_hosts: bool,
               say: Callable[[str], None]):
    self.directory = Path(run_dir) / "profile"
    self.first, self.last = steps if steps else (0, -1)
    self.enabled = bool(steps) and (all_hosts or jax.process_index() == 0)
    self.say = say
    self.started_at: int | None = None     # the first traced step, while tracing
    self.wall_start = 0.0

  def before_step(self, step: int) -> None:
    """Start tracing if `step` (about to be dispatched) is the first of the range to run."""
    if self.enabled and self.started_at is None and self.first <= step <= self.last:
      jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
      self.started_at, self.wall_start = step, time.time()

  def annotate(self, step: int) -> ContextManager[Any]:
    if self.started_at is None:
      return contextlib.nullcontext()
    return jax.profiler.StepTraceAnnotation("train", step_num=step)

  def after_step(self, step: int, outputs: Any) -> None:
    """Stop once the range's last step has run (waiting for `outputs`, that step's results)."""
    if self.started_at is not None and step >= self.last:
      self.stop(step, outputs)

  def stop(self, step: int | None, outputs: Any = None) -> None:
    """End the trace after `step` (None: wherever an error left it; no-op when not tracing)
    and name the file it wrote."""
    if self.started_at is None:
      return
    jax.block_until_ready(outputs)
    jax.profiler.stop_trace()
    first, self.started_at = self.started_at, None
    self.enabled = False   # one trace per run
    written = [p for p in self.directory.glob("plugins/profile/*/*.xplane.pb")
               if p.stat().st_mtime >= self.wall_start - 1]
    where = ", ".join(str(p) for p in sorted(written)) or str(self.directory)
    steps = f"steps {first}-{step}" if step is not None else f"the steps from {first} (cut short)"
    self.say(f"profile of {steps}: {where} (view: tensorboard --logdir {self.directory}, or "
             "perfetto_trace.json.gz beside it on ui.perfetto.dev)")
