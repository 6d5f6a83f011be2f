"""WKV-7 forward and backward as Pallas Mosaic TPU kernels.

Grid (batch, head group, time block). A head group is G heads packed side by side in the lanes, so
blocks are G*N lanes wide (128 for N = 64) with a block-diagonal [G*N, G*N] fp32 state. The time axis
is "arbitrary" (sequential on a core): the state lives in a VMEM scratch across time blocks, and each
grid step loops over several chunks to keep the number of grid steps (fixed overhead each) small. The
forward writes an fp32 state checkpoint per chunk; the backward walks the time blocks in reverse and
recomputes every chunk from its checkpoint.

Array layouts (prepared by `pallas_kernels.wkv7`): sequences [B, chunks, C, H*N]; reset [B, chunks, C, 1];
states [B, H/G, G*N, G*N]; checkpoints [B, H/G, chunks, G*N, G*N].
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.chunk_math import ChunkLayout, chunk_constants
from pallas_kernels.kernel_body import CONST_NAMES, INPUT_NAMES, backward_chunks, forward_chunks

_SEMANTICS = ("parallel", "parallel", "arbitrary")


def _const_specs_and_values(layout: ChunkLayout):
  consts = chunk_constants(layout)
  specs = [pl.BlockSpec(c.shape, functools.partial(_zeros_index, c.ndim)) for c in consts]
  return specs, [jnp.asarray(c) for c in consts]


def _zeros_index(ndim, *_):
  return (0,) * ndim


def _forward_kernel(*refs, names, layout: ChunkLayout, chunks_per_block: int):
  refs = dict(zip(names, refs))
  time_block = pl.program_id(2)

  @pl.when(time_block == 0)
  def _():
    refs["state_scratch"][...] = refs["state_in"][...]

  state = forward_chunks(refs, refs["state_scratch"][...], chunks_per_block, layout)
  refs["state_scratch"][...] = state

  @pl.when(time_block == pl.num_programs(2) - 1)
  def _():
    refs["state_out"][...] = state


def _backward_kernel(*refs, names, layout: ChunkLayout, chunks_per_block: int):
  refs = dict(zip(names, refs))
  step = pl.program_id(2)

  @pl.when(step == 0)
  def _():
    refs["dstate_scratch"][...] = refs["dstate_end"][...]

  dstate = backward_chunks(refs, refs["dstate_scratch"][...], chunks_per_block, layout)
  refs["dstate_scratch"][...] = dstate

  @pl.when(step == pl.num_programs(2) - 1)
  def _():
    refs["dstate_start"][...] = dstate


def _specs(layout: ChunkLayout, chunks_per_block: int, num_time_blocks: int, reverse: bool):
  C, L = layout.chunk_size, layout.key_lanes

  def time(t):
    return num_time_blocks - 1 - t if reverse else t

  seq = pl.BlockSpec((None, chunks_per_block, C, L), lambda b, h, t: (b, time(t), 0, h))
  reset = pl.BlockSpec((None, chunks_per_block, C, 1), lambda b, h, t: (b, time(t), 0, 0))
  state = pl.BlockSpec((None, None, L, L), lambda b, h, t: (b, h, 0, 0))
  checkpoint = pl.BlockSpec((None, None, chunks_per_block, L, L), lambda b, h, t: (b, h, time(t), 0, 0))
  return seq, reset, state, checkpoint


def _grid(r, layout: ChunkLayout, chunks_per_block: int):
  B, num_chunks, _, HN = r.shape
  if num_chunks % chunks_per_block or HN % layout.key_lanes:
    raise ValueError(f"mosaic_tpu: {num_chunks} chunks / {HN} lanes do not tile into blocks of "
                     f"{chunks_per_block} chunks x {layout.key_lanes} lanes")
  return B, HN // layout.key_lanes, num_chunks // chunks_per_block


def forward(r, log_w, k, v, a, b, state, reset, *, layout: ChunkLayout, chunks_per_block: int,
            interpret: bool):
  """Returns (y like r, end state [B, H/G, L, L] fp32, checkpoints [B, H/G, chunks, L, L] fp32)."""
  grid = _grid(r, layout, chunks_per_block)
  B, num_groups, num_time_blocks = grid
  L = layout.key_lanes
  seq, reset_spec, state_spec, checkpoint_spec = _specs(layout, chunks_per_block, num_time_blocks, False)
  const_specs, const_values = _const_specs_and_values(layout)
  names = [*CONST_NAMES, *INPUT_NAMES, "state_in"]
  in_specs = [*const_specs, *[seq] * 6, state_spec]
  args = [*const_values, r, log_w, k, v, a, b, state]
  if layout.has_reset:
    names.append("reset")
    in_specs.append(reset_spec)
    args.append(reset)
  names += ["y", "state_out", "checkpoint", "state_scratch"]
  num_chunks = r.shape[1]
  out_shape = [jax.ShapeDtypeStruct(r.shape, r.dtype),
               jax.ShapeDtypeStruct((B, num_groups, L, L), jnp.float32),
               jax.ShapeDtypeStruct((B, num_groups, num_chunks, L, L), jnp.float32)]
  kernel = functools.partial(_forward_kernel, names=names, layout=layout,
                             chunks_per_block=chunks_per_block)
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, in_specs=in_specs,
      out_specs=[seq, state_spec, checkpoint_spec],
      scratch_shapes=[pltpu.VMEM((L, L), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
      interpret=interpret, name="wkv7_forward_tpu")(*args)


def backward(r, log_w, k, v, a, b, reset, checkpoint, dy, dstate_end, *, layout: ChunkLayout,
             chunks_per_block: int, interpret: bool):
  """Returns (dr, dlog_w, dk, dv, da, db in their inputs' dtypes, dstate_start [B, H/G, L, L] fp32)."""
  grid = _grid(r, layout, chunks_per_block)
  B, num_groups, num_time_blocks = grid
  L = layout.key_lanes
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
  names += ["d" + name for name in INPUT_NAMES] + ["dstate_start", "dstate_scratch"]
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs]
  out_shape.append(jax.ShapeDtypeStruct((B, num_groups, L, L), jnp.float32))
  kernel = functools.partial(_backward_kernel, names=names, layout=layout,
                             chunks_per_block=chunks_per_block)
  *grads, dstate_start = pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, in_specs=in_specs,
      out_specs=[*[seq] * 6, state_spec],
      scratch_shapes=[pltpu.VMEM((L, L), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
      interpret=interpret, name="wkv7_backward_tpu")(*args)
  return (*grads, dstate_start)
