"""The WKV-7 chunk step: the one piece of chunk math every chunked form runs.

The Pallas kernels (`kernel_body`, Mosaic TPU and Triton GPU) call it on one chunk at a time,
arrays [Q, lanes]; the XLA forms (`goosejax.wkv.chunked`) on many chunks at once, arrays
[..., Q, N] whose leading dims are batch dims of every product. It lives here, not in goosejax,
because the kernels are the stricter client: only what Mosaic and Triton lower (2-D dots,
elementwise ops, sums, selects; no cumsum or custom_vjp, and no slicing in Triton; constant masks
arrive as kernel inputs), and `pallas_kernels` is the lower layer, imported by goosejax and never
the reverse.

Per head, a chunk of Q tokens with state S0 [value, key], time along rows (docs/architecture.md#the-chunked-wkv-7-form):

    g = inclusive cumulative log decay (a triangular matmul), g_excl = g - log_w, g_end = sum log_w
    A_xy[t, s] = sum_j x_t[j] y_s[j] e^{(g_excl or g)_t[j] - g_s[j]}, s < t for rows from a,
                 s <= t for rows from r
    T  = (I - A_ab)^{-1}                                       (`unit_lower_inverse`)
    U  = W S0^T + U0,  W = T a_start,  U0 = T A_ak V            (U_t = S_{t-1} a_t: the removals)
    Y  = r_start S0^T + A_rb U + A_rk V
    S' = S0 diag(decay_end) + U^T b_end + V^T k_end = S0 M + B  (affine in S0: `summary`)

with a_start = a e^{g_excl}, r_start = r e^{g} (decayed from the chunk start), b_end, k_end =
b, k e^{g_end - g} (decayed to its end), decay_end = e^{g_end}. Everything but U, Y and S' is
independent of S0 (`ChunkTerms`), so the XLA forms build the terms of many chunks together and
walk only the state through them.

Centring: the products A_xy use (x e^{g_t - m}) (y e^{m - g_s}) with m = g_end / 2, so every
Q x Q x N product is a plain matmul, no ratio is formed by dividing cumulative products, and each
factor is at most e^{|LOG_DECAY_MIN| Q / 2} for decays in the RWKV-7 range (wkv_policy).

Packed heads (TPU): P heads side by side in the lanes, each head's contractions multiply by its
lane mask and the state is block-diagonal [P*N, P*N]; with P = 1 the masks disappear.

Resets (the state zeroed before token t) are masks on the same factorisation: pairs (t, s) with a
reset in (s, t] do not interact, S0 reaches only rows before the first reset, and only tokens
after the last reset reach S'.

Precision: the decay cumsum, the removal system, its inverse and everything feeding U stay in
fp32 products ("exact"); the read-out and the state update's outer products may take bf16
operands with fp32 accumulation ("fast", `ChunkLayout.bf16_mxu`). float64 arrays compute in
float64 (the XLA forms' exactness tests).

Backward: the state-dependent part by hand (`output_cotangents` ... `term_cotangents`, written
so the XLA forms batch them over chunks), the terms by `jax.vjp` around the inverse, whose
gradient is the closed form dA = T^T dT T^T (`terms_vjp`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

FP32_DOTS = {"highest": lax.Precision.HIGHEST, "tf32x3": lax.DotAlgorithmPreset.TF32_TF32_F32_X3}
LADDER_BLOCK = 16  # with sliced_inverse, the diagonal blocks the masked ladder inverts


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
  """Static shape and precision facts of a chunk step."""
  chunk_size: int      # Q: wkv_policy.CHUNK_SIZES (the math takes any power of two >= 2)
  heads_packed: int    # P heads side by side in the lanes (block-diagonal state when > 1)
  head_size: int       # N
  value_lanes: int     # lanes of v, y and the state's rows (P*N, or a value tile when P == 1)
  has_reset: bool
  bf16_mxu: bool = False     # bf16 operands for the "fast" products
  fp32_dot: str = "highest"  # the fp32 products: "highest" (6-pass MXU / IEEE) or "tf32x3" (GPU)
  sliced_inverse: bool = False  # merge the inverse's blocks on slices (XLA; kernels cannot slice)

  def __post_init__(self):
    size = self.chunk_size
    if size < 2 or size & (size - 1):
      raise ValueError(f"ChunkLayout: chunk_size {size} is not a power of two >= 2")

  @property
  def key_lanes(self) -> int:
    return self.heads_packed * self.head_size

  @property
  def ladder_levels(self) -> int:
    return int(np.log2(self.chunk_size))


class ChunkConsts(NamedTuple):
  """Constant masks (`chunk_constants`); inside a kernel, loaded from its inputs."""
  tri_incl: jax.Array      # [Q, Q] 1 where s <= t
  tri_strict: jax.Array    # [Q, Q] 1 where s < t
  triu_strict: jax.Array   # [Q, Q] 1 where s > t (read with resets only)
  ladder: jax.Array        # [levels, Q, Q] (or a list of [Q, Q]): lower-left half-blocks per level
  head_lanes: jax.Array    # [P, 1, P*N] (or a list of [1, P*N]): lane mask of each packed head
  block_diag: jax.Array    # [P*N, P*N] 1 inside a head's N x N block


def chunk_constants(layout: ChunkLayout, dtype=np.float32) -> ChunkConsts:
  """The masks as NumPy arrays of `dtype` (the compute dtype: products with them stay in it)."""
  Q, P, N = layout.chunk_size, layout.heads_packed, layout.head_size
  t = np.arange(Q)[:, None]
  s = np.arange(Q)[None, :]
  levels = []
  half = 1
  while half < Q:
    same_block = (t // (2 * half)) == (s // (2 * half))
    levels.append(same_block & ((t // half) % 2 == 1) & ((s // half) % 2 == 0))
    half *= 2
  lane_head = np.arange(P * N) // N
  return ChunkConsts(
      tri_incl=(s <= t).astype(dtype),
      tri_strict=(s < t).astype(dtype),
      triu_strict=(s > t).astype(dtype),
      ladder=np.stack(levels).astype(dtype),
      head_lanes=(lane_head[None, None, :] == np.arange(P)[:, None, None]).astype(dtype),
      block_diag=(lane_head[:, None] == lane_head[None, :]).astype(dtype),
  )


def _dot(x, y, form: str, precision):
  """x y with each operand transposed where `form` ("nn", "nt", "tn") says, over the last two
  dims; leading dims are batch dims (broadcast when they differ), a 2-D operand is shared."""
  batch = ()
  if x.ndim > 2 and y.ndim > 2:
    if x.shape[:-2] != y.shape[:-2]:
      lead = jnp.broadcast_shapes(x.shape[:-2], y.shape[:-2])
      x = jnp.broadcast_to(x, lead + x.shape[-2:])
      y = jnp.broadcast_to(y, lead + y.shape[-2:])
    batch = tuple(range(x.ndim - 2))
  x_contract = x.ndim - 1 if form[0] == "n" else x.ndim - 2
  y_contract = y.ndim - 2 if form[1] == "n" else y.ndim - 1
  out = lax.dot_general(x, y, (((x_contract,), (y_contract,)), (batch, batch)),
                        precision=precision, preferred_element_type=jnp.promote_types(x.dtype, y.dtype))
  if x.ndim == 2 and y.ndim > 2:  # (x free, *batch, y free) -> (*batch, x free, y free)
    out = jnp.moveaxis(out, 0, -2)
  return out


def _round_bf16(x):
  """x rounded to bf16 and back, straight-through for gradients: the rounding is explicit so the
  CPU interpreter reproduces the operand precision of a single-pass bf16 MXU / tensor-core dot."""
  return x + lax.stop_gradient(x.astype(jnp.bfloat16).astype(x.dtype) - x)


class ResetMasks(NamedTuple):
  same_segment: jax.Array  # [Q, Q] bool: no reset in (s, t]
  sees_start: jax.Array    # [Q, 1] 1 where no reset in [0, t] (row t reads S0)
  reaches_end: jax.Array   # [Q, 1] 1 where no reset in (t, Q-1] (token t reaches the end state)
  keeps_start: jax.Array   # [1, 1] 1 where the chunk has no reset (S0 survives to the end)


class ChunkTerms(NamedTuple):
  """The state-independent terms of a chunk, [..., Q, lanes] (keys: the P*N key lanes, values:
  the value lanes)."""
  w: jax.Array             # [Q, keys]  U = W S0^T + U0
  u0: jax.Array            # [Q, values]
  r_start: jax.Array       # [Q, keys]  r decayed from the chunk start
  a_rb: tuple              # P x [Q, Q]  decayed <r_t, b_s>, s <= t, per packed head
  y_values: jax.Array      # [Q, values]  A_rk V, the outputs' part from this chunk's values
  b_end: jax.Array         # [Q, keys]  b decayed to the chunk end
  state_values: jax.Array  # [values, keys]  V^T k_end: the end state's part from this chunk's values
  decay_end: jax.Array     # [1, keys]  the whole chunk's decay


class ChunkMath:
  """The chunk step for one layout and its constants (NumPy arrays, or a kernel's loaded refs).

  Matmul policy: `exact` keeps fp32 (6-pass on TPU, IEEE or 3-pass TF32 on GPU); `fast` rounds
  operands to bf16 and accumulates in fp32 when `layout.bf16_mxu` (a Precision.DEFAULT fp32 dot
  is one bf16 MXU pass on TPU and a TF32 tensor-core dot on GPU, exact on bf16-rounded operands)."""

  def __init__(self, layout: ChunkLayout, consts: ChunkConsts):
    self.layout = layout
    self.consts = consts
    self._precision = FP32_DOTS[layout.fp32_dot]

  @classmethod
  def for_arrays(cls, chunk_size: int, head_size: int, dtype, has_reset: bool) -> ChunkMath:
    """One head per array slot, fp32 products (the XLA forms; float64 arrays stay float64)."""
    layout = ChunkLayout(chunk_size, 1, head_size, head_size, has_reset, sliced_inverse=True)
    return cls(layout, chunk_constants(layout, np.dtype(dtype)))

  # ------------------------------------------------------------------------------- products

  def exact(self, x, y, form: str):
    return _dot(x, y, form, self._precision)

  def fast(self, x, y, form: str):
    if not self.layout.bf16_mxu:
      return self.exact(x, y, form)
    return _dot(_round_bf16(x), _round_bf16(y), form, lax.Precision.DEFAULT)

  def _lanes(self) -> list:
    """Each packed head's lane mask [1, P*N]; [None] for one head (no masking)."""
    if self.layout.heads_packed == 1:
      return [None]
    return [self.consts.head_lanes[h] for h in range(self.layout.heads_packed)]

  def _block_diag(self, x):
    return x if self.layout.heads_packed == 1 else x * self.consts.block_diag

  def compact_state(self, state):
    """A block-diagonal packed state [P*N, P*N] as its N x N blocks side by side, [N, P*N]."""
    P, N = self.layout.heads_packed, self.layout.head_size
    if P == 1:
      return state
    return sum((state[p * N:(p + 1) * N] for p in range(1, P)), state[:N])

  def expand_state(self, compact):
    """[N, P*N] blocks side by side back to the block-diagonal [P*N, P*N] state."""
    if self.layout.heads_packed == 1:
      return compact
    return jnp.concatenate([compact * lanes for lanes in self._lanes()], axis=0)

  # ------------------------------------------------------------------ masks and the inverse

  def reset_masks(self, reset_Q1) -> ResetMasks:
    """Masks from the chunk's reset column [Q, 1] (1 = zero the state before that token). Sums
    of at most Q small integers: exact in any of the fp32 precisions."""
    c = self.consts
    ones_QQ = c.tri_incl + c.triu_strict
    resets_between = self.exact(c.tri_incl, reset_Q1 * c.tri_strict, "nn")  # resets in (s, t]
    resets_upto = self.exact(c.tri_incl, reset_Q1 * ones_QQ, "nn")  # in [0, t], every column
    resets_after = self.exact(c.triu_strict, reset_Q1 * ones_QQ, "nn")  # in (t, Q-1]
    dtype = reset_Q1.dtype
    return ResetMasks(
        same_segment=resets_between < 0.5,
        sees_start=(jnp.max(resets_upto, axis=-1, keepdims=True) < 0.5).astype(dtype),
        reaches_end=(jnp.max(resets_after, axis=-1, keepdims=True) < 0.5).astype(dtype),
        keeps_start=(jnp.sum(reset_Q1, axis=-2, keepdims=True) < 0.5).astype(dtype))

  def unit_lower_inverse(self, a_QQ):
    """(I - A)^{-1} for strictly lower A [..., Q, Q] by the Schur ladder: from the block-diagonal
    inverse X of block size h, the one of size 2h is X + X (A E_h) X, E_h keeping the lower-left
    half-blocks (exact algebra, fp32 products, no powers of A: the doubling product
    (I + A)(I + A^2)... loses all precision over a 64 chunk, docs/architecture.md#the-chunked-wkv-7-form).

    Kernels run every level as full Q x Q products with the level's mask, 2 log2(Q) - 2 of
    them. With `sliced_inverse` (the XLA forms) the levels past LADDER_BLOCK compute only the
    new lower-left blocks, X2 A21 X1, on slices: the same arithmetic without the products of
    zero blocks (at Q = 64, 0.18M multiply-adds instead of 2.6M)."""
    size = self.layout.chunk_size
    if not self.layout.sliced_inverse or size <= LADDER_BLOCK:
      return self._masked_ladder(a_QQ, self.layout.ladder_levels)
    block = LADDER_BLOCK
    count = size // block
    diagonal = jnp.stack([a_QQ[..., i * block:(i + 1) * block, i * block:(i + 1) * block]
                          for i in range(count)], axis=-3)
    inverse = self._masked_ladder(diagonal, int(np.log2(block)))  # [..., Q/b, b, b]
    while block < size:
      pairs = size // (2 * block)
      coupling = jnp.stack([a_QQ[..., (2 * i + 1) * block:(2 * i + 2) * block,
                                 2 * i * block:(2 * i + 1) * block] for i in range(pairs)], axis=-3)
      upper, lower = inverse[..., 0::2, :, :], inverse[..., 1::2, :, :]
      corner = self.exact(self.exact(lower, coupling, "nn"), upper, "nn")
      top = jnp.concatenate([upper, jnp.zeros_like(upper)], axis=-1)
      inverse = jnp.concatenate([top, jnp.concatenate([corner, lower], axis=-1)], axis=-2)
      block *= 2
    return inverse[..., 0, :, :]

  def _masked_ladder(self, a_XX, levels: int):
    """The first `levels` ladder levels as masked full-size products on [..., X, X]."""
    c, size = self.consts, a_XX.shape[-1]
    mask = lambda m: m if m.shape[-1] == size else m[:size, :size]  # on a leading diagonal block
    inverse = mask(c.tri_incl) - mask(c.tri_strict) + a_XX * mask(c.ladder[0])  # I + A E_1
    for level in range(1, levels):
      step = self.exact(inverse, a_XX * mask(c.ladder[level]), "nn")
      inverse = inverse + self.exact(step, inverse, "nn")
    return inverse

  # ------------------------------------------------------------------------------ the terms

  def _before_inverse(self, r, log_w, k, v, a, b, resets: ResetMasks | None):
    """Everything up to the removal systems: ([A_ab per head], rest for `_after_inverse`)."""
    c = self.consts
    g = self.exact(c.tri_incl, log_w, "nn")
    g_end = jnp.sum(log_w, axis=-2, keepdims=True)
    g_excl = g - log_w
    centre = lax.stop_gradient(0.5 * g_end)  # any centre gives the same products
    a_centred = a * jnp.exp(g_excl - centre)
    r_centred = r * jnp.exp(g - centre)
    to_centre = jnp.exp(centre - g)
    b_centred = b * to_centre
    k_centred = k * to_centre
    a_start = a * jnp.exp(g_excl)  # rows that read S0 (factors <= 1)
    r_start = r * jnp.exp(g)
    to_end = jnp.exp(g_end - g)
    b_end = b * to_end
    k_end = k * to_end
    decay_end = jnp.exp(g_end)
    strict = c.tri_strict > 0.5
    incl = c.tri_incl > 0.5
    if resets is not None:
      strict = strict & resets.same_segment
      incl = incl & resets.same_segment
      a_start = a_start * resets.sees_start
      r_start = r_start * resets.sees_start
      b_end = b_end * resets.reaches_end
      k_end = k_end * resets.reaches_end
      decay_end = decay_end * resets.keeps_start

    a_ab_heads, akv_heads, a_rb_heads = [], [], []
    y_values = None
    for lanes in self._lanes():
      a_h, r_h, v_h = (x if lanes is None else x * lanes for x in (a_centred, r_centred, v))
      a_ab_heads.append(jnp.where(strict, self.exact(a_h, b_centred, "nt"), 0.0))
      a_ak = jnp.where(strict, self.exact(a_h, k_centred, "nt"), 0.0)
      akv_heads.append(self.exact(a_ak, v_h, "nn"))
      a_rb_heads.append(jnp.where(incl, self.fast(r_h, b_centred, "nt"), 0.0))
      a_rk = jnp.where(incl, self.fast(r_h, k_centred, "nt"), 0.0)
      y_h = self.fast(a_rk, v_h, "nn")
      y_values = y_h if y_values is None else y_values + y_h
    state_values = self._block_diag(self.fast(v, k_end, "tn"))
    rest = (a_start, akv_heads, r_start, a_rb_heads, y_values, b_end, state_values, decay_end)
    return a_ab_heads, rest

  def _after_inverse(self, rest, inverses) -> ChunkTerms:
    a_start, akv_heads, r_start, a_rb_heads, y_values, b_end, state_values, decay_end = rest
    w = u0 = None
    for lanes, inverse, akv in zip(self._lanes(), inverses, akv_heads):
      w_h = self.exact(inverse, a_start if lanes is None else a_start * lanes, "nn")
      u0_h = self.exact(inverse, akv, "nn")
      w, u0 = (w_h, u0_h) if w is None else (w + w_h, u0 + u0_h)
    return ChunkTerms(w, u0, r_start, tuple(a_rb_heads), y_values, b_end, state_values, decay_end)

  def terms(self, r, log_w, k, v, a, b, resets: ResetMasks | None = None) -> ChunkTerms:
    """The chunk's `ChunkTerms` from its inputs [..., Q, lanes] (one float dtype)."""
    a_ab_heads, rest = self._before_inverse(r, log_w, k, v, a, b, resets)
    return self._after_inverse(rest, [self.unit_lower_inverse(x) for x in a_ab_heads])

  def terms_vjp(self, inputs, resets: ResetMasks | None = None
                ) -> tuple[ChunkTerms, Callable[[ChunkTerms], tuple]]:
    """(terms, pull_back): pull_back(d terms) = the cotangents of the six inputs."""
    (a_ab_heads, rest), pull_before = jax.vjp(
        lambda *x: self._before_inverse(*x, resets), *inputs)
    inverses = [self.unit_lower_inverse(x) for x in a_ab_heads]
    terms, pull_after = jax.vjp(self._after_inverse, rest, inverses)

    def pull_back(d_terms: ChunkTerms):
      d_rest, d_inverses = pull_after(d_terms)
      # dT = T dA T  =>  dA = T^T dT T^T (the strict-lower mask is applied by pull_before)
      d_a_ab = [self.exact(self.exact(t, dt, "tn"), t, "nt") for t, dt in zip(inverses, d_inverses)]
      return pull_before((d_a_ab, d_rest))

    return terms, pull_back

  # --------------------------------------------------------------- the state through a chunk

  def removals(self, state, terms: ChunkTerms):
    """U = W S0^T + U0: the removal read-outs S_{t-1} a_t of the chunk entered with `state`."""
    return self.exact(terms.w, state, "nt") + terms.u0

  def outputs(self, state, u, terms: ChunkTerms):
    """Y = r_start S0^T + A_rb U + A_rk V."""
    y = self.fast(terms.r_start, state, "nt") + terms.y_values
    for lanes, a_rb in zip(self._lanes(), terms.a_rb):
      y = y + self.fast(a_rb, u if lanes is None else u * lanes, "nn")
    return y

  def end_state(self, state, u, terms: ChunkTerms):
    """S' = S0 diag(decay_end) + U^T b_end + V^T k_end."""
    return (state * terms.decay_end + self._block_diag(self.fast(u, terms.b_end, "tn"))
            + terms.state_values)

  def forward(self, state, terms: ChunkTerms):
    """(Y [..., Q, values], S' [..., values, keys]) of the chunk entered with `state`
    [..., values, keys]."""
    u = self.removals(state, terms)
    return self.outputs(state, u, terms), self.end_state(state, u, terms)

  # ------------------------------------------- the backward of `forward`, in batchable pieces

  def output_cotangents(self, terms: ChunkTerms, d_y):
    """The outputs' shares of (dU, dS0): (A_rb^T dY, dY^T r_start)."""
    d_u = None
    for lanes, a_rb in zip(self._lanes(), terms.a_rb):
      d_u_h = self.fast(a_rb, d_y, "tn")
      d_u_h = d_u_h if lanes is None else d_u_h * lanes
      d_u = d_u_h if d_u is None else d_u + d_u_h
    return d_u, self._block_diag(self.fast(d_y, terms.r_start, "tn"))

  def removal_cotangent(self, d_u_outputs, terms: ChunkTerms, d_end):
    """dU = A_rb^T dY + b_end dS'^T."""
    return d_u_outputs + self.fast(terms.b_end, d_end, "nt")

  def start_cotangent(self, d_state_outputs, terms: ChunkTerms, d_end, d_u):
    """dS0 = dY^T r_start + dS' diag(decay_end) + dU^T W."""
    return (d_state_outputs + d_end * terms.decay_end
            + self._block_diag(self.exact(d_u, terms.w, "tn")))

  def term_cotangents(self, state, u, terms: ChunkTerms, d_y, d_u, d_end) -> ChunkTerms:
    """Cotangents of the terms from the chunk's S0, U and dY, dU, dS'."""
    return ChunkTerms(
        w=self.exact(d_u, state, "nn"),
        u0=d_u,
        r_start=self.fast(d_y, state, "nn"),
        a_rb=tuple(self.fast(d_y if lanes is None else d_y * lanes, u, "nt")
                   for lanes in self._lanes()),
        y_values=d_y,
        b_end=self.fast(u, d_end, "nn"),
        state_values=d_end,
        decay_end=jnp.sum(d_end * state, axis=-2, keepdims=True))

  def backward(self, state, inputs, d_y, d_end, resets: ResetMasks | None = None):
    """(dS0, (dr, dlog_w, dk, dv, da, db)) of one chunk from dY and dS', recomputing it from S0."""
    terms, pull_back = self.terms_vjp(inputs, resets)
    u = self.removals(state, terms)
    d_u_outputs, d_state_outputs = self.output_cotangents(terms, d_y)
    d_u = self.removal_cotangent(d_u_outputs, terms, d_end)
    d_state = self.start_cotangent(d_state_outputs, terms, d_end, d_u)
    return d_state, pull_back(self.term_cotangents(state, u, terms, d_y, d_u, d_end))

  # ------------------------------------------------ the chunk as an affine map (XLA forms)

  def summary(self, terms: ChunkTerms):
    """S' = S0 M + B: returns (M [..., keys, keys], B [..., values, keys])."""
    identity = jnp.eye(self.layout.key_lanes, dtype=terms.w.dtype)
    m = jnp.swapaxes(terms.decay_end, -1, -2) * identity
    m = m + self._block_diag(self.exact(terms.w, terms.b_end, "tn"))
    b = self._block_diag(self.exact(terms.u0, terms.b_end, "tn")) + terms.state_values
    return m, b

  def combine_affine(self, first, second):
    """Applying (M1, B1) then (M2, B2) is (M1 M2, B1 M2 + B2); associative, so
    `lax.associative_scan(math.combine_affine, (M, B))` gives every prefix."""
    m1, b1 = first
    m2, b2 = second
    return self.exact(m1, m2, "nn"), self.exact(b1, m2, "nn") + b2

  def apply_affine(self, state, summary):
    """S -> S M + B."""
    m, b = summary
    return self.exact(state, m, "nn") + b

