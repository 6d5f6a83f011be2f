"""One WKV-7 chunk step on plain arrays: the math both Pallas kernels run per chunk.

Per head, with the state S in the [value, key] layout and C tokens per chunk (rows = time):

    g  = inclusive cumulative log decay (a triangular matmul: Mosaic has no cumsum)
    U  = T (A0 S0^T + A_ak V),         T = (I - A_ab)^{-1}   (u_t = S_{t-1} a_t)
    Y  = R0 S0^T + A_rb U + A_rk V
    S' = S0 diag(e^{g_C}) + U^T B_end + V^T K_end

with A_xy[t, s] = sum_j x_t[j] y_s[j] e^{(g or g_excl)_t[j] - g_s[j]}, masked to s < t for rows from a and
s <= t for rows from r. Decay ratios are formed "centred" on m = g_C / 2, as (x e^{g_t - m}) (y e^{m - g_s}),
so both factors stay below e^{0.61 C / 2} for the RWKV-7 decay range and every C x C x N product is a matmul.

Several heads can share the lanes of one block ("packed" heads, G > 1, used on TPU so blocks fill the
128-lane tiles): per-head contractions then multiply by a lane mask of the head, and the state is kept
block-diagonal [G*N, G*N]. With G = 1 the masks disappear.

Resets (state zeroed before token t) are masks on the same factorisation: pairs (t, s) with a reset in
(s, t] do not interact, S0 is seen only by rows before the first reset, and only tokens after the last
reset reach the chunk's end state.

The backward differentiates the chunk with `jax.vjp` inside the kernel, except through the triangular
inverse, whose gradient is applied by hand (dA = T^T dT T^T).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_NN = (((1,), (0,)), ((), ()))
_NT = (((1,), (1,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
  """Static shape facts of one kernel program's chunk step."""
  chunk_size: int      # C, a power of two
  heads_packed: int    # G heads side by side in the lanes (block-diagonal state when > 1)
  head_size: int       # N
  value_lanes: int     # lanes of v, y and the state's rows (G*N, or a value tile when G == 1)
  has_reset: bool
  bf16_mxu: bool       # single-pass bf16 operands for the products the precision analysis allows
  fp32_dot: str = "highest"  # the fp32 products: "highest" (6-pass MXU / IEEE) or "tf32x3" (GPU)

  @property
  def key_lanes(self) -> int:
    return self.heads_packed * self.head_size

  @property
  def ladder_levels(self) -> int:
    return int(np.log2(self.chunk_size))


class ChunkConsts(NamedTuple):
  """Constant masks, built once (`chunk_constants`) and passed to the kernels as inputs."""
  tri_incl: jax.Array      # [C, C] 1 where s <= t
  tri_strict: jax.Array    # [C, C] 1 where s < t
  triu_strict: jax.Array   # [C, C] 1 where s > t (only read with resets)
  ladder: jax.Array        # [levels, C, C] (or a list of [C, C]) lower-left half-blocks of each level
  head_lanes: jax.Array    # [G, 1, G*N] (or a list of [1, G*N]) lane mask of each packed head
  block_diag: jax.Array    # [G*N, G*N] 1 inside a head's N x N block


def chunk_constants(layout: ChunkLayout) -> ChunkConsts:
  C, G, N = layout.chunk_size, layout.heads_packed, layout.head_size
  t = np.arange(C)[:, None]
  s = np.arange(C)[None, :]
  levels = []
  half = 1
  while half < C:
    same_block = (t // (2 * half)) == (s // (2 * half))
    levels.append(same_block & ((t // half) % 2 == 1) & ((s // half) % 2 == 0))
    half *= 2
  lane_head = np.arange(G * N) // N
  f32 = np.float32
  return ChunkConsts(
      tri_incl=(s <= t).astype(f32),
      tri_strict=(s < t).astype(f32),
      triu_strict=(s > t).astype(f32),
      ladder=np.stack(levels).astype(f32),
      head_lanes=(lane_head[None, None, :] == np.arange(G)[:, None, None]).astype(f32),
      block_diag=(lane_head[:, None] == lane_head[None, :]).astype(f32),
  )


FP32_DOTS = {"highest": lax.Precision.HIGHEST, "tf32x3": lax.DotAlgorithmPreset.TF32_TF32_F32_X3}


class _Products:
  """Matmuls with the precision policy: `exact` keeps fp32 (6-pass on TPU, IEEE or 3-pass TF32 on GPU);
  `fast` rounds operands to bf16 and accumulates in fp32 when the bf16-MXU mode is on. The rounding is
  explicit (and straight-through for gradients) so interpret mode on CPU reproduces the operand precision
  of hardware; a Precision.DEFAULT fp32 dot is a single bf16 MXU pass on TPU and a TF32 tensor-core dot
  on GPU, which is exact on bf16-rounded operands."""

  def __init__(self, bf16_mxu: bool, fp32_dot: str = "highest"):
    self.bf16_mxu = bf16_mxu
    self.fp32_precision = FP32_DOTS[fp32_dot]

  @staticmethod
  def _dot(x, y, dims, precision):
    return lax.dot_general(x, y, dims, precision=precision, preferred_element_type=jnp.float32)

  def exact(self, x, y, dims):
    return self._dot(x, y, dims, self.fp32_precision)

  def fast(self, x, y, dims):
    if not self.bf16_mxu:
      return self.exact(x, y, dims)
    return self._dot(_round_bf16(x), _round_bf16(y), dims, lax.Precision.DEFAULT)


def _round_bf16(x):
  return x + lax.stop_gradient(x.astype(jnp.bfloat16).astype(jnp.float32) - x)


class ResetMasks(NamedTuple):
  same_segment: jax.Array  # [C, C] bool: no reset in (s, t]
  sees_start: jax.Array    # [C, 1] 1 where no reset in [0, t] (row t reads S0)
  reaches_end: jax.Array   # [C, 1] 1 where no reset in (s, C-1] (token s reaches the end state)
  keeps_start: jax.Array   # [1, 1] 1 where the chunk has no reset (S0 survives to the end)


def reset_masks(reset_C1, consts: ChunkConsts, fp32_dot: str = "highest") -> ResetMasks:
  """Reset masks from the chunk's reset column [C, 1] (1.0 = zero the state before that token). Sums of
  at most C small integers: exact in any of the fp32 precisions."""
  exact = _Products(False, fp32_dot).exact
  ones_CC = consts.tri_incl + consts.triu_strict
  resets_between = exact(consts.tri_incl, reset_C1 * consts.tri_strict, _NN)  # resets in (s, t]
  resets_upto = exact(consts.tri_incl, reset_C1 * ones_CC, _NN)              # resets in [0, t], every column
  resets_after = exact(consts.triu_strict, reset_C1 * ones_CC, _NN)          # resets in (t, C-1]
  return ResetMasks(
      same_segment=resets_between < 0.5,
      sees_start=(jnp.max(resets_upto, axis=1, keepdims=True) < 0.5).astype(jnp.float32),
      reaches_end=(jnp.max(resets_after, axis=1, keepdims=True) < 0.5).astype(jnp.float32),
      keeps_start=(jnp.sum(reset_C1, axis=0, keepdims=True) < 0.5).astype(jnp.float32),
  )


def unit_lower_inverse(A_CC, consts: ChunkConsts, fp32_dot: str = "highest"):
  """(I - A)^{-1} for strictly lower A by the Schur ladder: block-diagonal inverses of block size b give
  those of size 2b as X + X (A * E_b) X, where E_b keeps the lower-left half-blocks. Exact algebra, fp32
  products, no long products of A (the doubling product form loses all precision at C = 64)."""
  exact = _Products(False, fp32_dot).exact
  inverse = consts.tri_incl - consts.tri_strict  # identity: the diagonal blocks of size 1
  for level_mask in consts.ladder:
    inverse = inverse + exact(exact(inverse, A_CC * level_mask, _NN), inverse, _NN)
  return inverse


def _masked(mask, x):
  return jnp.where(mask, x, 0.0)


def _stage_before_inverse(state, r, log_w, k, v, a, b, consts: ChunkConsts, resets: ResetMasks | None,
                          layout: ChunkLayout):
  """Everything up to the triangular systems. Returns ([A_ab per head], rest for `_stage_after_inverse`)."""
  mm = _Products(layout.bf16_mxu, layout.fp32_dot)
  G = layout.heads_packed
  g = mm.exact(consts.tri_incl, log_w, _NN)      # [C, K] inclusive
  g_end = jnp.sum(log_w, axis=0, keepdims=True)  # [1, K]
  g_excl = g - log_w
  centre = lax.stop_gradient(0.5 * g_end)        # any centre gives the same products
  a_centred = a * jnp.exp(g_excl - centre)
  r_centred = r * jnp.exp(g - centre)
  b_centred = b * jnp.exp(centre - g)
  k_centred = k * jnp.exp(centre - g)
  a_start = a * jnp.exp(g_excl)                  # rows that read S0 (factors <= 1)
  r_start = r * jnp.exp(g)
  b_end = b * jnp.exp(g_end - g)                 # tokens written into the end state
  k_end = k * jnp.exp(g_end - g)
  strict = consts.tri_strict > 0.5
  incl = consts.tri_incl > 0.5
  decay_end = jnp.exp(g_end)
  if resets is not None:
    strict = strict & resets.same_segment
    incl = incl & resets.same_segment
    a_start = a_start * resets.sees_start
    r_start = r_start * resets.sees_start
    b_end = b_end * resets.reaches_end
    k_end = k_end * resets.reaches_end
    decay_end = decay_end * resets.keeps_start

  removal_start = mm.exact(a_start, state, _NT)  # [C, V]: S0 a~_t
  out = mm.fast(r_start, state, _NT)
  A_ab_heads, rhs_heads, A_rb_heads = [], [], []
  for head in range(G):
    lanes = consts.head_lanes[head] if G > 1 else None
    a_h = a_centred if lanes is None else a_centred * lanes
    r_h = r_centred if lanes is None else r_centred * lanes
    A_ab_heads.append(_masked(strict, mm.exact(a_h, b_centred, _NT)))
    A_ak = _masked(strict, mm.exact(a_h, k_centred, _NT))
    A_rb_heads.append(_masked(incl, mm.fast(r_h, b_centred, _NT)))
    A_rk = _masked(incl, mm.fast(r_h, k_centred, _NT))
    rhs = removal_start + mm.exact(A_ak, v, _NN)
    out_v = mm.fast(A_rk, v, _NN)
    if lanes is not None:
      rhs = rhs * lanes
      out_v = out_v * lanes
    rhs_heads.append(rhs)
    out = out + out_v
  state_partial = state * decay_end + _block_diag(mm.fast(v, k_end, _TN), consts, G)
  return A_ab_heads, (rhs_heads, A_rb_heads, out, state_partial, b_end)


def _block_diag(x, consts: ChunkConsts, G: int):
  return x if G == 1 else x * consts.block_diag


def _stage_after_inverse(rest, inverses, consts: ChunkConsts, layout: ChunkLayout):
  """Solve for U = S_{t-1} a_t, then the outputs and the end state."""
  mm = _Products(layout.bf16_mxu, layout.fp32_dot)
  rhs_heads, A_rb_heads, out, state_partial, b_end = rest
  removal = None
  for inverse, rhs, A_rb in zip(inverses, rhs_heads, A_rb_heads):
    removal_h = mm.exact(inverse, rhs, _NN)
    out = out + mm.fast(A_rb, removal_h, _NN)
    removal = removal_h if removal is None else removal + removal_h
  state_end = state_partial + _block_diag(mm.fast(removal, b_end, _TN), consts, layout.heads_packed)
  return out, state_end


def chunk_forward(state, r, log_w, k, v, a, b, consts: ChunkConsts, resets: ResetMasks | None,
                  layout: ChunkLayout):
  """(y [C, V], end state [V, K]) of one chunk; all inputs fp32."""
  A_ab_heads, rest = _stage_before_inverse(state, r, log_w, k, v, a, b, consts, resets, layout)
  inverses = [unit_lower_inverse(A_ab, consts, layout.fp32_dot) for A_ab in A_ab_heads]
  return _stage_after_inverse(rest, inverses, consts, layout)


def chunk_backward(state, r, log_w, k, v, a, b, dy, dstate_end, consts: ChunkConsts,
                   resets: ResetMasks | None, layout: ChunkLayout):
  """Gradients (dstate, dr, dlog_w, dk, dv, da, db) of one chunk, recomputing it from its start state."""
  exact = _Products(False, layout.fp32_dot).exact

  def before(*primals):
    return _stage_before_inverse(*primals, consts, resets, layout)

  (A_ab_heads, rest), pull_before = jax.vjp(before, state, r, log_w, k, v, a, b)
  inverses = [unit_lower_inverse(A_ab, consts, layout.fp32_dot) for A_ab in A_ab_heads]
  _, pull_after = jax.vjp(lambda rest_, inv_: _stage_after_inverse(rest_, inv_, consts, layout),
                          rest, inverses)
  drest, dinverses = pull_after((dy, dstate_end))
  # d(I - A)^{-1} = T dA T  =>  dA = T^T dT T^T (the strict-lower mask is applied by pull_before).
  dA_ab_heads = [exact(exact(inv, dinv, _TN), inv, _NT) for inv, dinv in zip(inverses, dinverses)]
  dstate, dr, dlog_w, dk, dv, da, db = pull_before((dA_ab_heads, drest))
  dstate = _block_diag(dstate, consts, layout.heads_packed)
  return dstate, dr, dlog_w, dk, dv, da, db
