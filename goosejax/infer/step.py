"""A dedicated one-token forward step for decoding (spec §2.6).

Decoding is memory-bound: every token reads all weights once. This path therefore avoids the
sequence machinery of `RWKV7.__call__` (no T axis, no layer scan that slices the stacked
weights on every step): the weights are split per layer once, outside jit, and the step is a
plain unrolled loop over layers in which every matmul reads its weight matrix exactly once.
The embedding is a row gather. It computes the same function as `model(tokens_B1, state)`.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from goosejax.model.norms import GROUP_NORM_EPS, LAYER_NORM_EPS, normalize
from goosejax.model.params import param_dict
from goosejax.model.state import RWKV7State
from goosejax.model.time_mix import DECAY_SCALE, KK_NORM_EPS

_LAYER_PREFIX = "blocks."


# The large matrices are stored transposed, [out, in], for decoding: XLA:CPU's matrix-vector
# products read them ~10% faster that way (benchmarked with 12-layer chains of the 0.1B shapes).
TRANSPOSED = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")


class DecodeWeights(NamedTuple):
  """The model's weights laid out for `decode_step`: top-level arrays plus one dict per layer.

  top: {"emb", "ln0.weight", "ln0.bias", "ln_out.weight", "ln_out.bias", "head_T" [V, C]}
  layers: tuple of {"att.receptance" [out, in], "att.w1" [in, out], "ln1.weight", ...}, one
    per layer, unstacked; the TRANSPOSED names hold [out, in] matrices.
  """
  top: dict[str, jax.Array]
  layers: tuple[dict[str, jax.Array], ...]
  n_head: int
  head_size: int
  dtype: Any


jax.tree_util.register_pytree_node(
    DecodeWeights,
    lambda w: ((w.top, w.layers), (w.n_head, w.head_size, jnp.dtype(w.dtype).name)),
    lambda aux, children: DecodeWeights(children[0], children[1], aux[0], aux[1], jnp.dtype(aux[2])))


def decode_weights(model: nnx.Module) -> DecodeWeights:
  """Split the model's stacked [L, ...] parameters into per-layer arrays (done once)."""
  cfg = model.config
  params = param_dict(model)
  top = {name: value for name, value in params.items()
         if not name.startswith(_LAYER_PREFIX) and name != "head"}
  stacked = {name[len(_LAYER_PREFIX):]: value for name, value in params.items()
             if name.startswith(_LAYER_PREFIX)}
  # One jitted split (fresh output buffers, one compile) so the step never slices in its loop.
  layout = lambda name, x: x.T if name in TRANSPOSED else x
  split = jax.jit(lambda arrays, head: (
      tuple({name: layout(name, value[i]) for name, value in arrays.items()}
            for i in range(cfg.n_layer)), head.T))
  layers, top["head_T"] = split(stacked, params["head"])
  return DecodeWeights(top, layers, cfg.n_head, cfg.head_size, jnp.dtype(cfg.dtype))


def _layer_norm(x_BC, weight, bias):
  y = normalize(x_BC, LAYER_NORM_EPS) * weight.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(x_BC.dtype)


def _mm(x, w):
  """x @ w in x's dtype with fp32 accumulation (as the model's `matmul`)."""
  return jnp.matmul(x, w.astype(x.dtype), precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32).astype(x.dtype)


def _mm_t(x, w_T):
  """x @ w_T.T (w_T stored [out, in]) in x's dtype with fp32 accumulation."""
  y = jax.lax.dot_general(x, w_T.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())),
                          precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  return y.astype(x.dtype)


def _mm32(x, w):
  return jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def _time_mix(p, x_BC, prev_BC, wkv_BHNN, v_first_BC, first_layer: bool, H: int, N: int):
  B, C = x_BC.shape
  dtype = x_BC.dtype
  f32 = jnp.float32
  mix = lambda name: x_BC + (prev_BC - x_BC) * p[name].astype(dtype)
  xr, xw, xk, xv, xa, xg = (mix(f"att.x_{c}") for c in "rwkvag")
  r = _mm_t(xr, p["att.receptance"])
  k = _mm_t(xk, p["att.key"])
  v = _mm_t(xv, p["att.value"])
  z = p["att.w0"].astype(f32) + _mm32(jnp.tanh(_mm32(xw, p["att.w1"])), p["att.w2"])
  w_BHN = jnp.exp(-DECAY_SCALE * jax.nn.sigmoid(z)).reshape(B, H, N)
  iclr = jax.nn.sigmoid(p["att.a0"].astype(f32) + _mm32(_mm32(xa, p["att.a1"]), p["att.a2"]))
  gate = _mm(jax.nn.sigmoid(_mm(xg, p["att.g1"])), p["att.g2"])

  kk = (k.astype(f32) * p["att.k_k"].astype(f32)).reshape(B, H, N)
  kk = kk / jnp.maximum(jnp.linalg.norm(kk, axis=-1, keepdims=True), KK_NORM_EPS)
  k = k.astype(f32) * (1 + (iclr - 1) * p["att.k_a"].astype(f32))
  v = v.astype(f32)
  if first_layer:
    v_first_BC = v.astype(v_first_BC.dtype)
  else:
    nu = jax.nn.sigmoid(p["att.v0"].astype(f32) + _mm32(_mm32(xv, p["att.v1"]), p["att.v2"]))
    v = v + (v_first_BC.astype(f32) - v) * nu

  # The model feeds r, k, v, a, b to the WKV operator in the compute dtype; mirror that.
  as_op = lambda t: t.astype(dtype).astype(f32).reshape(B, H, N)
  r_BHN, k_BHN, v_BHN = as_op(r), as_op(k), as_op(v)
  a_BHN, b_BHN = as_op(-kk), as_op(kk * iclr.reshape(B, H, N))
  sa_BH = jnp.einsum("bhij,bhj->bhi", wkv_BHNN, a_BHN, precision=jax.lax.Precision.HIGHEST)
  wkv_BHNN = (wkv_BHNN * w_BHN[:, :, None, :] + sa_BH[..., :, None] * b_BHN[..., None, :]
              + v_BHN[..., :, None] * k_BHN[..., None, :])
  y_BHN = jnp.einsum("bhij,bhj->bhi", wkv_BHNN, r_BHN, precision=jax.lax.Precision.HIGHEST)
  y_BHN = y_BHN.astype(dtype).astype(f32)

  y_BHN = normalize(y_BHN, GROUP_NORM_EPS)
  y_BC = y_BHN.reshape(B, C) * p["att.ln_x_weight"].astype(f32) + p["att.ln_x_bias"].astype(f32)
  r_k = p["att.r_k"].astype(f32)
  bonus_BH1 = jnp.sum(r.astype(f32).reshape(B, H, N) * k.reshape(B, H, N) * r_k, axis=-1,
                      keepdims=True)
  y_BC = y_BC + (bonus_BH1 * v.reshape(B, H, N)).reshape(B, C)
  out_BC = _mm_t((y_BC * gate.astype(f32)).astype(dtype), p["att.output"])
  return out_BC, wkv_BHNN, v_first_BC


def _channel_mix(p, x_BC, prev_BC):
  xk = x_BC + (prev_BC - x_BC) * p["ffn.x_k"].astype(x_BC.dtype)
  hidden = jnp.square(jax.nn.relu(_mm_t(xk, p["ffn.key"])))
  return _mm_t(hidden, p["ffn.value"])


def decode_hidden(weights: DecodeWeights, tokens_B: jax.Array, state: RWKV7State):
  """One token per row through all layers: (ln_out output [B, C], new state)."""
  top, dtype = weights.top, weights.dtype
  H, N = weights.n_head, weights.head_size
  x_BC = jnp.take(top["emb"], tokens_B, axis=0).astype(dtype)
  x_BC = _layer_norm(x_BC, top["ln0.weight"], top["ln0.bias"])
  v_first_BC = jnp.zeros_like(x_BC)
  att_shift, wkv, ffn_shift = [], [], []
  for i, p in enumerate(weights.layers):
    xa_BC = _layer_norm(x_BC, p["ln1.weight"], p["ln1.bias"])
    dx_BC, wkv_BHNN, v_first_BC = _time_mix(p, xa_BC, state.att_shift_LBC[i].astype(dtype),
                                            state.wkv_LBHNN[i].astype(jnp.float32), v_first_BC,
                                            i == 0, H, N)
    x_BC = x_BC + dx_BC
    xf_BC = _layer_norm(x_BC, p["ln2.weight"], p["ln2.bias"])
    x_BC = x_BC + _channel_mix(p, xf_BC, state.ffn_shift_LBC[i].astype(dtype))
    att_shift.append(xa_BC)
    wkv.append(wkv_BHNN)
    ffn_shift.append(xf_BC)
  x_BC = _layer_norm(x_BC, top["ln_out.weight"], top["ln_out.bias"])
  new_state = RWKV7State(jnp.stack(att_shift).astype(state.att_shift_LBC.dtype), jnp.stack(wkv),
                         jnp.stack(ffn_shift).astype(state.ffn_shift_LBC.dtype))
  return x_BC, new_state


def decode_step(weights: DecodeWeights, tokens_B: jax.Array, state: RWKV7State):
  """One token per row: (logits [B, V] fp32, new state). Same function as model(tokens[:, None])."""
  x_BC, new_state = decode_hidden(weights, tokens_B, state)
  head_T = weights.top["head_T"].astype(x_BC.dtype)
  logits_BV = jax.lax.dot_general(x_BC, head_T, (((1,), (1,)), ((), ())),
                                  precision=jax.lax.Precision.HIGHEST,
                                  preferred_element_type=jnp.float32)
  return logits_BV, new_state
