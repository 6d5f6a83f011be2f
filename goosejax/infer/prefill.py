"""Prefill: a batch of prompts through the sequence form, logits only where they are needed.

`RWKV7.__call__` always projects every position through the [C, V] head; a prompt only needs
the last position's logits (the head is ~60% of the work per token at 0.1B), so prefill runs
`RWKV7.hidden_states` and applies the head to the last position only.

Two forms: `prefill_last(model, ...)` runs the model's own layer scan; `prefill_split(...)`
(what `generate` uses) runs the same `Blocks` module layer by layer on the per-layer weights
the decoder already holds (goosejax.infer.step.DecodeWeights), which spares the scan's copy of
every layer's weights out of the stacked arrays (~8% of a 512-token prefill at 0.1B on CPU).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from goosejax.infer.step import TRANSPOSED, DecodeWeights, LayerStates, _layer_norm
from goosejax.model.rwkv7 import RWKV7
from goosejax.model.state import RWKV7State


@functools.partial(jax.jit, static_argnums=0)
def _prefill_last(graphdef, params, tokens_BT, state, reset_BT):
  model = nnx.merge(graphdef, params)
  x_BTC, state = model.hidden_states(tokens_BT, state, reset_BT=reset_BT)
  return model.logits(x_BTC[:, -1]), state


def prefill_last(model: RWKV7, tokens_BT: jax.Array, state: RWKV7State | None = None, *,
                 reset_BT: jax.Array | None = None) -> tuple[jax.Array, RWKV7State]:
  """Run [B, T] tokens; return the last position's logits [B, V] (fp32) and the new state."""
  tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
  if tokens_BT.ndim != 2 or tokens_BT.shape[1] == 0:
    raise ValueError(f"prefill: tokens must be [batch, time] with time >= 1, got shape {tokens_BT.shape}")
  if state is None:
    state = model.init_state(tokens_BT.shape[0])
  graphdef, params = nnx.split(model)
  return _prefill_last(graphdef, params, tokens_BT, state, reset_BT)


def blocks_template(model: RWKV7):
  """(graphdef, flat parameter paths) of the model's Blocks, for `prefill_split`."""
  graphdef, params = nnx.split(model.blocks)
  return graphdef, tuple(path for path, _ in params.flat_state())


@functools.partial(jax.jit, static_argnums=(0, 1))
def _prefill_split(graphdef, paths, weights: DecodeWeights, tokens_BT, layers: LayerStates, reset_BT):
  top, dtype = weights.top, weights.dtype
  x_BTC = _layer_norm(jnp.take(top["emb"], tokens_BT, axis=0).astype(dtype), top["ln0.weight"],
                      top["ln0.bias"])
  v_first_BTC = jnp.zeros_like(x_BTC)
  new_layers = []
  for i, (flat, (att_shift_BC, wkv_BHNN, ffn_shift_BC)) in enumerate(zip(weights.layers, layers)):
    # The decoder keeps the big matrices [out, in]; the transpose folds into the matmul.
    values = {path: flat[".".join(path)].T if ".".join(path) in TRANSPOSED else flat[".".join(path)]
              for path in paths}
    block = nnx.merge(graphdef, nnx.State.from_flat_path(
        {path: nnx.Param(value) for path, value in values.items()}))
    x_BTC, v_first_BTC, (att, wkv, ffn) = block(
        x_BTC, v_first_BTC, att_shift_BC.astype(dtype), wkv_BHNN.astype(jnp.float32),
        ffn_shift_BC.astype(dtype), i == 0, reset_BT)
    new_layers.append((att.astype(att_shift_BC.dtype), wkv, ffn.astype(ffn_shift_BC.dtype)))
  x_BC = _layer_norm(x_BTC[:, -1], top["ln_out.weight"], top["ln_out.bias"])
  logits_BV = jax.lax.dot_general(x_BC, top["head_T"].astype(dtype), (((1,), (1,)), ((), ())),
                                  precision=jax.lax.Precision.HIGHEST,
                                  preferred_element_type=jnp.float32)
  return logits_BV, tuple(new_layers)


def prefill_split(template, weights: DecodeWeights, tokens_BT: jax.Array, layers: LayerStates, *,
                  reset_BT: jax.Array | None = None) -> tuple[jax.Array, LayerStates]:
  """`prefill_last` on per-layer weights and states: (last logits [B, V], per-layer states).

  template: `blocks_template(model)`; weights: `decode_weights(model)`.
  """
  graphdef, paths = template
  return _prefill_split(graphdef, paths, weights, jnp.asarray(tokens_BT, jnp.int32), layers,
                        reset_BT)
