"""Intra-chunk WKV-7 math: everything about a chunk that does not depend on its incoming state.

Per head, a chunk of C tokens entering with state S0 (value x key) is affine in S0
(see ../shared/spec/wkv7-kernels.md §1.2; time runs along rows, g is the inclusive
cumulative log decay inside the chunk, ge = g - log_w the exclusive one):

    U  = W S0^T + U0                 U_t = S_{t-1} a_t, the removal read-outs
    Y  = Q S0^T + Y0                 the chunk's outputs
    S_end = S0 diag(gamma) + U^T Bbar + V^T Kbar = S0 M + Baff,
    M  = diag(gamma) + W^T Bbar      (diagonal plus rank <= C)

with  Atilde = a e^{ge}, Rtilde = r e^{g}, Bbar = b e^{g_C - g}, Kbar = k e^{g_C - g},
gamma = e^{g_C}, the decayed products A_xy[t, s] = sum_j x_t[j] y_s[j] e^{g(e)_t[j] - g_s[j]}
(strictly lower for rows from a, inclusive for rows from r), T = (I - A_ab)^{-1} and
W = T Atilde, U0 = T A_ak V, Q = Rtilde + A_rb W, Y0 = A_rb U0 + A_rk V,
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
  """The state-independent terms of every chunk (leading dims ..., C tokens, N = head size)."""
  q: jax.Array      # [..., C, N]  Y = Q S0^T + Y0
  y0: jax.Array     # [..., C, N]
  w: jax.Array      # [..., C, N]  U = W S0^T + U0
  bbar: jax.Array   # [..., C, N]  b decayed to the chunk end
  gamma: jax.Array  # [..., N]     the whole chunk's decay
  baff: jax.Array   # [..., N, N]  the state the chunk produces from a zero state


def _einsum(spec, *operands):
  return jnp.einsum(spec, *operands, precision=PRECISION)


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
  a_centred = a * jnp.exp(ge - centre)
  r_centred = r * jnp.exp(g - centre)
  b_centred = b * jnp.exp(centre - g)
  k_centred = k * jnp.exp(centre - g)
  rows = jnp.concatenate([a_centred, r_centred], axis=-2)          # [..., 2C, N]
  cross_ab_ak = _einsum("...tn,...sn->...ts", rows, b_centred)     # [..., 2C, C]
  cross_rb_rk = _einsum("...tn,...sn->...ts", rows, k_centred)
  strict = jnp.tril(jnp.ones((size, size), bool), -1)
  inclusive = jnp.tril(jnp.ones((size, size), bool))
  if segment is not None:
    same_segment = segment[..., :, None] == segment[..., None, :]
    strict = strict & same_segment
    inclusive = inclusive & same_segment
  zero = jnp.zeros((), dtype)
  a_ab = jnp.where(strict, cross_ab_ak[..., :size, :], zero)
  a_rb = jnp.where(inclusive, cross_ab_ak[..., size:, :], zero)
  a_ak = jnp.where(strict, cross_rb_rk[..., :size, :], zero)
  a_rk = jnp.where(inclusive, cross_rb_rk[..., size:, :], zero)

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
  w = _einsum("...ts,...sn->...tn", inverse, a_tilde)
  u0 = _einsum("...ts,...sn->...tn", inverse, _einsum("...ts,...sn->...tn", a_ak, v))
  q = r_tilde + _einsum("...ts,...sn->...tn", a_rb, w)
  y0 = _einsum("...ts,...sn->...tn", a_rb, u0) + _einsum("...ts,...sn->...tn", a_rk, v)
  baff = _einsum("...ti,...tj->...ij", u0, b_bar) + _einsum("...ti,...tj->...ij", v, k_bar)
  return ChunkTerms(q, y0, w, b_bar, gamma, baff)


def chunk_summary(terms: ChunkTerms):
  """The chunk as an affine map of its incoming state, S_end = S0 M + Baff: returns (M, Baff)."""
  m = _einsum("...ti,...tj->...ij", terms.w, terms.bbar)
  m = m + terms.gamma[..., :, None] * jnp.eye(m.shape[-1], dtype=m.dtype)
  return m, terms.baff


def combine_affine(first, second):
  """Compose affine state maps: applying (M1, B1) then (M2, B2) is (M1 M2, B1 M2 + B2).

  Associative, so `jax.lax.associative_scan(combine_affine, (M, B))` gives every prefix.
  """
  m1, b1 = first
  m2, b2 = second
  return (_einsum("...ij,...jk->...ik", m1, m2),
          _einsum("...ij,...jk->...ik", b1, m2) + b2)


def apply_affine(state, summary):
  """S -> S M + B."""
  m, b = summary
  return _einsum("...ij,...jk->...ik", state, m) + b


def advance_state(state, terms: ChunkTerms):
  """S_end = S0 diag(gamma) + (S0 W^T) Bbar + Baff, without forming M (2 C N^2 per chunk)."""
  s_w = _einsum("...ij,...tj->...it", state, terms.w)
  return (state * terms.gamma[..., None, :] + _einsum("...it,...tj->...ij", s_w, terms.bbar)
          + terms.baff)


def chunk_outputs(state, terms: ChunkTerms):
  """Y = Q S0^T + Y0 for the chunk entered with `state`."""
  return _einsum("...tj,...ij->...ti", terms.q, state) + terms.y0
