"""WKV-7 forward and backward as Pallas Mosaic TPU kernels.

Grid (batch, head group, time block). A head group is P heads packed side by side in the lanes, so
the chunk step runs on P*N lanes (128 for N = 64) with a block-diagonal [P*N, P*N] fp32 state. The time
axis is "arbitrary" (sequential on a core): the state lives in a VMEM scratch across time blocks, and
each grid step loops over several chunks to keep the number of grid steps (fixed overhead each) small.
The checkpointing forward writes an fp32 state per chunk; the lean forward (no gradient needed) writes
none; the backward walks the time blocks in reverse and recomputes every chunk from its checkpoint.

Sequences arrive as [B, H, N, T]: for N < 128 that is how a TPU lays out a [B, T, H, N] array in HBM
(time along the 128 lanes, major_to_minor (0, 2, 3, 1)), so the caller's transpose is a bitcast and
no input is copied. Each grid step transposes its [P, N, tokens] blocks in VMEM into chunks
[chunks, Q, P*N] (time along sublanes, the chunk math's orientation) and its outputs back.

Array layouts (prepared by `pallas_kernels.wkv7`): sequences [B, H, N, T]; reset [B, chunks, Q, 1];
states [B, H/P, N, P*N] and checkpoints [B, H/P, chunks, N, P*N] (a group's N x N blocks side by side,
`ChunkMath.compact_state`: no zero blocks stored).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.chunk_math import ChunkLayout, chunk_constants
from pallas_kernels.kernel_body import (CONST_NAMES, INPUT_NAMES, backward_chunks, chunk_math,
                                        forward_chunks)

_SEMANTICS = ("parallel", "parallel", "arbitrary")


def _const_specs_and_values(layout: ChunkLayout):
  consts = chunk_constants(layout)
  specs = [pl.BlockSpec(c.shape, functools.partial(_zeros_index, c.ndim)) for c in consts]
  return specs, [jnp.asarray(c) for c in consts]


def _zeros_index(ndim, *_):
  return (0,) * ndim


def _stage_in(block_ref, chunks_ref, layout: ChunkLayout):
  """A [P, N, tokens] block (time on lanes) into fp32 chunks [chunks, Q, P*N] (time on sublanes)."""
  x = jnp.concatenate([block_ref[g].astype(jnp.float32) for g in range(layout.heads_packed)], axis=0)
  x = x.T
  Q = layout.chunk_size
  for i in range(chunks_ref.shape[0]):
    chunks_ref[i] = x[i * Q:(i + 1) * Q]


def _stage_out(chunks_ref, block_ref, layout: ChunkLayout):
  """fp32 chunks [chunks, Q, P*N] back into a [P, N, tokens] block of the output's dtype."""
  x = jnp.concatenate([chunks_ref[i] for i in range(chunks_ref.shape[0])], axis=0).T
  N = layout.head_size
  for g in range(layout.heads_packed):
    block_ref[g] = x[g * N:(g + 1) * N].astype(block_ref.dtype)


def _carry_in(scratch_ref, incoming_ref, math):
  """At the first time block of a (batch, head group): the state carried across time blocks in
  VMEM scratch starts from the incoming one. Scratch is never zeroed by the hardware, and each
  TensorCore has its own: every (batch, head group) a core runs starts here."""

  @pl.when(pl.program_id(2) == 0)
  def _():
    scratch_ref[...] = math.expand_state(incoming_ref[...])


def _forward_kernel(*refs, names, layout: ChunkLayout):
  refs = dict(zip(names, refs))
  math = chunk_math(refs, layout)
  time_block = pl.program_id(2)
  _carry_in(refs["state_scratch"], refs["state_in"], math)
  chunk_refs = {name: refs[name + "_chunks"] for name in (*INPUT_NAMES, "y")}
  for name in INPUT_NAMES:
    _stage_in(refs[name], chunk_refs[name], layout)
  chunk_refs.update((name, refs[name]) for name in ("reset", "checkpoint") if name in refs)
  state = forward_chunks({**refs, **chunk_refs}, refs["state_scratch"][...],
                         chunk_refs["r"].shape[0], layout)
  refs["state_scratch"][...] = state
  _stage_out(chunk_refs["y"], refs["y"], layout)

  @pl.when(time_block == pl.num_programs(2) - 1)
  def _():
    refs["state_out"][...] = math.compact_state(state)


def _backward_kernel(*refs, names, layout: ChunkLayout):
  refs = dict(zip(names, refs))
  math = chunk_math(refs, layout)
  step = pl.program_id(2)
  _carry_in(refs["dstate_scratch"], refs["dstate_end"], math)
  staged = (*INPUT_NAMES, "dy")
  chunk_refs = {name: refs[name + "_chunks"] for name in (*staged, *("d" + n for n in INPUT_NAMES))}
  for name in staged:
    _stage_in(refs[name], chunk_refs[name], layout)
  dstate = backward_chunks({**refs, **chunk_refs}, refs["dstate_scratch"][...],
                           chunk_refs["r"].shape[0], layout)
  refs["dstate_scratch"][...] = dstate
  for name in INPUT_NAMES:
    _stage_out(chunk_refs["d" + name], refs["d" + name], layout)

  @pl.when(step == pl.num_programs(2) - 1)
  def _():
    refs["dstate_start"][...] = math.compact_state(dstate)


def _specs(layout: ChunkLayout, chunks_per_block: int, num_time_blocks: int, reverse: bool):
  Q, P, N = layout.chunk_size, layout.heads_packed, layout.head_size

  def time(t):
    return num_time_blocks - 1 - t if reverse else t

  seq = pl.BlockSpec((None, P, N, chunks_per_block * Q), lambda b, h, t: (b, h, 0, time(t)))
  reset = pl.BlockSpec((None, chunks_per_block, Q, 1), lambda b, h, t: (b, time(t), 0, 0))
  state = pl.BlockSpec((None, None, N, P * N), lambda b, h, t: (b, h, 0, 0))
  checkpoint = pl.BlockSpec((None, None, chunks_per_block, N, P * N),
                            lambda b, h, t: (b, h, time(t), 0, 0))
  return seq, reset, state, checkpoint


def _grid(r, layout: ChunkLayout, chunks_per_block: int):
  B, H, N, T = r.shape
  tokens = chunks_per_block * layout.chunk_size
  if T % tokens or H % layout.heads_packed or N != layout.head_size:
    raise ValueError(f"mosaic_tpu: [B, H, N, T] = {r.shape} does not tile into blocks of "
                     f"{layout.heads_packed} heads x {tokens} tokens of head size {layout.head_size}")
  return B, H // layout.heads_packed, T // tokens


def _chunk_scratch(layout: ChunkLayout, chunks_per_block: int, count: int):
  shape = (chunks_per_block, layout.chunk_size, layout.key_lanes)
  return [pltpu.VMEM(shape, jnp.float32) for _ in range(count)]


def forward(r, log_w, k, v, a, b, state, reset, *, layout: ChunkLayout, chunks_per_block: int,
            interpret: bool, checkpoints: bool = True):
  """Returns (y like r, end state [B, H/P, N, P*N] fp32, and with `checkpoints` the start state of
  every chunk [B, H/P, chunks, N, P*N] fp32)."""
  grid = _grid(r, layout, chunks_per_block)
  B, num_groups, num_time_blocks = grid
  N, lanes = layout.head_size, layout.key_lanes
  seq, reset_spec, state_spec, checkpoint_spec = _specs(layout, chunks_per_block, num_time_blocks, False)
  const_specs, const_values = _const_specs_and_values(layout)
  names = [*CONST_NAMES, *INPUT_NAMES, "state_in"]
  in_specs = [*const_specs, *[seq] * 6, state_spec]
  args = [*const_values, r, log_w, k, v, a, b, state]
  if layout.has_reset:
    names.append("reset")
    in_specs.append(reset_spec)
    args.append(reset)
  names += ["y", "state_out"]
  out_shape = [jax.ShapeDtypeStruct(r.shape, r.dtype),
               jax.ShapeDtypeStruct((B, num_groups, N, lanes), jnp.float32)]
  out_specs = [seq, state_spec]
  if checkpoints:
    names.append("checkpoint")
    num_chunks = num_time_blocks * chunks_per_block
    out_shape.append(jax.ShapeDtypeStruct((B, num_groups, num_chunks, N, lanes), jnp.float32))
    out_specs.append(checkpoint_spec)
  staged = [*INPUT_NAMES, "y"]
  names += ["state_scratch", *(name + "_chunks" for name in staged)]
  kernel = functools.partial(_forward_kernel, names=names, layout=layout)
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((lanes, lanes), jnp.float32),
                      *_chunk_scratch(layout, chunks_per_block, len(staged))],
      compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
      interpret=interpret, name="wkv7_forward_tpu" if checkpoints else "wkv7_forward_lean_tpu")(*args)


def backward(r, log_w, k, v, a, b, reset, checkpoint, dy, dstate_end, *, layout: ChunkLayout,
             chunks_per_block: int, interpret: bool):
  """Returns (dr, dlog_w, dk, dv, da, db in their inputs' dtypes, dstate_start [B, H/P, N, P*N] fp32)."""
  grid = _grid(r, layout, chunks_per_block)
  B, num_groups, num_time_blocks = grid
  N, lanes = layout.head_size, layout.key_lanes
  seq, reset_spec, state_spec, checkpoint_spec = _specs(layout, chunks_per_block, num_time_blocks, True)
  const_specs, const_values = _const_specs_and_values(layout)
  inputs = (r, log_w, k, v, a, b)
  names = [*CONST_NAMES, *INPUT_NAMES, "checkpoint", "dy", "dstate_end"]
  in_specs = [*const_specs, *[seq] * 6, checkpoint_spec, seq, state_spec]
  args = [*const_values, *inputs, checkpoint, dy, dstate_end]
  if layout.has_reset:
    names.append("reset")
    in_specs.append(reset_spec)
    args.append(reset)
  grads = ["d" + name for name in INPUT_NAMES]
  staged = [*INPUT_NAMES, "dy", *grads]
  names += [*grads, "dstate_start", "dstate_scratch", *(name + "_chunks" for name in staged)]
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs]
  out_shape.append(jax.ShapeDtypeStruct((B, num_groups, N, lanes), jnp.float32))
  kernel = functools.partial(_backward_kernel, names=names, layout=layout)
  *grads, dstate_start = pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, in_specs=in_specs,
      out_specs=[*[seq] * 6, state_spec],
      scratch_shapes=[pltpu.VMEM((lanes, lanes), jnp.float32),
                      *_chunk_scratch(layout, chunks_per_block, len(staged))],
      compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
      interpret=interpret, name="wkv7_backward_tpu")(*args)
  return (*grads, dstate_start)
