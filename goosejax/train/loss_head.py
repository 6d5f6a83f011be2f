"""The head, cross-entropy and L2Wrap fused over vocabulary tiles: no [B, T, V] fp32 logits.

`fused_head_loss(x_BTC, head_CV, targets_BT, tile=...)` is the same scalar as
`cross_entropy(head_logits(x_BTC, head_CV), targets_BT)` (goosejax.train.recipe), with
L2Wrap's gradient when `l2wrap_scale` > 0, computed a tile of `tile` vocabulary columns at a
time. Shape letter U: the columns of one vocabulary tile (the glossary's other letters keep
their meaning).

* Forward: one `lax.scan` over tiles keeps, per token, the running max logit, its index (the
  first one, as `jnp.argmax`), the sum of exp(logit - max) rescaled as the max grows (online
  logsumexp) and the target's logit. Saved for the backward: x, the head, and per token the
  logsumexp, the argmax and the max.
* Backward: the same scan recomputes each tile's logits and forms
  (softmax - onehot(target)) g / (B T) + [column == argmax] max (l2wrap_scale / (B T)) g,
  accumulating dx in fp32 and writing dW tile by tile.
* The product is `goosejax.model.layers.matmul`'s: the head cast to x's dtype, full
  precision, fp32 results (fp64 when x is fp64, so float64 tests are exact); dx is summed in
  fp32 and cast to x's dtype, dW is cast to x's dtype, as autodiff of the unfused head gives.
* A vocabulary that is not a multiple of the tile: the last tile is moved back to end at V,
  and its columns the tile before already covered are masked out (no padded copy of the head).
* Under a mesh the work is a `shard_map`: rows and tokens split as the residual stream
  (batch, length), the head as its parameter is (channels over "embed", columns over
  "vocab"). Every device tiles its own columns, gathering each tile's channels over the
  embed axes (the whole head is never gathered), and the per-token statistics are combined
  over the vocab axes (max, first argmax, rescaled sum, target logit); dx is summed over the
  vocab axes, each tile's dW over the token axes and scattered back over the embed axes.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from goosejax import sharding


class _Layout(NamedTuple):
  """How the work is split (static): the mesh (None: one device) and the specs, the mesh axes
  that split tokens, the head's channels and its columns, the tile and the loss's constants."""
  mesh: Mesh | None
  x_spec: P
  tokens_spec: P
  head_spec: P
  token_axes: tuple[str, ...]
  embed_axes: tuple[str, ...]
  vocab_axes: tuple[str, ...]
  tile: int
  mean_scale: float      # 1 / (B T): cross-entropy is a mean over every token
  l2wrap_factor: float   # l2wrap_scale / (B T); 0: no L2Wrap


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _layout(mesh: Mesh | None, x_shape, head_shape, tile: int, l2wrap_scale: float) -> _Layout:
  B, T, _ = x_shape
  if mesh is None:
    x_spec, head_spec = P(), P()
  else:
    x_spec = sharding.logical_spec(sharding.RESIDUAL_AXES, x_shape, mesh)
    head_spec = sharding.logical_spec(("embed", "vocab"), head_shape, mesh)
  embed_axes, vocab_axes = (_axes(head_spec[0]), _axes(head_spec[1])) if head_spec else ((), ())
  shards = 1 if mesh is None else math.prod(mesh.shape[a] for a in vocab_axes)
  local_tile = min(tile, head_shape[1] // shards)
  tokens_spec = P(*x_spec[:2])
  token_axes = tuple(a for entry in tokens_spec for a in _axes(entry))
  return _Layout(mesh, x_spec, tokens_spec, head_spec, token_axes, embed_axes, vocab_axes,
                 local_tile, 1.0 / (B * T), l2wrap_scale / (B * T))


def _psum(x, axes):
  return lax.psum(x, axes) if axes else x


def _vocab_offset(layout: _Layout, columns: int) -> jax.Array:
  """The first vocabulary index of this device's columns."""
  return lax.axis_index(layout.vocab_axes) * columns if layout.vocab_axes else jnp.int32(0)


def _product(x_BTC, w_CU, dtype) -> jax.Array:
  """`matmul`'s head product in `dtype`: [B, T, C] @ [C, U] at full precision."""
  return lax.dot_general(x_BTC, w_CU, (((2,), (0,)), ((), ())),
                         precision=lax.Precision.HIGHEST, preferred_element_type=dtype)


def _tile_indices(columns: int, tile: int) -> jax.Array:
  return jnp.arange(-(-columns // tile), dtype=jnp.int32)


def _tile(layout: _Layout, x_BTC, head_CV, k, dtype):
  """Tile k: (start column, its head columns [C, U] (all channels), logits [B,T,U], local
  column indices [U], which columns are its own [U]). The last tile ends at the last column;
  its columns before k*tile belong to tile k-1."""
  tile = layout.tile
  start = jnp.minimum(k * tile, head_CV.shape[1] - tile)
  w_CU = lax.dynamic_slice_in_dim(head_CV, start, tile, axis=1)
  if layout.embed_axes:
    w_CU = lax.all_gather(w_CU, layout.embed_axes, axis=0, tiled=True)
  column_U = start + lax.iota(jnp.int32, tile)
  return start, w_CU, _product(x_BTC, w_CU, dtype), column_U, column_U >= k * tile


def _head_grad(layout: _Layout, dw_CU):
  """This device's share of a tile's dW: summed over the token axes, its embed rows kept
  (scattered where the rows' axes also split tokens, else sliced)."""
  embed = layout.embed_axes
  if not embed or not set(embed) <= set(layout.token_axes):
    dw_CU = _psum(dw_CU, layout.token_axes)
    if not embed:
      return dw_CU
    rows = dw_CU.shape[0] // lax.axis_size(embed)
    return lax.dynamic_slice_in_dim(dw_CU, lax.axis_index(embed) * rows, rows, axis=0)
  dw_CU = _psum(dw_CU, tuple(a for a in layout.token_axes if a not in embed))
  return lax.psum_scatter(dw_CU, embed, scatter_dimension=0, tiled=True)


def _local_forward(layout: _Layout, x_BTC, head_CV, targets_BT):
  """One device's columns: (loss, logsumexp [B,T], argmax [B,T] global index, max [B,T])."""
  dtype = jnp.promote_types(x_BTC.dtype, jnp.float32)
  columns, tile = head_CV.shape[1], layout.tile
  offset = _vocab_offset(layout, columns)
  local_targets_BT = targets_BT.astype(jnp.int32) - offset

  def step(carry, k):
    max_BT, top_BT, sum_BT, hit_BT = carry
    start, _, logits_BTU, column_U, own_U = _tile(layout, x_BTC, head_CV, k, dtype)
    logits_BTU = jnp.where(own_U, logits_BTU, -jnp.inf)
    tile_max_BT = jnp.max(logits_BTU, axis=-1)
    new_max_BT = jnp.maximum(max_BT, tile_max_BT)
    # strictly greater: an equal max in a later tile keeps the earlier (first) index
    tile_top_BT = start + jnp.argmax(logits_BTU, axis=-1).astype(jnp.int32)
    top_BT = jnp.where(tile_max_BT > max_BT, tile_top_BT, top_BT)
    sum_BT = (sum_BT * jnp.exp(max_BT - new_max_BT)
              + jnp.sum(jnp.exp(logits_BTU - new_max_BT[..., None]), axis=-1))
    mine_BT = (local_targets_BT >= k * tile) & (local_targets_BT < start + tile)
    index_BT1 = jnp.clip(local_targets_BT - start, 0, tile - 1)[..., None]
    picked_BT = jnp.take_along_axis(logits_BTU, index_BT1, axis=-1)[..., 0]
    return (new_max_BT, top_BT, sum_BT, hit_BT + jnp.where(mine_BT, picked_BT, 0)), None

  shape = targets_BT.shape
  init = (jnp.full(shape, -jnp.inf, dtype), jnp.zeros(shape, jnp.int32), jnp.zeros(shape, dtype),
          jnp.zeros(shape, dtype))
  (max_BT, top_BT, sum_BT, hit_BT), _ = lax.scan(step, init, _tile_indices(columns, tile))
  max_BT, top_BT, sum_BT, hit_BT = _combine_columns(layout, max_BT, top_BT + offset, sum_BT,
                                                    hit_BT)
  lse_BT = max_BT + jnp.log(sum_BT)
  loss = _psum(jnp.sum(lse_BT - hit_BT), layout.token_axes) * layout.mean_scale
  return loss, lse_BT, top_BT, max_BT


def _combine_columns(layout: _Layout, max_BT, top_BT, sum_BT, hit_BT):
  """Per-token statistics of every device's columns: the max, its first index, the sum rescaled
  to that max, the target's logit (held by exactly one device)."""
  axes = layout.vocab_axes
  if not axes:
    return max_BT, top_BT, sum_BT, hit_BT
  all_max_BT = lax.pmax(max_BT, axes)
  top_BT = lax.pmin(jnp.where(max_BT == all_max_BT, top_BT, jnp.iinfo(jnp.int32).max), axes)
  sum_BT = lax.psum(sum_BT * jnp.exp(max_BT - all_max_BT), axes)
  return all_max_BT, top_BT, sum_BT, lax.psum(hit_BT, axes)


def _local_backward(layout: _Layout, x_BTC, head_CV, targets_BT, lse_BT, top_BT, max_BT, g):
  """One device's columns: (dx [B,T,C] in x's dtype, d head [C, columns] in x's dtype)."""
  dtype = jnp.promote_types(x_BTC.dtype, jnp.float32)
  columns, tile = head_CV.shape[1], layout.tile
  offset = _vocab_offset(layout, columns)
  local_targets_BT1 = (targets_BT.astype(jnp.int32) - offset)[..., None]
  local_top_BT1 = (top_BT - offset)[..., None]
  g = g.astype(dtype)
  mean_g = g * layout.mean_scale
  push_BT1 = (max_BT * (layout.l2wrap_factor * g))[..., None]

  def step(carry, k):
    dx_BTC, dw_CV = carry
    start, w_CU, logits_BTU, column_U, own_U = _tile(layout, x_BTC, head_CV, k, dtype)
    softmax_BTU = jnp.exp(logits_BTU - lse_BT[..., None])
    d_BTU = (softmax_BTU - (column_U == local_targets_BT1).astype(dtype)) * mean_g
    if layout.l2wrap_factor:
      d_BTU = d_BTU + jnp.where(column_U == local_top_BT1, push_BT1, 0)
    d_BTU = jnp.where(own_U, d_BTU, 0)
    dx_BTC = dx_BTC + lax.dot_general(d_BTU, w_CU, (((2,), (1,)), ((), ())),
                                      precision=lax.Precision.HIGHEST, preferred_element_type=dtype)
    dw_CU = lax.dot_general(x_BTC, d_BTU, (((0, 1), (0, 1)), ((), ())),
                            precision=lax.Precision.HIGHEST, preferred_element_type=dtype)
    dw_CU = _head_grad(layout, dw_CU).astype(dw_CV.dtype)
    # columns not its own are zeros here: add, so tile k-1's values there stay
    dw_CV = lax.dynamic_update_slice_in_dim(
        dw_CV, lax.dynamic_slice_in_dim(dw_CV, start, tile, axis=1) + dw_CU, start, axis=1)
    return (dx_BTC, dw_CV), None

  init = (jnp.zeros(x_BTC.shape, dtype), jnp.zeros(head_CV.shape, head_CV.dtype))
  (dx_BTC, dw_CV), _ = lax.scan(step, init, _tile_indices(columns, tile))
  return _psum(dx_BTC, layout.vocab_axes).astype(x_BTC.dtype), dw_CV


def _forward(layout: _Layout, x_BTC, head_CV, targets_BT):
  run = functools.partial(_local_forward, layout)
  if layout.mesh is not None:
    run = jax.shard_map(run, mesh=layout.mesh,
                        in_specs=(layout.x_spec, layout.head_spec, layout.tokens_spec),
                        out_specs=(P(),) + (layout.tokens_spec,) * 3, check_vma=False)
  return run(x_BTC, head_CV, targets_BT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(layout: _Layout, x_BTC, head_CV, targets_BT):
  return _forward(layout, x_BTC, head_CV, targets_BT)[0]


def _fused_fwd(layout: _Layout, x_BTC, head_CV, targets_BT):
  loss, lse_BT, top_BT, max_BT = _forward(layout, x_BTC, head_CV, targets_BT)
  return loss, (x_BTC, head_CV, targets_BT, lse_BT, top_BT, max_BT)


def _fused_bwd(layout: _Layout, residuals, g):
  run = functools.partial(_local_backward, layout)
  if layout.mesh is not None:
    tokens = layout.tokens_spec
    run = jax.shard_map(run, mesh=layout.mesh,
                        in_specs=(layout.x_spec, layout.head_spec) + (tokens,) * 4 + (P(),),
                        out_specs=(layout.x_spec, layout.head_spec), check_vma=False)
  dx_BTC, dw_CV = run(*residuals, g)
  return dx_BTC, dw_CV, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_head_loss(x_BTC: jax.Array, head_CV: jax.Array, targets_BT: jax.Array, *, tile: int,
                    l2wrap_scale: float = 0.0, mesh: Mesh | None = None) -> jax.Array:
  """Mean cross-entropy (fp32) of the head `head_CV` [C, V] on ln_out's output `x_BTC`
  [B, T, C] (the compute dtype) against `targets_BT`, computed `tile` vocabulary columns at a
  time (per device's columns under `mesh`); with `l2wrap_scale` > 0 its gradient carries
  L2Wrap's push of l2wrap_scale / (B T) * max logit on each token's argmax logit."""
  if tile <= 0:
    raise ValueError(f"fused_head_loss: tile={tile}, expected a positive number of columns")
  layout = _layout(mesh, x_BTC.shape, head_CV.shape, tile, l2wrap_scale)
  return _fused(layout, x_BTC, head_CV.astype(x_BTC.dtype), targets_BT)
