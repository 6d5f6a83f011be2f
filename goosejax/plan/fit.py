"""`goosejax plan --fit`: the fastest layout of a config's step that fits the target's memory.

The global batch stays as asked; searched are `run.remat` (its values read from the schema),
`optimizer.grad_accum` (micro-batches: divisors of the rows each device holds) and the fused
loss head (`run.loss_vocab_tile`, tried where the unfused head does not fit). Each candidate is
a compile (seconds for tiny, minutes for 1.5B), so the order is by expected speed and the
search stops early:

  - policies from the least recomputation to the most (none, block, save_wkv, minimal, full,
    offload; a policy the schema gains later goes last), micro-batches from the fewest;
  - within a policy, the first candidate that fits ends that policy (more micro-batches or a
    tiled head only add work);
  - a miss at g micro-batches needing M of the device's D GiB skips every count below g·M/D:
    what a micro-batch holds shrinks at most as 1/g and the rest stays, so none of them fits;
  - once something fits at g micro-batches, a later policy is tried only at fewer than g: at g
    or more it recomputes more for no memory it needs, so it is assumed slower.

The winner is the fitting candidate with the most tokens/s at --hfu of the hardware FLOPs
(`cli.estimate_step`: recomputation costs time). A policy the target cannot compile is skipped
with the reason printed.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Callable

from goosejax.config import schema
from goosejax.plan import cli

# run.remat's policies by how much of the forward they rerun in the backward, least first.
REMAT_BY_RECOMPUTE = ("none", "block", "save_wkv", "minimal", "full", "offload")
# Policies that compile to another's program (goosejax.model.remat): not compiled again.
SAME_PROGRAM_AS = {"minimal": "full"}
FIT_LOSS_TILE = 4096   # vocabulary columns per tile when the search turns the fused head on
# What a compile that cannot happen raises (a policy the target lacks, e.g. no host memory space).
COMPILE_REFUSALS = (cli.GoosejaxError, ValueError, NotImplementedError, RuntimeError)


@dataclasses.dataclass(frozen=True)
class Candidate:
  remat: str
  grad_accum: int
  loss_vocab_tile: int

  def overrides(self) -> str:
    """As a user pastes them after `goosejax train` / `goosejax plan`."""
    text = f"run.remat={self.remat} optimizer.grad_accum={self.grad_accum}"
    return text + (f" run.loss_vocab_tile={self.loss_vocab_tile}" if self.loss_vocab_tile else "")

  def apply(self, cfg):
    """`cfg` with this candidate's settings."""
    return dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, remat=self.remat, loss_vocab_tile=self.loss_vocab_tile),
        optimizer=dataclasses.replace(cfg.optimizer, grad_accum=self.grad_accum))


@dataclasses.dataclass(frozen=True)
class Tried:
  """One candidate's outcome: its plan and step estimate, or why it could not compile."""
  candidate: Candidate
  plan: cli.Plan | None = None
  step: cli.StepEstimate | None = None
  skipped: str | None = None

  @property
  def fits(self) -> bool:
    return self.plan is not None and self.plan.memory.fits


# ----------------------------------------------------------------------------- the search space


def remat_policies() -> list[str]:
  """`run.remat`'s values as the schema has them now, least recomputation first."""
  known = len(REMAT_BY_RECOMPUTE)
  rank = lambda policy: REMAT_BY_RECOMPUTE.index(policy) if policy in REMAT_BY_RECOMPUTE else known
  return sorted(typing.get_args(schema.Remat), key=rank)


def searched_policies() -> list[str]:
  """The policies `--fit` compiles: remat_policies() less those with another's program."""
  return [policy for policy in remat_policies() if policy not in SAME_PROGRAM_AS]


def micro_batch_counts(rows_per_device: int) -> list[int]:
  """Every grad_accum that splits each device's rows evenly, fewest first."""
  return [g for g in range(1, rows_per_device + 1) if rows_per_device % g == 0]


def loss_tiles(cfg) -> tuple[int, ...]:
  """The unfused head first, then the fused one (the configured tile, else FIT_LOSS_TILE)."""
  return (0, cfg.run.loss_vocab_tile or min(FIT_LOSS_TILE, cfg.model.vocab_size))


def batch_split_problem(batch_size: int, shards: int) -> str | None:
  """Why `batch_size` rows cannot be split evenly over `shards` (mesh.data x mesh.fsdp), naming
  the nearest batch sizes below and above that can; None where they can."""
  if batch_size % shards == 0:
    return None
  below, above = batch_size // shards * shards, (batch_size // shards + 1) * shards
  nearest = f"{below} or {above}" if below else f"{above}"
  return (f"data.batch_size={batch_size} does not split over the {shards} batch shards "
          f"(mesh.data x mesh.fsdp): nearest batch sizes that do: {nearest}")


# ----------------------------------------------------------------------------- the search


def search(cfg, rows_per_device: int, compile_plan: Callable[[object], cli.Plan], *,
           estimate: Callable[[cli.Plan], cli.StepEstimate],
           report: Callable[[Tried], None] = lambda tried: None) -> list[Tried]:
  """Every candidate tried, in order (module docstring). `compile_plan(cfg)` makes the plan of
  one candidate's config; `report` hears of each as it is tried."""
  tried: list[Tried] = []
  fewest_fitting = None   # micro-batches of the first fit: later policies must beat it
  for policy in searched_policies():
    counts = [g for g in micro_batch_counts(rows_per_device)
              if fewest_fitting is None or g < fewest_fitting]
    fitted = _search_policy(cfg, policy, counts, compile_plan, estimate, report, tried)
    if fitted is not None and fewest_fitting is None:
      fewest_fitting = fitted.candidate.grad_accum
  return tried


def _search_policy(cfg, policy, counts, compile_plan, estimate, report, tried) -> Tried | None:
  """Candidates of one policy until one fits (returned) or it cannot compile (None)."""
  fewest_possible = 1.0   # micro-batches below this cannot fit (module docstring)
  for grad_accum in counts:
    if grad_accum < fewest_possible:
      continue
    misses = []
    for tile in loss_tiles(cfg):
      outcome = _try(cfg, Candidate(policy, grad_accum, tile), compile_plan, estimate)
      tried.append(outcome)
      report(outcome)
      if outcome.skipped is not None:
        return None
      if outcome.fits:
        return outcome
      misses.append(outcome)
    # The leanest miss bounds every head at more micro-batches (the fused head needs less).
    fewest_possible = grad_accum * min(_overshoot(miss.plan.memory) for miss in misses)
  return None


def _overshoot(memory) -> float:
  """How many times the device's memory a missed candidate needs (at least 1)."""
  return max(1.0, memory.total / memory.capacity)


def _try(cfg, candidate: Candidate, compile_plan, estimate) -> Tried:
  try:
    plan = compile_plan(candidate.apply(cfg))
  except COMPILE_REFUSALS as e:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return Tried(candidate, skipped=f"{type(e).__name__}: {reason}")
  return Tried(candidate, plan, estimate(plan))


def best(tried: list[Tried]) -> Tried | None:
  """The fitting candidate with the most tokens/s (the first tried on a tie), or None."""
  fitting = [t for t in tried if t.fits]
  return max(fitting, key=lambda t: t.step.tokens_per_second) if fitting else None


def closest_miss(tried: list[Tried]) -> Tried | None:
  """The compiled candidate whose total is the smallest share of the device's memory."""
  compiled = [t for t in tried if t.plan is not None]
  return min(compiled, key=lambda t: t.plan.memory.total / t.plan.memory.capacity, default=None)


# ----------------------------------------------------------------------------- report


HEADER = ("  remat      accum  loss tile  temporaries   total GiB  of GiB   hardware FLOPs  "
          "step s    tokens/s")


def format_tried(tried: Tried) -> str:
  """One line per candidate: what it needs against the device's memory, what it costs."""
  c = tried.candidate
  head = f"  {c.remat:<10} {c.grad_accum:>5}  {c.loss_vocab_tile:>9}"
  if tried.plan is None:
    return f"{head}  skipped: {tried.skipped}"
  memory, step = tried.plan.memory, tried.step
  hardware = tried.plan.flops.hardware
  flops = f"{hardware:14.3e}" if hardware is not None else f"{'n/a':>14}"
  verdict = "fits" if memory.fits else ("refused by the compiler" if memory.refused else "does NOT fit")
  return (f"{head}  {memory.temporaries / cli.GIB:11.2f}  {memory.total / cli.GIB:10.2f}  "
          f"{memory.capacity / cli.GIB:6.2f}  {flops}  {step.seconds:7.3g}  "
          f"{step.tokens_per_second:10,.0f}  {verdict}")


def chosen_line(tried: Tried) -> str:
  """The last line printed: the overrides to paste."""
  return f"fit: {tried.candidate.overrides()}"


def nothing_fits(tried: list[Tried], cfg) -> str:
  """The error when no candidate fits: the closest miss, or why nothing compiled."""
  where = f"with data.batch_size={cfg.data.batch_size} x data.ctx_len={cfg.data.ctx_len}"
  miss = closest_miss(tried)
  if miss is None:
    reason = tried[0].skipped if tried else "no candidates"
    return f"nothing fits {where}: nothing compiled ({reason})"
  memory = miss.plan.memory
  return (f"nothing fits {where}; closest: {miss.candidate.overrides()} needs "
          f"{memory.total / cli.GIB:.2f} of {memory.capacity / cli.GIB:.2f} GiB; shard more "
          f"(mesh.fsdp, mesh.tensor), use more devices, or lower data.batch_size")


# ----------------------------------------------------------------------------- command line


def run_fit(cfg, target: str, config_name: str, progress=None, *, hfu: float | None = None,
            mfu: float | None = None) -> None:
  """`goosejax plan --fit`: print each candidate as it is tried, then the chosen overrides as
  the last line; raises PlanError when the batch does not split over the chips or nothing fits."""
  from goosejax.config import ConfigError
  from goosejax.plan import targets
  if mfu is None and hfu is None:
    hfu = cli.DEFAULT_HFU
  facts = targets.target_facts(target)
  try:
    sizes = cfg.mesh.shape(facts.devices)
  except ConfigError as e:
    raise cli.PlanError(f"{target} has {facts.devices} devices: {e}") from None
  shards = sizes["data"] * sizes["fsdp"]
  if problem := batch_split_problem(cfg.data.batch_size, shards):
    raise cli.PlanError(f"{target}: {problem}")
  rows = cfg.data.batch_size // shards
  basis = f"{hfu:.0%} HFU" if hfu is not None else f"{mfu:.0%} MFU"
  print(f"fit: {config_name} on {target} ({facts.devices} x {facts.device_kind}, mesh "
        f"{cli._mesh_text(sizes)}): batch {cfg.data.batch_size} x {cfg.data.ctx_len}, {rows} rows "
        f"per device; step time at {basis}", flush=True)
  print(HEADER, flush=True)
  tried = search(cfg, rows, lambda candidate_cfg: cli.make_plan(candidate_cfg, target, config_name, progress),
                 estimate=lambda plan: cli.estimate_step(plan, hfu=hfu, mfu=mfu),
                 report=lambda outcome: print(format_tried(outcome), flush=True))
  winner = best(tried)
  if winner is None:
    raise cli.PlanError(nothing_fits(tried, cfg))
  print(chosen_line(winner), flush=True)
