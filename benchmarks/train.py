"""Training-step throughput: tokens/s and MFU of goosejax's jitted train step, next to the
matmul FLOP/s this machine actually reaches, measured in the same run.

  python benchmarks/train.py                     # tiny preset and a 2-layer 0.1B-shaped model
  python benchmarks/train.py --models tiny --steps 5
  python benchmarks/train.py --models 0.1b-l2 --ctx-len 512 --batch-size 4

The step is the real one (AdamW groups, L2Wrap, clipping, remat as configured) on synthetic
tokens, compiled ahead of time; times are the median of --steps timed steps after one warm-up
step. MFU = tokens/s x training FLOPs per token (goosejax.train.metrics.flops_per_token:
6 x matmul weights + WKV state work, no recomputation) / peak, where the peak is the best
square-matmul FLOP/s measured here in the model's compute dtype. On a shared or small CPU
the figures are noisy: repeat runs and read them as rough.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from goosejax import sharding
from goosejax.config import MeshConfig, load_config
from goosejax.train import recipe
from goosejax.train.batches import SyntheticBatches
from goosejax.train.metrics import flops_per_token, measure_matmul_flops

MODELS = {
    # name -> (preset, overrides)
    "tiny": ("tiny", []),
    "0.1b-l2": ("rwkv7-0.1b", ["model.n_layer=2", "model.dtype=float32", "run.remat=none"]),
}


def matmul_peak(dtype, sizes=(1024, 2048)) -> float:
  return max(measure_matmul_flops(jax.devices()[0], size, dtype, seconds=1.0) for size in sizes)


def bench_model(name: str, ctx_len: int | None, batch_size: int | None, steps: int) -> dict:
  preset, overrides = MODELS[name]
  if ctx_len is not None:
    overrides = overrides + [f"data.ctx_len={ctx_len}"]
  if batch_size is not None:
    overrides = overrides + [f"data.batch_size={batch_size}"]
  cfg = load_config(preset, overrides + ["run.steps=1000"])
  mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  graphdef, shapes = recipe.abstract_model(cfg)
  tx = recipe.make_optimizer(cfg.optimizer, cfg.run.steps, list(shapes))
  state, shardings = recipe.init_train_state(cfg, tx, mesh)
  step_fn = recipe.jit_train_step(recipe.make_train_step(graphdef, tx, cfg, mesh), shardings, mesh)
  batches = SyntheticBatches(cfg.model.vocab_size, cfg.data.ctx_len, cfg.data.batch_size)
  batch = sharding.host_to_global(next(batches), mesh)
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  state, metrics = compiled(state, batch)                  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    batch = sharding.host_to_global(next(batches), mesh)
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  tokens = cfg.data.batch_size * cfg.data.ctx_len
  flops = flops_per_token(cfg.model)
  stats = compiled.memory_analysis()
  return {
      "name": name, "params": sum(int(np.prod(s.shape)) for s in shapes.values()),
      "cfg": cfg, "step_s": step_s, "tokens_per_s": tokens / step_s,
      "train_flops_per_token": flops["train"], "achieved": tokens / step_s * flops["train"],
      "compile_s": compile_s, "loss": float(metrics["loss"]),
      "temp_mib": stats.temp_size_in_bytes / 2**20 if stats is not None else float("nan"),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  parser.add_argument("--ctx-len", type=int, help="tokens per sequence (default: tiny 128, 0.1b-l2 256)")
  parser.add_argument("--batch-size", type=int, help="sequences per step (default: tiny 8, 0.1b-l2 4)")
  parser.add_argument("--steps", type=int, default=3, help="timed steps per model")
  args = parser.parse_args()
  ctx_len = args.ctx_len
  device = jax.devices()[0]
  print(f"# goosejax train-step benchmark, {datetime.date.today()}, {platform.machine()} "
        f"{os.cpu_count()} CPUs, jax {jax.__version__}, device {device.device_kind} "
        f"({jax.device_count()} device(s), using 1)")
  peaks = {}
  rows = []
  for name in args.models:
    preset_ctx = {"tiny": 128, "0.1b-l2": 256}[name] if ctx_len is None else ctx_len
    batch_size = args.batch_size or {"tiny": 8, "0.1b-l2": 4}[name]
    result = bench_model(name, preset_ctx, batch_size, args.steps)
    dtype = result["cfg"].model.dtype
    if dtype not in peaks:
      peaks[dtype] = matmul_peak(jnp.dtype(dtype))
    result["mfu"] = result["achieved"] / peaks[dtype]
    rows.append(result)
  for dtype, peak in peaks.items():
    print(f"measured matmul peak ({dtype}, best of 1024^3 and 2048^3): {peak / 1e9:.1f} GFLOP/s")
  print()
  print("| model | params | L x D | batch x ctx | dtype | step s | tokens/s | achieved GFLOP/s "
        "| MFU vs measured matmul | compile s | temp MiB |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    m, d = r["cfg"].model, r["cfg"].data
    print(f"| {r['name']} | {r['params'] / 1e6:.1f}M | {m.n_layer} x {m.n_embd} | "
          f"{d.batch_size} x {d.ctx_len} | {m.dtype} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
          f"{r['achieved'] / 1e9:.1f} | {100 * r['mfu']:.1f}% | {r['compile_s']:.1f} | "
          f"{r['temp_mib']:.0f} |")
  print()
  print("train FLOPs/token: " + ", ".join(
      f"{r['name']} {r['train_flops_per_token'] / 1e6:.1f}M" for r in rows))


if __name__ == "__main__":
  main()
