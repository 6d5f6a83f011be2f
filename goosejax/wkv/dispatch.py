"""`wkv7`: the single entry point of the WKV-7 operator, dispatching on `impl`."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from goosejax.wkv.chunked import CHUNK_SIZES, wkv7_chunked
from goosejax.wkv.reference import compute_dtype, wkv7_reference, wkv7_step

IMPLEMENTATIONS = ("auto", "reference", "chunked", "associative")


class Choice(NamedTuple):
  """What impl="auto" runs for T > chunk_size (T == 1 is always a single recurrent step, and
  1 < T <= chunk_size the token scan)."""
  impl: str          # "chunked" or "associative"
  chunk_size: int
  intra: str         # the sequential forward inside a chunk: "matmul" or "recurrent" (token steps)
  group: int = 1     # chunks per step of the sequential scans


# Per-platform choices, from benchmarks/wkv.py. cpu: measured on a 2-core AMD EPYC (a shared
# machine): the token steps win the forward, the chunked custom VJP the backward (3-6x faster
# than autodiff through the token scan, 1/20-1/50 of its temporaries), and C = 32 was the best
# or within noise of it. gpu / tpu: NOT measured yet (no accelerator here). The associative
# form is chosen there because every op is batched over all chunks with log depth across
# them, where the sequential scan would launch small per-chunk kernels 64+ times; C = 64 as
# FLA's RWKV-7 layer uses under the same decay bound.
AUTO_CHOICES = {
    "cpu": Choice("chunked", 32, "recurrent"),
    "gpu": Choice("associative", 64, "matmul"),
    "tpu": Choice("associative", 64, "matmul"),
}
# chunk size of an explicit impl="chunked" / "associative" call without one (CPU-measured)
DEFAULT_CHUNK_SIZES = {"chunked": 32, "associative": 64}


class WKVInputError(ValueError):
  """Inputs of the wrong shape or an unknown implementation / chunk size."""


def _check_inputs(r, log_w, k, v, a, b, state, reset):
  if r.ndim != 4:
    raise WKVInputError(f"wkv7: r must be [B,T,H,N], got shape {r.shape}")
  for name, x in (("log_w", log_w), ("k", k), ("v", v), ("a", a), ("b", b)):
    if x.shape != r.shape:
      raise WKVInputError(f"wkv7: {name} has shape {x.shape}, expected r's shape {r.shape}")
  B, T, H, N = r.shape
  if state is not None and state.shape != (B, H, N, N):
    raise WKVInputError(f"wkv7: state has shape {state.shape}, expected {(B, H, N, N)}")
  if reset is not None and reset.shape != (B, T):
    raise WKVInputError(f"wkv7: reset has shape {reset.shape}, expected {(B, T)}")


def auto_choice(platform: str | None = None) -> Choice:
  """The implementation impl="auto" uses for T > 1 on `platform` (default: JAX's backend)."""
  platform = platform or jax.default_backend()
  return AUTO_CHOICES.get(platform, AUTO_CHOICES["gpu"])


def _single_step(r, log_w, k, v, a, b, state, reset, dtype):
  """T == 1: one recurrent step, no scan."""
  if reset is not None:
    state = jnp.where(reset[:, 0, None, None, None], 0, state)
  token = [x[:, 0].astype(dtype) for x in (r, log_w, k, v, a, b)]
  y_BHN, state = wkv7_step(state, token[0], jnp.exp(token[1]), *token[2:])
  return y_BHN[:, None].astype(r.dtype), state


def wkv7(r, log_w, k, v, a, b, state=None, *, reset=None, impl="auto", chunk_size=None):
  """WKV-7 over a sequence: returns (y [B,T,H,N] in r's dtype, final state [B,H,N,N] in fp32).

  r, k, v, a, b: [B,T,H,N] (a = -kappa_hat, b = kappa_hat * iclr, k the replacement key);
  log_w: [B,T,H,N] log decay in [-0.606531, 0); state: [B,H,N,N] value x key, None = zeros;
  reset: [B,T] bool, True where the state is zeroed before that token.
  impl: "reference" (token scan), "chunked" (chunks in a sequential scan), "associative"
  (chunks combined by associative scan), "auto" (the platform's measured best; one recurrent
  step when T == 1). chunk_size: 16, 32 or 64 for the chunked forms (None: the default).
  Everything is computed in fp32 (float64 when an input is float64 under x64).
  """
  _check_inputs(r, log_w, k, v, a, b, state, reset)
  if impl not in IMPLEMENTATIONS:
    raise WKVInputError(f"wkv7: unknown impl {impl!r}; expected one of {IMPLEMENTATIONS}")
  if chunk_size is not None and chunk_size not in CHUNK_SIZES:
    raise WKVInputError(f"wkv7: chunk_size={chunk_size!r}; expected None or one of {CHUNK_SIZES}")
  dtype = compute_dtype(r, log_w, k, v, a, b, state)
  B, T, H, N = r.shape
  state = jnp.zeros((B, H, N, N), dtype) if state is None else state.astype(dtype)
  if impl == "reference":
    return wkv7_reference(r, log_w, k, v, a, b, state, reset=reset)
  intra, group = "matmul", 1
  if impl == "auto":
    if T == 1:
      return _single_step(r, log_w, k, v, a, b, state, reset, dtype)
    choice = auto_choice()
    impl, intra, group = choice.impl, choice.intra, choice.group
    chunk_size = chunk_size or choice.chunk_size
    if T <= chunk_size:
      # one chunk or less: the token scan's per-token states are no more than a chunk's
      return wkv7_reference(r, log_w, k, v, a, b, state, reset=reset)
  mode = "associative" if impl == "associative" else "sequential"
  y, final_state = wkv7_chunked(r, log_w, k, v, a, b, state, reset=reset,
                                chunk_size=chunk_size or DEFAULT_CHUNK_SIZES[impl], mode=mode,
                                intra=intra, group=group, dtype=dtype)
  return y.astype(r.dtype), final_state
