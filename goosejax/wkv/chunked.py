"""Chunked WKV-7: the chunk math of `pallas_kernels.chunk_math` on many chunks at once, chunks
combined sequentially or by associative scan.

Shape letters: B batch, T tokens, H heads, N head size, L chunks, C tokens per chunk,
G chunks per group.

Two ways across chunks, one custom VJP; both keep only one fp32 state per chunk for the
backward (O(T/C N^2) per head) and recompute the chunk terms there:

* "sequential": a `lax.scan` over groups of G chunks. Each step slices its group out of the
  [B,T,H,N] inputs, builds the group's chunk terms together and walks the state through
  its chunks; the backward is the reverse scan carrying dS, with the terms' VJP
  (`ChunkMath.terms_vjp`) inside. Memory beyond the per-chunk states is one group's temporaries.
  The forward can instead run the token recurrence (`intra="recurrent"`, faster than small
  matmuls on CPUs), keeping the state at chunk starts; the backward is the same.
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

from goosejax.wkv.reference import wkv7_step
from pallas_kernels.chunk_math import ChunkMath
from pallas_kernels.wkv_policy import CHUNK_SIZES

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


def reset_columns(reset_BT, size: int, dtype):
  """Per-chunk reset columns [L, B, 1, C, 1] (1 = zero the state before that token), the input
  of `ChunkMath.reset_masks`; the unit axis broadcasts over heads."""
  batch, length = reset_BT.shape
  reset_BLC = reset_BT.reshape(batch, length // size, size).astype(dtype)
  return jnp.transpose(reset_BLC, (1, 0, 2))[:, :, None, :, None]


def _group_at(x_BTHN, index, size: int, group: int):
  """Chunks [index * group, (index + 1) * group) of [B, T, H, N] as [G, B, H, C, N]."""
  batch, _, heads, head_size = x_BTHN.shape
  x_BSHN = jax.lax.dynamic_slice_in_dim(x_BTHN, index * size * group, size * group, axis=1)
  return jnp.transpose(x_BSHN.reshape(batch, group, size, heads, head_size), (1, 0, 3, 2, 4))


def _put_group(x_BTHN, x_GBHCN, index, size: int, group: int):
  x_BSHN = jnp.transpose(x_GBHCN, (1, 0, 3, 2, 4)).reshape(x_BTHN.shape[0], size * group,
                                                           *x_BTHN.shape[2:])
  return jax.lax.dynamic_update_slice_in_dim(x_BTHN, x_BSHN, index * size * group, axis=1)


def _group_resets(math, reset_BT, index, size: int, group: int):
  """The reset masks of a group of chunks (leading dims [G, B, 1]), or None without resets."""
  if reset_BT is None:
    return None
  reset_BS = jax.lax.dynamic_slice_in_dim(reset_BT, index * size * group, size * group, axis=1)
  return math.reset_masks(reset_columns(reset_BS, size, math.consts.tri_incl.dtype))


def _take(tree, index: int):
  return jax.tree.map(lambda x: x[index], tree)


def _recurrent_forward(size, inputs, reset_BT, state_BHNN):
  """Token recurrence, keeping the state at every chunk start: (y, final, states [L,B,H,N,N]).

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
    xs_CBHN = [jnp.swapaxes(jax.lax.dynamic_slice_in_dim(x, index * size, size, axis=1), 0, 1)
               for x in inputs]
    if reset_BT is None:
      reset_CB = jnp.zeros((size, batch), bool)
    else:
      reset_CB = jax.lax.dynamic_slice_in_dim(reset_BT, index * size, size, axis=1).T
    end, y_CBHN = jax.lax.scan(token, state, (reset_CB, *xs_CBHN))
    y_BTHN = jax.lax.dynamic_update_slice_in_dim(y_BTHN, jnp.swapaxes(y_CBHN, 0, 1),
                                                 index * size, axis=1)
    return (end, y_BTHN), state

  (final_BHNN, y_BTHN), states_LBHNN = jax.lax.scan(
      chunk, (state_BHNN, jnp.zeros_like(inputs[0])), jnp.arange(length // size))
  return y_BTHN, final_BHNN, states_LBHNN


def _chunk_math(inputs, size: int, reset_BT) -> ChunkMath:
  return ChunkMath.for_arrays(size, inputs[0].shape[-1], inputs[0].dtype, reset_BT is not None)


# ---------------------------------------------------------------- sequential across chunks


def _sequential_forward(size, group, inputs, reset_BT, state_BHNN):
  """Scan over groups of chunks: (y [B,T,H,N], final state, incoming state of every chunk).

  A group's chunk terms are built together (bigger ops, one loop step); the state then
  walks through the group's chunks one by one."""
  steps = inputs[0].shape[1] // (size * group)
  math = _chunk_math(inputs, size, reset_BT)

  def step(carry, index):
    state, y = carry
    terms = math.terms(*(_group_at(x, index, size, group) for x in inputs),
                       _group_resets(math, reset_BT, index, size, group))
    starts, removals = [], []
    for g in range(group):
      terms_g = _take(terms, g)
      u = math.removals(state, terms_g)
      starts.append(state)
      removals.append(u)
      state = math.end_state(state, u, terms_g)
    starts_GBHNN = jnp.stack(starts)
    y_GBHCN = math.outputs(starts_GBHNN, jnp.stack(removals), terms)
    return (state, _put_group(y, y_GBHCN, index, size, group)), starts_GBHNN

  (final_BHNN, y_BTHN), starts = jax.lax.scan(
      step, (state_BHNN, jnp.zeros_like(inputs[0])), jnp.arange(steps))
  return y_BTHN, final_BHNN, starts.reshape(-1, *starts.shape[2:])


def _sequential_backward(size, group, inputs, reset_BT, states_LBHNN, d_y_BTHN, d_final_BHNN):
  """Reverse scan over groups carrying dS; the chunk terms are recomputed with their VJP."""
  steps = inputs[0].shape[1] // (size * group)
  states = states_LBHNN.reshape(steps, group, *states_LBHNN.shape[1:])
  math = _chunk_math(inputs, size, reset_BT)

  def step(carry, xs):
    d_end, d_inputs = carry
    index, starts_GBHNN = xs
    terms, pull_back = math.terms_vjp([_group_at(x, index, size, group) for x in inputs],
                                      _group_resets(math, reset_BT, index, size, group))
    d_y = _group_at(d_y_BTHN, index, size, group)
    u_from_outputs, state_from_outputs = math.output_cotangents(terms, d_y)
    d_ends, d_removals = [None] * group, [None] * group
    for g in reversed(range(group)):
      terms_g = _take(terms, g)
      d_ends[g] = d_end
      d_removals[g] = math.removal_cotangent(u_from_outputs[g], terms_g, d_end)
      d_end = math.start_cotangent(state_from_outputs[g], terms_g, d_end, d_removals[g])
    d_terms = math.term_cotangents(starts_GBHNN, math.removals(starts_GBHNN, terms), terms, d_y,
                                   jnp.stack(d_removals), jnp.stack(d_ends))
    d_group = pull_back(d_terms)
    d_inputs = tuple(_put_group(d, dg, index, size, group) for d, dg in zip(d_inputs, d_group))
    return (d_end, d_inputs), None

  zeros = tuple(jnp.zeros_like(x) for x in inputs)
  (d_initial, d_inputs), _ = jax.lax.scan(step, (d_final_BHNN, zeros),
                                          (jnp.arange(steps), states), reverse=True)
  return d_inputs, d_initial


# --------------------------------------------------------------- associative across chunks


def _all_resets(math, reset_BT, size: int):
  if reset_BT is None:
    return None
  return math.reset_masks(reset_columns(reset_BT, size, math.consts.tri_incl.dtype))


def associative_forward(size, inputs, reset_BT, enter):
  """All chunks at once, incoming states by associative scan of the affine chunk maps:
  (y [B,T,H,N], end state, incoming state of every chunk [L,B,H,N,N]).

  enter(math, (M, B)) -> the incoming state [B,H,N,N], given the map S -> S M + B of all the
  chunks: the initial state itself on one device; on a span of a sequence split over devices,
  the scan of the spans' maps (goosejax.wkv.sequence_parallel)."""
  math = _chunk_math(inputs, size, reset_BT)
  terms = math.terms(*(to_chunks(x, size) for x in inputs), _all_resets(math, reset_BT, size))
  prefix = jax.lax.associative_scan(math.combine_affine, math.summary(terms))
  state_BHNN = enter(math, jax.tree.map(lambda x: x[-1], prefix))
  after_LBHNN = math.apply_affine(state_BHNN[None], prefix)
  starts_LBHNN = jnp.concatenate([state_BHNN[None], after_LBHNN[:-1]], axis=0)
  y_LBHCN = math.outputs(starts_LBHNN, math.removals(starts_LBHNN, terms), terms)
  return from_chunks(y_LBHCN), after_LBHNN[-1], starts_LBHNN


def associative_backward(size, inputs, reset_BT, starts_LBHNN, d_y_BTHN, leave):
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
  m_LBHNN, _ = math.summary(terms)
  suffix = jax.lax.associative_scan(math.combine_affine,
                                    (jnp.swapaxes(m_LBHNN, -1, -2), from_outputs), reverse=True)
  d_end_BHNN = leave(math, jax.tree.map(lambda x: x[0], suffix))
  d_starts = math.apply_affine(d_end_BHNN[None], suffix)
  d_ends = jnp.concatenate([d_starts[1:], d_end_BHNN[None]], axis=0)
  d_terms = math.term_cotangents(starts_LBHNN, math.removals(starts_LBHNN, terms), terms, d_y,
                                 math.removal_cotangent(u_from_outputs, terms, d_ends), d_ends)
  d_inputs = tuple(from_chunks(d) for d in pull_back(d_terms))
  return d_inputs, d_starts[0]


# ------------------------------------------------------------------------- custom VJP core


def _forward(config, inputs, reset_BT, state_BHNN):
  mode, intra, size, group = config
  if mode == "associative":
    return associative_forward(size, inputs, reset_BT, lambda math, span_map: state_BHNN)
  if intra == "recurrent":
    return _recurrent_forward(size, inputs, reset_BT, state_BHNN)
  return _sequential_forward(size, group, inputs, reset_BT, state_BHNN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def wkv7_chunks(config, inputs, reset_BT, state_BHNN):
  """WKV-7 with T a multiple of chunk size x group.

  config: (mode, intra, chunk size, group), see `wkv7_chunked`; inputs: (r, log_w, k, v, a, b),
  each [B, T, H, N] in one float dtype; reset_BT: None or bool [B, T]; state: [B, H, N, N].
  Returns (y [B, T, H, N], final state [B, H, N, N])."""
  y_BTHN, final_BHNN, _ = _forward(config, inputs, reset_BT, state_BHNN)
  return y_BTHN, final_BHNN


def _wkv7_chunks_fwd(config, inputs, reset_BT, state_BHNN):
  y_BTHN, final_BHNN, starts_LBHNN = _forward(config, inputs, reset_BT, state_BHNN)
  return (y_BTHN, final_BHNN), (inputs, reset_BT, starts_LBHNN)


def _wkv7_chunks_bwd(config, residuals, cotangents):
  mode, _, size, group = config  # the backward is the matmul form whichever way the forward went
  inputs, reset_BT, starts_LBHNN = residuals
  d_y_BTHN, d_final_BHNN = cotangents
  if mode == "associative":
    d_inputs, d_initial = associative_backward(size, inputs, reset_BT, starts_LBHNN, d_y_BTHN,
                                               lambda math, span_map: d_final_BHNN)
  else:
    d_inputs, d_initial = _sequential_backward(size, group, inputs, reset_BT, starts_LBHNN,
                                               d_y_BTHN, d_final_BHNN)
  return tuple(d_inputs), None, d_initial


wkv7_chunks.defvjp(_wkv7_chunks_fwd, _wkv7_chunks_bwd)


def wkv7_chunked(r, log_w, k, v, a, b, state_BHNN, *, reset=None, chunk_size: int = 64,
                 mode: str = "sequential", intra: str = "matmul", group: int = 1,
                 dtype=jnp.float32):
  """WKV-7 over [B, T, H, N] inputs in chunks; any T (padded with identity steps).

  mode: "sequential" (lax.scan over chunks) or "associative" (lax.associative_scan).
  intra: how the sequential forward crosses a chunk, "matmul" or "recurrent" (token steps).
  group: chunks per step of the sequential scans (their chunk terms are built together).
  Computes in `dtype` (fp32 or float64); returns (y [B, T, H, N] in dtype, final state)."""
  if chunk_size not in CHUNK_SIZES:
    raise ValueError(f"wkv7 chunked: chunk_size={chunk_size}, expected one of {CHUNK_SIZES}")
  if mode not in MODES:
    raise ValueError(f"wkv7 chunked: mode={mode!r}, expected one of {MODES}")
  if intra not in INTRA:
    raise ValueError(f"wkv7 chunked: intra={intra!r}, expected one of {INTRA}")
  if not (isinstance(group, int) and group >= 1):
    raise ValueError(f"wkv7 chunked: group={group!r}, expected a positive int")
  length = r.shape[1]
  chunks = -(-length // chunk_size)
  group = 1 if mode == "associative" else min(group, chunks)
  padding = -length % (chunk_size * group)

  def prepare(x):
    # zeros are identity steps: log_w = 0 keeps the state, zero k, v, a, b add nothing
    x = x.astype(dtype)
    return jnp.pad(x, ((0, 0), (0, padding), (0, 0), (0, 0))) if padding else x
  inputs = tuple(prepare(x) for x in (r, log_w, k, v, a, b))
  reset_BT = None if reset is None else jnp.pad(reset.astype(bool), ((0, 0), (0, padding)))
  y_BTHN, final_BHNN = wkv7_chunks((mode, intra, chunk_size, group), inputs, reset_BT,
                                   state_BHNN.astype(dtype))
  return y_BTHN[:, :length], final_BHNN
