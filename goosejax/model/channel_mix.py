"""RWKV-7 channel mixing: token shift, then W_v relu(W_k x)^2 (docs/architecture.md#the-forward-pass)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from goosejax import sharding
from goosejax.config import ModelConfig
from goosejax.model import init
from goosejax.model.layers import matmul


class ChannelMix(nnx.Module):
  """Parameters of every layer's channel mix with a leading [L] axis; Linear weights [in, out]."""

  def __init__(self, cfg: ModelConfig, ratios: init.LayerRatios, *, rngs: nnx.Rngs):
    L, C, F = cfg.n_layer, cfg.n_embd, cfg.ffn_dim
    pdt = jnp.dtype(cfg.param_dtype)
    self.x_k = nnx.Param(jnp.asarray(ratios.shift_mix(ratios.r10**4) + jnp.zeros((L, C)), pdt))
    self.key = nnx.Param(init.orthogonal_stack(rngs.params(), L, F, C, init.LINEAR_GAINS["ffn.key"], pdt))
    self.value = nnx.Param(init.orthogonal_stack(rngs.params(), L, C, F, init.LINEAR_GAINS["ffn.value"], pdt))

  def __call__(self, x_BTC: jax.Array, prev_BTC: jax.Array) -> jax.Array:
    xk = x_BTC + (prev_BTC - x_BTC) * self.x_k[...].astype(x_BTC.dtype)
    hidden = sharding.constrain(jnp.square(jax.nn.relu(matmul(xk, self.key[...]))), sharding.MLP_AXES)
    return matmul(hidden, self.value[...])
