"""Device mesh, logical axis names, and the one rules table that places them on the mesh.

Every parameter and activation names its dimensions logically ("embed", "heads", "batch",
...); `RULES` alone decides which mesh axes ("data", "fsdp", "tensor", "sequence") each name is
split over. The usual layouts are then just mesh shapes:

  data parallel      mesh.data=-1                      params replicated, batch split
  FSDP / ZeRO-3      mesh.fsdp=-1                      params split on "embed", batch split
  tensor parallel    mesh.tensor=N                     heads, FFN hidden and vocab split
  sequence parallel  mesh.sequence=N                   every sequence's tokens split (long context)
  any mix            mesh.data=2 mesh.fsdp=2 mesh.tensor=2

A dimension whose size does not divide evenly over its mesh axes stays whole (replicated on
those axes) instead of failing, so odd LoRA ranks or vocabularies never block a layout.

The last section holds the span primitives of sequence parallelism (`span_mesh`,
`scan_spans`, `from_neighbour`, `previous_tokens`): one sequence split over the `sequence`
axis, and what crosses the span boundaries.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from jax.sharding import PartitionSpec as P

from goosejax.config import MeshConfig
from goosejax.errors import GoosejaxError
from goosejax.param_table import PARAMS

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
SEQUENCE_AXIS = "sequence"

# logical axis name -> mesh axes it is split over (empty: replicated).
RULES: dict[str, tuple[str, ...]] = {
    # activations
    "batch": ("data", "fsdp"),
    "length": ("sequence",),    # spans of one sequence (goosejax.sharding)
    "act_embed": (),            # the residual stream's channels: whole on every device
    "act_heads": ("tensor",),   # WKV inputs and outputs [B, T, H, N]: heads split
    "act_mlp": ("tensor",),     # the channel-mix hidden [B, T, F]
    "act_vocab": ("tensor",),
    # parameters
    "layers": (),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),       # the H*N channels that r/k/v produce and `output` consumes
    "mlp": ("tensor",),         # the channel-mix hidden size
    "lora": (),
    "channel": (),              # per-channel vectors and norm weights: small, kept whole
    "head_index": (),
    "head_dim": (),
}

# Every parameter's logical axes, by its dotted name (goosejax.model.params); declared in
# goosejax.param_table. Stacked layer parameters lead with "layers"; Linear weights are [in, out].
PARAM_AXES: dict[str, tuple[str, ...]] = {p.name: p.axes for p in PARAMS}

BATCH_AXES = ("batch", "length")
LOGITS_AXES = ("batch", "length", "act_vocab")
RESIDUAL_AXES = ("batch", "length", "act_embed")
HEADS_AXES = ("batch", "length", "act_heads", None)
MLP_AXES = ("batch", "length", "act_mlp")


class ShardingError(GoosejaxError):
  """A mesh or sharding request that cannot be satisfied; the message says why."""


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ("data", "fsdp", "tensor", "sequence") mesh over `devices` (default: all, every process)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = cfg.shape(len(devices))
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """PartitionSpec for a tensor whose dims carry logical `names` (None: never split)."""
  if len(names) != len(shape):
    raise ShardingError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape):
    if name is None:
      spec.append(None)
      continue
    if name not in RULES:
      raise ShardingError(f"logical axis {name!r} has no rule; known: {sorted(RULES)}")
    axes = tuple(a for a in RULES[name] if mesh.shape.get(a, 1) > 1)
    clash = used.intersection(axes)
    if clash:
      raise ShardingError(f"logical axes {tuple(names)}: mesh axis {sorted(clash)} is used twice")
    if not axes or size % math.prod(mesh.shape[a] for a in axes):
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def param_axes(name: str) -> tuple[str, ...]:
  if name not in PARAM_AXES:
    raise ShardingError(f"parameter {name!r} has no logical axes (goosejax.sharding.PARAM_AXES): "
                        "declare it in goosejax.param_table.PARAMS so it can be placed on the mesh")
  return PARAM_AXES[name]


def param_shardings(shapes: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
  """{name: NamedSharding} for a {name: array or shape-like} parameter dict."""
  result = {}
  for name, value in shapes.items():
    shape = tuple(getattr(value, "shape", value))
    result[name] = NamedSharding(mesh, logical_spec(param_axes(name), shape, mesh))
  return result


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def follow_params(tree: Any, param_shapes: Mapping[str, tuple[int, ...]],
                  shardings: Mapping[str, NamedSharding], mesh: Mesh) -> Any:
  """Shardings for a pytree (e.g. optimizer state) whose parameter-shaped leaves sit under a
  parameter's name: those follow that parameter, everything else is replicated."""
  def sharding_for(path, leaf):
    for entry in reversed(path):
      key = getattr(entry, "key", None)
      if key in shardings and tuple(leaf.shape) == tuple(param_shapes[key]):
        return shardings[key]
    return replicated(mesh)
  return jax.tree_util.tree_map_with_path(sharding_for, tree)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batches [B, T, ...]: rows split over the batch axes, the rest whole."""
  names = BATCH_AXES + (None,) * (ndim - 2)
  return NamedSharding(mesh, PartitionSpec(*_axes_of(names, mesh)))


def batch_shards(mesh: Mesh) -> int:
  """How many ways the batch dimension is split."""
  return math.prod(mesh.shape.get(a, 1) for a in RULES["batch"])


def batch_layout_problem(cfg, sizes: Mapping[str, int]) -> str | None:
  """Why `cfg`'s batches cannot be laid out on a mesh of `sizes` (its rows per micro-batch
  over data x fsdp, its tokens over sequence), or None. Train and `goosejax plan` both ask."""
  rows = cfg.data.batch_size // cfg.optimizer.grad_accum
  shards = sizes.get("data", 1) * sizes.get("fsdp", 1)
  if rows % shards:
    return (f"mesh.data x mesh.fsdp = {shards} does not divide data.batch_size / "
            f"optimizer.grad_accum = {cfg.data.batch_size} / {cfg.optimizer.grad_accum} = {rows} "
            f"rows per micro-batch (batch rows are split over both); mesh {dict(sizes)}")
  spans = sizes.get("sequence", 1)
  if cfg.data.ctx_len % spans:
    return (f"mesh.sequence = {spans} does not divide data.ctx_len={cfg.data.ctx_len} (each "
            f"sequence splits into {spans} equal spans); mesh {dict(sizes)}")
  return None


class RowBlock(NamedTuple):
  """The rows of every global batch one process loads: block `index` of `count` equal blocks."""
  index: int
  count: int


@functools.lru_cache(maxsize=16)  # a pure function of the mesh, asked for every batch
def process_row_block(mesh: Mesh, process_index: int | None = None) -> RowBlock:
  """Which rows of every global batch this process's devices hold: one block of `count`.

  Rows are split over the batch axes (mesh.data x mesh.fsdp). A mesh axis that does not split
  rows (sequence, tensor) and crosses processes makes those processes hold the same rows: they
  load the same data (e.g. mesh.sequence=2 over 2 hosts: one block, both load every row).
  """
  shards = batch_shards(mesh)
  rows_sharding = NamedSharding(mesh, PartitionSpec(*_axes_of(("batch",), mesh)))
  held: dict[int, set[int]] = {}
  for device, (rows,) in rows_sharding.devices_indices_map((shards,)).items():
    held.setdefault(device.process_index, set()).update(range(*rows.indices(shards)))
  blocks = sorted({frozenset(rows) for rows in held.values()}, key=min)
  # make_array_from_process_local_data places a process's rows in shard order, consecutive or
  # not; what it cannot do is a process sharing only some of its rows with another.
  if sum(map(len, blocks)) != shards or len({len(b) for b in blocks}) != 1:
    layout = "; ".join(f"process {p}: {sorted(rows)}" for p, rows in sorted(held.items()))
    raise ShardingError(
        f"mesh {dict(mesh.shape)} gives the processes overlapping sets of batch row shards "
        f"({layout}); each process's set must equal or be disjoint from every other's (make "
        "mesh.data x mesh.fsdp a multiple or a divisor of the process count)")
  index = jax.process_index() if process_index is None else process_index
  return RowBlock(blocks.index(frozenset(held[index])), len(blocks))


def _axes_of(names: Sequence[str | None], mesh: Mesh) -> list:
  spec = []
  for name in names:
    axes = tuple(a for a in RULES.get(name, ()) if mesh.shape.get(a, 1) > 1) if name else ()
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return spec


def constrain(x: jax.Array, names: Sequence[str | None], mesh: Mesh | None = None) -> jax.Array:
  """Pin an activation's layout by logical names inside jit.

  Without `mesh` the ambient one is used (`jax.set_mesh`, or inside jit
  `jax.sharding.use_abstract_mesh`, as the train step does around the model), so model code
  can name its activations without knowing the mesh; with no mesh at all (inference on one
  device) this is a no-op.
  """
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      return x
    return jax.lax.with_sharding_constraint(x, logical_spec(names, x.shape, mesh))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_spec(names, x.shape, mesh)))


def host_to_global(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays split over the mesh's batch axes.

  Every process passes whole rows: block `process_row_block(mesh)` of the global batch
  (processes holding the same rows pass the same ones); with one process the whole batch.
  """
  blocks = process_row_block(mesh).count
  result = {}
  for key, value in local.items():
    value = np.asarray(value)
    sharding = batch_sharding(mesh, value.ndim)
    global_shape = (value.shape[0] * blocks, *value.shape[1:])
    result[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return result


# ------------------------------------------------------------------------------------------
# Sequence parallelism: the span primitives.
#
# One sequence split over the `sequence` mesh axis: device i of P holds tokens
# [i T/P, (i+1) T/P) of every row, its span.
#
# What crosses a span boundary is small and independent of T: the previous token for the token
# shift ([B, C] per device boundary) and the recurrent state, which the WKV operator gets from a
# scan of per-span summaries (`scan_spans`, log2(P) rounds of `ppermute`, each device sending
# and keeping one summary, so no device's memory grows with P).
#
# `span_mesh` and `previous_tokens` are called from ordinary traced code (the model); the others
# run inside `jax.shard_map`, manual over `SEQUENCE_AXIS`.
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
