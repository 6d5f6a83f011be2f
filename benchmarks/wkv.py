"""WKV-7 operator: speed and memory of the implementations as ratios against the token scan.

  python benchmarks/wkv.py                      # the full grid (long on a small CPU)
  python benchmarks/wkv.py --quick              # B=2, T=4096, H=4: the shape the issue judges
  python benchmarks/wkv.py --batch 1 --length 512 4096 --heads 4 --repeats 2
  python benchmarks/wkv.py --precision          # bf16 / fp32 inputs against float64

For every (B, T, H) with N = 64 it times the forward and forward+backward (gradients of all
six inputs and the initial state) of the reference token scan (plain autodiff) and of the
chunked forms at each chunk size, and reads XLA's temporary-memory figure from the compiled
program (`memory_analysis().temp_size_in_bytes`: the peak of the buffers XLA allocates beyond
inputs and outputs). A cell whose estimated footprint (temporaries + arguments + outputs)
exceeds --memory-limit-gb is printed as "skipped: memory" with the estimate, without running.
Ratios are reference time / time (above 1: faster than the reference) and temporaries /
reference temporaries. Times are the minimum over --repeats runs after one warm-up run.

Implementations: reference (lax.scan over tokens, autodiff); chunked (sequential scan over
chunks, matmul form inside, custom VJP); chunked+rec (the same VJP, forward by token steps
inside each chunk: what impl="auto" runs on CPU); associative (all chunks at once, associative
scan across chunks, custom VJP).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from goosejax.wkv import CHUNK_SIZES, auto_choice, wkv7, wkv7_chunked, wkv7_reference
from goosejax.wkv.reference import compute_dtype
from pallas_kernels.wkv_policy import LOG_DECAY_MIN
VARIANTS = {  # name -> (mode, intra) for wkv7_chunked
    "chunked": ("sequential", "matmul"),
    "chunked+rec": ("sequential", "recurrent"),
    "associative": ("associative", "matmul"),
}


def make_inputs(batch, length, heads, head_size, seed=0, dtype=np.float32):
  """Model-like inputs: decays over the allowed range, unit removal keys, iclr in (0, 1)."""
  rng = np.random.default_rng(seed)
  shape = (batch, length, heads, head_size)
  r, k, v = (rng.normal(size=shape) for _ in range(3))
  log_w = LOG_DECAY_MIN / (1 + np.exp(-2 * rng.normal(size=shape)))
  kappa = rng.normal(size=shape)
  kappa /= np.linalg.norm(kappa, axis=-1, keepdims=True)
  iclr = rng.uniform(size=shape)
  state = 0.1 * rng.normal(size=(batch, heads, head_size, head_size))
  return [np.asarray(x, dtype) for x in (r, log_w, k, v, -kappa, kappa * iclr, state)]


def runner(name, chunk_size):
  """(r, log_w, k, v, a, b, state) -> (y, final state) for one table column."""
  if name == "reference":
    return lambda *x: wkv7_reference(*x[:6], x[6])
  mode, intra = VARIANTS[name]
  return lambda *x: wkv7_chunked(*x[:6], x[6], chunk_size=chunk_size, mode=mode, intra=intra,
                                 dtype=compute_dtype(*x))


def with_backward(run):
  def loss(*x):
    y, final = run(*x)
    return jnp.sum(y * y) + jnp.sum(final)
  return jax.grad(loss, argnums=tuple(range(7)))


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def available_gb() -> float:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) / 2**20
  except OSError:
    pass
  return 16.0


def measure(fn, args, repeats, limit_bytes):
  """(milliseconds or None, temporaries in bytes, footprint estimate in bytes)."""
  compiled = jax.jit(fn).lower(*args).compile()
  stats = compiled.memory_analysis()
  footprint = stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
  if footprint > limit_bytes:
    return None, stats.temp_size_in_bytes, footprint
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
    if times[-1] > 20 and len(times) >= 1:  # one slow run is a measurement already
      break
  return 1e3 * min(times), stats.temp_size_in_bytes, footprint


def _ratio(reference, value):
  return f"{reference / value:.2f}x" if reference and value else "-"


def speed_table(args) -> None:
  limit = args.memory_limit_gb * 2**30
  columns = [("reference", None)] + [(name, c) for name in args.impls if name != "reference"
                                     for c in args.chunk_sizes]
  print(f"\nWKV-7, N={args.head_size}, fp32; {cpu_name()}, "
        f"{os.cpu_count()} CPUs, jax {jax.__version__} ({jax.default_backend()}), "
        f"{datetime.date.today()}; min of {args.repeats} runs; memory limit "
        f"{args.memory_limit_gb:.0f} GB")
  print("speed = reference time / time; mem = temporaries / reference temporaries")
  print("| B | T | H | impl | C | fwd ms | fwd speed | fwd+bwd ms | fwd+bwd speed | "
        "fwd+bwd temp MB | mem |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for batch in args.batch:
    for length in args.length:
      for heads in args.heads:
        inputs = [jnp.asarray(x) for x in make_inputs(batch, length, heads, args.head_size)]
        ref = {}
        for name, chunk in columns:
          run = runner(name, chunk)
          cells = []
          for key, fn in (("fwd", run), ("bwd", with_backward(run))):
            if key == "fwd" and args.no_forward:
              cells.append((None, 0, 0, "not run"))
              continue
            ms, temp, footprint = measure(fn, inputs, args.repeats, limit)
            note = None if ms is not None else f"skipped: memory (~{footprint / 2**30:.1f} GB)"
            cells.append((ms, temp, footprint, note))
          if name == "reference":
            ref = {"fwd": cells[0][0], "bwd": cells[1][0], "temp": cells[1][1]}
          (fwd_ms, _, _, fwd_note), (bwd_ms, bwd_temp, _, bwd_note) = cells
          fwd = fwd_note or f"{fwd_ms:.1f}"
          bwd = bwd_note or f"{bwd_ms:.1f}"
          mem = f"{ref['temp'] and bwd_temp / ref['temp']:.3f}" if ref.get("temp") else "-"
          print(f"| {batch} | {length} | {heads} | {name} | {chunk or '-'} | {fwd} | "
                f"{_ratio(ref['fwd'], fwd_ms)} | {bwd} | {_ratio(ref['bwd'], bwd_ms)} | "
                f"{bwd_temp / 1e6:.1f} | {mem} |", flush=True)


def precision_table(args) -> None:
  """Relative error (max |x - x64| / max |x64|) of y, final state and gradients."""
  batch, length, heads = 1, args.precision_length, 4
  print(f"\nWKV-7 precision against the float64 token recurrence: B={batch}, T={length}, "
        f"H={heads}, N={args.head_size}, initial state, model-like inputs; log_w is fp32 "
        "in every row (the model keeps the decay in fp32)")
  base = make_inputs(batch, length, heads, args.head_size, seed=1, dtype=np.float64)
  weight = np.random.default_rng(2).normal(size=base[0].shape)

  def run_all(name, chunk, inputs):
    # through the entry point, as the model calls it: y comes back in r's dtype
    run = lambda *x: wkv7(*x[:6], x[6], impl=name, chunk_size=chunk)
    def loss(*x):
      y, final = run(*x)
      return jnp.sum(y.astype(final.dtype) * weight) + jnp.sum(final)
    (y, final) = jax.jit(run)(*inputs)
    grads = jax.jit(jax.grad(loss, argnums=tuple(range(7))))(*inputs)
    return [np.asarray(t, np.float64) for t in (y, final, *grads)]

  def rel(got, want):
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))

  with jax.enable_x64(True):
    truth = {}
    for source in ("fp32", "bf16"):
      rounded = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64) if source == "bf16" and i != 1
                 and i != 6 else np.asarray(np.float32(x), np.float64) for i, x in enumerate(base)]
      truth[source] = (rounded, run_all("reference", None, [jnp.asarray(x) for x in rounded]))
    exact = run_all("reference", None, [jnp.asarray(x) for x in base])
  print("| inputs | impl | C | y err | state err | max grad err | y err vs exact inputs |")
  print("|---|---|---|---|---|---|---|")
  rows = [("reference", None)] + [(n, c) for n in ("chunked", "associative") for c in args.chunk_sizes]
  rows += [("auto", None)]
  for source in ("fp32", "bf16"):
    rounded, want = truth[source]
    inputs = [jnp.asarray(x, jnp.bfloat16 if source == "bf16" and i not in (1, 6) else jnp.float32)
              for i, x in enumerate(rounded)]
    for name, chunk in rows:
      got = run_all(name, chunk, inputs)
      grad_err = max(rel(g, w) for g, w in zip(got[2:], want[2:]))
      print(f"| {source} | {name} | {chunk or '-'} | {rel(got[0], want[0]):.1e} | "
            f"{rel(got[1], want[1]):.1e} | {grad_err:.1e} | {rel(got[0], exact[0]):.1e} |",
            flush=True)
  print("(errors against float64 on the same rounded inputs, i.e. the arithmetic's own error, "
        "except the last column: against float64 on the unrounded inputs, which adds the input "
        "rounding. In the bf16 rows y and the input gradients are returned in bf16, so their "
        "errors include that final rounding, ~2^-9 relative.)")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.splitlines()[1:]))
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--length", type=int, nargs="+", default=[512, 4096, 16384])
  parser.add_argument("--heads", type=int, nargs="+", default=[4, 12])
  parser.add_argument("--head-size", type=int, default=64)
  parser.add_argument("--chunk-sizes", type=int, nargs="+", default=list(CHUNK_SIZES))
  parser.add_argument("--impls", nargs="+", default=["reference", *VARIANTS],
                      choices=["reference", *VARIANTS])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--memory-limit-gb", type=float, default=0.6 * available_gb())
  parser.add_argument("--quick", action="store_true",
                      help="only B=2, T=4096, H=4 (the comparison the issue judges)")
  parser.add_argument("--no-forward", action="store_true", help="time forward+backward only")
  parser.add_argument("--precision", action="store_true",
                      help="print the bf16/fp32 error table instead of the speed table")
  parser.add_argument("--precision-length", type=int, default=1024)
  args = parser.parse_args(argv)
  if args.quick:
    args.batch, args.length, args.heads = [2], [4096], [4]
  print(f"impl='auto' on {jax.default_backend()}: T == 1 one recurrent step, T > 1 "
        f"{auto_choice()}")
  if args.precision:
    precision_table(args)
  else:
    speed_table(args)


if __name__ == "__main__":
  main()
