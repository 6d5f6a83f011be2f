"""LayerNorm and per-head GroupNorm with the official epsilons, computed in fp32."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from goosejax.model.layers import merge_heads

LAYER_NORM_EPS = 1e-5
GROUP_NORM_EPS = 64e-5   # ln_x: 1e-5 * head_size_divisor**2 in older code; fixed in all official kernels


def normalize(x: jax.Array, eps: float) -> jax.Array:
  """(x - mean) / sqrt(biased var + eps) over the last axis, in fp32."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


class LayerNorm(nnx.Module):
  """LayerNorm over C; a non-empty `stack` gives weights leading layer axes (see Blocks)."""

  def __init__(self, n_embd: int, *, stack: tuple[int, ...] = (), param_dtype=jnp.float32):
    self.weight = nnx.Param(jnp.ones((*stack, n_embd), param_dtype))
    self.bias = nnx.Param(jnp.zeros((*stack, n_embd), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    return layer_norm(x, self.weight[...], self.bias[...])


def layer_norm(x: jax.Array, weight_C: jax.Array, bias_C: jax.Array) -> jax.Array:
  """LayerNorm over the last axis (eps 1e-5) with the affine, computed in fp32, in x's dtype."""
  y = normalize(x, LAYER_NORM_EPS) * weight_C.astype(jnp.float32) + bias_C.astype(jnp.float32)
  return y.astype(x.dtype)


def group_norm_heads(y_BTHN: jax.Array, weight_C: jax.Array, bias_C: jax.Array) -> jax.Array:
  """GroupNorm with one group per head (ln_x), eps 64e-5, then the per-channel affine."""
  y_BTC = merge_heads(normalize(y_BTHN, GROUP_NORM_EPS))
  return y_BTC * weight_C.astype(jnp.float32) + bias_C.astype(jnp.float32)
