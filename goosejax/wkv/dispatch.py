"""`wkv7`: the single entry point of the WKV-7 operator, dispatching on `impl`."""
from __future__ import annotations

import jax.numpy as jnp

from goosejax.wkv.reference import wkv7_reference

IMPLEMENTATIONS = ("auto", "reference")


def _check_inputs(r, log_w, k, v, a, b, state, reset):
  if r.ndim != 4:
    raise ValueError(f"wkv7: r must be [B,T,H,N], got shape {r.shape}")
  for name, x in (("log_w", log_w), ("k", k), ("v", v), ("a", a), ("b", b)):
    if x.shape != r.shape:
      raise ValueError(f"wkv7: {name} has shape {x.shape}, expected r's shape {r.shape}")
  B, T, H, N = r.shape
  if state is not None and state.shape != (B, H, N, N):
    raise ValueError(f"wkv7: state has shape {state.shape}, expected {(B, H, N, N)}")
  if reset is not None and reset.shape != (B, T):
    raise ValueError(f"wkv7: reset has shape {reset.shape}, expected {(B, T)}")


def wkv7(r, log_w, k, v, a, b, state=None, *, reset=None, impl="auto", chunk_size=None):
  """WKV-7 over a sequence: returns (y [B,T,H,N], final state [B,H,N,N] in fp32).

  r, k, v, a, b: [B,T,H,N] (a = -kappa_hat, b = kappa_hat * iclr, k the replacement key);
  log_w: [B,T,H,N] log decay in [-0.606531, 0); state: [B,H,N,N] value x key, None = zeros;
  reset: [B,T] bool, True where the state is zeroed before that token.
  """
  _check_inputs(r, log_w, k, v, a, b, state, reset)
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"wkv7: unknown impl {impl!r}; expected one of {IMPLEMENTATIONS}")
  del chunk_size  # only the chunked implementations use it
  return wkv7_reference(r, log_w, k, v, a, b, state, reset=reset)
