"""The recurrent state carried between calls: three small stacked arrays per model."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class RWKV7State(NamedTuple):
  """Per-layer recurrent state, layers stacked on the leading axis.

  att_shift_LBC: last ln1 output of each layer (time-mix token shift), compute dtype.
  wkv_LBHNN:     WKV state, [value, key] layout as in the official runtime, always fp32.
  ffn_shift_LBC: last ln2 output of each layer (channel-mix token shift), compute dtype.
  """
  att_shift_LBC: jax.Array
  wkv_LBHNN: jax.Array
  ffn_shift_LBC: jax.Array


def zeros_state(n_layer: int, batch: int, n_embd: int, n_head: int, head_size: int,
                dtype=jnp.float32) -> RWKV7State:
  shift = jnp.zeros((n_layer, batch, n_embd), dtype)
  return RWKV7State(shift, jnp.zeros((n_layer, batch, n_head, head_size, head_size), jnp.float32),
                    shift)


# A state split per layer: ((att_shift_BC, wkv_BHNN, ffn_shift_BC), ...), what
# `goosejax.model.rwkv7.run_layers` takes. The decoder carries this form from token to token:
# stacking [L, B, H, N, N] every step and slicing it per layer would copy the whole WKV state
# twice per token (its size at batch 64: README, "Inference speed").
LayerStates = tuple[tuple[jax.Array, jax.Array, jax.Array], ...]


def split_state(state: RWKV7State) -> LayerStates:
  return tuple((state.att_shift_LBC[i], state.wkv_LBHNN[i], state.ffn_shift_LBC[i])
               for i in range(state.wkv_LBHNN.shape[0]))


def join_state(layers: LayerStates) -> RWKV7State:
  return RWKV7State(*(jnp.stack(parts) for parts in zip(*layers)))
