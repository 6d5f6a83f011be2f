"""Compile the Pallas Triton WKV-7 kernels for a GPU without having one: shared memory, registers, spills.

  python benchmarks/triton_offline_compile.py --triton-python /path/to/python-with-triton [--chunk 16 32]

Lowers forward+backward for "cuda" from this process (CPU is fine), captures each kernel's Triton IR as
text, and compiles it with the `triton` package of --triton-python (a separate environment: triton is no
dependency of goosejax) for --arch (default sm_90a), reporting what `cuobjdump --dump-resource-usage`
says. jaxlib bundles its own Triton revision, so the figures are estimates of what XLA will build; a
kernel needing more shared memory than the GPU has per block (227 KB on H100/H200) cannot launch.
"""
from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile

_COMPILE = r"""
import pathlib, re, subprocess, sys, triton
from triton.backends.compiler import GPUTarget
path, warps, arch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
kernel = triton.compile(path, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": 1})
cubin = pathlib.Path(path + ".cubin")
cubin.write_bytes(kernel.asm["cubin"])
tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
usage = subprocess.run([str(tool), "--dump-resource-usage", str(cubin)], capture_output=True, text=True).stdout
found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
print(f"shared={kernel.metadata.shared} registers={found.group(1)} spill_stack={found.group(2)}")
"""


def dump_triton_ir(chunk_size: int, shape) -> list[tuple[str, str]]:
  """(kernel name, Triton IR text) of the forward and backward kernels at this chunk size."""
  import jax
  import jax.numpy as jnp
  from jax._src.pallas.triton import pallas_call_registration as registration

  from pallas_kernels import wkv7_pallas

  captured = []
  lower = registration.lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = lower(*args, **kwargs)
    captured.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  B, T, H, N = shape

  def loss(*x):
    y, state = wkv7_pallas(*x[:7], reset=x[7], backend="triton", interpret=False, chunk_size=chunk_size)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(state)

  sequence = jax.ShapeDtypeStruct((B, T, H, N), jnp.bfloat16)
  args = [sequence] * 6 + [jax.ShapeDtypeStruct((B, H, N, N), jnp.float32),
                           jax.ShapeDtypeStruct((B, T), jnp.bool_)]
  registration.lowering.lower_jaxpr_to_triton_module = capture
  try:
    jax.jit(jax.grad(loss, argnums=tuple(range(7)))).trace(*args).lower(lowering_platforms=("cuda",))
  finally:
    registration.lowering.lower_jaxpr_to_triton_module = lower
  return list(zip(("forward", "backward"), captured))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--triton-python", default=sys.executable, help="a python that can import triton")
  parser.add_argument("--chunk", type=int, nargs="+", default=[16, 32])
  parser.add_argument("--warps", type=int, default=None, help="default: the kernels' own setting")
  parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
  parser.add_argument("--shape", type=int, nargs=4, default=[8, 4096, 64, 64], metavar=("B", "T", "H", "N"))
  args = parser.parse_args(argv)
  from pallas_kernels import triton_gpu
  warps = args.warps or triton_gpu.NUM_WARPS
  failures = 0
  with tempfile.TemporaryDirectory() as folder:
    for chunk_size in args.chunk:
      for name, text in dump_triton_ir(chunk_size, args.shape):
        path = pathlib.Path(folder) / f"wkv7_{name}_C{chunk_size}.ttir"
        path.write_text(text)
        run = subprocess.run([args.triton_python, "-c", _COMPILE, str(path), str(warps), str(args.arch)],
                             capture_output=True, text=True)
        report = run.stdout.strip() if run.returncode == 0 else "FAILED: " + run.stderr.strip()[-600:]
        failures += run.returncode != 0
        print(f"chunk {chunk_size:>3} {name:<8} warps {warps}: {report}", flush=True)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
