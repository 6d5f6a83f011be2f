"""One sequence split over the `sequence` mesh axis: device i of P holds tokens
[i T/P, (i+1) T/P) of every row, its span.

What crosses a span boundary is small and independent of T: the previous token for the token
shift ([B, C] per device boundary) and the recurrent state, which the WKV operator gets from a
scan of per-span summaries (`scan_spans`, log2(P) rounds of `ppermute`, each device sending
and keeping one summary, so no device's memory grows with P).

`span_mesh` and `previous_tokens` are called from ordinary traced code (the model); the others
run inside `jax.shard_map`, manual over `SEQUENCE_AXIS`.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

SEQUENCE_AXIS = "sequence"


def span_mesh(length: int):
  """The ambient mesh (`jax.set_mesh` / `use_abstract_mesh`) when it splits a time dimension of
  `length` tokens over `SEQUENCE_AXIS` (more than one span, `length` divisible by their number);
  else None, and the time dimension stays whole as everywhere else a dimension does not divide."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  spans = dict(mesh.shape).get(SEQUENCE_AXIS, 1)
  return mesh if spans > 1 and length % spans == 0 else None


def scan_spans(combine: Callable[[Any, Any], Any], element: Any, *, reverse: bool = False) -> Any:
  """Inclusive scan of one `element` (a pytree) per span: span i gets
  combine(...combine(e_0, e_1)..., e_i); with `reverse`, the spans from the last down to i,
  the later ones first. combine(earlier, later) must be associative.

  Hillis-Steele doubling: in round k every span receives the running result of the span 2^k
  before it (after it, reversed) by one `ppermute` and combines it in front of its own."""
  spans = lax.axis_size(SEQUENCE_AXIS)
  index = lax.axis_index(SEQUENCE_AXIS)
  total = element
  distance = 1
  while distance < spans:
    if reverse:
      pairs = [(i + distance, i) for i in range(spans - distance)]
      receives = index < spans - distance
    else:
      pairs = [(i, i + distance) for i in range(spans - distance)]
      receives = index >= distance
    received = jax.tree.map(lambda x: lax.ppermute(x, SEQUENCE_AXIS, pairs), total)
    total = jax.tree.map(lambda new, old: jnp.where(receives, new, old),
                         combine(received, total), total)
    distance *= 2
  return total


def from_neighbour(x: jax.Array, edge: jax.Array, *, reverse: bool = False) -> jax.Array:
  """The previous span's `x` (reverse: the next span's); the first (last) span gets `edge`."""
  spans = lax.axis_size(SEQUENCE_AXIS)
  index = lax.axis_index(SEQUENCE_AXIS)
  if reverse:
    pairs, outer = [(i + 1, i) for i in range(spans - 1)], spans - 1
  else:
    pairs, outer = [(i, i + 1) for i in range(spans - 1)], 0
  return jnp.where(index == outer, edge, lax.ppermute(x, SEQUENCE_AXIS, pairs))


def previous_tokens(x_BTC: jax.Array, last_B1C: jax.Array) -> jax.Array:
  """[last, x_0, ..., x_{T-2}]. Under a mesh that splits T (`span_mesh`) each span's first
  position receives the previous span's last token (one [B, 1, C] `ppermute`), the first span
  `last_B1C`; manual over the sequence axis only, so rows and channels keep their sharding."""
  mesh = span_mesh(x_BTC.shape[1])
  if mesh is None:
    return jnp.concatenate([last_B1C.astype(x_BTC.dtype), x_BTC[:, :-1]], axis=1)

  def local(x_BSC, last_B1C):
    first_B1C = from_neighbour(x_BSC[:, -1:], last_B1C.astype(x_BSC.dtype))
    return jnp.concatenate([first_B1C, x_BSC[:, :-1]], axis=1)

  spans = P(None, SEQUENCE_AXIS)
  return jax.shard_map(local, mesh=mesh, in_specs=(spans, P()), out_specs=spans,
                       axis_names={SEQUENCE_AXIS})(x_BTC, last_B1C)
