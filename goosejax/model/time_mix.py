"""RWKV-7 time mixing (docs/architecture.md#the-forward-pass), parameters stacked over layers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from goosejax import sharding
from goosejax.config import ModelConfig
from goosejax.model import init
from goosejax.model.layers import matmul
from goosejax.model.norms import group_norm_heads
from goosejax.wkv import wkv7

DECAY_SCALE = 0.606531       # the official runtime's constant (e^-0.5 to 6 digits)
KK_NORM_EPS = 1e-12          # F.normalize's eps on the norm


def matmul_f32(x: jax.Array, w) -> jax.Array:
  """`matmul` in fp32 whatever the compute dtype (the decay, in-context rate and value LoRAs)."""
  return matmul(x.astype(jnp.float32), w)


class TimeMix(nnx.Module):
  """Parameters of every layer's time mix, each with a leading [L] axis.

  Names follow the official checkpoint (`blocks.{l}.att.*`); Linear weights are stored
  [in, out] (the transpose of PyTorch's) and LoRA matrices [in, out] as in the file.
  """

  def __init__(self, cfg: ModelConfig, ratios: init.LayerRatios, *, rngs: nnx.Rngs):
    L, C, H, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size
    d_w, d_a, d_v, d_g = cfg.lora_ranks
    pdt = jnp.dtype(cfg.param_dtype)
    vec = lambda values: nnx.Param(jnp.asarray(values + jnp.zeros((L, C)), pdt))
    r10 = ratios.r10
    self.x_r = vec(ratios.shift_mix(0.2 * r10))
    self.x_w = vec(ratios.shift_mix(0.9 * r10))
    self.x_k = vec(ratios.shift_mix(0.7 * r10))
    self.x_v = vec(ratios.shift_mix(0.7 * r10))
    self.x_a = vec(ratios.shift_mix(0.9 * r10))
    self.x_g = vec(ratios.shift_mix(0.2 * r10))
    self.w0 = vec(ratios.www + 0.5 + 2.5 * ratios.zz)
    self.a0 = vec(-0.19 + 0.3 * ratios.zz + 0.4 * ratios.lin)
    self.v0 = vec(0.73 - 0.4 * ratios.lin)
    self.k_k = vec(0.71 - 0.1 * ratios.lin)
    self.k_a = vec(1.02)
    self.r_k = nnx.Param(jnp.full((L, H, N), -0.04, pdt))
    zeros = lambda rank: nnx.Param(jnp.zeros((L, C, rank), pdt))
    up = lambda rank: nnx.Param(init.lora_up_stack(rngs.params(), L, rank, C, pdt))
    self.w1, self.w2 = zeros(d_w), up(d_w)
    self.a1, self.a2 = zeros(d_a), up(d_a)
    self.v1, self.v2 = zeros(d_v), up(d_v)
    self.g1, self.g2 = zeros(d_g), up(d_g)
    linear = lambda name: nnx.Param(
        init.orthogonal_stack(rngs.params(), L, C, C, init.LINEAR_GAINS[f"att.{name}"], pdt))
    self.receptance = linear("receptance")
    self.key = linear("key")
    self.value = linear("value")
    self.output = linear("output")
    layer = jnp.arange(L, dtype=jnp.float32)[:, None]
    self.ln_x_weight = nnx.Param((((layer + 1) / L) ** 0.7 + jnp.zeros((L, C))).astype(pdt))
    self.ln_x_bias = nnx.Param(jnp.zeros((L, C), pdt))
    self.n_head, self.head_size = H, N
    self.wkv_impl, self.wkv_chunk_size = cfg.wkv_impl, cfg.wkv_chunk_size

  def __call__(self, x_BTC, prev_BTC, wkv_BHNN, v_first_BTC, is_first_layer, reset_BT=None):
    """One layer (params already indexed to this layer inside the layer scan).

    x_BTC: ln1 output; prev_BTC: the previous token's ln1 output (zeros at a document start);
    reset_BT: True where a document starts (the WKV state is zeroed before that token).
    Returns (out_BTC, new wkv state, v_first_BTC).
    """
    B, T, C = x_BTC.shape
    H, N = self.n_head, self.head_size
    dtype = x_BTC.dtype
    p = lambda param: param[...].astype(dtype)
    delta_BTC = prev_BTC - x_BTC
    xr, xw, xk, xv, xa, xg = (x_BTC + delta_BTC * p(mu) for mu in
                              (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))
    r = matmul(xr, self.receptance[...])
    k = matmul(xk, self.key[...])
    v = matmul(xv, self.value[...])
    # Decay, in fp32 throughout: w = exp(-0.606531 * sigmoid(z)), stored as its log.
    z = self.w0[...].astype(jnp.float32) + matmul_f32(jnp.tanh(matmul_f32(xw, self.w1[...])), self.w2[...])
    log_w = -DECAY_SCALE * jax.nn.sigmoid(z)
    iclr = jax.nn.sigmoid(self.a0[...].astype(jnp.float32)
                          + matmul_f32(matmul_f32(xa, self.a1[...]), self.a2[...]))
    gate = matmul(jax.nn.sigmoid(matmul(xg, self.g1[...])), self.g2[...])

    # Removal key from the unmodified k, normalised per head.
    kk = (k.astype(jnp.float32) * self.k_k[...].astype(jnp.float32)).reshape(B, T, H, N)
    kk = kk / jnp.maximum(jnp.linalg.norm(kk, axis=-1, keepdims=True), KK_NORM_EPS)
    k = k.astype(jnp.float32) * (1 + (iclr - 1) * self.k_a[...].astype(jnp.float32))

    # Value residual: layer 0 defines v_first; later layers lerp toward it.
    nu = jax.nn.sigmoid(self.v0[...].astype(jnp.float32)
                        + matmul_f32(matmul_f32(xv, self.v1[...]), self.v2[...]))
    v = v.astype(jnp.float32)
    v_mixed = v + (v_first_BTC.astype(jnp.float32) - v) * nu
    v = jnp.where(is_first_layer, v, v_mixed)
    v_first_BTC = jnp.where(is_first_layer, v, v_first_BTC.astype(jnp.float32)).astype(v_first_BTC.dtype)

    # Split by heads over `tensor` (each device runs the WKV of its own heads, no gather).
    heads = lambda t: sharding.constrain(t.reshape(B, T, H, N), sharding.HEADS_AXES)
    iclr_h = heads(iclr)
    kk = sharding.constrain(kk, sharding.HEADS_AXES)
    y_BTHN, wkv_BHNN = wkv7(heads(r).astype(dtype), heads(log_w), heads(k).astype(dtype),
                            heads(v).astype(dtype), (-kk).astype(dtype), (kk * iclr_h).astype(dtype),
                            wkv_BHNN, reset=reset_BT, impl=self.wkv_impl, chunk_size=self.wkv_chunk_size)
    y_BTC = group_norm_heads(y_BTHN.astype(jnp.float32), self.ln_x_weight[...], self.ln_x_bias[...])
    bonus_BTH1 = jnp.sum(heads(r.astype(jnp.float32)) * heads(k) * self.r_k[...].astype(jnp.float32),
                         axis=-1, keepdims=True)
    y_BTC = y_BTC + (bonus_BTH1 * heads(v)).reshape(B, T, C)
    out_BTC = matmul((y_BTC * gate.astype(jnp.float32)).astype(dtype), self.output[...])
    return out_BTC, wkv_BHNN, v_first_BTC
