"""Hardware check of the Pallas WKV-7 kernels: one command, under 5 minutes on an H100/H200 GPU or a TPU.

  python benchmarks/device_check.py [--budget-s 240] [--repeats 5] [--skip-model] [--smoke]

1. correctness (fp32 reference maths at HIGHEST matmul precision): the Pallas kernels in fp32-operand mode
   and in bf16-MXU mode against the chunked XLA form (goosejax.wkv's, when it exists) and the token
   reference: outputs, final state and all gradients, with resets, an initial state and T not a multiple
   of the chunk size; also the `lax.platform_dependent` wiring.
2. timing at B=8, T=4096, H=64, N=64 in bf16: forward and forward+backward of Pallas (chunk 16, and 32
   on GPU / 64 on TPU)
   vs the chunked XLA form vs the reference.
3. forward+backward of a 0.1B-shaped model (L12 D768, ctx 512, batch 16) per WKV implementation, when
   goosejax.model exists.

Each step is guarded: a failure becomes a row in the final table and the rest still runs. Steps that
would start after the time budget are listed as skipped; extra correctness variants (chunk 64, IEEE fp32
dots, platform_dependent) run last. Timings: median of --repeats runs after one compile+warm-up run,
wall clock around block_until_ready. --smoke shrinks every shape so the script itself can be checked on
a CPU (interpret mode; the timings then mean nothing).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import time
import traceback
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.wkv_policy import LOG_DECAY_MIN

ROWS: list[dict] = []
TARGET_FWD_BWD_MS = 8.0  # wind_rwkv's chunked CUDA kernel on H100 at (8, 4096, 64, 64)


@dataclasses.dataclass(frozen=True)
class Shapes:
  check: tuple = (2, 300, 4, 64)      # correctness B, T, H, N
  timing: tuple = (8, 4096, 64, 64)   # operator timing B, T, H, N
  model_layers: int = 12
  model_embd: int = 768
  model_vocab: int = 65536
  model_batch: int = 16
  model_ctx: int = 512


SMOKE = Shapes(check=(1, 37, 2, 16), timing=(1, 40, 2, 16), model_layers=2, model_embd=64,
               model_vocab=256, model_batch=2, model_ctx=32)


def row(section: str, name: str, **fields):
  ROWS.append(dict(section=section, name=name, **fields))
  detail = ", ".join(f"{k}={v}" for k, v in fields.items())
  print(f"[{section}] {name}: {detail}", flush=True)


class Budget:
  def __init__(self, seconds: float):
    self.deadline = time.perf_counter() + seconds

  def allows(self, section: str, name: str, needs_s: float = 10.0) -> bool:
    if time.perf_counter() + needs_s > self.deadline:
      row(section, name, status="skipped (time budget)")
      return False
    return True


def guarded(section: str, name: str, fn: Callable[[], dict]) -> dict | None:
  try:
    fields = fn()
    row(section, name, **fields)
    return fields
  except Exception as error:  # one failing step must not hide the others
    traceback.print_exc(limit=4, file=sys.stdout)
    row(section, name, status=f"FAILED: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
    return None


# ------------------------------------------------------------------------------------------------
# Implementations under test.

def pallas_impl(**options):
  from pallas_kernels import wkv7_pallas
  return lambda r, w, k, v, a, b, s, reset: wkv7_pallas(r, w, k, v, a, b, s, reset=reset, **options)


def reference_impl():
  from goosejax.wkv import wkv7_reference
  return lambda r, w, k, v, a, b, s, reset: wkv7_reference(r, w, k, v, a, b, s, reset=reset)


def chunked_impls() -> dict[str, Callable]:
  """The chunked XLA form(s) from goosejax.wkv, through the dispatcher when it knows them, else from
  goosejax.wkv.chunked directly; empty when neither exists yet."""
  from goosejax import wkv as wkv_module
  impls = {}
  for impl in ("chunked", "associative"):
    if impl in getattr(wkv_module, "IMPLEMENTATIONS", ()):
      impls[f"xla-{impl}"] = functools.partial(_dispatch, wkv_module.wkv7, impl)
  if impls:
    return impls
  try:
    from goosejax.wkv.chunked import wkv7_chunked
  except ImportError:
    return {}
  return {f"xla-chunked-{mode}": functools.partial(_chunked_direct, wkv7_chunked, mode)
          for mode in ("sequential", "associative")}


def _dispatch(wkv7, impl, r, w, k, v, a, b, s, reset):
  return wkv7(r, w, k, v, a, b, s, reset=reset, impl=impl, chunk_size=64)


def _chunked_direct(wkv7_chunked, mode, r, w, k, v, a, b, s, reset):
  if s is None:
    s = jnp.zeros((r.shape[0], r.shape[2], r.shape[3], r.shape[3]), jnp.float32)
  return wkv7_chunked(r, w, k, v, a, b, s, reset=reset, chunk_size=64, mode=mode)


# ------------------------------------------------------------------------------------------------
# Inputs.

def make_inputs(seed: int, B: int, T: int, H: int, N: int, dtype, *, with_extras: bool):
  keys = jax.random.split(jax.random.PRNGKey(seed), 8)
  shape = (B, T, H, N)
  normal = lambda key, scale=1.0: jax.random.normal(key, shape, jnp.float32) * scale
  kk = normal(keys[0])
  kk = kk / jnp.linalg.norm(kk, axis=-1, keepdims=True)
  iclr = jax.nn.sigmoid(normal(keys[1]))
  log_w = LOG_DECAY_MIN * jax.nn.sigmoid(2.0 * normal(keys[2]))
  r, k, v = normal(keys[3]), normal(keys[4], 0.5), normal(keys[5])
  seq = [x.astype(dtype) for x in (r, log_w, k, v, -kk, kk * iclr)]
  state = reset = None
  if with_extras:
    state = jax.random.normal(keys[6], (B, H, N, N), jnp.float32) * 0.3
    reset = jax.random.uniform(keys[7], (B, T)) < 0.01
  return seq, state, reset


def grads_fn(impl):
  def loss(r, w, k, v, a, b, s, reset, weight_y, weight_s):
    y, s_end = impl(r, w, k, v, a, b, s, reset)
    return jnp.sum(y.astype(jnp.float32) * weight_y) + jnp.sum(s_end * weight_s)
  return jax.jit(jax.grad(loss, argnums=tuple(range(7))))


def relative_error(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


# ------------------------------------------------------------------------------------------------
# 1. Correctness.

class Correctness:
  """Oracles computed once (fp32, HIGHEST matmul precision), then any number of candidates."""
  section = "correctness"

  def __init__(self, shapes: Shapes, budget: Budget):
    self.budget = budget
    B, T, H, N = shapes.check
    self.seq, self.state, self.reset = make_inputs(0, B, T, H, N, jnp.float32, with_extras=True)
    weights = (jax.random.normal(jax.random.PRNGKey(1), (B, T, H, N)),
               jax.random.normal(jax.random.PRNGKey(2), (B, H, N, N)))
    self.args = (*self.seq, self.state, self.reset, *weights)
    self.truth = {}
    with jax.default_matmul_precision("highest"):
      for name, impl in {"reference": reference_impl(), **chunked_impls()}.items():
        if budget.allows(self.section, f"oracle {name}", 20):
          guarded(self.section, f"oracle {name}",
                  functools.partial(self._oracle, name, impl, f"{B}x{T}x{H}x{N} fp32"))

  def _oracle(self, name, impl, shape):
    y, s_end = jax.jit(impl)(*self.seq, self.state, self.reset)
    self.truth[name] = (y, s_end, grads_fn(impl)(*self.args))
    return {"status": "ok", "shape": shape}

  def core(self):
    self._candidates({
        "pallas fp32 (default fp32 dots)": (pallas_impl(mxu_dtype=jnp.float32), 1e-4, 2e-3),
        "pallas bf16-mxu": (pallas_impl(mxu_dtype=jnp.bfloat16), 1.5e-2, 1.5e-2),
    })

  def extras(self):
    big_chunk = 32 if jax.default_backend() == "gpu" else 64
    candidates = {f"pallas fp32 chunk {big_chunk}": (
        pallas_impl(mxu_dtype=jnp.float32, chunk_size=big_chunk), 1e-4, 2e-3)}
    if jax.default_backend() == "gpu":
      candidates["pallas fp32 (IEEE fp32 dots)"] = (
          pallas_impl(mxu_dtype=jnp.float32, fp32_dot="highest"), 1e-4, 2e-3)
    self._candidates(candidates)
    self._platform_dependent()

  def _candidates(self, candidates):
    if "reference" not in self.truth:
      return
    seq, state, reset, args, truth, section, budget = (self.seq, self.state, self.reset, self.args,
                                                       self.truth, self.section, self.budget)
    for name, (impl, tol_out, tol_grad) in candidates.items():
      if not budget.allows(section, name, 30):
        continue

      def run(impl=impl, tol_out=tol_out, tol_grad=tol_grad):
        y, s_end = jax.jit(impl)(*seq, state, reset)
        grads = grads_fn(impl)(*args)
        fields = {}
        worst = 0.0
        for oracle, (y_o, s_o, g_o) in truth.items():
          e_out = max(relative_error(y, y_o), relative_error(s_end, s_o))
          e_grad = max(relative_error(g, w) for g, w in zip(grads, g_o))
          fields[f"vs {oracle}"] = f"out {e_out:.1e} grad {e_grad:.1e}"
          if oracle == "reference":
            worst = max(e_out / tol_out, e_grad / tol_grad)
        fields["status"] = "PASS" if worst < 1 else f"FAIL (tolerances {tol_out:g}/{tol_grad:g})"
        return fields
      with jax.default_matmul_precision("highest"):
        guarded(section, name, run)

  def _platform_dependent(self):
    name = "platform_dependent wiring"
    if "reference" not in self.truth or not self.budget.allows(self.section, name, 30):
      return
    if jax.default_backend() == "cpu":
      row(self.section, name, status="skipped (compiled kernels only; no accelerator)")
      return

    def run():
      from pallas_kernels import platform_callables
      reference = reference_impl()
      op = lambda *x: jax.lax.platform_dependent(*x, default=reference,
                                                 **platform_callables(mxu_dtype=jnp.float32))
      y, s_end = jax.jit(op)(*self.seq, self.state, self.reset)
      y_o, s_o, _ = self.truth["reference"]
      err = max(relative_error(y, y_o), relative_error(s_end, s_o))
      return {"vs reference": f"out {err:.1e}", "status": "PASS" if err < 1e-4 else "FAIL"}
    with jax.default_matmul_precision("highest"):
      guarded(self.section, name, run)


# ------------------------------------------------------------------------------------------------
# 2. Timing of the operator.

def median_ms(fn, args, repeats: int) -> tuple[float, float]:
  """(compile + first run seconds, median ms over repeats)."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return first_s, statistics.median(times)


def time_operator(shapes: Shapes, budget: Budget, repeats: int):
  B, T, H, N = shapes.timing
  section = f"wkv {B}x{T}x{H}x{N} bf16"
  seq, _, _ = make_inputs(3, B, T, H, N, jnp.bfloat16, with_extras=False)
  big_chunk = 32 if jax.default_backend() == "gpu" else 64  # Triton's backward is limited to 32
  impls = {"pallas C=16": pallas_impl(chunk_size=16),
           f"pallas C={big_chunk}": pallas_impl(chunk_size=big_chunk),
           **chunked_impls(), "reference (lax.scan)": reference_impl()}
  results = {}
  for name, impl in impls.items():
    if not budget.allows(section, name, 40):
      continue

    def run(impl=impl, name=name):
      fwd = jax.jit(lambda *x: impl(*x, None, None))
      compile_fwd, fwd_ms = median_ms(fwd, seq, repeats)
      grad = jax.jit(jax.grad(lambda *x: jnp.sum(fwd(*x)[0].astype(jnp.float32)),
                              argnums=tuple(range(6))))
      compile_bwd, fwd_bwd_ms = median_ms(grad, seq, repeats)
      results[name] = fwd_bwd_ms
      fields = {"fwd_ms": f"{fwd_ms:.2f}", "fwd_bwd_ms": f"{fwd_bwd_ms:.2f}",
                "first_call_s": f"{compile_fwd:.1f}+{compile_bwd:.1f}"}
      if name.startswith("pallas") and shapes.timing == Shapes().timing:
        fields["target<=8ms"] = "met" if fwd_bwd_ms <= TARGET_FWD_BWD_MS else "missed"
      return fields
    guarded(section, name, run)
  pallas = {k: v for k, v in results.items() if k.startswith("pallas")}
  xla = {k: v for k, v in results.items() if k.startswith("xla")}
  if pallas and xla:
    best_pallas, best_xla = min(pallas.items(), key=lambda kv: kv[1]), min(xla.items(), key=lambda kv: kv[1])
    row(section, "pallas vs chunked XLA (fwd+bwd)", best_pallas=f"{best_pallas[0]} {best_pallas[1]:.2f}",
        best_xla=f"{best_xla[0]} {best_xla[1]:.2f}", speedup=f"{best_xla[1] / best_pallas[1]:.2f}x")


# ------------------------------------------------------------------------------------------------
# 3. A 0.1B-shaped model.

def _use_pallas_in_model():
  """Routes impl="pallas" of the model's WKV call to the kernels when the dispatcher does not know it yet."""
  import goosejax.wkv as wkv_module
  if "pallas" in getattr(wkv_module, "IMPLEMENTATIONS", ()):
    return "dispatcher"
  import goosejax.model.time_mix as time_mix
  from pallas_kernels import wkv7_pallas
  dispatch = time_mix.wkv7

  def wkv7(r, log_w, k, v, a, b, state=None, *, reset=None, impl="auto", chunk_size=None):
    if impl == "pallas":
      return wkv7_pallas(r, log_w, k, v, a, b, state, reset=reset, chunk_size=chunk_size or 16)
    return dispatch(r, log_w, k, v, a, b, state, reset=reset, impl=impl, chunk_size=chunk_size)

  time_mix.wkv7 = wkv7
  return "benchmark shim"


def time_model(shapes: Shapes, budget: Budget, repeats: int):
  section = (f"model L{shapes.model_layers} D{shapes.model_embd} ctx{shapes.model_ctx} "
             f"B{shapes.model_batch} bf16")
  try:
    from flax import nnx
    from goosejax.config import ModelConfig
    from goosejax.model.rwkv7 import RWKV7
    import goosejax.wkv as wkv_module
  except ImportError as error:
    row(section, "model", status=f"skipped: goosejax.model not importable ({error})")
    return
  route = guarded(section, "pallas routing", lambda: {"via": _use_pallas_in_model()})
  impls = ["pallas"] + [i for i in ("chunked", "associative") if i in getattr(wkv_module, "IMPLEMENTATIONS", ())]
  impls.append("reference")
  B, T = shapes.model_batch, shapes.model_ctx
  tokens = jax.random.randint(jax.random.PRNGKey(0), (B, T + 1), 0, shapes.model_vocab)
  for impl in impls:
    if impl == "pallas" and route is None:
      continue
    if not budget.allows(section, impl, 60):
      continue

    def run(impl=impl):
      cfg = ModelConfig(vocab_size=shapes.model_vocab, n_layer=shapes.model_layers,
                        n_embd=shapes.model_embd, head_size=64 if shapes.model_embd >= 64 else 16,
                        dtype="bfloat16", wkv_impl=impl)
      model = RWKV7(cfg, rngs=nnx.Rngs(0))
      graphdef, params = nnx.split(model)

      def loss(params, tokens):
        logits, _ = nnx.merge(graphdef, params)(tokens[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

      step = jax.jit(jax.value_and_grad(loss))
      first_s, ms = median_ms(step, (params, tokens), repeats)
      return {"fwd_bwd_ms": f"{ms:.1f}", "tokens_per_s": f"{B * T / ms * 1e3:,.0f}",
              "first_call_s": f"{first_s:.1f}"}
    guarded(section, impl, run)


# ------------------------------------------------------------------------------------------------

def print_table():
  print("\n" + "=" * 100)
  print(f"device_check  jax {jax.__version__}  backend {jax.default_backend()}  "
        f"device {jax.devices()[0].device_kind}  {time.strftime('%Y-%m-%d %H:%M')}")
  print("=" * 100)
  for entry in ROWS:
    fields = {k: v for k, v in entry.items() if k not in ("section", "name")}
    detail = "  ".join(f"{k}={v}" for k, v in fields.items())
    print(f"{entry['section']:<38} {entry['name']:<34} {detail}")
  failures = [e for e in ROWS if "FAIL" in str(e.get("status", ""))]
  print("=" * 100)
  print(f"{len(failures)} failed step(s)" if failures else "no failed steps")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--budget-s", type=float, default=240.0,
                      help="no new step starts after this many seconds (the running one finishes)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--skip-model", action="store_true")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script on a CPU")
  args = parser.parse_args(argv)
  shapes = SMOKE if args.smoke else Shapes()
  budget = Budget(args.budget_s)
  print(f"jax {jax.__version__}, devices: {jax.devices()}", flush=True)
  if jax.default_backend() == "cpu":
    print("warning: no accelerator; the kernels run in the (slow) interpreter, timings are meaningless")
  correctness: list[Correctness] = []
  steps = [lambda: correctness.append(Correctness(shapes, budget)),
           lambda: correctness and correctness[0].core(),
           lambda: time_operator(shapes, budget, args.repeats),
           None if args.skip_model else lambda: time_model(shapes, budget, args.repeats),
           lambda: correctness and correctness[0].extras()]
  for step in steps:
    if step is None:
      continue
    try:
      step()
    except Exception:  # a section's own setup failing still leaves the table
      traceback.print_exc(file=sys.stdout)
  print_table()
  return 1 if any("FAIL" in str(e.get("status", "")) for e in ROWS) else 0


if __name__ == "__main__":
  sys.exit(main())
