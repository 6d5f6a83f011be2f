"""The hardware checklist in one call (under 10 minutes on one H100/H200 or a TPU), one table.

  python benchmarks/device_check.py [--budget-s 480] [--repeats 5] [--smoke]

1. self-check: `goosejax.wkv.self_check.run_check` for this device's Pallas kernel at every chunk
   size it takes (outputs, final state and all seven gradients against the token scan; T not a
   multiple of the chunk, a reset, a carried state, the strongest decay). The outcomes are kept
   and handed to every later step (`wkv7(kernel_checks=)`, `self_check.use`), so a kernel that
   failed is not timed or trained with.
2. the WKV-7 operator at B=8, T=4096, H=64, N=64 in bf16: forward and forward+backward of
   impl="auto", the kernel at each chunk size it takes (and Triton with 16-row value tiles), the
   XLA chunked forms ("chunked", "associative") and the token scan ("reference"); median ms.
3. a train step: the real one (goosejax.train.recipe: AdamW, L2Wrap, clipping) of the tiny
   preset in bf16 compute on synthetic tokens; compile s, step ms, tokens/s, loss finite.
4. decode: `goosejax.infer.Generator` on that model, greedy, a 16-token prompt then 64 tokens.

Each step is guarded: a failure becomes a FAILED row and the rest still runs; a step that would
start after --budget-s is listed as skipped. Exit status 1 when a row failed. --smoke shrinks
every shape so the whole script runs on a CPU (kernels interpreted; timings mean nothing).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import statistics
import sys
import time
import traceback
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Sizes:
  operator: tuple = (8, 4096, 64, 64)    # WKV timing B, T, H, N
  train_overrides: tuple = ("model.dtype=bfloat16", "data.ctx_len=512", "data.batch_size=8")
  prompt_tokens: int = 16
  new_tokens: int = 64
  every_chunk_size: bool = True          # False: the kernel's default chunk size only


SMOKE = Sizes(operator=(1, 40, 2, 16), every_chunk_size=False,
              train_overrides=("model.dtype=bfloat16", "model.n_layer=1", "model.n_embd=64",
                               "model.head_size=16",
                               "model.vocab_size=256", "model.decay_lora=8", "model.iclr_lora=8",
                               "model.value_lora=8", "model.gate_lora=8", "data.ctx_len=24",
                               "data.batch_size=2"),
              prompt_tokens=5, new_tokens=4)


class Table:
  """Rows of (section, name, fields), printed as they come and once more together at the end."""

  def __init__(self, budget_s: float):
    self.rows: list[tuple[str, str, dict]] = []
    self.deadline = time.perf_counter() + budget_s

  def add(self, section: str, name: str, **fields):
    self.rows.append((section, name, fields))
    print(f"[{section}] {name}: " + ", ".join(f"{k}={v}" for k, v in fields.items()), flush=True)

  def run(self, section: str, name: str, step: Callable[[], dict], needs_s: float = 10.0):
    """Adds step()'s fields as a row, or a FAILED / skipped row; returns the fields or None."""
    if time.perf_counter() + needs_s > self.deadline:
      self.add(section, name, status="skipped (time budget)")
      return None
    try:
      fields = step()
    except Exception as error:  # one failing step must not hide the others
      traceback.print_exc(limit=4, file=sys.stdout)
      first_line = str(error).splitlines()[0][:160] if str(error) else ""
      self.add(section, name, status=f"FAILED: {type(error).__name__}: {first_line}")
      return None
    self.add(section, name, **fields)
    return fields

  @property
  def failed(self) -> bool:
    return any("FAIL" in str(fields.get("status", "")) for _, _, fields in self.rows)

  def print(self):
    device = jax.devices()[0]
    rule = "=" * 110
    print(f"\n{rule}\ndevice_check  jax {jax.__version__}  {jax.default_backend()}  "
          f"{device.device_kind}  {time.strftime('%Y-%m-%d %H:%M')}\n{rule}")
    for section, name, fields in self.rows:
      detail = "  ".join(f"{k}={v}" for k, v in fields.items())
      print(f"{section:<16} {name:<34} {detail}")
    print(rule)
    print("some steps FAILED" if self.failed else "no failed steps")


def median_ms(fn, args, repeats: int) -> tuple[float, float]:
  """(compile + first run s, median ms of `repeats` runs), wall clock around block_until_ready."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return first_s, statistics.median(times)


# ------------------------------------------------------------------------------ 1. self-check


def kernel_platform() -> str:
  """The policy row whose kernel this process runs: its TPU / CUDA devices', else "cpu"."""
  from goosejax.wkv import self_check
  return self_check.local_platform() or "cpu"


def kernel_chunk_sizes(sizes: Sizes) -> tuple[int, ...]:
  from pallas_kernels.wkv_policy import POLICY
  kernel = POLICY[kernel_platform()].kernel
  return kernel.chunk_sizes if sizes.every_chunk_size else (kernel.chunk_size,)


def self_checks(table: Table, sizes: Sizes):
  """Each chunk size of this platform's kernel checked; the outcomes as one value."""
  from goosejax.wkv import self_check
  from pallas_kernels import wkv7_pallas
  from pallas_kernels.wkv_policy import POLICY

  platform = kernel_platform()
  kernel = POLICY[platform].kernel
  checks = self_check.KernelChecks()
  for size in kernel_chunk_sizes(sizes):
    run = functools.partial(wkv7_pallas, chunk_size=size, backend=kernel.backend,
                            interpret=kernel.interpret)
    wrapped = lambda r, w, k, v, a, b, s, reset, run=run: run(r, w, k, v, a, b, s, reset=reset)

    def check(size=size, wrapped=wrapped):
      nonlocal checks
      outcome = self_check.run_check(platform, size, wrapped, warn=print)
      checks = checks.with_check(outcome)
      return {"status": "PASS" if outcome.passed else "FAIL", "detail": outcome.detail}

    table.run("self-check", f"{platform} {kernel.backend} chunk {size}", check, needs_s=30)
  return checks


# ------------------------------------------------------------------------------ 2. operator


def operator_inputs(B, T, H, N):
  from pallas_kernels.wkv_policy import LOG_DECAY_MIN
  keys = jax.random.split(jax.random.key(3), 6)
  normal = lambda key: jax.random.normal(key, (B, T, H, N), jnp.float32)
  kk = normal(keys[0])
  kk = kk / jnp.linalg.norm(kk, axis=-1, keepdims=True)
  iclr = jax.nn.sigmoid(normal(keys[1]))
  log_w = LOG_DECAY_MIN * jax.nn.sigmoid(2 * normal(keys[2]))
  sequences = (normal(keys[3]), log_w, 0.5 * normal(keys[4]), normal(keys[5]), -kk, kk * iclr)
  # As the model sends them: r, k, v, a, b in bf16, the log decay in fp32.
  return [x if x is log_w else x.astype(jnp.bfloat16) for x in sequences]


def operator_variants(sizes: Sizes, checks) -> dict[str, Callable | None]:
  from goosejax.wkv import wkv7
  from pallas_kernels import wkv7_pallas
  from pallas_kernels.wkv_policy import POLICY

  kernel = POLICY[kernel_platform()].kernel
  variants = {"auto": functools.partial(wkv7, impl="auto", kernel_checks=checks)}
  for size in kernel_chunk_sizes(sizes):
    outcome = checks.get(kernel_platform(), size)
    variants[f"pallas chunk {size}"] = None if outcome is None or not outcome.passed else (
        functools.partial(wkv7_pallas, chunk_size=size, backend=kernel.backend,
                          interpret=kernel.interpret))
  if kernel.backend == "triton":
    tiles = functools.partial(wkv7_pallas, chunk_size=16, backend="triton", value_block=16)
    variants["pallas chunk 16, value tiles 16"] = tiles if variants.get("pallas chunk 16") else None
  for impl in ("chunked", "associative", "reference"):
    variants[f"xla {impl}" if impl != "reference" else "token scan"] = functools.partial(
        wkv7, impl=impl)
  return variants


def time_operator(table: Table, sizes: Sizes, checks, repeats: int):
  B, T, H, N = sizes.operator
  section = f"wkv {B}x{T}x{H}x{N}"
  inputs = operator_inputs(B, T, H, N)
  results = {}
  for name, wkv in operator_variants(sizes, checks).items():
    if wkv is None:
      table.add(section, name, status="skipped (failed or missing self-check)")
      continue

    def run(wkv=wkv, name=name):
      forward = jax.jit(lambda *x: wkv(*x)[0])
      compile_forward, forward_ms = median_ms(forward, inputs, repeats)
      loss = lambda *x: jnp.sum(forward(*x).astype(jnp.float32))
      grads = jax.jit(jax.grad(loss, argnums=tuple(range(6))))
      compile_grads, grads_ms = median_ms(grads, inputs, repeats)
      results[name] = grads_ms
      return {"fwd_ms": f"{forward_ms:.2f}", "fwd_bwd_ms": f"{grads_ms:.2f}",
              "first_call_s": f"{compile_forward:.1f}+{compile_grads:.1f}"}
    table.run(section, name, run, needs_s=40)
  if "auto" in results:
    for other in ("xla chunked", "xla associative", "token scan"):
      if other in results:
        speedup = results[other] / results["auto"]
        table.add(section, f"auto vs {other}", fwd_bwd_speedup=f"{speedup:.2f}x")


# ------------------------------------------------------------------------------ 3. train step


def train_config(sizes: Sizes):
  from goosejax.config import load_config
  return load_config("tiny", [*sizes.train_overrides, "run.steps=100", "model.wkv_impl=auto"])


def train_step(table: Table, sizes: Sizes, checks, repeats: int):
  """The real train step; returns its trained parameters' model for the decode step."""
  from goosejax import sharding
  from goosejax.config import MeshConfig
  from goosejax.train import recipe
  from goosejax.train.batches import SyntheticBatches
  from goosejax.wkv import self_check

  cfg = train_config(sizes)
  section = f"train L{cfg.model.n_layer} D{cfg.model.n_embd}"
  name = f"{cfg.data.batch_size}x{cfg.data.ctx_len} {cfg.model.dtype}"
  trained = {}

  def run():
    mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    graphdef, shapes = recipe.abstract_model(cfg)
    tx = recipe.make_optimizer(cfg.optimizer, cfg.run.steps, list(shapes))
    state, shardings = recipe.init_train_state(cfg, tx, mesh)
    step = recipe.jit_train_step(recipe.make_train_step(graphdef, tx, cfg, mesh), shardings, mesh)
    batches = SyntheticBatches(cfg.model.vocab_size, cfg.data.ctx_len, cfg.data.batch_size)
    batch = sharding.host_to_global(next(batches), mesh)
    start = time.perf_counter()
    with self_check.use(checks):  # the model's wkv7 calls run what the self-check allowed
      compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    losses, times = [], []
    for _ in range(repeats + 1):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      losses.append(float(metrics["loss"]))
      times.append((time.perf_counter() - start) * 1e3)
    step_ms = statistics.median(times[1:])
    trained["model"] = recipe.merge_params(graphdef, state.params)
    finite = all(math.isfinite(loss) for loss in losses)
    return {"status": "PASS" if finite else "FAIL (loss not finite)", "compile_s": f"{compile_s:.1f}",
            "step_ms": f"{step_ms:.1f}",
            "tokens_per_s": f"{cfg.data.batch_size * cfg.data.ctx_len / step_ms * 1e3:,.0f}",
            "loss": f"{losses[0]:.3f} -> {losses[-1]:.3f}"}

  table.run(section, name, run, needs_s=60)
  return trained.get("model")


# ------------------------------------------------------------------------------ 4. decode


def decode(table: Table, sizes: Sizes, model, checks):
  from goosejax.infer.generate import Generator
  from goosejax.wkv import self_check

  def run():
    prompt = list(np.random.default_rng(0).integers(0, model.config.vocab_size, sizes.prompt_tokens))
    with self_check.use(checks):
      generator = Generator(model)
      start = time.perf_counter()
      generator.generate(prompt, sizes.new_tokens, temperature=0.0)  # compiles prefill and decode
      first_s = time.perf_counter() - start
      start = time.perf_counter()
      ids = generator.generate(prompt, sizes.new_tokens, temperature=0.0)
      seconds = time.perf_counter() - start
    valid = len(ids) == sizes.new_tokens and all(0 <= i < model.config.vocab_size for i in ids)
    return {"status": "PASS" if valid else f"FAIL ({len(ids)} ids)", "first_call_s": f"{first_s:.1f}",
            "tokens_per_s": f"{sizes.new_tokens / seconds:,.1f}"}

  if model is None:
    table.add("decode", "greedy", status="skipped (no trained model: the train step failed)")
    return
  table.run("decode", f"{sizes.prompt_tokens}-token prompt + {sizes.new_tokens} greedy", run,
            needs_s=30)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--budget-s", type=float, default=480.0,
                      help="no new step starts after this many seconds (the running one finishes)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, to run the script on a CPU")
  args = parser.parse_args(argv)
  sizes = SMOKE if args.smoke else Sizes()
  table = Table(args.budget_s)
  print(f"jax {jax.__version__}, devices: {jax.devices()}", flush=True)
  if jax.default_backend() == "cpu":
    print("no accelerator: the kernels run in the Pallas interpreter, timings mean nothing")
  checks = self_checks(table, sizes)
  time_operator(table, sizes, checks, args.repeats)
  model = train_step(table, sizes, checks, args.repeats)
  decode(table, sizes, model, checks)
  table.print()
  return 1 if table.failed else 0


if __name__ == "__main__":
  sys.exit(main())
