"""The chunk loops shared by the TPU and Triton kernels: refs in, refs out, the state carried in fp32.

Every sequence ref is blocked as [chunks, C, lanes] so a chunk is selected on the leading, untiled axis
(`ref[i]`): no dynamic sublane or lane offsets reach Mosaic, and Triton sees plain strided loads.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.chunk_math import ChunkConsts, ChunkLayout, chunk_backward, chunk_forward, reset_masks

INPUT_NAMES = ("r", "log_w", "k", "v", "a", "b")
CONST_NAMES = ChunkConsts._fields


def load_consts(refs: dict, layout: ChunkLayout) -> ChunkConsts:
  """Constant masks from their refs; only what this layout reads is loaded."""
  G = layout.heads_packed
  return ChunkConsts(
      tri_incl=refs["tri_incl"][...],
      tri_strict=refs["tri_strict"][...],
      triu_strict=refs["triu_strict"][...] if layout.has_reset else None,
      ladder=[refs["ladder"][level] for level in range(layout.ladder_levels)],
      head_lanes=[refs["head_lanes"][h] for h in range(G)] if G > 1 else None,
      block_diag=refs["block_diag"][...] if G > 1 else None,
  )


def _load_chunk(refs: dict, i, layout: ChunkLayout):
  inputs = [refs[name][i].astype(jnp.float32) for name in INPUT_NAMES]
  consts = load_consts(refs, layout)
  resets = None
  if layout.has_reset:
    resets = reset_masks(refs["reset"][i].astype(jnp.float32), consts, layout.fp32_dot)
  return inputs, consts, resets


def forward_chunks(refs: dict, state, num_chunks: int, layout: ChunkLayout):
  """Runs `num_chunks` chunks in order from `state` [V, K]; writes y and the per-chunk start states
  (fp32 checkpoints for the backward). Returns the end state."""

  def step(i, state):
    inputs, consts, resets = _load_chunk(refs, i, layout)
    y, state_next = chunk_forward(state, *inputs, consts, resets, layout)
    refs["y"][i] = y.astype(refs["y"].dtype)
    refs["checkpoint"][i] = state
    return state_next

  return lax.fori_loop(0, num_chunks, step, state)


def backward_chunks(refs: dict, dstate, num_chunks: int, layout: ChunkLayout):
  """Runs `num_chunks` chunks in reverse from the end-state cotangent `dstate`, recomputing each chunk
  from its checkpoint; writes the input gradients. Returns the cotangent of the first chunk's start."""

  def step(j, dstate):
    i = num_chunks - 1 - j
    inputs, consts, resets = _load_chunk(refs, i, layout)
    state = refs["checkpoint"][i]
    dy = refs["dy"][i].astype(jnp.float32)
    dstate, *grads = chunk_backward(state, *inputs, dy, dstate, consts, resets, layout)
    for name, grad in zip(INPUT_NAMES, grads):
      out = refs["d" + name]
      out[i] = grad.astype(out.dtype)
    return dstate

  return lax.fori_loop(0, num_chunks, step, dstate)
