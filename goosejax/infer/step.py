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
  # y = S_new r with S_new = S diag(w) + sa b^T + v k^T (spec §2.3) equals
  #   S (w * r) + sa (b . r) + v (k . r),
  # so both products with the old state come from one pass over it ([a, w * r] as two
  # columns), and the state is then read once more and written once for the update.
  # (At batch 64 the 0.1B model's WKV state is 151 MB, as much traffic as its weights.)
  cols_BHN2 = jnp.stack([a_BHN, w_BHN * r_BHN], axis=-1)
  prods_BHN2 = jnp.einsum("bhij,bhjc->bhic", wkv_BHNN, cols_BHN2, precision=jax.lax.Precision.HIGHEST)
  sa_BHN, s_wr_BHN = prods_BHN2[..., 0], prods_BHN2[..., 1]
  y_BHN = (s_wr_BHN + sa_BHN * jnp.sum(b_BHN * r_BHN, axis=-1, keepdims=True)
           + v_BHN * jnp.sum(k_BHN * r_BHN, axis=-1, keepdims=True))
  wkv_BHNN = (wkv_BHNN * w_BHN[:, :, None, :] + sa_BHN[..., :, None] * b_BHN[..., None, :]
              + v_BHN[..., :, None] * k_BHN[..., None, :])
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


# A state split per layer: ((att_shift_BC, wkv_BHNN, ffn_shift_BC), ...). The decode loop
# carries this form: stacking [L, B, H, N, N] every step and slicing it per layer would copy
# the whole WKV state twice per token (151 MB at batch 64 for the 0.1B shape).
LayerStates = tuple[tuple[jax.Array, jax.Array, jax.Array], ...]


def split_state(state: RWKV7State) -> LayerStates:
  return tuple((state.att_shift_LBC[i], state.wkv_LBHNN[i], state.ffn_shift_LBC[i])
               for i in range(state.wkv_LBHNN.shape[0]))


def join_state(layers: LayerStates) -> RWKV7State:
  return RWKV7State(*(jnp.stack(parts) for parts in zip(*layers)))


def decode_hidden(weights: DecodeWeights, tokens_B: jax.Array, layers: LayerStates):
  """One token per row through all layers: (ln_out output [B, C], new per-layer states)."""
  top, dtype = weights.top, weights.dtype
  H, N = weights.n_head, weights.head_size
  x_BC = jnp.take(top["emb"], tokens_B, axis=0).astype(dtype)
  x_BC = _layer_norm(x_BC, top["ln0.weight"], top["ln0.bias"])
  v_first_BC = jnp.zeros_like(x_BC)
  new_layers = []
  for i, (p, (att_shift_BC, wkv_BHNN, ffn_shift_BC)) in enumerate(zip(weights.layers, layers)):
    xa_BC = _layer_norm(x_BC, p["ln1.weight"], p["ln1.bias"])
    dx_BC, new_wkv_BHNN, v_first_BC = _time_mix(p, xa_BC, att_shift_BC.astype(dtype),
                                                wkv_BHNN.astype(jnp.float32), v_first_BC, i == 0, H, N)
    x_BC = x_BC + dx_BC
    xf_BC = _layer_norm(x_BC, p["ln2.weight"], p["ln2.bias"])
    x_BC = x_BC + _channel_mix(p, xf_BC, ffn_shift_BC.astype(dtype))
    new_layers.append((xa_BC.astype(att_shift_BC.dtype), new_wkv_BHNN,
                       xf_BC.astype(ffn_shift_BC.dtype)))
  return _layer_norm(x_BC, top["ln_out.weight"], top["ln_out.bias"]), tuple(new_layers)


def decode_step_layers(weights: DecodeWeights, tokens_B: jax.Array, layers: LayerStates):
  """`decode_step` on per-layer states: (logits [B, V] fp32, new per-layer states)."""
  x_BC, layers = decode_hidden(weights, tokens_B, layers)
  head_T = weights.top["head_T"].astype(x_BC.dtype)
  logits_BV = jax.lax.dot_general(x_BC, head_T, (((1,), (1,)), ((), ())),
                                  precision=jax.lax.Precision.HIGHEST,
                                  preferred_element_type=jnp.float32)
  return logits_BV, layers


def decode_step(weights: DecodeWeights, tokens_B: jax.Array, state: RWKV7State):
  """One token per row: (logits [B, V] fp32, new state). Same function as model(tokens[:, None])."""
  logits_BV, layers = decode_step_layers(weights, tokens_B, split_state(state))
  return logits_BV, join_state(layers)
