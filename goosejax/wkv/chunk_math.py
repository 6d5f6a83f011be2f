"""Intra-chunk WKV-7 math: the chunk terms that do not depend on the incoming state, and the
per-chunk forward and backward given that state.

Per head, a chunk of C tokens entering with state S0 (value x key) is affine in S0
(see ../shared/spec/wkv7-kernels.md §1.2; time runs along rows, g is the inclusive
cumulative log decay inside the chunk, ge = g - log_w the exclusive one):

    U     = W S0^T + U0                      U_t = S_{t-1} a_t, the removal read-outs
    Y     = Rtilde S0^T + A_rb U + A_rk V    the chunk's outputs
    S_end = S0 diag(gamma) + U^T Bbar + V^T Kbar = S0 M + Baff

with  Atilde = a e^{ge}, Rtilde = r e^{g}, Bbar = b e^{g_C - g}, Kbar = k e^{g_C - g},
gamma = e^{g_C}, the decayed products A_xy[t, s] = sum_j x_t[j] y_s[j] e^{g(e)_t[j] - g_s[j]}
(strictly lower for rows from a, inclusive for rows from r), T = (I - A_ab)^{-1},
W = T Atilde, U0 = T A_ak V, and the affine summary M = diag(gamma) + W^T Bbar,
Baff = U0^T Bbar + V^T Kbar.

The four C x C products are plain matmuls through the centred factorisation
e^{x_t - g_s} = e^{x_t - m} e^{m - g_s} with m the cumulative decay at mid-chunk: with
-0.606531 <= log_w <= 0 each factor is at most e^{0.607 C/2} (2.7e8 at C = 64), so nothing
overflows fp32, and the ratio is never formed by dividing cumulative products.

Per-document resets enter as masks from the within-chunk reset count `segment` (the number
of resets at or before each token): token s reaches token t only inside one segment, the
incoming state reaches only the first segment, and only the last segment reaches the end.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from goosejax.wkv.triangular import unit_lower_inverse

# fp32 matmuls at full precision: TPUs default to one bf16 pass and GPUs to TF32, which is
# far too coarse for the triangular inverse and the decayed products.
PRECISION = jax.lax.Precision.HIGHEST


class ChunkTerms(NamedTuple):
  """The state-independent terms of a chunk (leading dims ..., C tokens, N = head size)."""
  w: jax.Array        # [..., C, N]  U = W S0^T + U0
  u0: jax.Array       # [..., C, N]
  r_tilde: jax.Array  # [..., C, N]  r decayed from the chunk start
  a_rb: jax.Array     # [..., C, C]  decayed <r_t, b_s>, s <= t
  a_rk: jax.Array     # [..., C, C]  decayed <r_t, k_s>, s <= t
  v: jax.Array        # [..., C, N]
  bbar: jax.Array     # [..., C, N]  b decayed to the chunk end
  kbar: jax.Array     # [..., C, N]  k decayed to the chunk end
  gamma: jax.Array    # [..., N]     the whole chunk's decay


def _matmul(x, y):
  return jnp.matmul(x, y, precision=PRECISION)


def _t(x):
  return jnp.swapaxes(x, -1, -2)


def chunk_terms(r, log_w, k, v, a, b, segment=None) -> ChunkTerms:
  """ChunkTerms for inputs of shape [..., C, N] (one dtype, fp32 or float64).

  segment: None, or int [..., C] (broadcastable) counting the resets at or before each token
  of the chunk (resets zero the state before their token).
  """
  size = r.shape[-2]
  dtype = r.dtype
  inclusive_CC = jnp.tril(jnp.ones((size, size), dtype))
  g = jnp.einsum("ts,...sn->...tn", inclusive_CC, log_w, precision=PRECISION)
  ge = g - log_w
  g_last = g[..., -1:, :]
  centre = g[..., size // 2 - 1:size // 2, :]

  # Centred factors for the products (each bounded, see the module docstring).
  rows = jnp.concatenate([a * jnp.exp(ge - centre), r * jnp.exp(g - centre)], axis=-2)
  from_centre = jnp.exp(centre - g)
  cross_b = _matmul(rows, _t(b * from_centre))    # [..., 2C, C]: rows a then r
  cross_k = _matmul(rows, _t(k * from_centre))
  strict = jnp.tril(jnp.ones((size, size), bool), -1)
  inclusive = jnp.tril(jnp.ones((size, size), bool))
  if segment is not None:
    same_segment = segment[..., :, None] == segment[..., None, :]
    strict = strict & same_segment
    inclusive = inclusive & same_segment
  zero = jnp.zeros((), dtype)
  a_ab = jnp.where(strict, cross_b[..., :size, :], zero)
  a_ak = jnp.where(strict, cross_k[..., :size, :], zero)
  a_rb = jnp.where(inclusive, cross_b[..., size:, :], zero)
  a_rk = jnp.where(inclusive, cross_k[..., size:, :], zero)

  a_tilde = a * jnp.exp(ge)
  r_tilde = r * jnp.exp(g)
  to_end = jnp.exp(g_last - g)
  b_bar = b * to_end
  k_bar = k * to_end
  gamma = jnp.exp(g_last[..., 0, :])
  if segment is not None:
    first = (segment == 0)[..., None].astype(dtype)
    last = (segment == segment[..., -1:])[..., None].astype(dtype)
    a_tilde = a_tilde * first
    r_tilde = r_tilde * first
    b_bar = b_bar * last
    k_bar = k_bar * last
    gamma = gamma * first[..., -1, :]

  inverse = unit_lower_inverse(a_ab, PRECISION)
  w = _matmul(inverse, a_tilde)
  u0 = _matmul(inverse, _matmul(a_ak, v))
  return ChunkTerms(w, u0, r_tilde, a_rb, a_rk, v, b_bar, k_bar, gamma)


def chunk_removals(state, terms: ChunkTerms):
  """U = W S0^T + U0: the removal read-outs S_{t-1} a_t of the chunk entered with `state`."""
  return _matmul(terms.w, _t(state)) + terms.u0


def chunk_outputs(state, u, terms: ChunkTerms):
  """Y = Rtilde S0^T + A_rb U + A_rk V."""
  return (_matmul(terms.r_tilde, _t(state)) + _matmul(terms.a_rb, u)
          + _matmul(terms.a_rk, terms.v))


def chunk_end_state(state, u, terms: ChunkTerms):
  """S_end = S0 diag(gamma) + U^T Bbar + V^T Kbar."""
  return (state * terms.gamma[..., None, :] + _matmul(_t(u), terms.bbar)
          + _matmul(_t(terms.v), terms.kbar))


def chunk_forward(state, terms: ChunkTerms):
  """(Y [..., C, N], S_end [..., N, N]) for the chunk entered with `state` [..., N, N]."""
  u = chunk_removals(state, terms)
  return chunk_outputs(state, u, terms), chunk_end_state(state, u, terms)


# The backward of chunk_forward, in pieces so that the part that depends on the next chunk's
# state cotangent (a short recurrence over chunks) is separate from the batched parts.


def output_cotangents(terms: ChunkTerms, d_y):
  """The outputs' share of (dU, dS0): (A_rb^T dY, dY^T Rtilde)."""
  return _matmul(_t(terms.a_rb), d_y), _matmul(_t(d_y), terms.r_tilde)


def removal_cotangent(u_from_outputs, terms: ChunkTerms, d_end):
  """dU = A_rb^T dY + Bbar dS_end^T."""
  return u_from_outputs + _matmul(terms.bbar, _t(d_end))


def start_cotangent(state_from_outputs, terms: ChunkTerms, d_end, d_u):
  """dS0 = dY^T Rtilde + dS_end diag(gamma) + dU^T W."""
  return state_from_outputs + d_end * terms.gamma[..., None, :] + _matmul(_t(d_u), terms.w)


def term_cotangents(state, u, terms: ChunkTerms, d_y, d_u, d_end) -> ChunkTerms:
  """Cotangents of the chunk terms from the chunk's state S0, removals U and dY, dU, dS_end."""
  return ChunkTerms(
      w=_matmul(d_u, state),
      u0=d_u,
      r_tilde=_matmul(d_y, state),
      a_rb=_matmul(d_y, _t(u)),
      a_rk=_matmul(d_y, _t(terms.v)),
      v=_matmul(_t(terms.a_rk), d_y) + _matmul(terms.kbar, _t(d_end)),
      bbar=_matmul(u, d_end),
      kbar=_matmul(terms.v, d_end),
      gamma=jnp.sum(d_end * state, axis=-2))


def chunk_backward(state, terms: ChunkTerms, d_y, d_end):
  """Cotangents of `chunk_forward`: (d terms, d state) from d Y and d S_end."""
  u = chunk_removals(state, terms)
  u_from_outputs, state_from_outputs = output_cotangents(terms, d_y)
  d_u = removal_cotangent(u_from_outputs, terms, d_end)
  d_state = start_cotangent(state_from_outputs, terms, d_end, d_u)
  return term_cotangents(state, u, terms, d_y, d_u, d_end), d_state


def chunk_summary(terms: ChunkTerms):
  """The chunk as an affine map of its incoming state, S_end = S0 M + Baff: returns (M, Baff)."""
  m = _matmul(_t(terms.w), terms.bbar)
  m = m + terms.gamma[..., :, None] * jnp.eye(m.shape[-1], dtype=m.dtype)
  baff = _matmul(_t(terms.u0), terms.bbar) + _matmul(_t(terms.v), terms.kbar)
  return m, baff


def combine_affine(first, second):
  """Compose affine state maps: applying (M1, B1) then (M2, B2) is (M1 M2, B1 M2 + B2).

  Associative, so `jax.lax.associative_scan(combine_affine, (M, B))` gives every prefix.
  """
  m1, b1 = first
  m2, b2 = second
  return _matmul(m1, m2), _matmul(b1, m2) + b2


def apply_affine(state, summary):
  """S -> S M + B."""
  m, b = summary
  return _matmul(state, m) + b
