"""Shared WKV-7 test inputs and an independent NumPy float64 token recurrence."""
from __future__ import annotations

import numpy as np

DECAY_BOUND = 0.606531


def make_inputs(rng: np.random.Generator, batch: int, length: int, heads: int, head_size: int):
  """(r, log_w, k, v, a, b, state, reset) as float64 NumPy arrays, hardest cases first.

  Batch row 0: the strongest decay everywhere (log_w within 1e-6 of -0.606531), one removal
  key per head for every token (aligned kappa) and iclr = 1 - 1e-6, where I - A_ab is worst
  conditioned. Other rows: random decays in the allowed range and iclr in (0, 1).
  a = -kappa_hat (unit norm per head), b = kappa_hat * iclr, as the model builds them.
  """
  shape = (batch, length, heads, head_size)
  r, k, v = (rng.normal(size=shape) for _ in range(3))
  log_w = -DECAY_BOUND / (1 + np.exp(-rng.normal(size=shape) * 2))
  kappa = rng.normal(size=shape)
  iclr = rng.uniform(0.05, 0.95, size=shape)
  log_w[0] = -DECAY_BOUND + 1e-6 * rng.uniform(size=shape[1:])
  kappa[0] = rng.normal(size=(1, heads, head_size))
  iclr[0] = 1 - 1e-6
  kappa_hat = kappa / np.linalg.norm(kappa, axis=-1, keepdims=True)
  state = rng.normal(size=(batch, heads, head_size, head_size))
  reset = rng.uniform(size=(batch, length)) < 0.08
  reset[:, 0] = [True] + [False] * (batch - 1)  # row 0 drops its initial state at once
  return r, log_w, k, v, -kappa_hat, kappa_hat * iclr, state, reset


def recurrence(r, log_w, k, v, a, b, state, reset):
  """Token by token in float64: S = S diag(w) + (S a) b^T + v k^T, y = S r."""
  state = np.array(state, np.float64)
  y = np.zeros(r.shape)
  for t in range(r.shape[1]):
    state[reset[:, t]] = 0
    sa = np.einsum("bhij,bhj->bhi", state, a[:, t])
    state = (state * np.exp(log_w[:, t])[:, :, None, :] + sa[..., None] * b[:, t, :, None, :]
             + v[:, t, :, :, None] * k[:, t, :, None, :])
    y[:, t] = np.einsum("bhij,bhj->bhi", state, r[:, t])
  return y, state


def relative_error(got, want) -> float:
  """max |got - want| / max |want|."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
