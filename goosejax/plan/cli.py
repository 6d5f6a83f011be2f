"""`goosejax plan`: what a training config needs on a TPU slice or GPU cluster, from the real
compiler, on a machine without one.

  goosejax plan --config rwkv7-1.5b --topology v5p:2x2x4
  goosejax plan --config rwkv7-1.5b --topology v6e --devices 64      (the usual 64-chip slice)
  goosejax plan --config rwkv7-1.5b --topology h100:4x8 mesh.data=4 mesh.fsdp=8   (4 hosts x 8)
  goosejax plan --config tiny --topology v5p:2x2x1 --memory     (where the temporaries go)
  goosejax plan --config tiny --topology v5e:2x2 --fit        (the fastest remat x micro-batches that fits)

The train job's sharded step is compiled for compile-only devices of the target (goosejax.plan.targets:
needs the `tpu` or `cuda` extra), on the mesh of the config's `mesh` section, for its batch
(data.batch_size sequences of data.ctx_len tokens). Printed: the parameter count; per-device
memory (parameters, optimizer state and batch from their sharded sizes, temporaries from the
compiled program) against the device's memory; with --memory, the temporaries live at the
program's peak in groups (goosejax.plan.memory); FLOPs per step: hardware FLOPs (the compiled
program's, recomputation included, plus the Pallas WKV kernels by formula on the shapes they
run on) next to model FLOPs (6 * N * tokens + WKV); and the step time and tokens/s at --hfu
(default 0.5) of the datasheet peak for the hardware FLOPs, or at --mfu for the model FLOPs.
Compiling takes minutes for real configs; progress goes to stderr, the plan to stdout. JAX runs
on the CPU here (JAX_PLATFORMS=cpu unless set).

Exit status: 0 the plan fits; 2 it does not fit in device memory (the figures are printed
first), a mesh axis does not divide the slice, the batch or the model, or other bad input.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile
import threading
import time

from goosejax.config import args as config_args
from goosejax.errors import GoosejaxError
from goosejax.plan import memory as memory_groups
from pallas_kernels import wkv_policy

GIB = 2**30
DEFAULT_HFU = 0.5   # the hardware FLOPs utilisation `goosejax plan` assumes unless told


class PlanError(GoosejaxError):
  """A plan that cannot run: it does not fit, or its mesh does not divide the slice or model."""


# ----------------------------------------------------------------------------- mesh checks


def check_mesh_divides(cfg, sizes: dict[str, int]) -> None:
  """Refuse a mesh that would leave work unsplit: the batch rows over data x fsdp, parameters
  over fsdp (the embedding dim), whole heads and the FFN hidden size over tensor, each
  sequence's tokens over sequence (where the mesh has that axis). Sharding itself keeps an
  indivisible dimension whole; a plan that silently replicates a weight matrix is almost always
  a typo in the mesh."""
  from goosejax import sharding
  problem = sharding.batch_layout_problem(cfg, sizes)
  if problem:
    raise PlanError(problem)
  model = cfg.model
  checks = [
      ("mesh.fsdp", sizes["fsdp"], model.n_embd, f"model.n_embd={model.n_embd}"),
      ("mesh.tensor", sizes["tensor"], model.n_head,
       f"the {model.n_head} heads (model.n_embd / model.head_size)"),
      ("mesh.tensor", sizes["tensor"], model.ffn_dim, f"the FFN hidden size {model.ffn_dim}"),
  ]
  for axis, size, total, what in checks:
    if total % size:
      raise PlanError(f"{axis} = {size} does not divide {what}; mesh {sizes}")


# ----------------------------------------------------------------------------- WKV kernel work


def wkv_flops_per_token_head(chunk: int, head_size: int) -> tuple[int, int]:
  """(forward, backward) FLOPs of the WKV-7 kernels per token and head, counted from the chunked
  algorithm they run (pallas_kernels.chunk_math; docs/architecture.md#the-chunked-wkv-7-form),
  C = chunk, N = head size, per chunk and head (2mnk per m x k by k x n product):

    forward   20 C^2 N + 8 C N^2 + 4 C^3 (log2 C - 1)
      C^2 N: the decay cumsum as a triangular matmul (2), the four decayed C x C products
             A_ab, A_ak, A_rb, A_rk (8), A_ak V and A_rk V (4), W = T a_start and U0 = T A_ak V
             (4), A_rb U (2);
      C N^2: U = W S0^T + U0, r_start S0^T, U^T b_end, V^T k_end (2 each);
      C^3:   T = (I - A_ab)^{-1} by the Schur ladder, two C x C x C products per level after
             the first.
    backward  56 C^2 N + 20 C N^2 + 4 C^3 log2 C
      the chunk's terms and U recomputed from its checkpoint (18 C^2 N + 4 C N^2 + the
      ladder); then two products per forward product (one where an operand is a constant
      mask, the cumsum): 38 C^2 N + 16 C N^2, and dA = T^T dT T^T (4 C^3).

  Per token divide by C. The count is algorithmic: the TPU kernel packs two 64-wide heads into
  the 128 lanes and masks, so its MXU does more; reset masks and elementwise work are left out.
  At C = 64, N = 64: 197k forward + 410k backward per token and head."""
  C, N, levels = chunk, head_size, int(math.log2(chunk))
  forward = 20 * C * C * N + 8 * C * N * N + 4 * C**3 * (levels - 1)
  backward = 56 * C * C * N + 20 * C * N * N + 4 * C**3 * levels
  return forward // C, backward // C


def kernel_chunk_size(model_cfg, platform: str) -> int:
  """The chunk size the Pallas kernel runs with on `platform` ("tpu", "cuda") for this model:
  the policy table's (`wkv_policy.choose`; a configured size the kernel does not take is
  replaced, see `wkv_policy.substitution`)."""
  return wkv_policy.choose(platform, _kernel_impl(model_cfg), model_cfg.wkv_chunk_size).chunk_size


def _chunk_substitution(model_cfg, platform: str) -> str:
  """'' or the line saying the kernel runs another chunk size than model.wkv_chunk_size."""
  return wkv_policy.substitution(platform, _kernel_impl(model_cfg), model_cfg.wkv_chunk_size)


def _kernel_impl(model_cfg) -> str:
  """The impl whose kernel runs on an accelerator: "pallas" as asked, else auto's."""
  return "pallas" if model_cfg.wkv_impl == "pallas" else "auto"


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Memory:
  """Bytes per device."""
  parameters: int
  optimizer: int
  batch: int
  temporaries: int
  total: int            # arguments + outputs not aliased to them + temporaries + program code
  capacity: int
  refused: bool = False  # the TPU compiler refused the program: more than the HBM it can use

  @property
  def fits(self) -> bool:
    return not self.refused and self.total <= self.capacity


@dataclasses.dataclass(frozen=True)
class Flops:
  """FLOPs per step, summed over devices. `compiled` and `kernels` are what the program
  executes (recomputation under remat included): their sum is what HFU counts; `model` is what
  MFU counts."""
  compiled: float | None     # XLA ops, loop bodies counted per trip; None: nothing compiled
  kernels: float             # the Pallas WKV kernels, by formula per run, on the rows and
                             # padded lengths each run has in the program
  six_n_tokens: float        # 6 * (parameters without the embedding lookup) * tokens
  model: float               # six_n_tokens + one WKV forward and backward per layer (by
                             # formula, whichever implementation runs)

  @property
  def hardware(self) -> float | None:
    """What the devices execute: compiled XLA ops plus the kernels; None: nothing compiled."""
    return None if self.compiled is None else self.compiled + self.kernels


@dataclasses.dataclass(frozen=True)
class StepEstimate:
  """The step time at an assumed utilisation of the datasheet peak."""
  seconds: float
  basis: str                 # "HFU" (from hardware FLOPs) or "MFU" (from model FLOPs)
  assumed: float             # the utilisation assumed, of `basis`
  hfu: float | None          # hardware FLOPs utilisation at that step time (None: no program)
  mfu: float                 # model FLOPs utilisation at that step time
  tokens_per_second: float


@dataclasses.dataclass(frozen=True)
class Plan:
  config_name: str
  target: str
  platform: str              # "tpu" or "cuda"
  device_kind: str
  devices: int
  mesh: dict[str, int]
  parameters: int
  embedding: int
  tokens: int
  memory: Memory
  flops: Flops
  peak_flops: float          # per device, bf16 datasheet
  chunk_size: int            # the WKV kernels' chunk on this platform
  kernel_runs: dict[str, int]
  compile_seconds: float
  compiler_message: str | None = None   # why the compiler refused the program
  memory_breakdown: memory_groups.MemoryBreakdown | None = None   # asked for (--memory)
  memory_breakdown_error: str | None = None   # why there is none though it was asked for

  def step_seconds(self, mfu: float) -> float:
    return self.flops.model / (mfu * self.peak_flops * self.devices)


def estimate_step(plan: Plan, *, hfu: float | None = None, mfu: float | None = None) -> StepEstimate:
  """The step time at `hfu` of peak for the hardware FLOPs (recomputation included: a heavier
  remat policy costs time), or at `mfu` for the model FLOPs; one of them. Without a compiled
  program (the compiler refused it) there are no hardware FLOPs and `hfu` is applied to the
  model FLOPs (basis "MFU")."""
  if (hfu is None) == (mfu is None):
    raise ValueError("estimate_step: give hfu or mfu")
  capacity = plan.peak_flops * plan.devices
  hardware = plan.flops.hardware
  if hfu is not None and hardware is not None:
    seconds, basis, assumed = hardware / (hfu * capacity), "HFU", hfu
  else:
    assumed = mfu if mfu is not None else hfu
    seconds, basis = plan.flops.model / (assumed * capacity), "MFU"
  return StepEstimate(
      seconds=seconds, basis=basis, assumed=assumed,
      hfu=None if hardware is None else hardware / (seconds * capacity),
      mfu=plan.flops.model / (seconds * capacity), tokens_per_second=plan.tokens / seconds)


def make_plan(cfg, target: str, config_name: str, progress=None, *,
              memory_breakdown: bool = False) -> Plan:
  """Compile `cfg`'s train step for `target` and gather the plan's figures; with
  `memory_breakdown`, also where the temporaries go at their peak (goosejax.plan.memory: the
  compiler writes its buffer assignment to a temporary directory). Raises PlanError for a mesh
  that does not divide the slice or the model (a plan that does not fit is returned;
  `Plan.memory.fits` says so)."""
  from goosejax import sharding
  from goosejax.plan import cost, targets
  from goosejax.config import ConfigError
  from goosejax.train import recipe

  progress = progress or _quiet
  recipe.check_trainable(cfg)
  with progress(f"compile-only devices of {target}"):
    facts = targets.target_facts(target)
  try:
    sizes = cfg.mesh.shape(facts.devices)
  except ConfigError as e:
    raise PlanError(f"{target} has {facts.devices} devices: {e}") from None
  check_mesh_divides(cfg, sizes)
  mesh = sharding.make_mesh(cfg.mesh, targets.target_devices(target))
  try:
    sharding.process_row_block(mesh, 0)  # every host can load whole rows of the batch
  except sharding.ShardingError as e:
    raise PlanError(f"{target}: {e}") from None
  state, batch = targets.train_step_inputs(cfg, mesh, with_reset=cfg.data.pack_documents)
  parameters = sum(math.prod(leaf.shape) for leaf in state.params.values())
  embedding = math.prod(state.params["emb"].shape)

  start = time.monotonic()
  with progress(f"compiling the train step for {facts.devices} devices, mesh {_mesh_text(sizes)}"):
    compiled, compiler_message, groups = _compile(cfg, target, memory_breakdown)
  compile_seconds = time.monotonic() - start
  program = None
  if compiled is not None:
    with progress("counting FLOPs in the compiled program"):
      program = cost.program_cost(compiled)
  platform = targets.parse_target(target).platform
  return Plan(
      config_name=config_name, target=target, platform=platform, device_kind=facts.device_kind,
      devices=facts.devices, mesh=sizes, parameters=parameters, embedding=embedding,
      tokens=cfg.data.batch_size * cfg.data.ctx_len,
      memory=_memory(compiled, compiler_message, state, batch, facts.memory_bytes),
      flops=_flops(cfg, platform, parameters - embedding, program, facts.devices),
      peak_flops=facts.peak_bf16_flops, chunk_size=kernel_chunk_size(cfg.model, platform),
      kernel_runs=program.kernel_runs if program else {}, compile_seconds=compile_seconds,
      compiler_message=compiler_message,
      memory_breakdown=groups if isinstance(groups, memory_groups.MemoryBreakdown) else None,
      memory_breakdown_error=groups if isinstance(groups, str) else None)


def _compile(cfg, target: str, memory_breakdown: bool):
  """(the compiled train step, None, its memory breakdown), or (None, the compiler's message,
  the breakdown of what it laid out) when the TPU compiler refuses a program larger than HBM;
  the breakdown is None when not asked for, a line saying why where it could not be made."""
  import jax
  from goosejax.plan import targets
  with tempfile.TemporaryDirectory(prefix="goosejax-plan-") as dump:
    options = memory_groups.compiler_options(dump) if memory_breakdown else None
    try:
      compiled = targets.compile_train_step(cfg, target, with_reset=cfg.data.pack_documents,
                                            compiler_options=options)
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      message = str(e).splitlines()[0].rstrip(".")
      refused_total = _compiler_temporaries(message)
      return None, message, _breakdown(dump, refused_total, True) if options else None
    temporaries = compiled.memory_analysis().temp_size_in_bytes
    return compiled, None, _breakdown(dump, temporaries, False) if options else None


def _breakdown(dump: str, temporaries: int, refused: bool):
  """The memory breakdown of the program dumped in `dump`, or why there is none."""
  try:
    return memory_groups.breakdown(dump, temporaries, refused=refused)
  except memory_groups.DumpError as e:
    return f"no memory breakdown: {e}"


def _memory(compiled, compiler_message: str | None, state, batch, capacity: int) -> Memory:
  import jax
  per_device = lambda tree: sum(_shard_bytes(leaf) for leaf in jax.tree.leaves(tree))
  parameters, optimizer, batch = per_device(state.params), per_device(state.opt_state), per_device(batch)
  if compiled is None:
    temporaries = _compiler_temporaries(compiler_message)
    return Memory(parameters, optimizer, batch, temporaries,
                  parameters + optimizer + batch + temporaries, capacity, refused=True)
  stats = compiled.memory_analysis()
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
           + stats.temp_size_in_bytes + stats.generated_code_size_in_bytes)
  return Memory(parameters, optimizer, batch, stats.temp_size_in_bytes, total, capacity)


def _flops(cfg, platform: str, matmul_parameters: int, cost, devices: int) -> Flops:
  """`matmul_parameters`: all but the embedding table (a lookup). `cost`: the compiled
  program's ProgramCost, None when nothing compiled."""
  model, data = cfg.model, cfg.data
  tokens = data.batch_size * data.ctx_len
  forward, backward = wkv_flops_per_token_head(kernel_chunk_size(model, platform), model.head_size)
  six_n_tokens = 6 * matmul_parameters * tokens
  wkv_model = tokens * model.n_head * model.n_layer * (forward + backward)
  if cost is None:
    return Flops(None, 0.0, six_n_tokens, six_n_tokens + wkv_model)
  # What each kernel run covers is read off its output in the program: one device's rows (twice
  # them on a span of mesh.sequence), heads and length padded to whole chunks.
  token_heads = lambda kind: sum(n for name, n in cost.kernel_elements.items() if kind in name) \
      // model.head_size * devices
  kernels = token_heads("forward") * forward + token_heads("backward") * backward
  return Flops(cost.flops * devices, kernels, six_n_tokens, six_n_tokens + wkv_model)


def _shard_bytes(leaf) -> int:
  shape = leaf.sharding.shard_shape(leaf.shape)
  return math.prod(shape) * leaf.dtype.itemsize


_XLA_SIZE = re.compile(r"temporaries \((\d+(?:\.\d+)?)([KMGT])\)")


def _compiler_temporaries(message: str) -> int:
  """The temporaries an out-of-memory TPU compile reports ('... HLO temporaries (39.14G) ...',
  XLA's binary units); 0 when the message does not say."""
  match = _XLA_SIZE.search(message)
  if not match:
    return 0
  return int(float(match[1]) * 1024 ** ("KMGT".index(match[2]) + 1))


def _mesh_text(sizes: dict[str, int]) -> str:
  return " ".join(f"{axis}={size}" for axis, size in sizes.items())


# ----------------------------------------------------------------------------- report


def format_plan(plan: Plan, cfg, mfu: float | None = None, hfu: float | None = None) -> str:
  """The plan as printed; the step time at `mfu` of peak for the model FLOPs, or at `hfu` (by
  default DEFAULT_HFU) for the hardware FLOPs."""
  if mfu is None and hfu is None:
    hfu = DEFAULT_HFU
  model, memory = cfg.model, plan.memory
  accum = cfg.optimizer.grad_accum
  rows = cfg.data.batch_size // accum // (plan.mesh["data"] * plan.mesh["fsdp"])
  per_device = (f"{rows} sequence{'s' if rows != 1 else ''} per device"
                + (f" in each of {accum} micro-batches" if accum > 1 else ""))
  gib = lambda n: f"{n / GIB:9.2f}"
  share = memory.total / memory.capacity
  verdict = "fits" if memory.fits else "does NOT fit"
  lines = [
      f"plan: {plan.config_name} on {plan.target}: {plan.devices} x {plan.device_kind}, "
      f"mesh {_mesh_text(plan.mesh)}",
      f"parameters      {plan.parameters:,} ({plan.parameters - plan.embedding:,} without the "
      f"embedding); L{model.n_layer} D{model.n_embd} head {model.head_size} FFN {model.ffn_dim} "
      f"vocab {model.vocab_size}",
      f"batch           {cfg.data.batch_size} x {cfg.data.ctx_len} = {plan.tokens:,} tokens per "
      f"step, {per_device}; {model.dtype} compute, remat {cfg.run.remat}",
      "memory per device           GiB",
      f"  parameters          {gib(memory.parameters)}   fp32 master copies, sharded",
      f"  optimizer state     {gib(memory.optimizer)}   Adam moments",
      f"  batch               {gib(memory.batch)}",
      f"  temporaries         {gib(memory.temporaries)}   "
      + ("compiled: activations, gradients, workspace" if plan.compiler_message is None
         else "as the compiler reports them"),
      f"  total               {gib(memory.total)}   of {memory.capacity / GIB:.2f} GiB "
      f"({share:.0%}): {verdict}",
  ]
  if plan.compiler_message:
    lines.append(f"  compiler: {plan.compiler_message}")
  if plan.memory_breakdown_error:
    lines.append(f"  {plan.memory_breakdown_error}")
  if plan.memory_breakdown is not None:
    lines.append(memory_groups.format_breakdown(plan.memory_breakdown))
  lines += _flops_lines(plan)
  lines.append(_step_line(plan, estimate_step(plan, hfu=hfu, mfu=mfu)))
  if plan.platform in ("tpu", "cuda") and (substituted := _chunk_substitution(cfg.model, plan.platform)):
    lines.append(f"note: {substituted}")
  if plan.platform == "cuda":
    lines.append("note: JAX takes 75% of GPU memory unless XLA_PYTHON_CLIENT_MEM_FRACTION is raised")
  lines.append(f"compiled here in {plan.compile_seconds:.0f} s")
  return "\n".join(lines)


def _flops_lines(plan: Plan) -> list[str]:
  flops = plan.flops
  lines = ["FLOPs per step, all devices"]
  if flops.compiled is not None:
    lines.append(f"  compiled XLA ops    {flops.compiled:9.3e}   loop bodies counted per trip, "
                 f"recomputation under remat included")
  else:
    lines.append("  compiled XLA ops          n/a   no program: the compiler refused it")
  if plan.kernel_runs:
    runs = ", ".join(f"{name} x{n}" for name, n in sorted(plan.kernel_runs.items()))
    lines.append(f"  WKV kernels         {flops.kernels:9.3e}   by formula on each run's rows and "
                 f"padded length as compiled, chunk {plan.chunk_size}: {runs}")
  if flops.hardware is not None:
    lines.append(f"  hardware FLOPs      {flops.hardware:9.3e}   compiled XLA ops + WKV kernels "
                 f"(what HFU counts): {flops.hardware / flops.model:.2f} x model FLOPs")
  lines += [
      f"  6 x N x tokens      {flops.six_n_tokens:9.3e}   N = parameters without the embedding",
      f"  model FLOPs         {flops.model:9.3e}   6NT + one WKV forward and backward per layer "
      f"(what MFU counts)",
  ]
  return lines


def _step_line(plan: Plan, step: StepEstimate) -> str:
  line = (f"at {step.assumed:.0%} {step.basis} of {plan.peak_flops / 1e12:.0f} TFLOP/s bf16 per "
          f"device: step {step.seconds:.3g} s, {step.tokens_per_second:,.0f} tokens/s "
          f"({step.tokens_per_second / plan.devices:,.0f} per device)")
  if step.basis == "HFU":
    return line + f"; MFU then {step.mfu:.0%}"
  if step.hfu is not None:
    return line + f"; HFU then {step.hfu:.0%} (the hardware FLOPs at this step time)"
  return line + "; no program, so no hardware FLOPs: the step time is from the model FLOPs"


# ----------------------------------------------------------------------------- command line


@contextlib.contextmanager
def _quiet(message: str):
  yield


@contextlib.contextmanager
def stderr_progress(message: str):
  """`message` on stderr, the elapsed seconds while the block runs (in place on a terminal, a
  line every 30 s otherwise), then the time it took."""
  stream, start, done = sys.stderr, time.monotonic(), threading.Event()
  tty = stream.isatty()
  stream.write(f"plan: {message} ...{'' if tty else chr(10)}")
  stream.flush()

  def tick():
    while not done.wait(1.0 if tty else 30.0):
      elapsed = time.monotonic() - start
      stream.write(f"\rplan: {message} ... {elapsed:.0f} s" if tty
                   else f"plan: {message} ... {elapsed:.0f} s\n")
      stream.flush()

  ticker = threading.Thread(target=tick, daemon=True)
  ticker.start()
  try:
    yield
  finally:
    done.set()
    ticker.join()
    elapsed = time.monotonic() - start
    stream.write(f"\rplan: {message}: {elapsed:.0f} s\n" if tty
                 else f"plan: {message}: done in {elapsed:.0f} s\n")
    stream.flush()


def _fraction(text: str) -> float:
  value = float(text)
  if not 0 < value <= 1:
    raise argparse.ArgumentTypeError(f"{text}: expected a fraction in (0, 1], e.g. 0.4")
  return value


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="goosejax plan", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=config_args.KEYS_HELP)
  config_args.add_config_arguments(p)   # --config, --steps, ..., overrides anywhere
  p.add_argument("--topology", "--target", dest="topology", required=True,
                 action=config_args.StoreOnce,
                 help="a TPU slice (v5p:4x4x4, v6e:4x4), GPUs (h100:8, h200:4x8 = hosts x per "
                      "host), or a bare chip (v5p, h100) with --devices")
  p.add_argument("--devices", type=config_args.whole_number, action=config_args.StoreOnce,
                 help="chips or GPUs: picks the usual slice shape for a bare chip, checks a named one")
  utilisation = p.add_mutually_exclusive_group()
  utilisation.add_argument(
      "--hfu", type=_fraction,
      help=f"hardware FLOPs utilisation for the step time: the step takes hardware FLOPs (the "
           f"compiled program's, recomputation included, plus the WKV kernels) / (HFU x peak) "
           f"(default {DEFAULT_HFU})")
  utilisation.add_argument(
      "--mfu", type=_fraction,
      help="model FLOPs utilisation for the step time instead: model FLOPs (6NT + WKV) / (MFU x "
           "peak), as before --hfu; a remat policy then changes nothing")
  p.add_argument("--memory", action="store_true",
                 help="where the temporaries go: the buffers live at the compiled program's peak, "
                      "grouped (saved residuals, kernel checkpoints, gathered weights, loss head, "
                      "optimizer update, backward pass, other) with GiB, share, count and the "
                      "largest; also for a program the compiler refuses")
  p.add_argument("--fit", action="store_true",
                 help="keep the batch, search run.remat x optimizer.grad_accum (x the fused loss "
                      "head) for the fastest layout that fits (goosejax.plan.fit); one line per "
                      "candidate compiled, the chosen overrides as the last line")
  return p


def resolve_target(topology: str, devices: int | None) -> str:
  """A full target name from --topology and --devices."""
  from goosejax.plan import targets
  if devices is not None and devices < 1:
    raise PlanError(f"--devices {devices}: expected a positive number of chips or GPUs")
  if ":" not in topology:
    if devices is None:
      raise PlanError(f"--topology {topology}: give the layout ({topology}:<topology>) or "
                      f"--devices N")
    return targets.target_for(topology, devices)
  if devices is not None:
    count = targets.target_facts(topology).devices
    if count != devices:
      raise PlanError(f"--topology {topology} has {count} devices, not --devices {devices}")
  return topology


def main(argv: list[str]) -> int:
  """Exit status 0 (fits), 2 (does not fit, a mesh that does not divide, bad input)."""
  from goosejax.cli import exit_status
  args = config_args.parse_args(_parser(), argv)
  # The targets' devices come from the compiler plugins: never initialise (and hold) an
  # accelerator this machine has. A no-op where JAX_PLATFORMS is set or JAX already started.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

  def run() -> None:
    cfg = config_args.resolve(args).config
    target = resolve_target(args.topology, args.devices)
    if args.fit:
      return _fit(cfg, target, args)
    plan = make_plan(cfg, target, args.config, stderr_progress, memory_breakdown=args.memory)
    print(format_plan(plan, cfg, mfu=args.mfu, hfu=args.hfu), flush=True)
    if not plan.memory.fits:
      m = plan.memory
      why = (f"the compiler refused it: {plan.compiler_message}" if m.refused
             else f"more than the {m.capacity / GIB:.2f} GiB each {plan.device_kind} has")
      raise PlanError(
          f"does not fit: {m.total / GIB:.2f} GiB per device (parameters {m.parameters / GIB:.2f}, "
          f"optimizer state {m.optimizer / GIB:.2f}, batch {m.batch / GIB:.2f}, temporaries "
          f"{m.temporaries / GIB:.2f}), {why}; shard more (mesh.fsdp, mesh.tensor), use more "
          f"devices, or lower data.batch_size / raise optimizer.grad_accum")
  return exit_status("plan", run)


def _fit(cfg, target: str, args) -> None:
  from goosejax.plan import fit
  if args.memory:
    raise PlanError("--fit compiles many layouts: plan the chosen one with --memory afterwards")
  fit.run_fit(cfg, target, args.config, stderr_progress, hfu=args.hfu, mfu=args.mfu)
