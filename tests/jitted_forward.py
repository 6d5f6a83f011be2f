"""One jitted model forward shared by the model and parity tests (one trace per shape)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens_BT, state, reset_BT):
  return nnx.merge(graphdef, params)(tokens_BT, state, reset_BT=reset_BT)


def forward(model, tokens_BT, state=None, reset_BT=None):
  """`model(tokens_BT, state, reset_BT=...)` jitted, always with an explicit state and reset."""
  B, T = tokens_BT.shape
  state = model.init_state(B) if state is None else state
  reset_BT = jnp.zeros((B, T), bool) if reset_BT is None else reset_BT
  graphdef, params = nnx.split(model)
  return _forward(graphdef, params, tokens_BT, state, reset_BT)
