"""The Pallas kernels check themselves on the first real TPU or GPU a process uses.

Interpret mode on CPU runs the kernel bodies but not what the hardware compilers make of them
(Mosaic's layouts, Triton's TF32x3 dots, shared-memory tiling). So before `wkv7` first hands
work to a compiled kernel on a device this process really has, a short forward+backward on a
small input (T not a multiple of the chunk, a document reset, a non-zero incoming state, the
strongest decay the model produces) is compared with the token-scan reference. A mismatch or
an error switches that platform and chunk size to the XLA form wherever the outcome is used,
with one warning line that names what was found. Compiling for a target the process does not have
(goosejax.plan.targets) checks nothing: there is nothing to run on.

The outcome of one check (`run_check`) is a `KernelCheck` for one (platform, chunk size); the
outcomes are a value, `KernelChecks`, that the caller keeps and hands on: to `wkv7(...,
kernel_checks=)`, or for a block of code where the model calls `wkv7` (`with use(checks):`, the
way `jax.set_mesh` scopes a mesh). Nothing is remembered between calls: a kernel that would run
on this process's devices with no outcome in hand is checked on the spot, every time, so an
entry point runs `checks_for` once, reports it (`describe_wkv`) and installs it.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import dataclasses
import sys
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from goosejax.wkv.reference import wkv7_reference
from pallas_kernels.wkv_policy import LOG_DECAY_MIN

# Largest |error| / max |reference| accepted per output. Compiled fp32 dots (TF32x3 on CUDA,
# multi-pass bf16 on TPU) stay near 1e-5; a wrong index or a lost term is O(1).
TOLERANCE = 5e-3


@dataclasses.dataclass(frozen=True)
class KernelCheck:
  """The outcome of one self-check: one kernel platform at one chunk size."""
  platform: str                 # "tpu" or "cuda"
  chunk_size: int
  passed: bool
  detail: str                   # the worst relative error, or the error raised


@dataclasses.dataclass(frozen=True)
class KernelChecks:
  """Self-check outcomes by (platform, chunk size); empty: nothing checked yet."""
  outcomes: tuple[KernelCheck, ...] = ()

  def get(self, platform: str, chunk_size: int) -> KernelCheck | None:
    return next((c for c in self.outcomes if (c.platform, c.chunk_size) == (platform, chunk_size)),
                None)

  def with_check(self, check: KernelCheck) -> "KernelChecks":
    others = tuple(c for c in self.outcomes
                   if (c.platform, c.chunk_size) != (check.platform, check.chunk_size))
    return KernelChecks(others + (check,))


_IN_EFFECT: contextvars.ContextVar[KernelChecks] = contextvars.ContextVar(
    "goosejax_kernel_checks", default=KernelChecks())


@contextlib.contextmanager
def use(checks: KernelChecks) -> Iterator[KernelChecks]:
  """`wkv7` calls traced inside the block (a model's, a train step's) that are given no
  `kernel_checks` read these outcomes."""
  token = _IN_EFFECT.set(checks)
  try:
    yield checks
  finally:
    _IN_EFFECT.reset(token)


def in_effect() -> KernelChecks:
  """The outcomes installed by the innermost `use` block (empty outside any)."""
  return _IN_EFFECT.get()


def local_platform() -> str | None:
  """"tpu" or "cuda" when this process has such devices, else None (CPU, ROCm, ...)."""
  backend = jax.default_backend()
  if backend == "tpu":
    return "tpu"
  if backend == "gpu" and "cuda" in jax.devices()[0].client.platform_version.lower():
    return "cuda"
  return None


def check_inputs(chunk_size: int, seed: int = 0):
  """(r, log_w, k, v, a, b, state, reset) in fp32: B=2, T=2*chunk+3, H=2, N=64."""
  B, T, H, N = 2, 2 * chunk_size + 3, 2, 64
  keys = jax.random.split(jax.random.key(seed), 8)
  normal = lambda key, shape=(B, T, H, N): jax.random.normal(key, shape, jnp.float32)
  # Decays from the fastest the model allows (LOG_DECAY_MIN) to almost none; half the channels
  # at the fastest.
  log_w = LOG_DECAY_MIN * jax.random.uniform(keys[0], (B, T, H, N), jnp.float32)
  log_w = jnp.where(jnp.arange(N) % 2 == 0, LOG_DECAY_MIN, log_w)
  kk = normal(keys[1])
  kk = kk / jnp.linalg.norm(kk, axis=-1, keepdims=True)
  iclr = jax.random.uniform(keys[2], (B, T, H, N), jnp.float32)
  state = 0.5 * normal(keys[3], (B, H, N, N))
  reset = jnp.zeros((B, T), bool).at[1, chunk_size + 1].set(True)
  return (normal(keys[4]), log_w, 0.5 * normal(keys[5]), normal(keys[6]), -kk, kk * iclr,
          state, reset)


def _relative_error(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if not np.all(np.isfinite(got)):
    return float("inf")
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def compare_with_reference(kernel: Callable, chunk_size: int) -> tuple[str, float]:
  """(description, worst relative error) of `kernel`'s outputs, final state and every input
  gradient against the token-scan reference; raises whatever the kernel raises."""
  inputs = check_inputs(chunk_size)
  other = check_inputs(chunk_size, seed=1)
  cotangents = (other[0], other[6])   # for y [B,T,H,N] and the final state [B,H,N,N]

  def loss(fn, *differentiable):
    y, final = fn(*differentiable, inputs[7])
    return jnp.sum(y * cotangents[0]) + jnp.sum(final * cotangents[1]), (y, final)

  def run(fn):
    grad = jax.jit(jax.grad(lambda *xs: loss(fn, *xs), argnums=tuple(range(7)), has_aux=True))
    grads, (y, final) = grad(*inputs[:7])
    return {"y": y, "state": final, **{f"d{name}": g for name, g in
                                        zip(("r", "log_w", "k", "v", "a", "b", "state0"), grads)}}

  reference = lambda r, log_w, k, v, a, b, state, reset: wkv7_reference(
      r, log_w, k, v, a, b, state, reset=reset)
  got, want = run(kernel), run(reference)
  errors = {name: _relative_error(got[name], want[name]) for name in want}
  worst = max(errors, key=errors.get)
  return f"worst relative error {errors[worst]:.2e} ({worst})", errors[worst]


def run_check(platform: str, chunk_size: int, kernel: Callable | None = None,
              warn: Callable[[str], None] | None = None) -> KernelCheck:
  """Checks `kernel` (default: the compiled `platform` kernel at `chunk_size`) against the
  reference now, on this process's devices; a failure is also warned about in one line."""
  if kernel is None:
    kernel = pallas_kernels.platform_callables(chunk_size=chunk_size)[platform]
  try:
    # In a thread of its own: JAX's trace state is per thread, so the check runs now on the
    # device even when wkv7 calls it while a jit is being traced.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      detail, worst = pool.submit(compare_with_reference, kernel, chunk_size).result()
    passed = worst <= TOLERANCE
    if not passed:
      detail += f" > {TOLERANCE:g}"
  except Exception as error:  # any failure to compile or run means the kernels are not usable
    passed, detail = False, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
  if not passed:
    (warn or _stderr)(f"goosejax: WARNING: the Pallas WKV kernel failed its self-check on "
                      f"{platform} at chunk size {chunk_size} ({detail}); using the XLA chunked "
                      "form instead")
  return KernelCheck(platform, chunk_size, passed, detail)


def kernel_check(platform: str, chunk_size: int,
                 checks: KernelChecks | None = None) -> KernelCheck | None:
  """The outcome that decides whether the compiled `platform` kernel at `chunk_size` may run:
  None when compiling for hardware this process does not have (nothing to run on); else the
  one in `checks` (default: `in_effect()`), or a check run now when that holds none."""
  if local_platform() != platform:
    return None
  found = (in_effect() if checks is None else checks).get(platform, chunk_size)
  return found if found is not None else run_check(platform, chunk_size)


def kernels_usable(platform: str, chunk_size: int, checks: KernelChecks | None = None) -> bool:
  """May `wkv7` put the compiled `platform` kernel in a program? Yes when compiling for
  hardware this process does not have; otherwise only if its self-check passed."""
  check = kernel_check(platform, chunk_size, checks)
  return check is None or check.passed


def checks_for(chunk_sizes, checks: KernelChecks | None = None) -> KernelChecks:
  """`checks` (default: those `in_effect()`) with an outcome for each of `chunk_sizes` of this
  process's kernel platform, running the checks it lacks; unchanged on CPU and other platforms."""
  checks = in_effect() if checks is None else checks
  platform = local_platform()
  for size in dict.fromkeys(chunk_sizes):
    if platform is not None and checks.get(platform, size) is None:
      checks = checks.with_check(run_check(platform, size))
  return checks


def describe_wkv(impl: str, kernel_chunk_size: int | None,
                 checks: KernelChecks | None = None) -> str:
  """One start-up line: which WKV implementation runs on this process's devices (running the
  self-check now, with the chunk size the kernel would use, if `checks` has no outcome)."""
  backend = jax.default_backend()
  if impl not in ("auto", "pallas"):
    return f"wkv: impl={impl}, the XLA form, on {backend}"
  platform = local_platform()
  if platform is None:
    form = "the XLA chunked form" if impl == "auto" else "the Pallas kernel in the interpreter"
    return f"wkv: impl={impl} runs {form} on {backend} (no TPU or CUDA devices)"
  check = kernel_check(platform, kernel_chunk_size, checks)
  if check.passed:
    return (f"wkv: impl={impl} runs the Pallas kernels on {platform} "
            f"at chunk size {kernel_chunk_size} (self-check passed: {check.detail})")
  return (f"wkv: impl={impl} runs the XLA chunked form on {platform}: the Pallas kernel failed "
          f"its self-check at chunk size {kernel_chunk_size} ({check.detail})")


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)
