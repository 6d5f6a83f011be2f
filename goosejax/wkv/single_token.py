"""The WKV-7 operator on one token: the single-step form every T == 1 call runs.

Per head, with the state S in the official [value, key] layout, one token is

    S' = S diag(w) + (S a) b^T + v k^T,     y = S' r

(`goosejax.wkv.reference.wkv7_step` computes exactly that, in that order: one pass over S for
S a, one to write S', one to read S' again for S' r). Expanding y,

    y = S (w * r) + (S a) (b . r) + v (k . r),

so both products with the old state come from one pass over it ([a, w * r] as two columns),
and S' is then written in one more pass. A token's cost is the state's traffic (at batch 64
the 0.1B model's WKV state is as large as its weights; figures in the README's Inference speed
section), so this form reads the state once where the plain step reads it twice. Plain jnp: differentiable, and any dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def wkv7_fused_step(state_BHNN, r_BHN, w_BHN, k_BHN, v_BHN, a_BHN, b_BHN):
  """One token, one read of the state. `w` is the decay itself (not its log).

  Returns (y [B,H,N], new state [B,H,N,N]), the same function as `wkv7_step`.
  """
  cols_BHN2 = jnp.stack([a_BHN, w_BHN * r_BHN], axis=-1)
  prods_BHN2 = jnp.einsum("bhij,bhjc->bhic", state_BHNN, cols_BHN2,
                          precision=jax.lax.Precision.HIGHEST)
  sa_BHN, s_wr_BHN = prods_BHN2[..., 0], prods_BHN2[..., 1]
  y_BHN = (s_wr_BHN + sa_BHN * jnp.sum(b_BHN * r_BHN, axis=-1, keepdims=True)
           + v_BHN * jnp.sum(k_BHN * r_BHN, axis=-1, keepdims=True))
  state_BHNN = (state_BHNN * w_BHN[:, :, None, :] + sa_BHN[..., :, None] * b_BHN[..., None, :]
                + v_BHN[..., :, None] * k_BHN[..., None, :])
  return y_BHN, state_BHNN


def wkv7_single_token(r, log_w, k, v, a, b, state, reset, dtype):
  """`wkv7` for T == 1: inputs [B,1,H,N], state [B,H,N,N] in `dtype` (fp32 or float64),
  reset [B,1] bool or None. Returns (y [B,1,H,N] in r's dtype, new state in `dtype`)."""
  if reset is not None:
    state = jnp.where(reset[:, 0, None, None, None], 0, state)
  r_BHN, log_w_BHN, k_BHN, v_BHN, a_BHN, b_BHN = (x[:, 0].astype(dtype) for x in (r, log_w, k, v, a, b))
  y_BHN, state = wkv7_fused_step(state, r_BHN, jnp.exp(log_w_BHN), k_BHN, v_BHN, a_BHN, b_BHN)
  return y_BHN[:, None].astype(r.dtype), state
