"""Per-token log-probabilities of many token sequences, each from a fresh state, in batches.

Every evaluation here (perplexity, LAMBADA, the lm-eval adapter) reduces to: for sequences
s (each normally starting with the document-start token 0), the log-probability of s[t]
given s[:t] and whether s[t] is the argmax. Sequences are packed whole into B rows
(longest first, each into the currently shortest row); a row's sequences follow one another
with a reset at each sequence start, so each is scored exactly as if run alone from a zero
state (docs/architecture.md#evaluation-protocol). The rows advance together in fixed chunks
of T tokens carrying the recurrent state, so memory stays at one [B, T, V] logits block and
one compile serves all.
"""
from __future__ import annotations

import functools
import heapq
import sys
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from goosejax.errors import GoosejaxError
from goosejax.model.rwkv7 import RWKV7


class EvalDataError(GoosejaxError):
  """Evaluation input goosejax cannot use: a data file, a sequence or a setting (the message
  names it and the problem)."""


class SequenceScore(NamedTuple):
  """For a sequence of n tokens: logprobs[t] = log p(s[t+1] | s[:t+1]) (n - 1 values, float64)
  and greedy[t] = whether s[t+1] was the argmax."""
  logprobs: np.ndarray
  greedy: np.ndarray


@functools.partial(jax.jit, static_argnums=0)
def _score_chunk(graphdef, params, tokens_BT, targets_BT, reset_BT, state):
  model = nnx.merge(graphdef, params)
  x_BTC, state = model.hidden_states(tokens_BT, state, reset_BT=reset_BT)
  logits_BTV = model.logits(x_BTC)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  safe_BT = jnp.maximum(targets_BT, 0)
  target_logit_BT = jnp.take_along_axis(logits_BTV, safe_BT[..., None], axis=-1)[..., 0]
  logp_BT = jnp.where(targets_BT >= 0, target_logit_BT - log_z_BT, 0.0)
  # Greedy means no other token scores strictly higher (ties count as greedy).
  greedy_BT = jnp.max(logits_BTV, axis=-1) <= target_logit_BT
  return logp_BT, greedy_BT, state


def _pack(lengths: Sequence[int], rows: int) -> list[list[int]]:
  """Sequence indices per row: longest first, each into the row with the fewest tokens."""
  heap = [(0, row) for row in range(rows)]
  assignment: list[list[int]] = [[] for _ in range(rows)]
  for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    total, row = heapq.heappop(heap)
    assignment[row].append(index)
    heapq.heappush(heap, (total + lengths[index], row))
  return assignment


class Progress:
  """A one-line progress report on stderr (tokens done, rate, ETA); silent if disabled."""

  def __init__(self, label: str, enabled: bool = True, stream=None):
    self.label, self.enabled = label, enabled
    self.stream = stream or sys.stderr
    self.start = time.perf_counter()
    self.open_line = False

  def restart_clock(self) -> None:
    """Measure the rate from now on (e.g. after loading the model)."""
    self.start = time.perf_counter()

  def update(self, done_tokens: int, total_tokens: int) -> None:
    if not self.enabled:
      return
    elapsed = max(time.perf_counter() - self.start, 1e-9)
    rate = done_tokens / elapsed
    eta = (total_tokens - done_tokens) / rate if rate > 0 else 0.0
    share = 100.0 * done_tokens / max(total_tokens, 1)
    self.stream.write(f"\r{self.label}: {done_tokens:,}/{total_tokens:,} tokens ({share:5.1f}%) "
                      f"{rate:,.0f} tok/s, ETA {eta:,.0f} s   ")
    self.stream.flush()
    self.open_line = True

  def close(self) -> None:
    """End the progress line (if one was written), e.g. before an error or interrupt message."""
    if self.open_line:
      self.stream.write("\n")
      self.stream.flush()
      self.open_line = False


def score_sequences(model: RWKV7, sequences: Sequence[Sequence[int]], *, batch_size: int = 4,
                    chunk_len: int = 256, progress: Callable[[int, int], None] | None = None
                    ) -> list[SequenceScore]:
  """Score every next token of every sequence (see the module docstring).

  batch_size: rows run together; chunk_len: tokens per row per step (memory ~ B*T*V floats).
  progress: called after each chunk with (sequence tokens processed, total tokens).
  """
  if batch_size < 1 or chunk_len < 1:
    raise EvalDataError(f"batch_size={batch_size}, chunk_len={chunk_len}: expected both >= 1")
  vocab = model.config.vocab_size
  lengths = [len(s) for s in sequences]
  for i, s in enumerate(sequences):
    if not lengths[i]:
      raise EvalDataError(f"sequence {i} is empty; each needs at least one token (start with 0)")
    bad = [t for t in s if not 0 <= int(t) < vocab]
    if bad:
      raise EvalDataError(f"sequence {i} has token ids outside [0, {vocab}): {bad[:8]}")
  if not sequences:
    return []
  rows = min(batch_size, len(sequences))
  assignment = _pack(lengths, rows)
  width = max(sum(lengths[i] for i in row) for row in assignment)
  n_chunks = -(-width // chunk_len)
  total = n_chunks * chunk_len
  tokens = np.zeros((rows, total), np.int32)
  targets = np.full((rows, total), -1, np.int32)
  reset = np.zeros((rows, total), bool)
  starts: dict[int, tuple[int, int]] = {}
  for row, indices in enumerate(assignment):
    at = 0
    for index in indices:
      seq = np.asarray(sequences[index], np.int32)
      n = len(seq)
      tokens[row, at:at + n] = seq
      targets[row, at:at + n - 1] = seq[1:]
      reset[row, at] = True
      starts[index] = (row, at)
      at += n

  graphdef, params = nnx.split(model)
  state = model.init_state(rows)
  logp = np.zeros((rows, total), np.float64)
  greedy = np.zeros((rows, total), bool)
  row_tokens = [sum(lengths[i] for i in row) for row in assignment]
  for c in range(n_chunks):
    window = slice(c * chunk_len, (c + 1) * chunk_len)
    chunk_logp, chunk_greedy, state = _score_chunk(
        graphdef, params, jnp.asarray(tokens[:, window]), jnp.asarray(targets[:, window]),
        jnp.asarray(reset[:, window]), state)
    logp[:, window] = np.asarray(chunk_logp, np.float64)
    greedy[:, window] = np.asarray(chunk_greedy)
    if progress is not None:
      progress(sum(min(n, (c + 1) * chunk_len) for n in row_tokens), sum(row_tokens))
  scores = []
  for index, n in enumerate(lengths):
    row, at = starts[index]
    scores.append(SequenceScore(logp[row, at:at + n - 1].copy(), greedy[row, at:at + n - 1].copy()))
  return scores

