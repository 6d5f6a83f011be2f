"""A small causal Transformer: the baseline of the expressivity experiments.

Pre-norm GPT blocks, x + Attention(ln1(x)), then + MLP(ln2(x)), with rotary position
embeddings (RoPE: no learned position table, so one model runs at any length), softmax
attention over causal heads of `head_size`, a GELU MLP of `ffn_dim` and a final LayerNorm.

Shapes come from the project's ModelConfig (vocab_size, n_layer, n_embd, head_size, ffn_dim,
dtype, param_dtype), so a Transformer and an RWKV-7 are described by the same config; the
RWKV-only fields (LoRA ranks, WKV implementation) are ignored. Parameters are stacked over
layers and the layers run under `lax.scan`, as in RWKV7, and the weight matrices carry the
names of their RWKV-7 counterparts ("receptance" is RWKV's name for the query; the MLP's two
matrices are ffn.key and ffn.value) so goosejax.train.recipe.make_optimizer gives both models
the same parameter groups: weight decay on emb, head and the six block matrices only.

Shape letters as in the README's glossary (B, T, C, H, N, L, V, F), plus K for key positions
and D for rotary frequency pairs (N / 2).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from goosejax.config import ModelConfig
from goosejax.model.norms import LayerNorm
from goosejax.model.layers import matmul, merge_heads, split_heads

INIT_STD = 0.02
ROPE_BASE = 10_000.0


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype) -> nnx.Param:
  return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


def rotary_angles(seq_len: int, head_size: int) -> tuple[jax.Array, jax.Array]:
  """(cos, sin) [T, N/2] of RoPE's rotation per position and frequency pair."""
  inv_freq = ROPE_BASE ** (-jnp.arange(0, head_size, 2, dtype=jnp.float32) / head_size)
  angles_TD = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  return jnp.cos(angles_TD), jnp.sin(angles_TD)


def apply_rotary(x_BTHN: jax.Array, cos_TD: jax.Array, sin_TD: jax.Array) -> jax.Array:
  """Rotate each (first half, second half) channel pair by its position's angle."""
  x1, x2 = jnp.split(x_BTHN.astype(jnp.float32), 2, axis=-1)
  cos, sin = cos_TD[None, :, None], sin_TD[None, :, None]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x_BTHN.dtype)


class CausalSelfAttention(nnx.Module):
  """Multi-head causal softmax attention; weights [L, in, out]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    L, C, pdt = cfg.n_layer, cfg.n_embd, jnp.dtype(cfg.param_dtype)
    self.head_size = cfg.head_size
    self.receptance = _normal(rngs, (L, C, C), INIT_STD, pdt)     # the query projection
    self.key = _normal(rngs, (L, C, C), INIT_STD, pdt)
    self.value = _normal(rngs, (L, C, C), INIT_STD, pdt)
    # GPT-2's residual scaling: each of the 2L residual branches starts small.
    self.output = _normal(rngs, (L, C, C), INIT_STD / math.sqrt(2 * L), pdt)

  def __call__(self, x_BTC: jax.Array, cos_TD: jax.Array, sin_TD: jax.Array) -> jax.Array:
    T, N = x_BTC.shape[1], self.head_size
    heads = lambda w: split_heads(matmul(x_BTC, w[...]), N)
    q_BTHN = apply_rotary(heads(self.receptance), cos_TD, sin_TD)
    k_BTHN = apply_rotary(heads(self.key), cos_TD, sin_TD)
    v_BTHN = heads(self.value)
    scores_BHTK = jnp.einsum("bthn,bkhn->bhtk", q_BTHN, k_BTHN,
                             preferred_element_type=jnp.float32) / math.sqrt(N)
    causal_TK = jnp.tril(jnp.ones((T, T), bool))
    scores_BHTK = jnp.where(causal_TK, scores_BHTK, -jnp.inf)
    probs_BHTK = jax.nn.softmax(scores_BHTK, axis=-1).astype(x_BTC.dtype)
    y_BTHN = jnp.einsum("bhtk,bkhn->bthn", probs_BHTK, v_BTHN)
    return matmul(merge_heads(y_BTHN), self.output[...])


class MLP(nnx.Module):
  """W_value gelu(W_key x); weights [L, in, out]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    L, C, F, pdt = cfg.n_layer, cfg.n_embd, cfg.ffn_dim, jnp.dtype(cfg.param_dtype)
    self.key = _normal(rngs, (L, C, F), INIT_STD, pdt)
    self.value = _normal(rngs, (L, F, C), INIT_STD / math.sqrt(2 * L), pdt)

  def __call__(self, x_BTC: jax.Array) -> jax.Array:
    return matmul(jax.nn.gelu(matmul(x_BTC, self.key[...])), self.value[...])


class TransformerBlocks(nnx.Module):
  """All L pre-norm blocks, parameters with a leading [L] axis; `__call__` runs one layer
  (inside the layer scan the parameters are sliced to it)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    L, C, pdt = cfg.n_layer, cfg.n_embd, jnp.dtype(cfg.param_dtype)
    self.ln1 = LayerNorm(C, stack=(L,), param_dtype=pdt)
    self.att = CausalSelfAttention(cfg, rngs=rngs)
    self.ln2 = LayerNorm(C, stack=(L,), param_dtype=pdt)
    self.ffn = MLP(cfg, rngs=rngs)

  def __call__(self, x_BTC: jax.Array, cos_TD: jax.Array, sin_TD: jax.Array) -> jax.Array:
    x_BTC = x_BTC + self.att(self.ln1(x_BTC), cos_TD, sin_TD)
    return x_BTC + self.ffn(self.ln2(x_BTC))


class CausalTransformer(nnx.Module):
  """`model(tokens_BT) -> (logits_BTV, None)`: the call shape of RWKV7 (whose second output is
  its recurrent state; this baseline keeps no KV cache, it only trains and scores). fp32 logits."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    if cfg.head_size % 2:
      raise ValueError(f"CausalTransformer: RoPE needs an even head_size, got {cfg.head_size}")
    self.config = cfg
    V, C, pdt = cfg.vocab_size, cfg.n_embd, jnp.dtype(cfg.param_dtype)
    self.emb = _normal(rngs, (V, C), INIT_STD, pdt)
    self.blocks = TransformerBlocks(cfg, rngs=rngs)
    self.ln_out = LayerNorm(C, param_dtype=pdt)
    self.head = _normal(rngs, (C, V), INIT_STD, pdt)

  def __call__(self, tokens_BT: jax.Array) -> tuple[jax.Array, None]:
    if tokens_BT.ndim != 2:
      raise ValueError(f"CausalTransformer: tokens must be [batch, time], got shape {tokens_BT.shape}")
    dtype = jnp.dtype(self.config.dtype)
    x_BTC = jnp.take(self.emb[...], tokens_BT, axis=0).astype(dtype)
    cos_TD, sin_TD = rotary_angles(tokens_BT.shape[1], self.config.head_size)
    graphdef, params = nnx.split(self.blocks)

    def layer(x_BTC, layer_params):
      return nnx.merge(graphdef, layer_params)(x_BTC, cos_TD, sin_TD), None

    x_BTC, _ = jax.lax.scan(layer, x_BTC, params)
    x_BTC = self.ln_out(x_BTC)
    logits_BTV = jnp.matmul(x_BTC, self.head[...].astype(dtype), precision=jax.lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)
    return logits_BTV, None
