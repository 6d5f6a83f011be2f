"""Chunked WKV-7: the chunk math of `pallas_kernels.chunk_math` on many chunks at once, chunks
combined sequentially or by associative scan.

Shape letters: B batch, T tokens, H heads, N head size, J chunks, Q tokens per chunk.

Two ways across chunks, one custom VJP; both keep only one fp32 state per chunk for the
backward (O(T/Q N^2) per head) and recompute the chunk terms there:

* "sequential": a `lax.scan` over chunks. Each step slices its chunk out of the [B,T,H,N]
  inputs, builds the chunk's terms and walks the state through it; the backward is the
  reverse scan carrying dS, with the terms' VJP (`ChunkMath.terms_vjp`) inside. Memory beyond
  the per-chunk states is one chunk's temporaries. The forward can instead run the token
  recurrence (`intra="recurrent"`, faster than small matmuls on CPUs), keeping the state at
  chunk starts; the backward is the same.
* "associative": every chunk's terms at once, the incoming states from
  `lax.associative_scan` over the chunks' affine maps S -> S M + B (log depth), all outputs
  in parallel; the backward runs the reversed affine recurrence of the state cotangent,
  dS0_c = G_c + dS_end_c M_c^T, as a reverse associative scan. This is the form that
  splits one sequence across devices.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from goosejax.wkv.reference import wkv7_step
from pallas_kernels.chunk_math import ChunkMath
from pallas_kernels.wkv_policy import CHECKPOINT_NAME, CHUNK_SIZES

MODES = ("sequential", "associative")
INTRA = ("matmul", "recurrent")


def to_chunks(x_BTHN, size: int):
  """[B, T, H, N] (T a multiple of size) -> [J, B, H, Q, N]."""
  batch, length, heads, head_size = x_BTHN.shape
  x_BJQHN = x_BTHN.reshape(batch, length // size, size, heads, head_size)
  return jnp.transpose(x_BJQHN, (1, 0, 3, 2, 4))


def from_chunks(x_JBHQN):
  """[J, B, H, Q, N] -> [B, J*Q, H, N]."""
  chunks, batch, heads, size, head_size = x_JBHQN.shape
  return jnp.transpose(x_JBHQN, (1, 0, 3, 2, 4)).reshape(batch, chunks * size, heads, head_size)


def reset_columns(reset_BT, size: int, dtype):
  """Per-chunk reset columns [J, B, 1, Q, 1] (1 = zero the state before that token), the input
  of `ChunkMath.reset_masks`; the unit axis broadcasts over heads."""
  batch, length = reset_BT.shape
  reset_BJQ = reset_BT.reshape(batch, length // size, size).astype(dtype)
  return jnp.transpose(reset_BJQ, (1, 0, 2))[:, :, None, :, None]


def _chunk_at(x_BTHN, index, size: int):
  """Chunk `index` of [B, T, H, N] as [B, H, Q, N]."""
  x_BQHN = jax.lax.dynamic_slice_in_dim(x_BTHN, index * size, size, axis=1)
  return jnp.swapaxes(x_BQHN, 1, 2)


def _put_chunk(x_BTHN, x_BHQN, index, size: int):
  return jax.lax.dynamic_update_slice_in_dim(x_BTHN, jnp.swapaxes(x_BHQN, 1, 2), index * size,
                                             axis=1)


def _chunk_resets(math, reset_BT, index, size: int):
  """The reset masks of chunk `index` (leading dims [B, 1]), or None without resets."""
  if reset_BT is None:
    return None
  reset_BQ = jax.lax.dynamic_slice_in_dim(reset_BT, index * size, size, axis=1)
  return math.reset_masks(reset_columns(reset_BQ, size, math.consts.tri_incl.dtype)[0])


def _recurrent_forward(size, inputs, reset_BT, state_BHNN):
  """Token recurrence, keeping the state at every chunk start: (y, final, states [J,B,H,N,N]).

  An outer scan over chunks slices each chunk out of the [B,T,H,N] inputs (no time-major copy
  of whole inputs), an inner scan steps through its tokens."""
  batch, length = inputs[0].shape[:2]

  def token(state, xs):
    reset_B, r, log_w, k, v, a, b = xs
    state = jnp.where(reset_B[:, None, None, None], 0, state)
    y, state = wkv7_step(state, r, jnp.exp(log_w), k, v, a, b)
    return state, y

  def chunk(carry, index):
    state, y_BTHN = carry
    xs_QBHN = [jnp.swapaxes(jax.lax.dynamic_slice_in_dim(x, index * size, size, axis=1), 0, 1)
               for x in inputs]
    if reset_BT is None:
      reset_QB = jnp.zeros((size, batch), bool)
    else:
      reset_QB = jax.lax.dynamic_slice_in_dim(reset_BT, index * size, size, axis=1).T
    end, y_QBHN = jax.lax.scan(token, state, (reset_QB, *xs_QBHN))
    y_BTHN = jax.lax.dynamic_update_slice_in_dim(y_BTHN, jnp.swapaxes(y_QBHN, 0, 1),
                                                 index * size, axis=1)
    return (end, y_BTHN), state

  (final_BHNN, y_BTHN), states_JBHNN = jax.lax.scan(
      chunk, (state_BHNN, jnp.zeros_like(inputs[0])), jnp.arange(length // size))
  return y_BTHN, final_BHNN, states_JBHNN


def _chunk_math(inputs, size: int, reset_BT) -> ChunkMath:
  return ChunkMath.for_arrays(size, inputs[0].shape[-1], inputs[0].dtype, reset_BT is not None)


# ---------------------------------------------------------------- sequential across chunks


def _sequential_forward(size, inputs, reset_BT, state_BHNN):
  """Scan over chunks: (y [B,T,H,N], final state, incoming state of every chunk [J,B,H,N,N])."""
  chunks = inputs[0].shape[1] // size
  math = _chunk_math(inputs, size, reset_BT)

  def step(carry, index):
    state_BHNN, y_BTHN = carry
    terms = math.terms(*(_chunk_at(x, index, size) for x in inputs),
                       _chunk_resets(math, reset_BT, index, size))
    u = math.removals(state_BHNN, terms)
    y_BHQN = math.outputs(state_BHNN, u, terms)
    end_BHNN = math.end_state(state_BHNN, u, terms)
    return (end_BHNN, _put_chunk(y_BTHN, y_BHQN, index, size)), state_BHNN

  (final_BHNN, y_BTHN), starts_JBHNN = jax.lax.scan(
      step, (state_BHNN, jnp.zeros_like(inputs[0])), jnp.arange(chunks))
  return y_BTHN, final_BHNN, starts_JBHNN


def _sequential_backward(size, inputs, reset_BT, starts_JBHNN, d_y_BTHN, d_final_BHNN):
  """Reverse scan over chunks carrying dS; the chunk terms are recomputed with their VJP."""
  chunks = inputs[0].shape[1] // size
  math = _chunk_math(inputs, size, reset_BT)

  def step(carry, xs):
    d_end, d_inputs = carry
    index, start_BHNN = xs
    terms, pull_back = math.terms_vjp([_chunk_at(x, index, size) for x in inputs],
                                      _chunk_resets(math, reset_BT, index, size))
    d_y = _chunk_at(d_y_BTHN, index, size)
    u_from_outputs, state_from_outputs = math.output_cotangents(terms, d_y)
    d_u = math.removal_cotangent(u_from_outputs, terms, d_end)
    d_start = math.start_cotangent(state_from_outputs, terms, d_end, d_u)
    d_terms = math.term_cotangents(start_BHNN, math.removals(start_BHNN, terms), terms, d_y, d_u,
                                   d_end)
    d_chunk = pull_back(d_terms)
    d_inputs = tuple(_put_chunk(d, dc, index, size) for d, dc in zip(d_inputs, d_chunk))
    return (d_start, d_inputs), None

  zeros = tuple(jnp.zeros_like(x) for x in inputs)
  (d_initial, d_inputs), _ = jax.lax.scan(step, (d_final_BHNN, zeros),
                                          (jnp.arange(chunks), starts_JBHNN), reverse=True)
  return d_inputs, d_initial


# --------------------------------------------------------------- associative across chunks


def _all_resets(math, reset_BT, size: int):
  if reset_BT is None:
    return None
  return math.reset_masks(reset_columns(reset_BT, size, math.consts.tri_incl.dtype))


def associative_forward(size, inputs, reset_BT, enter):
  """All chunks at once, incoming states by associative scan of the affine chunk maps:
  (y [B,T,H,N], end state, incoming state of every chunk [J,B,H,N,N]).

  enter(math, (M, B)) -> the incoming state [B,H,N,N], given the map S -> S M + B of all the
  chunks: the initial state itself on one device; on a span of a sequence split over devices,
  the scan of the spans' maps (goosejax.wkv.sequence_parallel)."""
  math = _chunk_math(inputs, size, reset_BT)
  terms = math.terms(*(to_chunks(x, size) for x in inputs), _all_resets(math, reset_BT, size))
  prefix = jax.lax.associative_scan(math.combine_affine, math.summary(terms))
  state_BHNN = enter(math, jax.tree.map(lambda x: x[-1], prefix))
  after_JBHNN = math.apply_affine(state_BHNN[None], prefix)
  starts_JBHNN = jnp.concatenate([state_BHNN[None], after_JBHNN[:-1]], axis=0)
  y_JBHQN = math.outputs(starts_JBHNN, math.removals(starts_JBHNN, terms), terms)
  return from_chunks(y_JBHQN), after_JBHNN[-1], starts_JBHNN


def associative_backward(size, inputs, reset_BT, starts_JBHNN, d_y_BTHN, leave):
  """(input cotangents, cotangent of the incoming state) by the reverse associative scan.

  leave(math, (M^T, G)) -> the cotangent of the end state, given the map dS_end -> dS0 =
  dS_end M^T + G of all the chunks: the final state's cotangent on one device."""
  math = _chunk_math(inputs, size, reset_BT)
  terms, pull_back = math.terms_vjp([to_chunks(x, size) for x in inputs],
                                    _all_resets(math, reset_BT, size))
  d_y = to_chunks(d_y_BTHN, size)
  u_from_outputs, state_from_outputs = math.output_cotangents(terms, d_y)
  # dS0_c = G_c + dS_end_c M_c^T, G_c its part without dS_end: suffix compositions of the
  # maps x -> x M_c^T + G_c.
  from_outputs = math.start_cotangent(state_from_outputs, terms,
                                      jnp.zeros_like(state_from_outputs), u_from_outputs)
  m_JBHNN, _ = math.summary(terms)
  suffix = jax.lax.associative_scan(math.combine_affine,
                                    (jnp.swapaxes(m_JBHNN, -1, -2), from_outputs), reverse=True)
  d_end_BHNN = leave(math, jax.tree.map(lambda x: x[0], suffix))
  d_starts = math.apply_affine(d_end_BHNN[None], suffix)
  d_ends = jnp.concatenate([d_starts[1:], d_end_BHNN[None]], axis=0)
  d_terms = math.term_cotangents(starts_JBHNN, math.removals(starts_JBHNN, terms), terms, d_y,
                                 math.removal_cotangent(u_from_outputs, terms, d_ends), d_ends)
  d_inputs = tuple(from_chunks(d) for d in pull_back(d_terms))
  return d_inputs, d_starts[0]


# ------------------------------------------------------------------------- custom VJP core


def _forward(config, inputs, reset_BT, state_BHNN):
  mode, intra, size = config
  if mode == "associative":
    return associative_forward(size, inputs, reset_BT, lambda math, span_map: state_BHNN)
  if intra == "recurrent":
    return _recurrent_forward(size, inputs, reset_BT, state_BHNN)
  return _sequential_forward(size, inputs, reset_BT, state_BHNN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def wkv7_chunks(config, inputs, reset_BT, state_BHNN):
  """WKV-7 with T a multiple of the chunk size.

  config: (mode, intra, chunk size), see `wkv7_chunked`; inputs: (r, log_w, k, v, a, b),
  each [B, T, H, N] in one float dtype; reset_BT: None or bool [B, T]; state: [B, H, N, N].
  Returns (y [B, T, H, N], final state [B, H, N, N])."""
  y_BTHN, final_BHNN, _ = _forward(config, inputs, reset_BT, state_BHNN)
  return y_BTHN, final_BHNN


def _wkv7_chunks_fwd(config, inputs, reset_BT, state_BHNN):
  y_BTHN, final_BHNN, starts_JBHNN = _forward(config, inputs, reset_BT, state_BHNN)
  starts_JBHNN = checkpoint_name(starts_JBHNN, CHECKPOINT_NAME)
  return (y_BTHN, final_BHNN), (inputs, reset_BT, starts_JBHNN)


def _wkv7_chunks_bwd(config, residuals, cotangents):
  mode, _, size = config  # the backward is the matmul form whichever way the forward went
  inputs, reset_BT, starts_JBHNN = residuals
  d_y_BTHN, d_final_BHNN = cotangents
  if mode == "associative":
    d_inputs, d_initial = associative_backward(size, inputs, reset_BT, starts_JBHNN, d_y_BTHN,
                                               lambda math, span_map: d_final_BHNN)
  else:
    d_inputs, d_initial = _sequential_backward(size, inputs, reset_BT, starts_JBHNN,
                                               d_y_BTHN, d_final_BHNN)
  return tuple(d_inputs), None, d_initial


wkv7_chunks.defvjp(_wkv7_chunks_fwd, _wkv7_chunks_bwd)


def wkv7_chunked(r, log_w, k, v, a, b, state_BHNN, *, reset=None, chunk_size: int = 64,
                 mode: str = "sequential", intra: str = "matmul", dtype=jnp.float32):
  """WKV-7 over [B, T, H, N] inputs in chunks; any T (padded with identity steps).

  mode: "sequential" (lax.scan over chunks) or "associative" (lax.associative_scan).
  intra: how the sequential forward crosses a chunk, "matmul" or "recurrent" (token steps).
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
    x = x.astype(dtype)
    return jnp.pad(x, ((0, 0), (0, padding), (0, 0), (0, 0))) if padding else x
  inputs = tuple(prepare(x) for x in (r, log_w, k, v, a, b))
  reset_BT = None if reset is None else jnp.pad(reset.astype(bool), ((0, 0), (0, padding)))
  y_BTHN, final_BHNN = wkv7_chunks((mode, intra, chunk_size), inputs, reset_BT,
                                   state_BHNN.astype(dtype))
  return y_BTHN[:, :length], final_BHNN
