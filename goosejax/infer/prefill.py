"""Prefill: a batch of prompts through the sequence form, logits only where they are needed.

`RWKV7.__call__` always projects every position through the [C, V] head; a prompt only needs
the last position's logits (the head is ~60% of the work per token at 0.1B), so this module
runs the same embedding, layer scan and final norm and applies the head to chosen positions.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from goosejax.model.rwkv7 import RWKV7
from goosejax.model.state import RWKV7State


def hidden_states(model: RWKV7, tokens_BT: jax.Array, state: RWKV7State | None = None, *,
                  reset_BT: jax.Array | None = None) -> tuple[jax.Array, RWKV7State]:
  """`model(tokens, state, reset_BT=...)` without the head: (ln_out output [B,T,C], state)."""
  cfg = model.config
  B, T = tokens_BT.shape
  if state is None:
    state = model.init_state(B)
  dtype = model.compute_dtype
  x_BTC = model.ln0(jnp.take(model.emb[...], tokens_BT, axis=0).astype(dtype))
  graphdef, params = nnx.split(model.blocks)

  def layer(carry, xs):
    x_BTC, v_first_BTC = carry
    layer_params, att_shift_BC, wkv_BHNN, ffn_shift_BC, layer_index = xs
    block = nnx.merge(graphdef, layer_params)
    x_BTC, v_first_BTC, new_state = block(x_BTC, v_first_BTC, att_shift_BC, wkv_BHNN,
                                          ffn_shift_BC, layer_index == 0, reset_BT)
    return (x_BTC, v_first_BTC), new_state

  (x_BTC, _), (att_shift, wkv, ffn_shift) = jax.lax.scan(
      layer, (x_BTC, jnp.zeros_like(x_BTC)),
      (params, state.att_shift_LBC.astype(dtype), state.wkv_LBHNN.astype(jnp.float32),
       state.ffn_shift_LBC.astype(dtype), jnp.arange(cfg.n_layer)))
  return model.ln_out(x_BTC), RWKV7State(att_shift, wkv, ffn_shift)


def project_head(model: RWKV7, x_C: jax.Array) -> jax.Array:
  """Logits (fp32) of final-norm outputs of any leading shape [..., C]."""
  return jnp.matmul(x_C, model.head[...].astype(x_C.dtype), precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _prefill_last(graphdef, params, tokens_BT, state, reset_BT):
  model = nnx.merge(graphdef, params)
  x_BTC, state = hidden_states(model, tokens_BT, state, reset_BT=reset_BT)
  return project_head(model, x_BTC[:, -1]), state


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
