"""WKV-7 forward and backward as Pallas Triton kernels (NVIDIA GPUs; the backend is chosen by
`pltriton.CompilerParams`, which works on jax 0.10 to 0.12).

Grid (batch, head, value tile). Each program owns the rows of one head's state that belong to its value
tile, keeps them in registers as a fori_loop carry ([value tile, N] fp32), and walks all chunks of the
sequence.

Chunks above 32 are refused (wkv_policy.TRITON): the backward at Q = 64 needs more shared memory
than a Hopper block has; NUM_WARPS = 8 spilled least. Both from the offline sm_90a compile
(benchmarks/triton_offline_compile.py; figures in the README's Pallas WKV-7 kernels section).
Value tiles are independent in the forward (u, y and the state rows all split by value
channel); in the backward the key-side gradients (r, log_w, k, a, b) are partial sums per tile, written
in fp32 and summed by the caller. Triton needs power-of-two arrays: Q, N and the tile are powers of two
(the caller pads N).

Array layouts (prepared by `pallas_kernels.wkv7`): sequences [B, chunks, Q, H*N]; reset [B, chunks, Q, 1];
states [B, H*N, N] (value rows of all heads stacked); checkpoints [B, chunks, H*N, N].
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.chunk_math import ChunkLayout, chunk_constants
from pallas_kernels.kernel_body import CONST_NAMES, INPUT_NAMES, backward_chunks, forward_chunks

_KEY_SIDE = ("r", "log_w", "k", "a", "b")
NUM_WARPS = 8


def _compiler_params(num_warps: int | None):
  return pltriton.CompilerParams(num_warps=num_warps or NUM_WARPS, num_stages=1)


def _zeros_index(ndim, *_):
  return (0,) * ndim


def _const_specs_and_values(layout: ChunkLayout):
  consts = chunk_constants(layout)
  specs = [pl.BlockSpec(c.shape, functools.partial(_zeros_index, c.ndim)) for c in consts]
  return specs, [jnp.asarray(c) for c in consts]


def _forward_kernel(*refs, names, layout: ChunkLayout, num_chunks: int):
  refs = dict(zip(names, refs))
  refs["state_out"][...] = forward_chunks(refs, refs["state_in"][...], num_chunks, layout)


def _backward_kernel(*refs, names, layout: ChunkLayout, num_chunks: int):
  refs = dict(zip(names, refs))
  refs["dstate_start"][...] = backward_chunks(refs, refs["dstate_end"][...], num_chunks, layout)


def _specs(layout: ChunkLayout, num_chunks: int, value_tiles: int):
  Q, N, tile_lanes = layout.chunk_size, layout.head_size, layout.value_lanes

  def value_block(h, vt):
    return h * value_tiles + vt

  key_seq = pl.BlockSpec((None, num_chunks, Q, N), lambda b, h, vt: (b, 0, 0, h))
  value_seq = pl.BlockSpec((None, num_chunks, Q, tile_lanes), lambda b, h, vt: (b, 0, 0, value_block(h, vt)))
  reset = pl.BlockSpec((None, num_chunks, Q, 1), lambda b, h, vt: (b, 0, 0, 0))
  state = pl.BlockSpec((None, tile_lanes, N), lambda b, h, vt: (b, value_block(h, vt), 0))
  checkpoint = pl.BlockSpec((None, num_chunks, tile_lanes, N), lambda b, h, vt: (b, 0, value_block(h, vt), 0))
  return key_seq, value_seq, reset, state, checkpoint


def _check(r, layout: ChunkLayout):
  B, num_chunks, Q, HN = r.shape
  N, tile_lanes = layout.head_size, layout.value_lanes
  for what, size in (("chunk size", Q), ("head size", N), ("value tile", tile_lanes)):
    if size < 16 or size & (size - 1):
      raise ValueError(f"triton_gpu: the {what} must be a power of two >= 16 (Triton dots), got {size}")
  if layout.heads_packed != 1 or N % tile_lanes or HN % N:
    raise ValueError(f"triton_gpu: unsupported layout {layout} for {HN} lanes")
  return B, HN // N, N // tile_lanes, num_chunks


def forward(r, log_w, k, v, a, b, state, reset, *, layout: ChunkLayout, interpret: bool,
            checkpoints: bool = True, num_warps: int | None = None):
  """Returns (y like r, end state [B, H*N, N] fp32, and with `checkpoints` the start state of every
  chunk [B, chunks, H*N, N] fp32)."""
  B, H, value_tiles, num_chunks = _check(r, layout)
  key_seq, value_seq, reset_spec, state_spec, checkpoint_spec = _specs(layout, num_chunks, value_tiles)
  const_specs, const_values = _const_specs_and_values(layout)
  names = [*CONST_NAMES, *INPUT_NAMES, "state_in"]
  in_specs = [*const_specs, key_seq, key_seq, key_seq, value_seq, key_seq, key_seq, state_spec]
  args = [*const_values, r, log_w, k, v, a, b, state]
  if layout.has_reset:
    names.append("reset")
    in_specs.append(reset_spec)
    args.append(reset)
  names += ["y", "state_out"]
  HN, N = r.shape[-1], layout.head_size
  out_shape = [jax.ShapeDtypeStruct(r.shape, r.dtype), jax.ShapeDtypeStruct((B, HN, N), jnp.float32)]
  out_specs = [value_seq, state_spec]
  if checkpoints:
    names.append("checkpoint")
    out_shape.append(jax.ShapeDtypeStruct((B, num_chunks, HN, N), jnp.float32))
    out_specs.append(checkpoint_spec)
  kernel = functools.partial(_forward_kernel, names=names, layout=layout, num_chunks=num_chunks)
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(B, H, value_tiles), in_specs=in_specs, out_specs=out_specs,
      compiler_params=_compiler_params(num_warps), interpret=interpret,
      name="wkv7_forward_triton" if checkpoints else "wkv7_forward_lean_triton")(*args)


def backward(r, log_w, k, v, a, b, reset, checkpoint, dy, dstate_end, *, layout: ChunkLayout,
             interpret: bool, num_warps: int | None = None):
  """Returns (dr, dlog_w, dk, dv, da, db in their inputs' dtypes, dstate_start [B, H*N, N] fp32)."""
  B, H, value_tiles, num_chunks = _check(r, layout)
  key_seq, value_seq, reset_spec, state_spec, checkpoint_spec = _specs(layout, num_chunks, value_tiles)
  const_specs, const_values = _const_specs_and_values(layout)
  inputs = dict(zip(INPUT_NAMES, (r, log_w, k, v, a, b)))
  names = [*CONST_NAMES, *INPUT_NAMES, "checkpoint", "dy", "dstate_end"]
  in_specs = [*const_specs, key_seq, key_seq, key_seq, value_seq, key_seq, key_seq,
              checkpoint_spec, value_seq, state_spec]
  args = [*const_values, *inputs.values(), checkpoint, dy, dstate_end]
  if layout.has_reset:
    names.append("reset")
    in_specs.append(reset_spec)
    args.append(reset)
  # Key-side gradients: one fp32 partial per value tile when the value dim is tiled.
  if value_tiles == 1:
    key_grad_shape = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    key_grad_spec = key_seq
  else:
    key_grad_shape = lambda x: jax.ShapeDtypeStruct((value_tiles, *x.shape), jnp.float32)
    Q, N = layout.chunk_size, layout.head_size
    key_grad_spec = pl.BlockSpec((None, None, num_chunks, Q, N), lambda b, h, vt: (vt, b, 0, 0, h))
  out_shape, out_specs = [], []
  for name in INPUT_NAMES:
    names.append("d" + name)
    if name in _KEY_SIDE:
      out_shape.append(key_grad_shape(inputs[name]))
      out_specs.append(key_grad_spec)
    else:
      out_shape.append(jax.ShapeDtypeStruct(v.shape, v.dtype))
      out_specs.append(value_seq)
  names.append("dstate_start")
  out_shape.append(jax.ShapeDtypeStruct(dstate_end.shape, jnp.float32))
  out_specs.append(state_spec)
  kernel = functools.partial(_backward_kernel, names=names, layout=layout, num_chunks=num_chunks)
  *grads, dstate_start = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(B, H, value_tiles), in_specs=in_specs, out_specs=out_specs,
      compiler_params=_compiler_params(num_warps), interpret=interpret,
      name="wkv7_backward_triton")(*args)
  if value_tiles > 1:
    grads = [g.sum(0).astype(inputs[name].dtype) if name in _KEY_SIDE else g
             for name, g in zip(INPUT_NAMES, grads)]
  return (*grads, dstate_start)
