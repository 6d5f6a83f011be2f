"""Grain training and validation pipelines over token streams.

Each dataset in `data.paths` (or the built-in corpus) becomes one flat token stream: a
binidx `.bin` as it is on disk (memory-mapped), or `.jsonl`/`.txt`/ArrayRecord/Parquet
documents tokenized once in memory (Parquet read a row group at a time), each followed by the tokenizer's `eot_id`. A stream of S tokens
has N = (S - 1) // T window slots; slot i is tokens [i*T, i*T + T + 1), so inputs are its
first T tokens and targets its last T (T = data.ctx_len). The last slots of every stream
are the held-out validation windows (`ceil(validation_fraction * N)`, at least enough for
one global batch over all streams together); training uses the rest.

Training order, as a function of the global sample index j = 0, 1, 2, ...:
- `shuffle` (default): a seeded Grain shuffle of the training slots, reshuffled every epoch.
- `magic_prime`: RWKV-LM's order, slot = (c * (j+1)^3) mod P with c = int(P * (sqrt(5)-1)/2)
  and P = `magic_prime(...)` (or `data.magic_prime`); with validation_fraction 0 and one
  binidx file this visits exactly the windows RWKV-LM trains on, step by step.
Several streams are mixed by `data.weights` (Grain's deterministic weighted interleave),
each keeping its own order. Process p of W takes the samples with j % W == p, batched
`batch_size // W` at a time, so global step k always covers samples [k*B, (k+1)*B) whatever
W is: an iterator state restores under a different process count.

`data.pack_documents` adds `reset` [b, T] bool: True where a document starts. The
end-of-text token that closes one document opens the next, so the state is reset *at* that
token and every document is read as `[eot] tokens...`, the context official evaluation uses
(it prepends 0). Items of foreign binidx files that do not end in `eot_id` reset at their
first token instead.

API: `make_train_iterator`, `make_validation_iterator` -> `BatchIterator` (`next()`,
`get_state()` -> JSON-serializable dict, `set_state(dict)`); the magic-prime arithmetic lives
in `goosejax.data.order`. Training makes global arrays of the batches with
`goosejax.sharding.host_to_global`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import grain
import numpy as np

from goosejax.config import DataConfig
from goosejax.data.binidx import BinIdxDataset, dtype_for_vocab
from goosejax.data.documents import (ARRAY_RECORD_SUFFIXES, JSONL_SUFFIXES, PARQUET_SUFFIXES,
                                     TEXT_SUFFIXES, builtin_documents, expand_paths,
                                     read_documents)
from goosejax.errors import DataError
from goosejax.data.order import MagicPrimeOrder, is_prime, largest_magic_prime
from goosejax.data.tokenizer import Tokenizer, load_tokenizer

STATE_FORMAT = "goosejax.data.BatchIterator/1"
_SOURCE_SUFFIXES = {"jsonl": JSONL_SUFFIXES, "text": TEXT_SUFFIXES,
                    "arrayrecord": ARRAY_RECORD_SUFFIXES, "parquet": PARQUET_SUFFIXES}
_READ_OPTIONS = dict(num_threads=2, prefetch_buffer_size=4)


# ----------------------------------------------------------------------------- token streams


class TokenStream:
  """One dataset as a flat token array plus the offsets where its documents start."""

  def __init__(self, name: str, tokens: np.ndarray, document_starts: np.ndarray,
               binidx: BinIdxDataset | None = None):
    self.name = name
    self.tokens = tokens
    self.document_starts = np.asarray(document_starts, dtype=np.int64)
    self._binidx = binidx

  def __getstate__(self) -> dict:
    if self._binidx is not None:  # re-map the file instead of pickling its contents
      return {"name": self.name, "binidx": self._binidx}
    return {"name": self.name, "tokens": self.tokens, "document_starts": self.document_starts}

  def __setstate__(self, state: dict) -> None:
    binidx = state.get("binidx")
    if binidx is not None:
      self.__init__(state["name"], binidx.tokens, binidx.document_starts, binidx)
    else:
      self.__init__(state["name"], state["tokens"], state["document_starts"])

  def __len__(self) -> int:
    return len(self.tokens)

  def reset_positions(self, eot_id: int) -> np.ndarray:
    """Sorted stream offsets where the recurrent state resets (see the module docstring)."""
    starts = self.document_starts[(self.document_starts > 0) & (self.document_starts < len(self))]
    previous = np.asarray(self.tokens[starts - 1]) if len(starts) else np.zeros(0, np.int64)
    return np.unique(np.where(previous == eot_id, starts - 1, starts))


def tokenize_documents(name: str, documents: Iterable[str], tokenizer: Tokenizer) -> TokenStream:
  """Documents -> one in-memory stream, each document followed by `tokenizer.eot_id`."""
  dtype = dtype_for_vocab(tokenizer.vocab_size)
  pieces, starts, total = [], [], 0
  for document in documents:
    ids = tokenizer.encode(document)
    ids.append(tokenizer.eot_id)
    pieces.append(np.asarray(ids, dtype=dtype))
    starts.append(total)
    total += len(ids)
  if not pieces:
    raise DataError(f"{name}: no documents")
  return TokenStream(name, np.concatenate(pieces), np.asarray(starts, dtype=np.int64))


def _file_key(source: str, pattern: str) -> tuple:
  return tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size)
               for p in expand_paths(pattern, _SOURCE_SUFFIXES[source]))


@functools.lru_cache(maxsize=16)
def _cached_stream(source: str, pattern: str, tokenizer_spec: str, text_field: str,
                   key: tuple) -> TokenStream:
  """Tokenized text streams are built once per (files, tokenizer) and shared by iterators."""
  del key  # cache key only: changed files are read again
  tokenizer = load_tokenizer(tokenizer_spec)
  if source == "builtin":
    return tokenize_documents("builtin corpus", (text for _, text in builtin_documents()), tokenizer)
  files = expand_paths(pattern, _SOURCE_SUFFIXES[source])
  for path in files:
    if path.suffix.lower() not in _SOURCE_SUFFIXES[source]:
      raise DataError(f"{path}: data.source={source!r} expects {list(_SOURCE_SUFFIXES[source])} files")
  documents = (doc for path in files for doc in read_documents(path, text_field))
  return tokenize_documents(pattern, documents, tokenizer)


def load_streams(config: DataConfig) -> list[TokenStream]:
  """One TokenStream per entry of `config.paths` (the built-in corpus for source=builtin)."""
  if config.source == "builtin":
    if config.paths:
      raise DataError(f"data.paths={list(config.paths)} given with data.source='builtin'; set "
                      "data.source to binidx, arrayrecord, jsonl, parquet or text to train "
                      "on them")
    return [_cached_stream("builtin", "", config.tokenizer, "", ())]
  if not config.paths:
    raise DataError(f"data.source={config.source!r} needs data.paths (files, prefixes or globs)")
  if config.source == "binidx":
    streams = []
    for path in config.paths:
      dataset = BinIdxDataset(path)
      streams.append(TokenStream(str(dataset.prefix), dataset.tokens, dataset.document_starts, dataset))
    return streams
  if config.source not in _SOURCE_SUFFIXES:
    raise DataError(f"data.source={config.source!r}: expected builtin, binidx, arrayrecord, "
                    "jsonl, parquet or text")
  return [_cached_stream(config.source, p, config.tokenizer, config.text_field,
                         _file_key(config.source, p)) for p in config.paths]


# ----------------------------------------------------------------------------- windows


class WindowReader:
  """Slot -> {"inputs", "targets"[, "reset"]} for one stream; checks ids against the vocab."""

  def __init__(self, stream: TokenStream, ctx_len: int, eot_id: int | None, vocab_size: int | None):
    self.stream, self.ctx_len, self.vocab_size = stream, ctx_len, vocab_size
    self.resets = None if eot_id is None else stream.reset_positions(eot_id)

  def __call__(self, slot: int) -> dict[str, np.ndarray]:
    start, T = int(slot) * self.ctx_len, self.ctx_len
    window = np.asarray(self.stream.tokens[start:start + T + 1]).astype(np.int32)
    if self.vocab_size is not None and len(window) and (window.max() >= self.vocab_size or window.min() < 0):
      bad = int(np.flatnonzero((window >= self.vocab_size) | (window < 0))[0])
      raise DataError(f"{self.stream.name}: token {int(window[bad])} at token offset {start + bad} is "
                      f"outside the vocabulary [0, {self.vocab_size})")
    batch = {"inputs": window[:-1], "targets": window[1:]}
    if self.resets is not None:
      lo, hi = np.searchsorted(self.resets, [start, start + T])
      reset = np.zeros(T, dtype=bool)
      reset[self.resets[lo:hi] - start] = True
      batch["reset"] = reset
    return batch


# ----------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class _Layout:
  """How one stream is split: slots [0, n_train) train, [n_train, n_slots) validation."""
  stream: TokenStream
  n_slots: int
  n_train: int
  prime: int | None


def _layouts(config: DataConfig, streams: Sequence[TokenStream]) -> list[_Layout]:
  T, B = config.ctx_len, config.batch_size
  layouts = []
  for stream in streams:
    n_slots = (len(stream) - 1) // T
    if n_slots < 1:
      raise DataError(f"{stream.name}: {len(stream)} tokens is shorter than one window of "
                      f"ctx_len + 1 = {T + 1} tokens; use more data or a smaller data.ctx_len")
    n_val = 0
    if config.validation_fraction > 0:
      n_val = max(math.ceil(config.validation_fraction * n_slots), math.ceil(B / len(streams)))
    n_train = n_slots - n_val
    if n_train < 1:
      raise DataError(f"{stream.name}: {n_slots} windows of {T + 1} tokens cannot hold {n_val} "
                      f"validation windows (validation_fraction={config.validation_fraction}, "
                      f"batch_size={B}) and still train; use more data, a smaller ctx_len, or "
                      "data.validation_fraction=0")
    prime = None
    if config.order == "magic_prime":
      bound = min(n_train, len(stream) // T - 1)
      prime = config.magic_prime if config.magic_prime is not None else largest_magic_prime(bound)
      if prime is None:
        raise DataError(f"{stream.name}: {n_train} training windows are too few for the magic_prime "
                        "order (it needs a prime P % 3 == 2 <= the window count, so at least 2)")
      if not (is_prime(prime) and prime % 3 == 2 and prime <= bound):
        raise DataError(f"data.magic_prime={prime}: must be a prime with P % 3 == 2 and P <= "
                        f"{bound} (the training windows of {stream.name})")
    layouts.append(_Layout(stream, n_slots, n_train, prime))
  return layouts


def _order_settings(config: DataConfig, layouts: Sequence[_Layout]) -> dict[str, Any]:
  """What the sample order depends on, by name (a saved state keeps it, so a refused resume
  can say which setting changed)."""
  return {"data.source": config.source, "data.tokenizer": config.tokenizer,
          "data.ctx_len": config.ctx_len, "data.order": config.order, "data.seed": config.seed,
          "data.weights": list(config.weights), "data.pack_documents": config.pack_documents,
          "data.validation_fraction": config.validation_fraction,
          # text_field only when not the default: states saved before it existed still resume
          **({"data.text_field": config.text_field} if config.text_field != "text" else {}),
          "files (name, tokens, training windows, prime)":
              [[Path(l.stream.name).name, len(l.stream), l.n_train, l.prime] for l in layouts]}


def _fingerprint(settings: dict[str, Any]) -> str:
  """Identifies the sample order, so a state never resumes on different data or settings."""
  return hashlib.sha256(json.dumps(list(settings.values())).encode()).hexdigest()[:16]


def _changed_settings(saved: Any, now: dict[str, Any]) -> str:
  """'data.ctx_len 16 -> 32, ...' for a state that recorded its settings, else ''."""
  if not isinstance(saved, dict):
    return ""
  return ", ".join(f"{key} {saved.get(key)!r} -> {value!r}" for key, value in now.items()
                   if saved.get(key) != value)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} is not in [0, process_count={process_count})")
  return process_index, process_count


def _local_batch(config: DataConfig, process_count: int) -> int:
  if config.batch_size % process_count:
    raise DataError(f"data.batch_size={config.batch_size} (global) is not divisible by "
                    f"{process_count} processes")
  return config.batch_size // process_count


def _readers(config: DataConfig, layouts: Sequence[_Layout], vocab_size: int | None) -> list[WindowReader]:
  eot_id = load_tokenizer(config.tokenizer).eot_id if config.pack_documents else None
  return [WindowReader(l.stream, config.ctx_len, eot_id, vocab_size) for l in layouts]


def _prepare(config: DataConfig):
  config.validate()
  if config.magic_prime is not None and len(config.paths) > 1:
    raise DataError("data.magic_prime is set, but data.paths has several datasets; leave it "
                    "unset so that each dataset gets its own prime")
  layouts = _layouts(config, load_streams(config))
  return layouts, _order_settings(config, layouts)


# ----------------------------------------------------------------------------- iterators


class BatchIterator:
  """Batches of one process, checkpointable: `get_state()` / `set_state(state)`.

  The state is a small JSON-serializable dict (format, global step, global batch size,
  process index/count, data fingerprint and the settings it hashes). Its step is global, so
  every process holds the same state up to `process_index`, and one saved copy (e.g. Orbax
  `args.JsonSave`) restores any process count. It is not a `grain.DatasetIterator`: Grain's own checkpoint
  handler, which writes one file per process index, is not needed.
  """

  def __init__(self, batched: grain.MapDataset, *, settings: dict[str, Any],
               global_batch_size: int, process_index: int, process_count: int):
    self._dataset = batched
    self._iterator = iter(batched.to_iter_dataset(grain.ReadOptions(**_READ_OPTIONS)))
    self.settings = settings
    self.fingerprint = _fingerprint(settings)
    self.global_batch_size = global_batch_size
    self.process_index, self.process_count = process_index, process_count

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def __len__(self) -> int:
    """Batches per pass (a huge number for the endless training iterator)."""
    return len(self._dataset)

  def get_state(self) -> dict[str, Any]:
    return {"format": STATE_FORMAT, "step": int(self._iterator.get_state()["next_index"]),
            "global_batch_size": self.global_batch_size, "process_index": self.process_index,
            "process_count": self.process_count, "fingerprint": self.fingerprint,
            "settings": self.settings}

  def set_state(self, state: dict[str, Any]) -> None:
    """Resume after `state["step"]` global batches; any process count works."""
    keys = ("format", "step", "global_batch_size", "fingerprint")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or any(k not in state for k in keys):
      raise DataError(f"data iterator state: expected a dict with format {STATE_FORMAT!r} and keys "
                      f"{list(keys)}, got {str(state)[:120]}")
    if state["fingerprint"] != self.fingerprint:
      changed = _changed_settings(state.get("settings"), self.settings) or (
          f"fingerprint {state['fingerprint']} != {self.fingerprint}: paths, sizes, ctx_len, "
          "order, seed, weights, packing or validation split changed")
      raise DataError("data iterator state was saved for different data or data settings "
                      f"({changed}); set them back or start a new run")
    if state["global_batch_size"] != self.global_batch_size:
      raise DataError(f"data iterator state was saved with global batch size "
                      f"{state['global_batch_size']}, this run uses {self.global_batch_size}; "
                      "the sample order of later steps would differ")
    self._iterator.set_state({"next_index": int(state["step"])})


def make_train_iterator(config: DataConfig, process_index: int | None = None,
                        process_count: int | None = None, vocab_size: int | None = None) -> BatchIterator:
  """Endless training batches for this process: {"inputs", "targets"[, "reset"]}, [b, T].

  b = config.batch_size // process_count. `vocab_size` (the model's) makes every window
  check its ids; process_index/count default to jax.process_index()/process_count().
  """
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch(config, process_count)
  layouts, settings = _prepare(config)
  components = []
  for i, (layout, reader) in enumerate(zip(layouts, _readers(config, layouts, vocab_size))):
    if layout.prime is None:
      seed = (config.seed + 1_000_003 * i) % 2**32
      slots = grain.MapDataset.range(layout.n_train).shuffle(seed=seed).repeat()
    else:
      slots = grain.MapDataset.range(0, sys.maxsize).map(MagicPrimeOrder(layout.prime))
    components.append(slots.map(reader))
  weights = list(config.weights) or [1.0] * len(components)
  kept = [(c, w) for c, w in zip(components, weights) if w > 0]
  if not kept:
    raise DataError(f"data.weights={weights}: at least one weight must be positive")
  if len(kept) == 1:
    samples = kept[0][0]
  else:
    samples = grain.MapDataset.mix([c for c, _ in kept], [w for _, w in kept])
  batched = samples[process_index::process_count].batch(local_batch, drop_remainder=True)
  return BatchIterator(batched, settings=settings, global_batch_size=config.batch_size,
                       process_index=process_index, process_count=process_count)


def make_validation_iterator(config: DataConfig, process_index: int | None = None,
                             process_count: int | None = None,
                             vocab_size: int | None = None) -> BatchIterator | None:
  """One pass over the held-out windows in a fixed order (None when validation_fraction=0).

  Every call starts from the beginning, so evaluations at different steps see the same
  batches; `len(it)` is the number of batches (whole global batches only).
  """
  if config.validation_fraction == 0:
    return None
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch(config, process_count)
  layouts, settings = _prepare(config)
  parts = [grain.MapDataset.range(l.n_train, l.n_slots).map(reader)
           for l, reader in zip(layouts, _readers(config, layouts, vocab_size))]
  windows = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
  n_batches = len(windows) // config.batch_size
  windows = windows[:n_batches * config.batch_size]
  batched = windows[process_index::process_count].batch(local_batch, drop_remainder=True)
  return BatchIterator(batched, settings=settings, global_batch_size=config.batch_size,
                       process_index=process_index, process_count=process_count)

