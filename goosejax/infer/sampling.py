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

One deliberate difference: the official cutoff search never succeeds when top_p >= 1 and the
float32 cumulative sum stays just below 1, which silently turns sampling into greedy; here
top_p >= 1 means no top-p cut.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


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
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature}: expected >= 0 (0 means greedy)")
    if not 0 <= self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p}: expected a value in [0, 1]")
    if self.top_k < 0 or int(self.top_k) != self.top_k:
      raise ValueError(f"top_k={self.top_k}: expected an integer >= 0 (0 means no limit)")
    if not 0 <= self.penalty_decay <= 1:
      raise ValueError(f"penalty_decay={self.penalty_decay}: expected a value in [0, 1]")
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


def sampling_probs(logits_BV: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Steps 3-6 up to the draw: the normalised distribution a token is drawn from."""
  probs_BV = jax.nn.softmax(logits_BV.astype(jnp.float32), axis=-1)
  V = probs_BV.shape[-1]
  top_k = cfg.top_k if 0 < cfg.top_k < V else 0
  if top_k:
    # The top-p cutoff only matters inside the k kept tokens, so the partial sort suffices.
    sorted_BK, _ = jax.lax.top_k(probs_BV, top_k)
    kth_B1 = sorted_BK[:, -1:]
  elif cfg.top_p < 1:
    sorted_BK = -jnp.sort(-probs_BV, axis=-1)
  else:
    sorted_BK = None
  keep_BV = jnp.ones(probs_BV.shape, bool)
  if sorted_BK is not None and cfg.top_p < 1:
    reached_BK = jnp.cumsum(sorted_BK, axis=-1) >= cfg.top_p
    first_B = jnp.argmax(reached_BK, axis=-1)
    cutoff_B1 = jnp.take_along_axis(sorted_BK, first_B[:, None], axis=-1)
    # Not reached inside the k kept tokens: the cut would fall below them and drops none of them.
    cutoff_B1 = jnp.where(jnp.any(reached_BK, axis=-1, keepdims=True), cutoff_B1, 0.0)
    keep_BV &= probs_BV >= cutoff_B1
  if top_k:
    keep_BV &= _top_k_mask(probs_BV, kth_B1, top_k)
  probs_BV = jnp.where(keep_BV, probs_BV, 0.0)
  if cfg.temperature != 1.0:
    probs_BV = probs_BV ** (1.0 / cfg.temperature)
  return probs_BV / jnp.sum(probs_BV, axis=-1, keepdims=True)


def _top_k_mask(probs_BV: jax.Array, kth_B1: jax.Array, top_k: int) -> jax.Array:
  """Exactly k tokens per row: all above the k-th value, then ties at it by lowest id."""
  above_BV = probs_BV > kth_B1
  tie_BV = probs_BV == kth_B1
  room_B1 = top_k - jnp.sum(above_BV, axis=-1, keepdims=True)
  tie_rank_BV = jnp.cumsum(tie_BV, axis=-1)
  return above_BV | (tie_BV & (tie_rank_BV <= room_B1))


def draw(probs_BV: jax.Array, uniform_B: jax.Array) -> jax.Array:
  """Inverse-CDF draw: the first token whose cumulative probability exceeds u * total."""
  cdf_BV = jnp.cumsum(probs_BV, axis=-1)
  target_B1 = uniform_B[:, None] * cdf_BV[:, -1:]
  index_B = jnp.sum(cdf_BV <= target_B1, axis=-1)
  # Never land on a zero-probability token through rounding at the top end.
  last_B = probs_BV.shape[-1] - 1 - jnp.argmax(probs_BV[:, ::-1] > 0, axis=-1)
  return jnp.minimum(index_B, last_B).astype(jnp.int32)


def sample(logits_BV: jax.Array, uniform_B: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Steps 3-6 on already penalised logits: one token id per row (int32)."""
  if cfg.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return draw(sampling_probs(logits_BV, cfg), uniform_B)
