"""Parquet documents: read a row group at a time, batched exactly as the same documents in
jsonl (packing, shuffle, per-process shards, exact resume), prepare-data, one-line errors."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from goosejax import cli
from goosejax.config import DataConfig
from goosejax.data import DataError, make_train_iterator, make_validation_iterator, read_documents

T = 16
TEXTS = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 5 + 1)
         for i in range(40)]


def write_parquet(path, columns, row_group_size=7):
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
  return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """The same documents as one jsonl file and as a directory of two Parquet shards."""
  root = tmp_path_factory.mktemp("corpus")
  (root / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
  write_parquet(root / "shards" / "part-0.parquet", {"text": TEXTS[:25], "id": list(range(25))})
  write_parquet(root / "shards" / "part-1" / "data.parquet", {"text": TEXTS[25:]})
  (root / "shards" / "_SUCCESS").write_text("")   # what Spark leaves beside its shards
  return root


def config(source, path, **overrides):
  settings = dict(ctx_len=T, batch_size=4, validation_fraction=0.05, pack_documents=True)
  return DataConfig(source=source, paths=(str(path),), **{**settings, **overrides})


def test_documents_are_read_one_row_group_at_a_time(tmp_path, monkeypatch):
  texts = ["first", None, "", "fourth", "fifth"] * 3
  path = write_parquet(tmp_path / "d.parquet", {"text": pa.array(texts, pa.large_string())},
                       row_group_size=4)
  groups_read = []
  original = pq.ParquetFile.read_row_group

  def read_row_group(self, i, *args, **kwargs):
    groups_read.append((i, kwargs.get("columns")))
    return original(self, i, *args, **kwargs)

  def read_whole_file(self, *args, **kwargs):
    raise AssertionError("the whole file was read at once")

  monkeypatch.setattr(pq.ParquetFile, "read_row_group", read_row_group)
  monkeypatch.setattr(pq.ParquetFile, "read", read_whole_file)
  stats = {}
  assert list(read_documents(path, stats=stats)) == [t for t in texts if t]
  assert groups_read == [(i, ["text"]) for i in range(4)]        # 15 rows in groups of 4
  assert stats["empty"] == 6                                     # nulls and "" are skipped


def test_parquet_batches_equal_jsonl_batches_per_process_and_resume(corpus):
  for process in (0, 1):
    jsonl = make_train_iterator(config("jsonl", corpus / "docs.jsonl"), process, 2)
    parquet = make_train_iterator(config("parquet", corpus / "shards"), process, 2)
    expected, got = [next(jsonl) for _ in range(6)], [next(parquet) for _ in range(6)]
    for a, b in zip(expected, got):
      assert a.keys() == b.keys() == {"inputs", "targets", "reset"}
      assert all(np.array_equal(a[k], b[k]) for k in a)
    resumed = make_train_iterator(config("parquet", corpus / "shards"), process, 2)
    resumed.set_state(parquet.get_state())
    after, expected_after = next(resumed), next(jsonl)
    assert all(np.array_equal(after[k], v) for k, v in expected_after.items())
  validation = [list(make_validation_iterator(config(s, p), 0, 1))
                for s, p in (("jsonl", corpus / "docs.jsonl"), ("parquet", corpus / "shards"))]
  assert len(validation[0]) == len(validation[1]) >= 1
  assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(*validation))


def test_text_field_names_the_column(corpus, tmp_path):
  path = write_parquet(tmp_path / "c.parquet", {"content": TEXTS, "text": ["x"] * len(TEXTS)})
  batches = [next(make_train_iterator(config(s, p, **kw), 0, 1))["inputs"] for s, p, kw in (
      ("jsonl", corpus / "docs.jsonl", {}), ("parquet", path, {"text_field": "content"}))]
  assert np.array_equal(*batches)


@pytest.mark.parametrize("columns, expected", [
    ({"body": ["a b c"]}, r"bad\.parquet: no column 'text' \(columns: \['body'\]\); set data.text_field"),
    ({"text": [1, 2, 3]}, r"bad\.parquet: column 'text' is int64, expected a string column"),
    (None, r"bad\.parquet: not a readable Parquet file \(.*\)"),
])
def test_bad_parquet_is_one_line_naming_file_and_column(tmp_path, capsys, columns, expected):
  path = tmp_path / "bad.parquet"
  if columns is None:
    path.write_bytes(b"PAR1 this is not a parquet file")
  else:
    write_parquet(path, columns)
  with pytest.raises(DataError, match=expected):
    make_train_iterator(config("parquet", path), 0, 1)
  assert cli.main(["prepare-data", str(path), "--out", str(tmp_path / "ds"), "--quiet"]) == 2
  error = capsys.readouterr().err.strip()
  assert "\n" not in error and str(path) in error and "Traceback" not in error


def test_parquet_source_refuses_other_files_and_empty_directories(corpus, tmp_path):
  with pytest.raises(DataError, match=r"docs\.jsonl: data.source='parquet' expects \['.parquet'\]"):
    make_train_iterator(config("parquet", corpus / "docs.jsonl"), 0, 1)
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match=r"empty: a directory without \['.parquet'\] files"):
    make_train_iterator(config("parquet", tmp_path / "empty"), 0, 1)


def test_prepare_data_from_parquet_equals_prepare_data_from_jsonl(corpus, tmp_path):
  for name, source in (("from_jsonl", corpus / "docs.jsonl"), ("from_parquet", corpus / "shards")):
    assert cli.main(["prepare-data", str(source), "--out", str(tmp_path / name), "--quiet"]) == 0
  for suffix in (".bin", ".idx"):
    assert ((tmp_path / f"from_parquet{suffix}").read_bytes()
            == (tmp_path / f"from_jsonl{suffix}").read_bytes())
