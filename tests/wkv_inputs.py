"""The WKV-7 tests' inputs and their one float64 oracle: a NumPy token recurrence.

Every WKV form (token scan, chunked XLA forms, Pallas kernels) is checked against `recurrence`.
`relative_error` is closeness's (max |got - want| / max |want|).
"""
from __future__ import annotations

import numpy as np

from closeness import relative_error  # noqa: F401  (the WKV tests' error measure)
from pallas_kernels.wkv_policy import LOG_DECAY_MIN


def make_inputs(rng: np.random.Generator, batch: int, length: int, heads: int, head_size: int, *,
                reset_rate: float = 0.08, with_state: bool = True):
  """(r, log_w, k, v, a, b, state, reset) as float64 NumPy arrays, hardest cases first.

  Batch row 0: the strongest decay everywhere (log_w within 1e-6 of LOG_DECAY_MIN), one removal
  key per head for every token (aligned kappa) and iclr = 1 - 1e-6, where I - A_ab is worst
  conditioned; it resets at t = 0 (drops its initial state) when there are resets. Other rows:
  decays over the allowed range and iclr in (0, 1). a = -kappa_hat (unit norm per head),
  b = kappa_hat * iclr, as the model builds them. reset: each token with probability
  `reset_rate`, None when 0; state: None unless `with_state`.
  """
  shape = (batch, length, heads, head_size)
  r, k, v = (rng.normal(size=shape) for _ in range(3))
  log_w = LOG_DECAY_MIN / (1 + np.exp(-rng.normal(size=shape) * 2))
  kappa = rng.normal(size=shape)
  iclr = rng.uniform(0.05, 0.95, size=shape)
  log_w[0] = LOG_DECAY_MIN + 1e-6 * rng.uniform(size=shape[1:])
  kappa[0] = rng.normal(size=(1, heads, head_size))
  iclr[0] = 1 - 1e-6
  kappa_hat = kappa / np.linalg.norm(kappa, axis=-1, keepdims=True)
  state = rng.normal(size=(batch, heads, head_size, head_size))
  reset = rng.uniform(size=(batch, length)) < reset_rate
  reset[:, 0] = [True] + [False] * (batch - 1)
  return (r, log_w, k, v, -kappa_hat, kappa_hat * iclr, state if with_state else None,
          reset if reset_rate else None)


def float32(inputs):
  """The inputs with every float array rounded to float32 (None and bool arrays kept)."""
  return tuple(x if x is None or x.dtype == bool else np.asarray(x, np.float32) for x in inputs)


def recurrence(r, log_w, k, v, a, b, state=None, reset=None):
  """Token by token in float64: S = S diag(w) + (S a) b^T + v k^T, y = S r (state None = zeros,
  reset None = none). Returns (y [B,T,H,N], final state [B,H,N,N])."""
  r, log_w, k, v, a, b = (np.asarray(x, np.float64) for x in (r, log_w, k, v, a, b))
  batch, length, heads, head_size = r.shape
  if state is None:
    state = np.zeros((batch, heads, head_size, head_size))
  state = np.array(state, np.float64)
  y = np.zeros(r.shape)
  for t in range(length):
    if reset is not None:
      state[np.asarray(reset)[:, t]] = 0
    sa = np.einsum("bhij,bhj->bhi", state, a[:, t])
    state = (state * np.exp(log_w[:, t])[:, :, None, :] + sa[..., None] * b[:, t, :, None, :]
             + v[:, t, :, :, None] * k[:, t, :, None, :])
    y[:, t] = np.einsum("bhij,bhj->bhi", state, r[:, t])
  return y, state
