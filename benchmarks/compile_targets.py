"""What the WKV-7 kernels and the sharded train step cost on hardware this machine does not have,
from the real compilers (goosejax.plan.targets): kernel calls in the program, compiled temporaries, and
the floor the algorithm needs, side by side.

  JAX_PLATFORMS=cpu python benchmarks/compile_targets.py [--targets v5e:2x2 v5p:2x2x1 h100:1]
      [--shape 8 4096 64 64] [--dtype bfloat16]

Needs the `tpu` / `cuda` extras. The floor: the outputs (y, final state) for the forward (its
lean kernel writes no checkpoints), and for forward+backward the per-chunk fp32 state
checkpoints the backward reads plus the outputs (six input gradients and the state's). The
forward+backward program here also keeps y and its cotangent (this loss's sum(y)), one bf16
sequence beyond the floor. Compiled GPU programs are not autotuned, so nothing below is a speed.
"""
from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from goosejax.plan import targets
from goosejax.wkv import wkv7
from pallas_kernels.wkv_policy import POLICY

MIB = 2**20


def checkpoint_bytes(shape, chunk_size: int) -> int:
  B, T, H, N = shape
  return B * H * math.ceil(T / chunk_size) * N * N * 4


def floor_bytes(shape, dtype, chunk_size: int) -> dict[str, int]:
  B, T, H, N = shape
  item = jnp.dtype(dtype).itemsize
  outputs = B * T * H * N * item + B * H * N * N * 4
  gradients = 6 * B * T * H * N * item + B * H * N * N * 4
  return {"forward": outputs, "forward+backward": checkpoint_bytes(shape, chunk_size) + gradients}


def compile_both(target: str, shape, dtype):
  device = SingleDeviceSharding(targets.target_devices(target)[0])
  inputs = [jax.ShapeDtypeStruct(shape, dtype, sharding=device) for _ in range(6)]

  def loss(*xs):
    y, state = wkv7(*xs, impl="auto")
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(state)

  programs = {"forward": lambda *xs: wkv7(*xs, impl="auto"),
              "forward+backward": jax.grad(loss, argnums=tuple(range(6)))}
  for name, fn in programs.items():
    start = time.perf_counter()
    compiled = jax.jit(fn).trace(*inputs).lower().compile()
    yield name, compiled, time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--targets", nargs="+", default=["v5e:2x2", "v5p:2x2x1", "h100:1"])
  parser.add_argument("--shape", nargs=4, type=int, default=[8, 4096, 64, 64], metavar=("B", "T", "H", "N"))
  parser.add_argument("--dtype", default="bfloat16")
  args = parser.parse_args()
  shape, dtype = tuple(args.shape), jnp.dtype(args.dtype)
  print(f"WKV-7 impl='auto' at (B, T, H, N) = {shape} {dtype.name}, jax {jax.__version__}")
  print("| target | program | kernel calls | temporaries MiB | checkpoints MiB | outputs MiB | "
        "floor MiB | (temp + out) / floor | compile s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for target in args.targets:
    platform = targets.parse_target(target).platform
    chunk_size = POLICY[platform].auto.chunk_size
    floor = floor_bytes(shape, dtype, chunk_size)
    for name, compiled, seconds in compile_both(target, shape, dtype):
      memory = compiled.memory_analysis()
      calls = targets.custom_call_targets(compiled.as_text()).count(targets.KERNEL_CALL_TARGETS[platform])
      temp, out = memory.temp_size_in_bytes, memory.output_size_in_bytes
      checkpoints = checkpoint_bytes(shape, chunk_size) if name == "forward+backward" else 0
      print(f"| {target} | {name} | {calls} | {temp / MIB:.0f} | {checkpoints / MIB:.0f} | "
            f"{out / MIB:.0f} | {floor[name] / MIB:.0f} | {(temp + out) / floor[name]:.2f} | "
            f"{seconds:.1f} |")


if __name__ == "__main__":
  main()
