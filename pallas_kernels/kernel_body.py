"""The chunk loops shared by the TPU and Triton kernels: refs in, refs out, the state carried in fp32.

Every sequence ref is blocked as [chunks, Q, lanes] so a chunk is selected on the leading, untiled axis
(`ref[i]`): no dynamic sublane or lane offsets reach Mosaic, and Triton sees plain strided loads.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.chunk_math import ChunkConsts, ChunkLayout, ChunkMath

INPUT_NAMES = ("r", "log_w", "k", "v", "a", "b")
CONST_NAMES = ChunkConsts._fields


def chunk_math(refs: dict, layout: ChunkLayout) -> ChunkMath:
  """The chunk step with its constant masks loaded from their refs (only what `layout` reads)."""
  P = layout.heads_packed
  consts = ChunkConsts(
      tri_incl=refs["tri_incl"][...],
      tri_strict=refs["tri_strict"][...],
      triu_strict=refs["triu_strict"][...] if layout.has_reset else None,
      ladder=[refs["ladder"][level] for level in range(layout.ladder_levels)],
      head_lanes=[refs["head_lanes"][h] for h in range(P)] if P > 1 else None,
      block_diag=refs["block_diag"][...] if P > 1 else None,
  )
  return ChunkMath(layout, consts)


def _load_chunk(refs: dict, i, layout: ChunkLayout):
  math = chunk_math(refs, layout)
  inputs = [refs[name][i].astype(jnp.float32) for name in INPUT_NAMES]
  resets = math.reset_masks(refs["reset"][i].astype(jnp.float32)) if layout.has_reset else None
  return math, inputs, resets


def forward_chunks(refs: dict, state, num_chunks: int, layout: ChunkLayout):
  """Runs `num_chunks` chunks in order from `state` [values, keys]; writes y and, when there is a
  "checkpoint" ref, each chunk's start state (fp32, for the backward). Returns the end state."""
  checkpoints = refs.get("checkpoint")

  def step(i, state):
    math, inputs, resets = _load_chunk(refs, i, layout)
    y, state_next = math.forward(state, math.terms(*inputs, resets))
    refs["y"][i] = y.astype(refs["y"].dtype)
    if checkpoints is not None:
      checkpoints[i] = math.compact_state(state)
    return state_next

  return lax.fori_loop(0, num_chunks, step, state)


def backward_chunks(refs: dict, dstate, num_chunks: int, layout: ChunkLayout):
  """Runs `num_chunks` chunks in reverse from the end-state cotangent `dstate`, recomputing each chunk
  from its checkpoint; writes the input gradients. Returns the cotangent of the first chunk's start."""

  def step(j, dstate):
    i = num_chunks - 1 - j
    math, inputs, resets = _load_chunk(refs, i, layout)
    dy = refs["dy"][i].astype(jnp.float32)
    state = math.expand_state(refs["checkpoint"][i])
    dstate, grads = math.backward(state, inputs, dy, dstate, resets)
    for name, grad in zip(INPUT_NAMES, grads):
      out = refs["d" + name]
      out[i] = grad.astype(out.dtype)
    return dstate

  return lax.fori_loop(0, num_chunks, step, dstate)
