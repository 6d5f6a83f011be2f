"""Prefill: a batch of prompts through the sequence form, logits only where they are needed.

`RWKV7.__call__` always projects every position through the [C, V] head; a prompt only needs
the last position's logits (the head is a large share of each token's work, see the README's
"Inference speed"), so prefill applies the head to the last position only.

Two forms of the same function: `prefill_last(model, ...)` runs the model's own layer scan
(`RWKV7.hidden_states`); `prefill_split(weights, ...)` (what `generate` uses) runs the same
`Blocks` unrolled on the per-layer weights the decoder already holds
(goosejax.infer.decode.last_logits), which spares the scan's copy of every layer's weights out
of the stacked arrays (benchmarks/inference.py times this prefill; figures in the README).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from goosejax.infer.decode import DecodeWeights, LayerStates, last_logits
from goosejax.model.rwkv7 import RWKV7
from goosejax.model.state import RWKV7State


@functools.partial(jax.jit, static_argnums=0)
def _prefill_last(graphdef, params, tokens_BT, state, reset_BT):
  model = nnx.merge(graphdef, params)
  x_BTC, state = model.hidden_states(tokens_BT, state, reset_BT=reset_BT)
  return model.logits(x_BTC[:, -1]), state


def _check_tokens(tokens_BT) -> jax.Array:
  tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
  if tokens_BT.ndim != 2 or tokens_BT.shape[1] == 0:
    raise ValueError(f"prefill: tokens must be [batch, time] with time >= 1, got shape {tokens_BT.shape}")
  return tokens_BT


def prefill_last(model: RWKV7, tokens_BT: jax.Array, state: RWKV7State | None = None, *,
                 reset_BT: jax.Array | None = None) -> tuple[jax.Array, RWKV7State]:
  """Run [B, T] tokens; return the last position's logits [B, V] (fp32) and the new state."""
  tokens_BT = _check_tokens(tokens_BT)
  if state is None:
    state = model.init_state(tokens_BT.shape[0])
  graphdef, params = nnx.split(model)
  return _prefill_last(graphdef, params, tokens_BT, state, reset_BT)


_last_logits = jax.jit(last_logits)


def prefill_split(weights: DecodeWeights, tokens_BT: jax.Array, layers: LayerStates, *,
                  reset_BT: jax.Array | None = None) -> tuple[jax.Array, LayerStates]:
  """`prefill_last` on per-layer weights and states: (last logits [B, V], per-layer states).

  weights: `decode_weights(model)`; layers: `split_state(state)`.
  """
  return _last_logits(weights, _check_tokens(tokens_BT), layers, reset_BT)
