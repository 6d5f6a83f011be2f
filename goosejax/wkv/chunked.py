"""Chunked WKV-7: intra-chunk matmul form, chunks combined sequentially or by associative scan.

Shape letters: B batch, T tokens, H heads, N head size, L chunks, C tokens per chunk.

Two ways across chunks, one custom VJP each; both keep only one fp32 state per chunk for
the backward (O(T/C N^2) per head) and recompute the chunk terms there:

* "sequential": a `lax.scan` over chunks. Each step slices its chunk out of the [B,T,H,N]
  inputs, builds the chunk terms and advances the state; the backward is the reverse scan
  carrying dS, with `jax.vjp` of the chunk terms inside. Memory beyond the per-chunk states
  is one chunk's temporaries. The forward inside a chunk can also be the token recurrence
  (`intra="recurrent"`), which is faster than small matmuls on CPUs; the backward is the
  same either way.
* "associative": every chunk's terms at once, the incoming states from
  `lax.associative_scan` over the chunks' affine maps S -> S M + B (log depth), all outputs
  in parallel; the backward runs the reversed affine recurrence of the state cotangent,
  dS0_c = dY_c^T Q_c + dS_end_c M_c^T, as a reverse associative scan. This is the form that
  splits one sequence across devices.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from goosejax.wkv.chunk_math import (ChunkTerms, apply_affine, chunk_backward, chunk_forward,
                                     chunk_summary, chunk_terms, combine_affine,
                                     output_cotangent_to_state)
from goosejax.wkv.reference import wkv7_step

CHUNK_SIZES = (16, 32, 64)
MODES = ("sequential", "associative")
INTRA = ("matmul", "recurrent")


def to_chunks(x_BTHN, size: int):
  """[B, T, H, N] (T a multiple of size) -> [L, B, H, C, N]."""
  batch, length, heads, head_size = x_BTHN.shape
  x_BLCHN = x_BTHN.reshape(batch, length // size, size, heads, head_size)
  return jnp.transpose(x_BLCHN, (1, 0, 3, 2, 4))


def from_chunks(x_LBHCN):
  """[L, B, H, C, N] -> [B, L*C, H, N]."""
  chunks, batch, heads, size, head_size = x_LBHCN.shape
  return jnp.transpose(x_LBHCN, (1, 0, 3, 2, 4)).reshape(batch, chunks * size, heads, head_size)


def segments(reset_BT, size: int):
  """Within-chunk reset counts [L, B, 1, C] (int32), the masks' input for `chunk_terms`."""
  batch, length = reset_BT.shape
  count_BLC = jnp.cumsum(reset_BT.reshape(batch, length // size, size).astype(jnp.int32), axis=-1)
  return jnp.transpose(count_BLC, (1, 0, 2))[:, :, None, :]


def _chunk_at(x_BTHN, index, size: int):
  """Chunk `index` of [B, T, H, N] as [B, H, C, N]."""
  return jnp.swapaxes(jax.lax.dynamic_slice_in_dim(x_BTHN, index * size, size, axis=1), 1, 2)


def _put_chunk(x_BTHN, chunk_BHCN, index, size: int):
  return jax.lax.dynamic_update_slice_in_dim(x_BTHN, jnp.swapaxes(chunk_BHCN, 1, 2),
                                             index * size, axis=1)


def _segment_at(reset_BT, index, size: int):
  """Within-chunk reset counts of chunk `index` as [B, 1, C], or None without resets."""
  if reset_BT is None:
    return None
  reset_BC = jax.lax.dynamic_slice_in_dim(reset_BT, index * size, size, axis=1)
  return jnp.cumsum(reset_BC.astype(jnp.int32), axis=-1)[:, None, :]


def _recurrent_chunk(state_BHNN, inputs_BHCN, reset_BT, index, size: int):
  """The chunk by token recurrence: (y [B, H, C, N], state after the chunk)."""
  r, log_w, k, v, a, b = (jnp.moveaxis(x, 2, 0) for x in inputs_BHCN)
  if reset_BT is None:
    reset_CB = jnp.zeros((size, r.shape[1]), bool)
  else:
    reset_CB = jax.lax.dynamic_slice_in_dim(reset_BT, index * size, size, axis=1).T

  def step(state, xs):
    reset_B, *token = xs
    state = jnp.where(reset_B[:, None, None, None], 0, state)
    r_t, log_w_t, k_t, v_t, a_t, b_t = token
    y_t, state = wkv7_step(state, r_t, jnp.exp(log_w_t), k_t, v_t, a_t, b_t)
    return state, y_t
  end_BHNN, y_CBHN = jax.lax.scan(step, state_BHNN, (reset_CB, r, log_w, k, v, a, b))
  return jnp.moveaxis(y_CBHN, 0, 2), end_BHNN


# ---------------------------------------------------------------- sequential across chunks


def _sequential_forward(intra, size, inputs, reset_BT, state_BHNN):
  """Scan over chunks: (y [B,T,H,N], final state, incoming state of every chunk)."""
  chunks = inputs[0].shape[1] // size

  def step(carry, index):
    state, y = carry
    chunk = [_chunk_at(x, index, size) for x in inputs]
    if intra == "recurrent":
      y_chunk, end = _recurrent_chunk(state, chunk, reset_BT, index, size)
    else:
      y_chunk, end = chunk_forward(state, chunk_terms(*chunk, _segment_at(reset_BT, index, size)))
    return (end, _put_chunk(y, y_chunk, index, size)), state

  (final_BHNN, y_BTHN), states_LBHNN = jax.lax.scan(
      step, (state_BHNN, jnp.zeros_like(inputs[0])), jnp.arange(chunks))
  return y_BTHN, final_BHNN, states_LBHNN


def _sequential_backward(size, inputs, reset_BT, states_LBHNN, d_y_BTHN, d_final_BHNN):
  """Reverse scan over chunks carrying dS; the chunk terms are recomputed under jax.vjp."""
  chunks = inputs[0].shape[1] // size

  def step(carry, xs):
    d_end, d_inputs = carry
    index, state = xs
    segment = _segment_at(reset_BT, index, size)
    terms, pull_back = jax.vjp(lambda *x: chunk_terms(*x, segment),
                               *[_chunk_at(x, index, size) for x in inputs])
    d_terms, d_start = chunk_backward(state, terms, _chunk_at(d_y_BTHN, index, size), d_end)
    d_chunk = pull_back(d_terms)
    d_inputs = tuple(_put_chunk(d, dc, index, size) for d, dc in zip(d_inputs, d_chunk))
    return (d_start, d_inputs), None

  zeros = tuple(jnp.zeros_like(x) for x in inputs)
  (d_initial, d_inputs), _ = jax.lax.scan(step, (d_final_BHNN, zeros),
                                          (jnp.arange(chunks), states_LBHNN), reverse=True)
  return d_inputs, d_initial


# --------------------------------------------------------------- associative across chunks


def _associative_forward(size, inputs, reset_BT, state_BHNN):
  """All chunks at once, incoming states by associative scan of the affine chunk maps."""
  segment = None if reset_BT is None else segments(reset_BT, size)
  terms = chunk_terms(*(to_chunks(x, size) for x in inputs), segment)
  prefix_m, prefix_b = jax.lax.associative_scan(combine_affine, chunk_summary(terms))
  after_LBHNN = apply_affine(state_BHNN[None], (prefix_m, prefix_b))
  states_LBHNN = jnp.concatenate([state_BHNN[None], after_LBHNN[:-1]], axis=0)
  y_LBHCN, _ = chunk_forward(states_LBHNN, terms)
  return from_chunks(y_LBHCN), after_LBHNN[-1], states_LBHNN


def _associative_backward(size, inputs, reset_BT, states_LBHNN, d_y_BTHN, d_final_BHNN):
  segment = None if reset_BT is None else segments(reset_BT, size)
  terms, pull_back = jax.vjp(lambda *x: chunk_terms(*x, segment),
                             *(to_chunks(x, size) for x in inputs))
  d_y_LBHCN = to_chunks(d_y_BTHN, size)
  # dS0_c = G_c + dS_end_c M_c^T: suffix compositions of the maps x -> x M_c^T + G_c.
  m_LBHNN, _ = chunk_summary(terms)
  maps = (jnp.swapaxes(m_LBHNN, -1, -2), output_cotangent_to_state(terms, d_y_LBHCN))
  suffix = jax.lax.associative_scan(combine_affine, maps, reverse=True)
  d_starts_LBHNN = apply_affine(d_final_BHNN[None], suffix)
  d_ends_LBHNN = jnp.concatenate([d_starts_LBHNN[1:], d_final_BHNN[None]], axis=0)
  d_terms, _ = chunk_backward(states_LBHNN, terms, d_y_LBHCN, d_ends_LBHNN)
  d_inputs = tuple(from_chunks(d) for d in pull_back(d_terms))
  return d_inputs, d_starts_LBHNN[0]


# ------------------------------------------------------------------------- custom VJP core


def _forward(mode, intra, size, inputs, reset_BT, state_BHNN):
  if mode == "associative":
    return _associative_forward(size, inputs, reset_BT, state_BHNN)
  return _sequential_forward(intra, size, inputs, reset_BT, state_BHNN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def wkv7_chunks(mode: str, intra: str, size: int, inputs, reset_BT, state_BHNN):
  """WKV-7 with T a multiple of `size`. inputs: (r, log_w, k, v, a, b), each [B, T, H, N] in
  one float dtype; reset_BT: None or bool [B, T]; state: [B, H, N, N].
  Returns (y [B, T, H, N], final state [B, H, N, N])."""
  y_BTHN, final_BHNN, _ = _forward(mode, intra, size, inputs, reset_BT, state_BHNN)
  return y_BTHN, final_BHNN


def _wkv7_chunks_fwd(mode, intra, size, inputs, reset_BT, state_BHNN):
  y_BTHN, final_BHNN, states_LBHNN = _forward(mode, intra, size, inputs, reset_BT, state_BHNN)
  return (y_BTHN, final_BHNN), (inputs, reset_BT, states_LBHNN)


def _wkv7_chunks_bwd(mode, intra, size, residuals, cotangents):
  del intra  # the backward is the matmul form whichever way the forward went
  inputs, reset_BT, states_LBHNN = residuals
  d_y_BTHN, d_final_BHNN = cotangents
  backward = _associative_backward if mode == "associative" else _sequential_backward
  d_inputs, d_initial = backward(size, inputs, reset_BT, states_LBHNN, d_y_BTHN, d_final_BHNN)
  return tuple(d_inputs), None, d_initial


wkv7_chunks.defvjp(_wkv7_chunks_fwd, _wkv7_chunks_bwd)


def wkv7_chunked(r, log_w, k, v, a, b, state_BHNN, *, reset=None, chunk_size: int = 64,
                 mode: str = "sequential", intra: str = "matmul", dtype=jnp.float32):
  """WKV-7 over [B, T, H, N] inputs in chunks; any T (padded with identity steps).

  Computes in `dtype` (fp32 or float64); returns (y [B, T, H, N] in dtype, final state)."""
  if chunk_size not in CHUNK_SIZES:
    raise ValueError(f"wkv7 chunked: chunk_size={chunk_size}, expected one of {CHUNK_SIZES}")
  if mode not in MODES:
    raise ValueError(f"wkv7 chunked: mode={mode!r}, expected one of {MODES}")
  if intra not in INTRA:
    raise ValueError(f"wkv7 chunked: intra={intra!r}, expected one of {INTRA}")
  length = r.shape[1]
  padding = -length % chunk_size

  def prepare(x):
    # zeros are identity steps: log_w = 0 keeps the state, zero k, v, a, b add nothing
    return jnp.pad(x.astype(dtype), ((0, 0), (0, padding), (0, 0), (0, 0))) if padding else x.astype(dtype)
  inputs = tuple(prepare(x) for x in (r, log_w, k, v, a, b))
  reset_BT = None if reset is None else jnp.pad(reset.astype(bool), ((0, 0), (0, padding)))
  y_BTHN, final_BHNN = wkv7_chunks(mode, intra, chunk_size, inputs, reset_BT,
                                   state_BHNN.astype(dtype))
  return y_BTHN[:, :length], final_BHNN
