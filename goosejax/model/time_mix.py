"""RWKV-7 time mixing (docs/architecture.md#the-forward-pass), parameters stacked over layers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from goosejax import sharding
from goosejax.config import ModelConfig
from goosejax.model import init, remat
from goosejax.model.layers import matmul, merge_heads, split_heads
from goosejax.model.norms import group_norm_heads
from goosejax.wkv import wkv7
from pallas_kernels.wkv_policy import DECAY_SCALE

KK_NORM_EPS = 1e-12          # F.normalize's eps on the norm


def fp32(x: jax.Array) -> jax.Array:
  """x in fp32: the decay, in-context learning rate, value residual, keys and bonus are
  computed in fp32 whatever the compute dtype."""
  return x.astype(jnp.float32)


def lora(x: jax.Array, down, up, activation=None) -> jax.Array:
  """up(activation(down(x))): a low-rank path, in x's dtype."""
  hidden = matmul(x, down)
  return matmul(hidden if activation is None else activation(hidden), up)


def shift_mix(x_BTC: jax.Array, delta_BTC: jax.Array, mu_C) -> jax.Array:
  """The lerp by `mu_C` from each token toward the previous one (delta_BTC = previous - this),
  in the compute dtype."""
  return x_BTC + delta_BTC * mu_C[...].astype(x_BTC.dtype)


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
    to_compute = lambda t: t.astype(x_BTC.dtype)   # the compute dtype; `fp32` the other way
    # Token shift: six lerps from this token toward the previous one, in the compute dtype.
    delta_BTC = prev_BTC - x_BTC
    xr_BTC, xw_BTC, xk_BTC, xv_BTC, xa_BTC, xg_BTC = (
        shift_mix(x_BTC, delta_BTC, mu_C)
        for mu_C in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))
    r_BTC = matmul(xr_BTC, self.receptance[...])
    k_BTC = matmul(xk_BTC, self.key[...])
    v_BTC = matmul(xv_BTC, self.value[...])    # as `value_of`
    gate_BTC = lora(xg_BTC, self.g1[...], self.g2[...], jax.nn.sigmoid)
    # Decay (w = exp(w_log)), in-context learning rate and value residual gate: fp32 LoRAs.
    w_log_BTC = -DECAY_SCALE * jax.nn.sigmoid(
        fp32(self.w0[...]) + lora(fp32(xw_BTC), self.w1[...], self.w2[...], jnp.tanh))
    iclr_BTC = jax.nn.sigmoid(fp32(self.a0[...]) + lora(fp32(xa_BTC), self.a1[...], self.a2[...]))
    nu_BTC = jax.nn.sigmoid(fp32(self.v0[...]) + lora(fp32(xv_BTC), self.v1[...], self.v2[...]))

    # Removal key: the unmodified key times k_k, unit length per head.
    kk_BTHN = self.heads(fp32(k_BTC) * fp32(self.k_k[...]))
    kk_BTHN = kk_BTHN / jnp.maximum(jnp.linalg.norm(kk_BTHN, axis=-1, keepdims=True), KK_NORM_EPS)
    # Replacement key: the key scaled toward k * k_a as the in-context learning rate grows.
    k_BTC = fp32(k_BTC) * (1 + (iclr_BTC - 1) * fp32(self.k_a[...]))
    # Value residual: layer 0 defines v_first; later layers lerp toward it.
    v_BTC = fp32(v_BTC)
    v_BTC = jnp.where(is_first_layer, v_BTC, v_BTC + (fp32(v_first_BTC) - v_BTC) * nu_BTC)
    v_first_BTC = jnp.where(is_first_layer, v_BTC, fp32(v_first_BTC)).astype(v_first_BTC.dtype)

    r_BTHN, w_log_BTHN, k_BTHN, v_BTHN, iclr_BTHN = map(
        self.heads, (r_BTC, w_log_BTC, k_BTC, v_BTC, iclr_BTC))
    a_BTHN, b_BTHN = -kk_BTHN, kk_BTHN * iclr_BTHN
    # The WKV reads r, k, v, a, b rounded to the compute dtype and w_log in fp32.
    y_BTHN, wkv_BHNN = wkv7(to_compute(r_BTHN), w_log_BTHN, to_compute(k_BTHN), to_compute(v_BTHN),
                            to_compute(a_BTHN), to_compute(b_BTHN), wkv_BHNN, reset=reset_BT,
                            impl=self.wkv_impl, chunk_size=self.wkv_chunk_size)
    y_BTHN = remat.tag(y_BTHN, remat.WKV_OUT)
    # ln_x per head, plus the bonus: each head's value weighted by its (r * k * r_k) sum.
    y_BTC = group_norm_heads(y_BTHN, self.ln_x_weight[...], self.ln_x_bias[...])
    # (r goes to fp32 before its split: fp32(r_BTHN) would round r's bf16 gradient differently.)
    bonus_BTH1 = jnp.sum(self.heads(fp32(r_BTC)) * k_BTHN * fp32(self.r_k[...]), axis=-1,
                         keepdims=True)
    y_BTC = y_BTC + merge_heads(bonus_BTH1 * v_BTHN)
    out_BTC = matmul(to_compute(y_BTC * fp32(gate_BTC)), self.output[...])
    return out_BTC, wkv_BHNN, v_first_BTC

  def value_of(self, x_BTC: jax.Array, prev_BTC: jax.Array) -> jax.Array:
    """The value projection before the value residual, as `__call__` computes it, in the
    compute dtype: layer 0's is `v_first`, which the model computes on its own before the
    layer scan."""
    return matmul(shift_mix(x_BTC, prev_BTC - x_BTC, self.x_v), self.value[...])

  def heads(self, x_BTC: jax.Array) -> jax.Array:
    """[B,T,C] -> [B,T,H,N], split by heads over `tensor` (each device runs the WKV of its
    own heads, no gather)."""
    return sharding.constrain(split_heads(x_BTC, self.head_size), sharding.HEADS_AXES)
