"""The Triton kernels as XLA builds them for an H100 (sm_90a) in the configuration impl="auto"
runs on CUDA (N = 64, its chunk size, the default value block and warps, bf16 inputs with a
state and resets): registers, spills and shared memory per program, from `ptxas -v` on XLA's
own PTX (benchmarks/triton_offline_compile.py). The figures are the README's ("Pallas WKV-7
kernels"); the target is no spills at all, which the backward does not reach yet, so a kernel
that spills more than it does today fails here."""
import pytest

from pallas_kernels import triton_gpu
from pallas_kernels.wkv_policy import POLICY
import benchmark_scripts
from targets import require

# Spill stores, bytes per thread at the README's shape (8, 4096, 64, 64), measured 2026-12-08
# with ptxas 13.0.
SPILL_STORE_BYTES = {"wkv7_forward_triton": 48, "wkv7_backward_triton": 2280}
SHARED_BYTES_PER_BLOCK = 227 * 1024  # the most an H100 block can opt in to


def _offline_compile():
  return benchmark_scripts.load("triton_offline_compile")


@pytest.fixture(scope="module")
def tool():
  require("cuda")
  return _offline_compile()


def test_default_kernels_spill_no_more_than_recorded(tool):
  kernels = tool.kernel_resources(chunk_size=POLICY["cuda"].auto.chunk_size)
  assert sorted(k.name for k in kernels) == sorted(SPILL_STORE_BYTES)
  for kernel in kernels:
    assert kernel.threads == 32 * triton_gpu.NUM_WARPS, kernel
    assert kernel.spill_store_bytes <= SPILL_STORE_BYTES[kernel.name], kernel.row()
    assert 0 < kernel.shared_bytes <= SHARED_BYTES_PER_BLOCK, kernel.row()
    assert kernel.programs_per_sm >= 1, kernel.row()
