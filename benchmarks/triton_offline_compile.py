"""Registers, spills and shared memory of the Pallas Triton WKV-7 kernels as XLA builds them for an
H100 (sm_90a), without a GPU.

  python benchmarks/triton_offline_compile.py                          # the default configuration
  python benchmarks/triton_offline_compile.py --chunk 16 32 --value-block 64 16 --warps 4 8

XLA's own GPU compiler (the `cuda` extra's PJRT plugin, compile-only devices from
goosejax.plan.targets) compiles forward+backward of `wkv7_pallas` at [B, T, H, N] with bf16 inputs,
a state and resets, as the model calls it, and dumps what it built: the PTX of each Triton kernel
(jaxlib's own Triton revision) and the thunk sequence, which names each kernel's threads and dynamic
shared memory. `ptxas -v` (the one XLA itself runs, from PATH) assembles each kernel's PTX for
sm_90a and reports its registers per thread and spill bytes. Occupancy follows from registers x
threads against the SM's 64K registers and 228 KB of shared memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

REGISTERS_PER_SM = 65536
SHARED_BYTES_PER_SM = 228 * 1024
MAX_WARPS_PER_SM = 64


class OfflineCompileError(RuntimeError):
  """No ptxas, or XLA built no Triton kernels."""


@dataclasses.dataclass(frozen=True)
class KernelResources:
  """What one compiled Triton kernel needs per program (a CUDA thread block)."""
  name: str
  threads: int
  shared_bytes: int        # dynamic shared memory XLA launches it with
  registers: int           # per thread
  spill_store_bytes: int
  spill_load_bytes: int
  stack_bytes: int

  @property
  def programs_per_sm(self) -> int:
    by_registers = REGISTERS_PER_SM // (self.registers * self.threads)
    by_shared = SHARED_BYTES_PER_SM // max(self.shared_bytes, 1)
    return min(by_registers, by_shared, MAX_WARPS_PER_SM * 32 // self.threads)

  def row(self) -> str:
    warps = self.programs_per_sm * self.threads // 32
    return (f"{self.name:<22} threads {self.threads:>4}  registers {self.registers:>3}  "
            f"spill stores {self.spill_store_bytes:>5} B  loads {self.spill_load_bytes:>5} B  "
            f"stack {self.stack_bytes:>5} B  shared {self.shared_bytes / 1024:6.1f} KiB  "
            f"{self.programs_per_sm} program(s) = {warps} warps per SM")


def find_ptxas() -> str:
  ptxas = shutil.which("ptxas")
  if ptxas is None:
    raise OfflineCompileError("ptxas is not on PATH: XLA's GPU compiler needs it too (a CUDA 12.8+ "
                              "toolkit, or pip install nvidia-cuda-nvcc-cu12 and its bin/ on PATH)")
  return ptxas


def _dump_kernels(folder: pathlib.Path, shape, chunk_size: int, value_block: int | None,
                  target: str) -> None:
  """Compiles forward+backward for `target` with XLA's dump of what it built in `folder`."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import SingleDeviceSharding

  from goosejax.plan.targets import target_devices
  from pallas_kernels import wkv7_pallas

  device = SingleDeviceSharding(target_devices(target)[0])
  B, T, H, N = shape
  sequence = jax.ShapeDtypeStruct((B, T, H, N), jnp.bfloat16, sharding=device)
  state = jax.ShapeDtypeStruct((B, H, N, N), jnp.float32, sharding=device)
  reset = jax.ShapeDtypeStruct((B, T), jnp.bool_, sharding=device)

  def loss(*x):
    y, final = wkv7_pallas(*x[:7], reset=x[7], backend="triton", interpret=False,
                           chunk_size=chunk_size, value_block=value_block)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(final)

  grads = jax.jit(jax.grad(loss, argnums=tuple(range(7))))
  grads.trace(*[sequence] * 6, state, reset).lower().compile(
      compiler_options={"xla_dump_to": str(folder)})


def _ptxas_report(ptxas: str, ptx: pathlib.Path, arch: str) -> dict[str, int]:
  run = subprocess.run([ptxas, "-v", f"-arch={arch}", str(ptx), "-o", str(ptx.with_suffix(".cubin"))],
                       capture_output=True, text=True)
  if run.returncode:
    raise OfflineCompileError(f"ptxas failed on {ptx.name}: {run.stderr.strip()[-400:]}")
  registers = re.search(r"Used (\d+) registers", run.stderr)
  spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                     run.stderr)
  return {"registers": int(registers.group(1)), "stack_bytes": int(spills.group(1)),
          "spill_store_bytes": int(spills.group(2)), "spill_load_bytes": int(spills.group(3))}


def kernel_resources(*, chunk_size: int, value_block: int | None = None, num_warps: int | None = None,
                     shape=(8, 4096, 64, 64), target: str = "h100:1", arch: str = "sm_90a"
                     ) -> list[KernelResources]:
  """The forward and backward kernels' resources; None options are the kernels' defaults."""
  from pallas_kernels import triton_gpu

  ptxas = find_ptxas()
  default_warps = triton_gpu.NUM_WARPS
  triton_gpu.NUM_WARPS = num_warps or default_warps
  try:
    with tempfile.TemporaryDirectory() as name:
      folder = pathlib.Path(name)
      _dump_kernels(folder, shape, chunk_size, value_block, target)
      launches = {}
      for sequence in folder.glob("*thunk_sequence.txt"):
        for kernel, threads, shared in re.findall(
            r"(wkv7_\w+_triton) grid: \[[^\]]*\] threads: \[(\d+)[^\]]*\]\s+shared_memory: (\d+)",
            sequence.read_text()):
          launches[kernel] = (int(threads), int(shared))
      found = []
      for ptx in sorted(folder.glob("*.ptx")):
        entry = re.search(r"\.entry (wkv7_\w+_triton)\(", ptx.read_text())
        if entry and entry.group(1) in launches:
          threads, shared = launches[entry.group(1)]
          found.append(KernelResources(entry.group(1), threads, shared,
                                       **_ptxas_report(ptxas, ptx, arch)))
  finally:
    triton_gpu.NUM_WARPS = default_warps
  if not found:
    raise OfflineCompileError(f"XLA built no wkv7 Triton kernels for {target} (dump had "
                              f"{len(launches)} launches)")
  return found


def main(argv=None) -> int:
  from pallas_kernels import triton_gpu
  from pallas_kernels.wkv_policy import POLICY

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--chunk", type=int, nargs="+", default=[POLICY["cuda"].auto.chunk_size],
                      help="default: what impl='auto' runs on CUDA")
  parser.add_argument("--value-block", type=int, nargs="+", default=[None],
                      help="value rows per program (default: the whole head)")
  parser.add_argument("--warps", type=int, nargs="+", default=[triton_gpu.NUM_WARPS])
  parser.add_argument("--shape", type=int, nargs=4, default=[8, 4096, 64, 64],
                      metavar=("B", "T", "H", "N"))
  parser.add_argument("--target", default="h100:1", help="a goosejax.plan target, e.g. h200:1")
  args = parser.parse_args(argv)
  try:
    for chunk, value_block, warps in itertools.product(args.chunk, args.value_block, args.warps):
      print(f"chunk {chunk}, value block {value_block or args.shape[3]}, {warps} warps, "
            f"{args.target} (sm_90a), shape {tuple(args.shape)}:", flush=True)
      for kernel in kernel_resources(chunk_size=chunk, value_block=value_block, num_warps=warps,
                                     shape=tuple(args.shape), target=args.target):
        print("  " + kernel.row(), flush=True)
  except OfflineCompileError as error:
    print(f"triton_offline_compile: {error}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
