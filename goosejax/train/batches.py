"""Where the trainer's batches come from.

The trainer consumes any per-process iterator of numpy batches

    {"inputs": int32 [b, T], "targets": int32 [b, T], optional "reset": bool [b, T]}

where b = data.batch_size / process count and process p holds rows [p*b, (p+1)*b) of the
global batch, with `get_state() -> JSON-serialisable value` and `set_state(value)` to save
and resume its exact position. The state should describe the global position (the same on
every process), as both iterators here do; then a checkpoint also resumes under a different
process count. `open_batches` builds the Grain pipelines of goosejax.data from the config;
`SyntheticBatches` is a corpus-free stream for tests and benchmarks (pass it to `train`).
"""
from __future__ import annotations

from typing import Any, Iterator, Protocol

import numpy as np

from goosejax.config import Config, ConfigError

SPLITS = ("train", "validation")


class ResumableBatches(Protocol):
  """What `train` reads batches from (goosejax.data.pipeline.BatchIterator is one)."""
  def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...
  def __next__(self) -> dict[str, np.ndarray]: ...
  def get_state(self) -> Any: ...
  def set_state(self, state: Any) -> None: ...


class SyntheticBatches:
  """A deterministic, learnable token stream.

  Each token follows a fixed random permutation of the one before with probability 3/4 and
  is uniform otherwise, so a model can bring the loss from ln(V) towards about
  0.56 + ln(V)/4 nats. Row r of the stream depends only on (seed, split, r): any process
  count, batch position or restart yields the same global batches.
  """

  FOLLOW_PROBABILITY = 0.75

  def __init__(self, vocab_size: int, ctx_len: int, batch_size: int, *, seed: int = 0,
               split: str = "train", process_index: int = 0, process_count: int = 1):
    if split not in SPLITS:
      raise ValueError(f"SyntheticBatches: split={split!r}, expected one of {SPLITS}")
    if batch_size % process_count:
      raise ConfigError(f"data.batch_size={batch_size} is not divisible by the "
                        f"{process_count} processes")
    self.vocab_size, self.ctx_len = vocab_size, ctx_len
    self.global_batch, self.local_batch = batch_size, batch_size // process_count
    self.first_row = process_index * self.local_batch
    self.seed, self.split_id = seed, SPLITS.index(split)
    self.permutation = np.random.default_rng([seed, 7919]).permutation(vocab_size)
    self.batch_index = 0

  def _row(self, row: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, self.split_id, row])
    T = self.ctx_len + 1
    uniform = rng.integers(0, self.vocab_size, T)
    follow = rng.random(T) < self.FOLLOW_PROBABILITY
    tokens = np.empty(T, np.int64)
    tokens[0] = uniform[0]
    for t in range(1, T):
      tokens[t] = self.permutation[tokens[t - 1]] if follow[t] else uniform[t]
    return tokens

  def __iter__(self) -> "SyntheticBatches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    start = self.batch_index * self.global_batch + self.first_row
    rows = np.stack([self._row(start + i) for i in range(self.local_batch)])
    self.batch_index += 1
    return {"inputs": rows[:, :-1].astype(np.int32), "targets": rows[:, 1:].astype(np.int32)}

  def get_state(self) -> dict[str, int]:
    return {"batch_index": self.batch_index}

  def set_state(self, state: dict[str, int]) -> None:
    self.batch_index = int(state["batch_index"])


def open_batches(cfg: Config, split: str, process_index: int,
                 process_count: int) -> ResumableBatches | None:
  """This process's batches of `split` ('train' or 'validation') from goosejax.data's
  pipelines; None when the data has no held-out split (data.validation_fraction=0)."""
  if split not in SPLITS:
    raise ValueError(f"open_batches: split={split!r}, expected one of {SPLITS}")
  from goosejax.data import pipeline  # Grain and tokenizers load only when a corpus is read
  make = pipeline.make_train_iterator if split == "train" else pipeline.make_validation_iterator
  return make(cfg.data, process_index=process_index, process_count=process_count,
              vocab_size=cfg.model.vocab_size)
