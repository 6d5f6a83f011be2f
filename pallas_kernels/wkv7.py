"""`wkv7_pallas`: the WKV-7 operator on Pallas kernels (TPU Mosaic or GPU Triton), differentiable.

Same semantics as `goosejax.wkv.wkv7_reference`: state in the [value, key] layout, y_t = S_t r_t with
S_t = S_{t-1} diag(e^{log_w_t}) + (S_{t-1} a_t) b_t^T + v_t k_t^T, reset[b, t] zeroing the state before
token t. The kernels run the chunked form (see `chunk_math`), so they are exact for decays in the RWKV-7
range: log_w in [wkv_policy.LOG_DECAY_MIN, 0] (any log_w >= -150 / chunk_size stays finite in fp32).

This module only lays out, pads and dispatches: T is padded to whole chunks with identity steps (every
input 0, so the state passes unchanged), heads are grouped for the TPU lanes, and N is padded to a power
of two for Triton. Without a gradient the lean forward kernels run (no state checkpoints written).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels import mosaic_tpu, triton_gpu
from pallas_kernels.chunk_math import FP32_DOTS, ChunkLayout
from pallas_kernels.wkv_policy import CHECKPOINT_NAME, KERNEL_INPUT_DTYPES, KERNELS, POLICY

BACKENDS = tuple(KERNELS)
_TPU_BLOCK_TOKENS = 256     # tokens per TPU grid step: few grid steps, blocks well inside VMEM
_TPU_MAX_GROUP_LANES = 512  # a single whole-width head group is allowed up to this many lanes


class PallasWKVError(ValueError):
  """Bad arguments to `wkv7_pallas` (shapes, dtypes, options)."""


@dataclasses.dataclass(frozen=True)
class KernelPlan:
  """Static choices for one call: backend, chunk layout and blocking, padding."""
  backend: str
  interpret: bool
  layout: ChunkLayout
  heads: int             # H after padding (TPU groups)
  head_size: int         # N after padding (Triton powers of two)
  chunks: int            # after padding T
  chunks_per_block: int  # TPU time block

  @property
  def kernel(self):
    """The module whose forward and backward call `pl.pallas_call` for this backend."""
    return mosaic_tpu if self.backend == "tpu" else triton_gpu

  @property
  def options(self) -> dict:
    """The keyword arguments of that module's forward and backward."""
    options = dict(layout=self.layout, interpret=self.interpret)
    if self.backend == "tpu":
      options["chunks_per_block"] = self.chunks_per_block
    return options


def _resolve_backend(backend: str | None) -> str:
  if backend is None:
    return "triton" if jax.default_backend() == "gpu" else "tpu"
  if backend not in BACKENDS:
    raise PallasWKVError(f"wkv7_pallas: backend={backend!r}; expected None or one of {BACKENDS}")
  return backend


def _resolve_bf16_mxu(mxu_dtype, input_dtype) -> bool:
  if mxu_dtype is None:
    return jnp.dtype(input_dtype) != jnp.float32
  dtype = jnp.dtype(mxu_dtype)
  if dtype not in (jnp.float32, jnp.bfloat16):
    raise PallasWKVError(f"wkv7_pallas: mxu_dtype={mxu_dtype!r}; expected None, float32 or bfloat16")
  return dtype == jnp.bfloat16


def _next_power_of_two(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _tpu_heads_per_group(H: int, N: int) -> tuple[int, int]:
  """(P, padded H): P heads fill lanes to a multiple of 128; else one whole-width group when small;
  else H is padded with empty heads to a multiple of the minimal P. Python ints (math.gcd, not
  np.gcd): P sizes the grid, and Pallas takes a NumPy integer there for a dynamic grid bound."""
  minimal = 128 // math.gcd(N, 128)
  if H % minimal == 0:
    return minimal, H
  if H * N <= _TPU_MAX_GROUP_LANES:
    return H, H
  return minimal, -(-H // minimal) * minimal


def _resolve_fp32_dot(fp32_dot: str | None, backend: str, interpret: bool) -> str:
  compiled_triton = backend == "triton" and not interpret
  if fp32_dot is None:
    return "tf32x3" if compiled_triton else "highest"
  if fp32_dot not in FP32_DOTS:
    raise PallasWKVError(f"wkv7_pallas: fp32_dot={fp32_dot!r}; expected None or one of {tuple(FP32_DOTS)}")
  if fp32_dot == "tf32x3" and not compiled_triton:
    raise PallasWKVError("wkv7_pallas: fp32_dot='tf32x3' needs backend='triton' compiled for a GPU "
                         "(Mosaic TPU and the CPU interpreter have no TF32 dots)")
  return fp32_dot


def plan_kernels(shape, dtype, *, chunk_size: int, backend: str | None, interpret: bool | None,
                 mxu_dtype, has_reset: bool, value_block: int | None = None,
                 fp32_dot: str | None = None) -> KernelPlan:
  B, T, H, N = shape
  backend = _resolve_backend(backend)
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  fp32_dot = _resolve_fp32_dot(fp32_dot, backend, interpret)
  allowed = KERNELS[backend].chunk_sizes
  if chunk_size not in allowed:
    raise PallasWKVError(f"wkv7_pallas: chunk_size={chunk_size} with backend={backend!r}; expected one "
                         f"of {allowed} (Triton's backward needs too much shared memory above 32)")
  bf16_mxu = _resolve_bf16_mxu(mxu_dtype, dtype)
  chunks = -(-T // chunk_size)
  if backend == "tpu":
    if value_block is not None:
      raise PallasWKVError("wkv7_pallas: value_block applies to backend='triton' only")
    P, heads = _tpu_heads_per_group(H, N)
    chunks_per_block = min(chunks, max(1, _TPU_BLOCK_TOKENS // chunk_size))
    chunks = -(-chunks // chunks_per_block) * chunks_per_block
    layout = ChunkLayout(chunk_size, P, N, P * N, has_reset, bf16_mxu, fp32_dot)
    return KernelPlan(backend, interpret, layout, heads, N, chunks, chunks_per_block)
  head_size = max(16, _next_power_of_two(N))
  value_lanes = head_size if value_block is None else value_block
  if value_lanes < 16 or value_lanes & (value_lanes - 1) or head_size % value_lanes:
    raise PallasWKVError(f"wkv7_pallas: value_block={value_block}; expected a power of two >= 16 "
                         f"dividing the (padded) head size {head_size}")
  layout = ChunkLayout(chunk_size, 1, head_size, value_lanes, has_reset, bf16_mxu, fp32_dot)
  return KernelPlan(backend, interpret, layout, H, head_size, chunks, chunks)


def _check_inputs(r, log_w, k, v, a, b, state, reset):
  if r.ndim != 4:
    raise PallasWKVError(f"wkv7_pallas: r must be [B,T,H,N], got shape {r.shape}")
  for name, x in (("log_w", log_w), ("k", k), ("v", v), ("a", a), ("b", b)):
    if x.shape != r.shape:
      raise PallasWKVError(f"wkv7_pallas: {name} has shape {x.shape}, expected r's shape {r.shape}")
  for name, x in (("r", r), ("log_w", log_w), ("k", k), ("v", v), ("a", a), ("b", b)):
    if x.dtype.name not in KERNEL_INPUT_DTYPES:
      raise PallasWKVError(f"wkv7_pallas: {name} has dtype {x.dtype}; the kernels take float32, "
                           "bfloat16 or float16 inputs")
  B, T, H, N = r.shape
  if state is not None and state.shape != (B, H, N, N):
    raise PallasWKVError(f"wkv7_pallas: state has shape {state.shape}, expected {(B, H, N, N)}")
  if reset is not None and reset.shape != (B, T):
    raise PallasWKVError(f"wkv7_pallas: reset has shape {reset.shape}, expected {(B, T)}")


# ----------------------------------------------------------------------------------------------
# Layout conversions (plain, differentiable XLA ops).

def _to_kernel(x_BTHN, plan: KernelPlan):
  """[B, T, H, N] -> the kernel's sequence layout, padded with identity steps and empty heads
  (a copy only when T, H or N needs padding): TPU [B, H, N, T] (the transpose is a bitcast of
  TPU's own layout for N < 128, see mosaic_tpu), Triton [B, chunks, Q, H*N] (a reshape)."""
  B, T, H, N = x_BTHN.shape
  Q = plan.layout.chunk_size
  padding = ((0, 0), (0, plan.chunks * Q - T), (0, plan.heads - H), (0, plan.head_size - N))
  if any(after for _, after in padding):
    x_BTHN = jnp.pad(x_BTHN, padding)
  if plan.backend == "tpu":
    return jnp.transpose(x_BTHN, (0, 2, 3, 1))
  return x_BTHN.reshape(B, plan.chunks, Q, plan.heads * plan.head_size)


def _from_kernel(x, plan: KernelPlan, shape):
  B, T, H, N = shape
  if plan.backend == "tpu":
    x = jnp.transpose(x, (0, 3, 1, 2))
  else:
    x = x.reshape(B, plan.chunks * plan.layout.chunk_size, plan.heads, plan.head_size)
  return x if x.shape == shape else x[:, :T, :H, :N]


def _pack_state(state_BHNN, plan: KernelPlan):
  """[B, H, N, N] -> Triton [B, H*N, N]; TPU [B, H/P, N, P*N] (each group's heads side by side)."""
  B, H, N, _ = state_BHNN.shape
  Np = plan.head_size
  state = jnp.pad(state_BHNN, ((0, 0), (0, plan.heads - H), (0, Np - N), (0, Np - N)))
  if plan.backend == "triton":
    return state.reshape(B, plan.heads * Np, Np)
  P = plan.layout.heads_packed
  grouped = state.reshape(B, plan.heads // P, P, Np, Np)
  return jnp.swapaxes(grouped, 2, 3).reshape(B, plan.heads // P, Np, P * Np)


def _unpack_state(packed, plan: KernelPlan, H: int, N: int):
  B = packed.shape[0]
  Np = plan.head_size
  if plan.backend == "triton":
    state = packed.reshape(B, plan.heads, Np, Np)
  else:
    P = plan.layout.heads_packed
    grouped = packed.reshape(B, plan.heads // P, Np, P, Np)
    state = jnp.swapaxes(grouped, 2, 3).reshape(B, plan.heads, Np, Np)
  return state[:, :H, :N, :N]


# ----------------------------------------------------------------------------------------------
# The differentiable kernel call on prepared layouts.

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _wkv7_kernels(plan: KernelPlan, r, log_w, k, v, a, b, state, reset):
  """Without a gradient the lean forward runs: it writes no checkpoints."""
  return tuple(plan.kernel.forward(r, log_w, k, v, a, b, state, reset, **plan.options,
                                   checkpoints=False))


def _wkv7_kernels_fwd(plan: KernelPlan, r, log_w, k, v, a, b, state, reset):
  y, state_end, checkpoint = plan.kernel.forward(r, log_w, k, v, a, b, state, reset,
                                                 **plan.options, checkpoints=True)
  checkpoint = checkpoint_name(checkpoint, CHECKPOINT_NAME)
  return (y, state_end), (r, log_w, k, v, a, b, reset, checkpoint)


def _wkv7_kernels_bwd(plan: KernelPlan, residuals, cotangents):
  r, log_w, k, v, a, b, reset, checkpoint = residuals
  dy, dstate_end = cotangents
  grads = plan.kernel.backward(r, log_w, k, v, a, b, reset, checkpoint, dy.astype(r.dtype),
                               dstate_end.astype(jnp.float32), **plan.options)
  dreset = None if reset is None else jnp.zeros_like(reset)
  return (*grads, dreset)


_wkv7_kernels.defvjp(_wkv7_kernels_fwd, _wkv7_kernels_bwd)


def wkv7_pallas(r, log_w, k, v, a, b, state=None, reset=None, *, chunk_size: int | None = None,
                backend: str | None = None, interpret: bool | None = None, mxu_dtype=None,
                value_block: int | None = None, fp32_dot: str | None = None):
  """WKV-7 on Pallas kernels: returns (y [B,T,H,N] in r.dtype, final state [B,H,N,N] fp32).

  r, k, v, a, b, log_w: [B,T,H,N] float32/bfloat16/float16; state: [B,H,N,N] or None (zeros);
  reset: [B,T] bool or None. Differentiable in all of r, log_w, k, v, a, b and state.
  chunk_size: tokens per chunk, `wkv_policy.KERNELS[backend].chunk_sizes`: 16, 32 or 64 on TPU and
    16 or 32 with Triton (the kernels pad T with identity steps); None: the kernel's default (16).
  backend: "tpu" (Mosaic), "triton" (GPU) or None for the default platform's (TPU layout on CPU).
  interpret: run the kernel in the Pallas interpreter; None means "when running on CPU".
  mxu_dtype: operands of the matmuls the precision analysis allows in bf16 (the readout and the state
    update's outer products); the decay cumsum, the removal system and its inverse stay fp32. None picks
    bfloat16 for 16-bit inputs and float32 for float32 inputs.
  value_block: Triton only, split each head's value rows over this many lanes per program (more programs
    when B*H is small).
  fp32_dot: how the fp32 products run: "highest" (6-pass bf16 on TPU, IEEE fp32 on GPU) or "tf32x3"
    (3-pass TF32 tensor-core dots, about fp32 accuracy; compiled Triton only). None: "tf32x3" for
    compiled Triton, else "highest".
  """
  _check_inputs(r, log_w, k, v, a, b, state, reset)
  shape = r.shape
  B, T, H, N = shape
  backend = _resolve_backend(backend)
  chunk_size = chunk_size or KERNELS[backend].chunk_size
  plan = plan_kernels(shape, r.dtype, chunk_size=chunk_size, backend=backend, interpret=interpret,
                      mxu_dtype=mxu_dtype, has_reset=reset is not None, value_block=value_block,
                      fp32_dot=fp32_dot)
  inputs = [_to_kernel(x, plan) for x in (r, log_w, k, v, a, b)]
  if state is None:
    state = jnp.zeros((B, H, N, N), jnp.float32)
  packed_state = _pack_state(state.astype(jnp.float32), plan)
  reset_chunks = None
  if reset is not None:
    Q = plan.layout.chunk_size
    reset_f = jnp.pad(reset.astype(jnp.float32), ((0, 0), (0, plan.chunks * Q - T)))
    reset_chunks = reset_f.reshape(B, plan.chunks, Q, 1)
  y, state_end = _wkv7_kernels(plan, *inputs, packed_state, reset_chunks)
  return _from_kernel(y, plan, shape), _unpack_state(state_end, plan, H, N)


def platform_callables(*, chunk_size: int | None = None, mxu_dtype=None) -> dict[str, Callable]:
  """Per-platform kernels for `jax.lax.platform_dependent(..., tpu=..., cuda=..., default=...)`.

  Each callable takes (r, log_w, k, v, a, b, state, reset) positionally and returns (y, final state);
  compiled kernels (never interpreted), so one jitted function lowers to Mosaic on TPU and Triton on
  CUDA. Lowering handles one platform at a time.
  """
  return {platform: functools.partial(wkv7_pallas, chunk_size=chunk_size, backend=row.kernel.backend,
                                      interpret=False, mxu_dtype=mxu_dtype)
          for platform, row in POLICY.items() if not row.kernel.interpret}
