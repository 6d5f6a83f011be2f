"""Grain pipelines: windows, orders (seeded shuffle, RWKV-LM magic prime), packing resets,
per-process sharding, exact resume, mixtures, validation split, global batches."""
import dataclasses
import json
import math

import numpy as np
import pytest

from goosejax.config import ConfigError, DataConfig
from goosejax.data import (BinIdxDataset, BinIdxWriter, DataError, load_tokenizer,
                           make_train_iterator, make_validation_iterator)
from goosejax.data.order import MagicPrimeOrder, largest_magic_prime, magic_prime

T = 16


def write_stream(prefix, n_docs, seed, offset=1, eot=True):
  """Documents of 3..40 tokens with distinct ids (offset + position), each ending in 0."""
  rng = np.random.default_rng(seed)
  position = 0
  with BinIdxWriter(prefix, np.uint16) as writer:
    for _ in range(n_docs):
      size = int(rng.integers(3, 40))
      doc = offset + position + np.arange(size)
      if eot:
        doc[-1] = 0
      writer.add_document(doc % 65000)
      position += size
  return BinIdxDataset(prefix)


@pytest.fixture(scope="module")
def stream_a(tmp_path_factory):
  return write_stream(tmp_path_factory.mktemp("a") / "a", 60, seed=0)  # ~1300 tokens, ~80 slots


@pytest.fixture(scope="module")
def stream_b(tmp_path_factory):
  return write_stream(tmp_path_factory.mktemp("b") / "b", 60, seed=1, offset=30000)


def config(*datasets, **overrides):
  base = DataConfig(source="binidx", paths=tuple(str(d.prefix) for d in datasets), ctx_len=T,
                    batch_size=4, validation_fraction=0.0)
  return dataclasses.replace(base, **overrides)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def slot_of(dataset, row):
  """The window slot whose first T tokens are `row` (asserts that one exists)."""
  tokens = dataset.tokens
  for slot in range((dataset.n_tokens - 1) // T):
    if np.array_equal(tokens[slot * T:slot * T + T], row):
      return slot
  raise AssertionError(f"row {row[:4]}... is not a window of the stream")


def test_batches_are_shifted_windows_of_the_stream(stream_a):
  batch = next(make_train_iterator(config(stream_a), 0, 1))
  assert set(batch) == {"inputs", "targets"}
  assert batch["inputs"].shape == (4, T) and batch["inputs"].dtype == np.int32
  for inputs, targets in zip(batch["inputs"], batch["targets"]):
    slot = slot_of(stream_a, inputs)
    assert np.array_equal(targets, stream_a.tokens[slot * T + 1:slot * T + T + 1])


def test_shuffle_is_seeded_and_visits_every_slot_once_per_epoch(stream_a):
  n_slots = (stream_a.n_tokens - 1) // T
  cfg = config(stream_a, batch_size=1)
  first = [slot_of(stream_a, b["inputs"][0]) for b in take(make_train_iterator(cfg, 0, 1), 2 * n_slots)]
  assert sorted(first[:n_slots]) == list(range(n_slots)) == sorted(first[n_slots:])
  assert first[:n_slots] != first[n_slots:]  # reshuffled each epoch
  again = [slot_of(stream_a, b["inputs"][0]) for b in take(make_train_iterator(cfg, 0, 1), 10)]
  assert again == first[:10]
  other = make_train_iterator(dataclasses.replace(cfg, seed=1), 0, 1)
  assert [slot_of(stream_a, b["inputs"][0]) for b in take(other, 10)] != first[:10]


def test_magic_prime_order_matches_rwkv_lm(stream_a):
  n_tokens = stream_a.n_tokens
  prime = magic_prime(n_tokens, T)
  assert prime == largest_magic_prime(n_tokens // T - 1) and prime % 3 == 2
  factor = int(prime * ((math.sqrt(5) - 1) / 2))  # RWKV-LM dataset.py, written out again
  cfg = config(stream_a, order="magic_prime")
  batches = take(make_train_iterator(cfg, 0, 1), 3)
  for step, batch in enumerate(batches):
    for k, row in enumerate(batch["inputs"]):
      ii = 1 + step * cfg.batch_size + k
      start = ((factor * ii * ii * ii) % prime) * T
      assert np.array_equal(row, stream_a.tokens[start:start + T])
  order = MagicPrimeOrder(prime)
  assert sorted(order(j) for j in range(prime)) == list(range(prime))


def test_magic_prime_values():
  assert [largest_magic_prime(b) for b in (1, 2, 10, 100, 1000)] == [None, 2, 5, 89, 983]
  # the values RWKV-LM's scripts pass for minipile (1498226207 tokens) and a 75G-token set
  assert magic_prime(1498226207, 512) == 2926181 and magic_prime(1498226207, 2048) == 731531
  assert magic_prime(74958479689, 512) == 146403263


def test_resume_from_state_is_exact(stream_a):
  cfg = config(stream_a, pack_documents=True)
  iterator = make_train_iterator(cfg, 0, 1)
  take(iterator, 3)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = take(iterator, 4)
  resumed = make_train_iterator(cfg, 0, 1)
  resumed.set_state(state)
  for a, b in zip(expected, take(resumed, 4)):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_processes_split_each_global_batch_and_resume_across_process_counts(stream_a):
  cfg = config(stream_a, batch_size=4, order="magic_prime")
  single = make_train_iterator(cfg, 0, 1)
  take(single, 2)
  state = single.get_state()
  global_batch = next(single)["inputs"]
  halves = []
  for p in range(2):
    local = make_train_iterator(cfg, p, 2)
    local.set_state(state)
    halves.append(next(local)["inputs"])
  assert halves[0].shape == (2, T)
  rows = lambda a: sorted(map(tuple, a.tolist()))
  assert rows(np.concatenate(halves)) == rows(global_batch)
  assert np.array_equal(halves[1], global_batch[1::2])  # process p takes samples j % 2 == p


def test_state_from_other_data_or_batch_size_is_refused(stream_a, stream_b):
  state = make_train_iterator(config(stream_a), 0, 1).get_state()
  with pytest.raises(DataError, match="different data or data settings"):
    make_train_iterator(config(stream_b), 0, 1).set_state(state)
  with pytest.raises(DataError, match="global batch size 4, this run uses 8"):
    make_train_iterator(config(stream_a, batch_size=8), 0, 1).set_state(state)
  with pytest.raises(DataError, match="expected a dict with format"):
    make_train_iterator(config(stream_a), 0, 1).set_state({"next_index": 3})
  with pytest.raises(DataError, match="not divisible by 3 processes"):
    make_train_iterator(config(stream_a), 0, 3)


def test_packing_resets_at_the_eot_that_opens_each_document(stream_a):
  batch = next(make_train_iterator(config(stream_a, pack_documents=True), 0, 1))
  assert batch["reset"].dtype == bool and batch["reset"].any()
  # every document here ends in eot 0 and 0 occurs nowhere else, so resets sit on the zeros
  assert np.array_equal(batch["reset"], batch["inputs"] == 0)


def test_packing_without_eot_resets_at_item_starts(tmp_path):
  dataset = write_stream(tmp_path / "noeot", 40, seed=2, eot=False)
  batch = next(make_train_iterator(config(dataset, pack_documents=True, batch_size=2), 0, 1))
  starts = set(dataset.document_starts.tolist())
  for inputs, reset in zip(batch["inputs"], batch["reset"]):
    start = slot_of(dataset, inputs) * T
    assert [t for t in range(T) if reset[t]] == [t for t in range(T) if start + t in starts]


def test_mixture_follows_the_weights(stream_a, stream_b):
  cfg = config(stream_a, stream_b, weights=(3.0, 1.0), batch_size=4)
  rows = np.concatenate([b["inputs"] for b in take(make_train_iterator(cfg, 0, 1), 10)])
  from_b = (rows.max(axis=1) >= 30000).sum()
  assert from_b == 10  # Grain's deterministic interleave: exactly 1 in 4
  only_a = config(stream_a, stream_b, weights=(1.0, 0.0))
  rows = next(make_train_iterator(only_a, 0, 1))["inputs"]
  assert rows.max() < 30000


def test_validation_windows_are_held_out_and_fixed(stream_a):
  cfg = config(stream_a, validation_fraction=0.1, batch_size=4)
  n_slots = (stream_a.n_tokens - 1) // T
  n_val = max(math.ceil(0.1 * n_slots), 4)
  validation = make_validation_iterator(cfg, 0, 1)
  assert len(validation) == n_val // 4
  val_slots = [slot_of(stream_a, row) for b in validation for row in b["inputs"]]
  assert val_slots == list(range(n_slots - n_val, n_slots - n_val + len(validation) * 4))
  train = make_train_iterator(cfg, 0, 1)
  train_slots = {slot_of(stream_a, row) for b in take(train, n_slots // 4) for row in b["inputs"]}
  assert train_slots.isdisjoint(val_slots)
  again = [slot_of(stream_a, row) for b in make_validation_iterator(cfg, 0, 1) for row in b["inputs"]]
  assert again == val_slots
  assert make_validation_iterator(config(stream_a), 0, 1) is None


def test_bad_data_is_reported_not_batched(stream_a, tmp_path):
  with pytest.raises(DataError, match=r"a\b.*token \d+ at token offset \d+ is outside the vocabulary \[0, 100\)"):
    next(make_train_iterator(config(stream_a), 0, 1, vocab_size=100))
  with pytest.raises(DataError, match="shorter than one window of ctx_len \\+ 1 = 2049"):
    make_train_iterator(config(stream_a, ctx_len=2048), 0, 1)
  with pytest.raises(DataError, match="cannot hold .* validation windows"):
    make_train_iterator(config(stream_a, ctx_len=512, validation_fraction=0.5), 0, 1)
  with pytest.raises(DataError, match="data.magic_prime=7: must be a prime with P % 3 == 2"):
    make_train_iterator(config(stream_a, order="magic_prime", magic_prime=7), 0, 1)
  with pytest.raises(DataError, match="file not found"):
    make_train_iterator(config(stream_a, paths=(str(tmp_path / "missing"),)), 0, 1)
  with pytest.raises(ConfigError, match="data.source='csv'"):
    make_train_iterator(config(stream_a, source="csv"), 0, 1)


def test_text_sources_equal_their_prepared_binidx(tmp_path):
  from goosejax import cli
  texts = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 5 + 1) for i in range(30)]
  (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
  for i, text in enumerate(texts):
    (tmp_path / f"doc{i:02d}.txt").write_text(text)
  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(str(tmp_path / "docs.array_record"), "group_size:1")
  for text in texts:
    writer.write(text.encode())
  writer.close()
  assert cli.main(["prepare-data", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "ds"), "--quiet"]) == 0
  common = dict(ctx_len=T, batch_size=4, validation_fraction=0.05, pack_documents=True)
  batches = {}
  for source, path in [("binidx", tmp_path / "ds"), ("jsonl", tmp_path / "docs.jsonl"),
                       ("text", tmp_path / "doc*.txt"), ("arrayrecord", tmp_path / "docs.array_record")]:
    cfg = DataConfig(source=source, paths=(str(path),), **common)
    batches[source] = take(make_train_iterator(cfg, 0, 1), 3) + list(make_validation_iterator(cfg, 0, 1))
  for source in ("jsonl", "text", "arrayrecord"):
    assert len(batches[source]) == len(batches["binidx"]) > 3
    for a, b in zip(batches["binidx"], batches[source]):
      assert all(np.array_equal(a[k], b[k]) for k in a)


def test_builtin_corpus_feeds_a_batch():
  cfg = DataConfig(ctx_len=64, batch_size=8)
  assert cfg.source == "builtin"
  batch = next(make_train_iterator(cfg, 0, 1, vocab_size=65536))
  assert batch["inputs"].shape == (8, 64)
  text = load_tokenizer("world").decode(batch["inputs"][0])
  assert len(text) > 64  # real (Python source) text, not padding
  with pytest.raises(DataError, match="data.paths=.* given with data.source='builtin'"):
    make_train_iterator(dataclasses.replace(cfg, paths=("x",)), 0, 1)


def test_global_batch_on_a_mesh(stream_a):
  """A pipeline batch as the trainer places it (goosejax.sharding.host_to_global)."""
  from jax.sharding import PartitionSpec

  from goosejax import sharding
  from goosejax.config import MeshConfig

  mesh = sharding.make_mesh(MeshConfig(data=4, fsdp=2))
  batch = next(make_train_iterator(config(stream_a, batch_size=8, pack_documents=True), 0, 1))
  arrays = sharding.host_to_global(batch, mesh)
  assert arrays["inputs"].shape == (8, T)
  assert arrays["inputs"].sharding.spec == PartitionSpec(("data", "fsdp"), None)
  assert arrays["reset"].dtype == bool
  for key in batch:
    assert np.array_equal(np.asarray(arrays[key]), batch[key])
  assert len(arrays["inputs"].addressable_shards) == 8
