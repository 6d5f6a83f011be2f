"""Token sampling in the official `rwkv` pipeline's order (rwkv==0.8.32, `rwkv/utils.py`).

Per step and per row:
  1. banned tokens get logit -inf;
  2. every token generated so far gets `presence + count * frequency` subtracted from its
     logit, where `count` is its occurrence count decayed by `penalty_decay` once per step
     (the prompt is not counted; a token's count starts from its occurrence weight, 0 for
     tokens that decode to whitespace or digits in the official pipeline, else 1);
  3. probs = softmax(logits) in fp32;
  4. top-p: with probs sorted descending, the cutoff is the probability at the first position
     where the cumulative sum reaches top_p; tokens with smaller probability are dropped;
  5. top-k: only the k most probable tokens are kept (k = 0: no limit);
  6. probs ** (1 / temperature), renormalised, and one token drawn.
temperature = 0 is greedy (argmax of the penalised logits).

Step 6 is computed as softmax((log p - max log p) / temperature) over the kept tokens: the
same distribution, but at tiny temperatures probs ** (1 / T) underflows to 0 / 0, while the
log form concentrates on the most probable kept token(s) and stays normalised.

One deliberate difference: the official cutoff search never succeeds when top_p >= 1 and the
float32 cumulative sum stays just below 1, which silently turns sampling into greedy; here
top_p >= 1 means no top-p cut.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from goosejax.errors import GoosejaxError


class GenerationError(GoosejaxError):
  """Bad arguments to `generate` (the message names the argument and what was expected)."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static sampling settings (hashable: a change recompiles the decode loop)."""
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  penalty_decay: float = 0.996

  def validate(self) -> "SamplingConfig":
    """Self, or a GenerationError naming the first unusable setting."""
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "penalty_decay"):
      if not math.isfinite(getattr(self, name)):
        raise GenerationError(f"{name}={getattr(self, name)}: expected a finite number")
    if self.temperature < 0:
      raise GenerationError(f"temperature={self.temperature}: expected >= 0 (0 means greedy)")
    if not 0 <= self.top_p <= 1:
      raise GenerationError(f"top_p={self.top_p}: expected a value in [0, 1]")
    if self.top_k < 0 or int(self.top_k) != self.top_k:
      raise GenerationError(f"top_k={self.top_k}: expected an integer >= 0 (0 means no limit)")
    if not 0 <= self.penalty_decay <= 1:
      raise GenerationError(f"penalty_decay={self.penalty_decay}: expected a value in [0, 1]")
    return self

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  @property
  def uses_penalties(self) -> bool:
    return self.presence_penalty != 0 or self.frequency_penalty != 0


def apply_penalties(logits_BV: jax.Array, seen_BV: jax.Array, counts_BV: jax.Array,
                    banned_V: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Steps 1-2: banned tokens to -inf, presence/frequency penalties on generated tokens."""
  logits_BV = jnp.where(banned_V, -jnp.inf, logits_BV.astype(jnp.float32))
  if cfg.uses_penalties:
    penalty_BV = cfg.presence_penalty + counts_BV * cfg.frequency_penalty
    logits_BV = logits_BV - jnp.where(seen_BV, penalty_BV, 0.0)
  return logits_BV


def update_counts(seen_BV: jax.Array, counts_BV: jax.Array, token_B: jax.Array,
                  weight_V: jax.Array, active_B: jax.Array, cfg: SamplingConfig):
  """After emitting `token_B`: decay every count, then add the token's occurrence weight."""
  if not cfg.uses_penalties:
    return seen_BV, counts_BV
  hit_BV = (jnp.arange(seen_BV.shape[-1])[None, :] == token_B[:, None]) & active_B[:, None]
  decay_B1 = jnp.where(active_B, cfg.penalty_decay, 1.0)[:, None]
  counts_BV = counts_BV * decay_B1 + jnp.where(hit_BV, weight_V[None, :], 0.0)
  return seen_BV | hit_BV, counts_BV


# Top-p looks for its cutoff among this many most probable tokens first (a partial sort is
# cheap; a full sort of 65536 probabilities costs more than a decode step on CPU) and bisects
# over all probabilities only when their mass does not reach top_p.
TOP_P_CANDIDATES = 256


def sampling_probs(logits_BV: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Steps 3-6 up to the draw: the normalised distribution a token is drawn from."""
  logits_BV = logits_BV.astype(jnp.float32)
  probs_BV = jax.nn.softmax(logits_BV, axis=-1)
  keep_BV = _kept_tokens(probs_BV, cfg)
  if cfg.temperature == 1.0:
    probs_BV = jnp.where(keep_BV, probs_BV, 0.0)
    return probs_BV / jnp.sum(probs_BV, axis=-1, keepdims=True)
  return _tempered(logits_BV, keep_BV, cfg.temperature)


def _kept_tokens(probs_BV: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Steps 4-5: [B, V] bool, the tokens top-p and top-k keep (never a zero-probability one:
  the official pipeline's 0 ** (1 / T) keeps those at 0)."""
  B, V = probs_BV.shape
  keep_BV = probs_BV > 0
  top_k = cfg.top_k if 0 < cfg.top_k < V else 0
  if top_k:
    # The top-p cutoff only matters inside the k kept tokens, so the partial sort suffices.
    top_probs, top_ids = jax.lax.top_k(probs_BV, top_k)   # [B, top_k] each
    if cfg.top_p < 1:
      keep_BV &= probs_BV >= _cutoff_in_sorted(top_probs, cfg.top_p)[0]
    # Exactly k tokens (ties at the k-th value: the lowest ids, as lax.top_k returns them).
    keep_BV &= jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], top_ids].set(True)
  elif cfg.top_p < 1:
    keep_BV &= probs_BV >= _top_p_cutoff(probs_BV, cfg.top_p)
  return keep_BV


# Smaller temperatures act as this one (float32's smallest normal number): as float32 they
# would lose precision or round to 0, and the result is the same top-token distribution.
MIN_TEMPERATURE = float(jnp.finfo(jnp.float32).tiny)


def _tempered(logits_BV: jax.Array, keep_BV: jax.Array, temperature: float) -> jax.Array:
  """Step 6, p ** (1 / T) renormalised over the kept tokens, as a softmax of
  (log p - max log p) / T: the most probable kept token gets exp(0) = 1, so the sum never
  underflows, whatever T. Dividing (not multiplying by 1 / T) keeps 0 / T at 0."""
  log_p_BV = jnp.where(keep_BV, jax.nn.log_softmax(logits_BV, axis=-1), -jnp.inf)
  shifted_BV = log_p_BV - jnp.max(log_p_BV, axis=-1, keepdims=True)
  weights_BV = jnp.exp(shifted_BV / max(temperature, MIN_TEMPERATURE))
  return weights_BV / jnp.sum(weights_BV, axis=-1, keepdims=True)


def _cutoff_in_sorted(sorted_probs: jax.Array, top_p: float) -> tuple[jax.Array, jax.Array]:
  """(cutoff [B,1], found [B,1]): the probability at the first position of the descending
  `sorted_probs` [B, k] where the cumulative sum reaches top_p (0 where it is not reached)."""
  reached = jnp.cumsum(sorted_probs, axis=-1) >= top_p   # [B, k]
  found_B1 = jnp.any(reached, axis=-1, keepdims=True)
  first_B1 = argmax(reached.astype(jnp.float32))[:, None]
  cutoff_B1 = jnp.take_along_axis(sorted_probs, first_B1, axis=-1)
  return jnp.where(found_B1, cutoff_B1, 0.0), found_B1


def _top_p_cutoff(probs_BV: jax.Array, top_p: float) -> jax.Array:
  """The official top-p cutoff [B, 1]: the largest probability value c such that the tokens
  with probability >= c hold at least top_p of the mass."""
  k = min(TOP_P_CANDIDATES, probs_BV.shape[-1])
  cutoff_B1, found_B1 = _cutoff_in_sorted(jax.lax.top_k(probs_BV, k)[0], top_p)

  def bisect(_):
    # Non-negative float32 values order like their bit patterns, so bisecting over the
    # integers finds the exact probability value in 31 masked sums.
    bits_BV = jax.lax.bitcast_convert_type(probs_BV, jnp.int32)
    mass = lambda c_B1: jnp.sum(jnp.where(bits_BV >= c_B1, probs_BV, 0.0), axis=-1, keepdims=True)
    lo_B1 = jnp.zeros(cutoff_B1.shape, jnp.int32)                 # mass(lo) >= top_p
    hi_B1 = jnp.max(bits_BV, axis=-1, keepdims=True) + 1          # mass(hi) < top_p

    def step(_, bounds):
      lo, hi = bounds
      mid = lo + (hi - lo) // 2
      ok = mass(mid) >= top_p
      return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo_B1, _ = jax.lax.fori_loop(0, 32, step, (lo_B1, hi_B1))
    return jnp.where(found_B1, cutoff_B1, jax.lax.bitcast_convert_type(lo_B1, jnp.float32))

  return jax.lax.cond(jnp.all(found_B1), lambda _: cutoff_B1, bisect, None)


def argmax(x_BV: jax.Array) -> jax.Array:
  """First index of the maximum per row (int32). jnp.argmax's variadic reduction, like any
  integer reduction, is slow on XLA:CPU; this uses float min/max reductions only."""
  V = x_BV.shape[-1]
  max_B1 = jnp.max(x_BV, axis=-1, keepdims=True)
  ids_BV = jax.lax.broadcasted_iota(jnp.float32, x_BV.shape, x_BV.ndim - 1)   # exact below 2**24
  first_B = jnp.min(jnp.where(x_BV == max_B1, ids_BV, float(V)), axis=-1)
  return jnp.minimum(first_B, V - 1).astype(jnp.int32)      # a NaN row gives the last id


def draw(probs_BV: jax.Array, uniform_B: jax.Array, block: int = 256) -> jax.Array:
  """Inverse-CDF draw: the first token whose cumulative probability exceeds u * total.

  Two levels (block sums, then one block) instead of a cumulative sum over the whole
  vocabulary, which XLA:CPU computes slowly. Never lands on a zero-probability token.
  """
  B, V = probs_BV.shape
  n_blocks = -(-V // block)
  padded_BV = jnp.pad(probs_BV, ((0, 0), (0, n_blocks * block - V)))
  blocks = padded_BV.reshape(B, n_blocks, block)
  block_cdf = jnp.cumsum(jnp.sum(blocks, axis=-1), axis=-1)   # [B, n_blocks]
  target_B1 = uniform_B[:, None] * block_cdf[:, -1:]
  # The block holding the target: the count of whole blocks at or below it.
  index_B = jnp.minimum(jnp.sum((block_cdf <= target_B1).astype(jnp.float32), axis=-1),
                        n_blocks - 1).astype(jnp.int32)
  previous_B1 = jnp.take_along_axis(block_cdf, jnp.maximum(index_B - 1, 0)[:, None], axis=-1)
  before_B1 = jnp.where(index_B[:, None] > 0, previous_B1, 0.0)
  inner = jnp.take_along_axis(blocks, index_B[:, None, None], axis=1)[:, 0]   # [B, block]
  inner_cdf = before_B1 + jnp.cumsum(inner, axis=-1)
  offset_B = jnp.sum((inner_cdf <= target_B1).astype(jnp.float32), axis=-1).astype(jnp.int32)
  token_B = index_B * block + offset_B
  # Rounding can leave the target on or past a zero-probability entry: take the last nonzero
  # token at or before it (or the first nonzero token if there is none before it).
  ids_BV = jax.lax.broadcasted_iota(jnp.float32, probs_BV.shape, 1)
  nonzero_BV = probs_BV > 0
  before_B = jnp.max(jnp.where(nonzero_BV & (ids_BV <= token_B[:, None]), ids_BV, -1.0), axis=-1)
  first_B = jnp.min(jnp.where(nonzero_BV, ids_BV, float(V)), axis=-1)
  return jnp.where(before_B >= 0, before_B, jnp.minimum(first_B, V - 1)).astype(jnp.int32)


def sample(logits_BV: jax.Array, uniform_B: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Steps 3-6 on already penalised logits: one token id per row (int32)."""
  if cfg.greedy:
    return argmax(logits_BV)
  return draw(sampling_probs(logits_BV, cfg), uniform_B)
