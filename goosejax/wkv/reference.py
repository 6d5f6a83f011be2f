"""The WKV-7 oracle: a plain `lax.scan` over tokens.

Per head, with the state S in the official [value, key] layout:

    S_t = S_{t-1} diag(w_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T,     y_t = S_t r_t

Everything runs in fp32, or float64 when x64 is enabled and the inputs are float64.
This is the slow, obviously-correct form every fast implementation is tested against.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def compute_dtype(*arrays) -> jnp.dtype:
  """fp32, or float64 when any input is float64 (only possible with x64 on)."""
  if any(x is not None and x.dtype == jnp.float64 for x in arrays):
    return jnp.dtype(jnp.float64)
  return jnp.dtype(jnp.float32)


def wkv7_step(state_BHNN, r_BHN, w_BHN, k_BHN, v_BHN, a_BHN, b_BHN):
  """One recurrent step. `w` is the decay itself (not its log). Returns (y, new state)."""
  sa_BHN = jnp.einsum("bhij,bhj->bhi", state_BHNN, a_BHN)
  state_BHNN = (state_BHNN * w_BHN[:, :, None, :]
                + sa_BHN[..., :, None] * b_BHN[..., None, :]
                + v_BHN[..., :, None] * k_BHN[..., None, :])
  y_BHN = jnp.einsum("bhij,bhj->bhi", state_BHNN, r_BHN)
  return y_BHN, state_BHNN


def wkv7_reference(r, log_w, k, v, a, b, state=None, *, reset=None):
  """Token-by-token WKV-7. Shapes: r..b [B,T,H,N], state [B,H,N,N], reset [B,T] bool."""
  dtype = compute_dtype(r, log_w, k, v, a, b, state)
  B, T, H, N = r.shape
  if state is None:
    state = jnp.zeros((B, H, N, N), dtype)
  if reset is None:
    reset = jnp.zeros((B, T), bool)
  inputs = [x.astype(dtype) for x in (r, log_w, k, v, a, b)]
  inputs_TBHN = [jnp.swapaxes(x, 0, 1) for x in inputs]
  reset_TB = jnp.swapaxes(reset.astype(bool), 0, 1)

  def step(state_BHNN, xs):
    r_BHN, log_w_BHN, k_BHN, v_BHN, a_BHN, b_BHN, reset_B = xs
    state_BHNN = jnp.where(reset_B[:, None, None, None], 0, state_BHNN)
    y_BHN, state_BHNN = wkv7_step(state_BHNN, r_BHN, jnp.exp(log_w_BHN), k_BHN,
                                  v_BHN, a_BHN, b_BHN)
    return state_BHNN, y_BHN

  final_state, y_TBHN = jax.lax.scan(step, state.astype(dtype), (*inputs_TBHN, reset_TB))
  return jnp.swapaxes(y_TBHN, 0, 1).astype(r.dtype), final_state
