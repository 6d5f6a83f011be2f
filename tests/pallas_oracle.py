"""Shared helpers of the Pallas kernel tests: RWKV-7-like inputs and a float64 numpy recurrence."""
from __future__ import annotations

import numpy as np

LOG_W_MIN = -0.6065306597  # -e^{-1/2}: the RWKV-7 decay clamp


def rwkv7_inputs(seed: int, B: int, T: int, H: int, N: int, *, reset_every: int = 0,
                 with_state: bool = True):
  """float32 numpy inputs shaped like a real layer's: unit-norm removal key kk, a = -kk, b = kk * iclr,
  log decay in the clamp range (some channels at the strongest decay), optional resets and state."""
  rng = np.random.default_rng(seed)
  shape = (B, T, H, N)
  r = rng.normal(size=shape)
  k = rng.normal(size=shape) * 0.5
  v = rng.normal(size=shape)
  kk = rng.normal(size=shape)
  kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
  iclr = 1.0 / (1.0 + np.exp(-rng.normal(size=shape)))
  log_w = LOG_W_MIN / (1.0 + np.exp(-2.0 * rng.normal(size=shape)))
  log_w[..., : N // 4] = LOG_W_MIN * 0.999
  a, b = -kk, kk * iclr
  state = rng.normal(size=(B, H, N, N)) * 0.3 if with_state else None
  reset = None
  if reset_every:
    reset = np.zeros((B, T), bool)
    reset[:, reset_every::reset_every] = True
    reset[-1, 3] = True  # one batch row resets off the regular pattern
  f32 = lambda x: None if x is None else np.asarray(x, np.float32)
  return tuple(f32(x) for x in (r, log_w, k, v, a, b)) + (f32(state), reset)


def recurrence_f64(r, log_w, k, v, a, b, state=None, reset=None):
  """The token recurrence in float64 numpy: S_t = S diag(w) + (S a) b^T + v k^T, y_t = S_t r_t."""
  r, log_w, k, v, a, b = (np.asarray(x, np.float64) for x in (r, log_w, k, v, a, b))
  B, T, H, N = r.shape
  S = np.zeros((B, H, N, N)) if state is None else np.asarray(state, np.float64).copy()
  y = np.zeros((B, T, H, N))
  for t in range(T):
    if reset is not None:
      S[np.asarray(reset)[:, t]] = 0.0
    sa = np.einsum("bhij,bhj->bhi", S, a[:, t])
    S = (S * np.exp(log_w[:, t])[:, :, None, :] + sa[..., None] * b[:, t, :, None, :]
         + v[:, t, :, :, None] * k[:, t, :, None, :])
    y[:, t] = np.einsum("bhij,bhj->bhi", S, r[:, t])
  return y, S


def relative_error(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
