"""WKV-7 with one sequence split over the `sequence` mesh axis (goosejax.sharding).

Shape letters: B batch, T tokens, S tokens of one span (T / spans), H heads, N head size,
J chunks of one span, Q tokens per chunk; an axis of spans is named in words
(`ends_by_span`).

A span's chunks map its incoming state affinely, S -> S M + B (`ChunkMath.summary`), so the
span does not need its incoming state to summarise itself. Per span and WKV call:

  forward   chunked.py's associative form on the span: chunk terms and the associative scan
            of the chunk maps; the scan of the span maps across devices (`scan_spans`:
            log2(spans) ppermutes of the two [B, H, N, N] matrices M, B) applied to the initial
            state gives the span's incoming state; then all chunk starts and outputs at once.
  backward  the same reversed: the reverse scan of the chunks' cotangent maps
            dS0 = G + dS_end M^T, the reverse scan of the span maps across devices gives the
            cotangent of the span's end state, then every chunk's cotangents at once.

Both directions are log-depth in the number of spans and every device holds only its own span (plus one
N x N state per chunk kept for the backward). Resets anywhere, including at a span's first
token, are masks inside the chunk maps. A span whose length is not a multiple of the chunk
size is padded at its end with identity steps.

`wkv7_sequence_parallel_kernel` runs each span with a single-device kernel instead (the Pallas
kernels on TPU and CUDA, which take an incoming state but produce no summaries): a span's end
state and outputs are affine in its incoming state S,

  end = S M + B        y_t = y0_t + S y1_t

so one kernel call over the rows doubled, half from state 0 and half from state I with v = 0,
gives (y0, B) and (y1, M). The scan of (M, B) across spans gives S; the rest is one [S, N] x
[N, N] product per row and head. About twice a kernel call's work, both directions (the
backward is autodiff through the kernel's own VJP, the permutes and the products).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from goosejax import sharding
from goosejax.errors import GoosejaxError
from goosejax.sharding import SEQUENCE_AXIS, from_neighbour, scan_spans
from goosejax.wkv.chunked import associative_backward, associative_forward
from pallas_kernels.chunk_math import ChunkMath
from pallas_kernels.wkv_policy import CHECKPOINT_NAME, CHUNK_SIZES


class SequenceSplitError(GoosejaxError):
  """A sequence that cannot be split over the `sequence` mesh axis as asked."""


class _Layout(NamedTuple):
  """Static facts of one call: the mesh and how [B, T, H, N] inputs lie on it."""
  mesh: object        # jax.sharding.Mesh or AbstractMesh with a `sequence` axis
  chunk_size: int
  x_spec: P           # [B, T, H, N]: rows, spans, heads
  state_spec: P       # [B, H, N, N]
  per_span_spec: P    # [spans * k, B, H, N, N]: k per-span states stacked along the spans


def _layout(mesh, shape, chunk_size: int) -> _Layout:
  """The layout of [B, T, H, N] inputs on `mesh`; SequenceSplitError if T does not split."""
  batch, length, heads, head_size = shape
  spans = dict(mesh.shape).get(SEQUENCE_AXIS, 1)
  if length % spans:
    raise SequenceSplitError(f"wkv7 sequence parallel: T={length} tokens do not split into "
                             f"mesh.sequence={spans} equal spans; expected T divisible by {spans}")
  rows, heads = sharding.logical_spec(("batch", "heads"), (batch, heads), mesh)
  return _Layout(mesh, chunk_size,
                 x_spec=P(rows, SEQUENCE_AXIS, heads, None),
                 state_spec=P(rows, heads, None, None),
                 per_span_spec=P(SEQUENCE_AXIS, rows, heads, None, None))


def wkv7_sequence_parallel(r, log_w, k, v, a, b, state, *, mesh, reset=None, chunk_size: int = 64,
                           dtype=jnp.float32):
  """WKV-7 over [B, T, H, N] inputs whose T is split over `mesh`'s sequence axis.

  T must be a multiple of the number of spans (any span length; spans are padded to whole chunks
  locally). Batch rows and heads are split over the mesh axes their logical names map to
  (goosejax.sharding.RULES), the time dimension over `sequence`. Computes in `dtype` (fp32 or
  float64); returns (y [B, T, H, N] in dtype, final state [B, H, N, N])."""
  if chunk_size not in CHUNK_SIZES:
    raise SequenceSplitError(f"wkv7 sequence parallel: chunk_size={chunk_size}, "
                             f"expected one of {CHUNK_SIZES}")
  layout = _layout(mesh, r.shape, chunk_size)
  inputs = tuple(x.astype(dtype) for x in (r, log_w, k, v, a, b))
  reset_BT = None if reset is None else reset.astype(bool)
  return _wkv7_spans(layout, inputs, reset_BT, state.astype(dtype))


# ------------------------------------------------------------------------------ one span


def _pad_span(xs_BSHN, reset_BS, size: int):
  """Pad the span to whole chunks with identity steps (log_w = 0 keeps the state, zero k, v, a,
  b add nothing; no reset)."""
  padding = -xs_BSHN[0].shape[1] % size
  if not padding:
    return xs_BSHN, reset_BS
  pad = lambda x: jnp.pad(x, ((0, 0), (0, padding)) + ((0, 0),) * (x.ndim - 2))
  return tuple(pad(x) for x in xs_BSHN), None if reset_BS is None else pad(reset_BS)


def _span_forward(size: int, inputs, reset_BS, initial_BHNN):
  """One device: (y [B,S,H,N], end state [1,B,H,N,N], incoming state of each chunk [J,B,H,N,N])."""
  length = inputs[0].shape[1]
  inputs, reset_BS = _pad_span(inputs, reset_BS, size)

  def enter(math, span_map):
    # the maps of spans 0..i applied to the initial state give the state at span i's end
    end_BHNN = math.apply_affine(initial_BHNN, scan_spans(math.combine_affine, span_map))
    return from_neighbour(end_BHNN, initial_BHNN)

  y_BSHN, end_BHNN, starts_JBHNN = associative_forward(size, inputs, reset_BS, enter)
  return y_BSHN[:, :length], end_BHNN[None], starts_JBHNN


def _span_backward(size: int, inputs, reset_BS, starts_JBHNN, d_y_BSHN, d_final_BHNN):
  """One device: (input cotangents [B,S,H,N] x 6, cotangent of its incoming state [1,B,H,N,N])."""
  length = inputs[0].shape[1]
  (*inputs, d_y_BSHN), reset_BS = _pad_span((*inputs, d_y_BSHN), reset_BS, size)

  def leave(math, span_map):
    # the cotangent maps of the last span down to span i applied to the final state's
    # cotangent give the cotangent of span i's incoming state; the next span's is that of
    # this span's end
    d_start_BHNN = math.apply_affine(d_final_BHNN,
                                     scan_spans(math.combine_affine, span_map, reverse=True))
    return from_neighbour(d_start_BHNN, d_final_BHNN, reverse=True)

  d_inputs, d_start_BHNN = associative_backward(size, inputs, reset_BS, starts_JBHNN, d_y_BSHN,
                                                leave)
  return tuple(d[:, :length] for d in d_inputs), d_start_BHNN[None]


# -------------------------------------------------------------- across spans: custom VJP


def _forward(layout: _Layout, inputs, reset_BT, state_BHNN):
  """(y, the end state of every span [spans,B,H,N,N], chunk starts [spans*J,B,H,N,N]) over the mesh."""
  reset_spec = None if reset_BT is None else P(layout.x_spec[0], SEQUENCE_AXIS)
  run = jax.shard_map(functools.partial(_span_forward, layout.chunk_size), mesh=layout.mesh,
                      in_specs=((layout.x_spec,) * 6, reset_spec, layout.state_spec),
                      out_specs=(layout.x_spec, layout.per_span_spec, layout.per_span_spec))
  return run(inputs, reset_BT, state_BHNN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _wkv7_spans(layout: _Layout, inputs, reset_BT, state_BHNN):
  y_BTHN, ends_by_span, _ = _forward(layout, inputs, reset_BT, state_BHNN)
  return y_BTHN, ends_by_span[-1]


def _wkv7_spans_fwd(layout: _Layout, inputs, reset_BT, state_BHNN):
  y_BTHN, ends_by_span, starts = _forward(layout, inputs, reset_BT, state_BHNN)
  starts = checkpoint_name(starts, CHECKPOINT_NAME)
  return (y_BTHN, ends_by_span[-1]), (inputs, reset_BT, starts)


def _wkv7_spans_bwd(layout: _Layout, residuals, cotangents):
  inputs, reset_BT, starts = residuals
  d_y_BTHN, d_final_BHNN = cotangents
  reset_spec = None if reset_BT is None else P(layout.x_spec[0], SEQUENCE_AXIS)
  run = jax.shard_map(functools.partial(_span_backward, layout.chunk_size), mesh=layout.mesh,
                      in_specs=((layout.x_spec,) * 6, reset_spec, layout.per_span_spec,
                                layout.x_spec, layout.state_spec),
                      out_specs=((layout.x_spec,) * 6, layout.per_span_spec))
  d_inputs, d_starts_by_span = run(inputs, reset_BT, starts, d_y_BTHN, d_final_BHNN)
  return d_inputs, None, d_starts_by_span[0]


_wkv7_spans.defvjp(_wkv7_spans_fwd, _wkv7_spans_bwd)


# ------------------------------------------------- spans run by a single-device kernel


def _span_by_kernel(kernel, r, log_w, k, v, a, b, reset_BS, initial_BHNN):
  """One device: (y [B,S,H,N], end state [1,B,H,N,N]) of its span, from two kernel runs batched."""
  batch, _, heads, size = r.shape
  zero_BHNN = jnp.zeros((batch, heads, size, size), jnp.float32)
  eye_BHNN = jnp.broadcast_to(jnp.eye(size, dtype=jnp.float32), zero_BHNN.shape)
  twice = lambda x: jnp.concatenate([x, x])
  y_2BSHN, end_2BHNN = kernel(
      twice(r), twice(log_w), twice(k), jnp.concatenate([v, jnp.zeros_like(v)]), twice(a),
      twice(b), jnp.concatenate([zero_BHNN, eye_BHNN]),
      None if reset_BS is None else twice(reset_BS))
  y0_BSHN, y1_BSHN = y_2BSHN[:batch].astype(jnp.float32), y_2BSHN[batch:].astype(jnp.float32)
  span_map = (end_2BHNN[batch:], end_2BHNN[:batch])   # (M, B): end = S M + B
  # the affine algebra of the XLA forms (fp32 products); the chunk size is not used here
  math = ChunkMath.for_arrays(CHUNK_SIZES[0], size, jnp.float32, has_reset=False)
  end_BHNN = math.apply_affine(initial_BHNN, scan_spans(math.combine_affine, span_map))
  incoming_BHNN = from_neighbour(end_BHNN, initial_BHNN)
  y_BSHN = y0_BSHN + jnp.einsum("bshj,bhvj->bshv", y1_BSHN, incoming_BHNN,
                                precision=jax.lax.Precision.HIGHEST)
  return y_BSHN.astype(r.dtype), end_BHNN[None]


def wkv7_sequence_parallel_kernel(kernel, r, log_w, k, v, a, b, state, reset=None, *, mesh):
  """WKV-7 over [B, T, H, N] inputs whose T is split over `mesh`'s sequence axis, every span
  run by `kernel`: a single-device callable (r, log_w, k, v, a, b, state, reset) -> (y, final
  state), differentiable (e.g. a Pallas kernel with its custom VJP). Rows and heads are split
  like `wkv7_sequence_parallel`'s. Returns (y [B, T, H, N] in r's dtype, final state fp32)."""
  layout = _layout(mesh, r.shape, chunk_size=0)  # the kernel chunks its span itself
  reset_spec = None if reset is None else P(layout.x_spec[0], SEQUENCE_AXIS)
  run = jax.shard_map(functools.partial(_span_by_kernel, kernel), mesh=mesh,
                      in_specs=((layout.x_spec,) * 6 + (reset_spec, layout.state_spec)),
                      out_specs=(layout.x_spec, layout.per_span_spec), check_vma=False)
  y_BTHN, ends_by_span = run(r, log_w, k, v, a, b, None if reset is None else reset.astype(bool),
                           state.astype(jnp.float32))
  return y_BTHN, ends_by_span[-1]
