"""binidx: bit layout against an independent reader/writer written from the table in
docs/architecture.md#training-data-binidx-and-sample-order, bad files, and the `prepare-data`
command."""
import json
import pickle
import re
import struct

import numpy as np
import pytest

from goosejax import cli
from goosejax.data import BinIdxDataset, BinIdxWriter, DataError, load_tokenizer


def spec_read(prefix):
  """Parse PREFIX.idx/.bin exactly as the format's table says (independent of goosejax)."""
  idx = open(f"{prefix}.idx", "rb").read()
  assert idx[:9] == b"MMIDIDX\x00\x00"
  version, code, n, d = struct.unpack("<QBQQ", idx[9:34])
  sizes = list(struct.unpack(f"<{n}i", idx[34:34 + 4 * n]))
  pointers = list(struct.unpack(f"<{n}q", idx[34 + 4 * n:34 + 12 * n]))
  doc_idx = list(struct.unpack(f"<{d}q", idx[34 + 12 * n:34 + 12 * n + 8 * d]))
  assert len(idx) == 34 + 12 * n + 8 * d
  fmt = {8: "H", 4: "i"}[code]
  data = open(f"{prefix}.bin", "rb").read()
  width = struct.calcsize(fmt)
  items = [list(struct.unpack(f"<{s}{fmt}", data[p:p + width * s])) for s, p in zip(sizes, pointers)]
  return version, code, doc_idx, items


def spec_write(prefix, items, code=8):
  """Write a dataset the way RWKV-LM's builder lays it out (independent of goosejax)."""
  fmt = {8: "H", 4: "i"}[code]
  width = struct.calcsize(fmt)
  with open(f"{prefix}.bin", "wb") as f:
    for item in items:
      f.write(struct.pack(f"<{len(item)}{fmt}", *item))
  sizes = [len(i) for i in items]
  pointers = [sum(sizes[:k]) * width for k in range(len(items))]
  with open(f"{prefix}.idx", "wb") as f:
    f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(items), len(items) + 1))
    f.write(struct.pack(f"<{len(items)}i", *sizes))
    f.write(struct.pack(f"<{len(items)}q", *pointers))
    f.write(struct.pack(f"<{len(items) + 1}q", *range(len(items) + 1)))


DOCS = [[5, 6, 7, 0], [65529, 0], [1, 0], [300, 301, 302, 303, 304, 0]]


@pytest.mark.parametrize("dtype, code", [(np.uint16, 8), (np.int32, 4)])
def test_writer_output_matches_the_spec_layout(tmp_path, dtype, code):
  with BinIdxWriter(tmp_path / "ds", dtype) as writer:
    for doc in DOCS:
      writer.add_document(doc)
  version, found_code, doc_idx, items = spec_read(tmp_path / "ds")
  assert (version, found_code, doc_idx, items) == (1, code, list(range(len(DOCS) + 1)), DOCS)


def test_reader_reads_a_spec_written_file_as_a_grain_source(tmp_path):
  spec_write(tmp_path / "ref", DOCS)
  ds = BinIdxDataset(tmp_path / "ref.bin")
  assert ds.dtype == np.uint16 and len(ds) == 4 and ds.n_tokens == 14
  assert [ds[i].tolist() for i in range(len(ds))] == DOCS and ds[-1].tolist() == DOCS[-1]
  assert ds.tokens.tolist() == sum(DOCS, []) and ds.document_starts.tolist() == [0, 4, 6, 8]
  assert ds.doc_idx.tolist() == [0, 1, 2, 3, 4]
  clone = pickle.loads(pickle.dumps(ds))
  assert clone[3].tolist() == DOCS[3] and isinstance(clone.tokens, np.memmap)
  with pytest.raises(IndexError):
    ds[4]


def test_writer_rejects_ids_that_do_not_fit(tmp_path):
  with pytest.raises(DataError, match="does not fit uint16"):
    with BinIdxWriter(tmp_path / "ds", np.uint16) as writer:
      writer.add_document([1, 70000])
  assert not list(tmp_path.iterdir())  # aborted: nothing left behind


@pytest.mark.parametrize("damage, message", [
    (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:20]), "truncated: 20 bytes"),
    (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:-8]), "truncated"),
    (lambda idx, bin_: idx.write_bytes(idx.read_bytes() + b"\0"), "trailing bytes"),
    (lambda idx, bin_: idx.write_bytes(b"PK\x03\x04" + idx.read_bytes()[4:]), "not a binidx index"),
    (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:9] + struct.pack("<Q", 2) + idx.read_bytes()[17:]), "version 2"),
    (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:17] + b"\x09" + idx.read_bytes()[18:]), "unknown dtype code 9"),
    (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:17] + b"\x07" + idx.read_bytes()[18:]), "floating point"),
    (lambda idx, bin_: bin_.write_bytes(bin_.read_bytes()[:-2]), r"26 bytes, but its index"),
    (lambda idx, bin_: bin_.unlink(), "file not found"),
])
def test_damaged_files_give_clear_errors(tmp_path, damage, message):
  spec_write(tmp_path / "ds", DOCS)
  damage(tmp_path / "ds.idx", tmp_path / "ds.bin")
  with pytest.raises(DataError, match=message):
    BinIdxDataset(tmp_path / "ds")


def test_inconsistent_pointers_are_rejected(tmp_path):
  spec_write(tmp_path / "ds", DOCS)
  idx = bytearray((tmp_path / "ds.idx").read_bytes())
  idx[34 + 4 * 4 + 8:34 + 4 * 4 + 16] = struct.pack("<q", 4)  # pointer of item 1
  (tmp_path / "ds.idx").write_bytes(bytes(idx))
  with pytest.raises(DataError, match="running sum"):
    BinIdxDataset(tmp_path / "ds")


# ----------------------------------------------------------------------------- prepare-data


def run_cli(*args):
  return cli.main(["prepare-data", *map(str, args)])


def test_prepare_data_writes_documents_then_eot(tmp_path, capsys):
  texts = ["Hello world\n\n", "中文测试", "User: hi\n\nAssistant:"]
  (tmp_path / "a.jsonl").write_text(
      "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts[:2])) + "\n\n"
      + json.dumps({"text": ""}) + "\n")
  (tmp_path / "b.txt").write_text(texts[2])
  assert run_cli(tmp_path / "a.jsonl", tmp_path / "*.txt", "--out", tmp_path / "out" / "ds",
                 "--ctx-len", "4", "--quiet") == 0
  out = capsys.readouterr().out
  world = load_tokenizer("world")
  expected = [world.encode(t) + [0] for t in texts]
  version, code, doc_idx, items = spec_read(tmp_path / "out" / "ds")
  assert (code, items, doc_idx) == (8, expected, [0, 1, 2, 3])
  n_tokens = sum(map(len, expected))
  assert "documents  3 (skipped 1 empty)" in out and f"tokens     {n_tokens}" in out
  assert "magic_prime 2 for ctx_len 4" in out  # 16 tokens // 4 - 1 = 3 -> largest P%3==2 prime: 2


def test_prepare_data_reads_array_record(tmp_path, capsys):
  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(str(tmp_path / "docs.array_record"), "group_size:1")
  for text in ("first document", "second ☃"):
    writer.write(text.encode())
  writer.close()
  assert run_cli(tmp_path / "docs.array_record", "--out", tmp_path / "ds", "--dtype", "int32", "--quiet") == 0
  world = load_tokenizer("world")
  assert spec_read(tmp_path / "ds")[3] == [world.encode("first document") + [0], world.encode("second ☃") + [0]]
  assert spec_read(tmp_path / "ds")[1] == 4


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"", "empty.txt: input file is empty"),
    ("latin1.txt", "caf\u00e9".encode("latin-1"), r"latin1.txt: not valid UTF-8 at byte 3"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": \n', r"bad.jsonl:2: not valid JSON"),
    ("field.jsonl", b'{"body": "x"}\n', r"field.jsonl:1: expected a JSON object with a 'text' field"),
    ("type.jsonl", b'{"text": 3}\n', r"type.jsonl:1: field 'text' is int"),
    ("blank.jsonl", b'{"text": ""}\n', r"blank.jsonl: contains no non-empty document"),
    ("data.csv", b"a,b\n", r"data.csv: unsupported input type '.csv'"),
])
def test_prepare_data_bad_inputs(tmp_path, capsys, name, content, message):
  (tmp_path / name).write_bytes(content)
  assert run_cli(tmp_path / name, "--out", tmp_path / "ds", "--quiet") == 2
  err = capsys.readouterr().err
  assert "goosejax prepare-data: error:" in err
  assert re.search(message, err), err
  assert not (tmp_path / "ds.bin").exists() and not (tmp_path / "ds.idx").exists()


def test_prepare_data_needs_an_output(tmp_path, capsys):
  (tmp_path / "a.txt").write_text("x")
  with pytest.raises(SystemExit) as exit_info:
    run_cli(tmp_path / "a.txt")
  assert exit_info.value.code == 2 and "--out PREFIX" in capsys.readouterr().err


def _one_line_error(capsys) -> str:
  err = capsys.readouterr().err
  assert err.startswith("goosejax prepare-data: error: ") and err.count("\n") == 1, err
  return err


@pytest.mark.parametrize("out", ["afile/ds", "afile/deeper/ds"])
def test_prepare_data_out_under_a_file(tmp_path, capsys, out):
  (tmp_path / "a.txt").write_text("some text")
  (tmp_path / "afile").write_text("a file, not a folder")
  assert run_cli(tmp_path / "a.txt", "--out", tmp_path / out, "--quiet") == 2
  assert f"{tmp_path / 'afile'} is a file, not a folder" in _one_line_error(capsys)
  assert (tmp_path / "afile").read_text() == "a file, not a folder"


def test_prepare_data_refuses_to_replace_a_dataset_without_force(tmp_path, capsys):
  (tmp_path / "a.txt").write_text("first")
  assert run_cli(tmp_path / "a.txt", "--out", tmp_path / "ds", "--quiet") == 0
  first = (tmp_path / "ds.bin").read_bytes()
  (tmp_path / "a.txt").write_text("second, longer document")
  assert run_cli(tmp_path / "a.txt", "--out", tmp_path / "ds.bin", "--quiet") == 2
  assert f"{tmp_path / 'ds.bin'} already exists; pass --force to replace it" in _one_line_error(capsys)
  assert (tmp_path / "ds.bin").read_bytes() == first
  assert run_cli(tmp_path / "a.txt", "--out", tmp_path / "ds", "--quiet", "--force") == 0
  assert spec_read(tmp_path / "ds")[3] == [load_tokenizer("world").encode("second, longer document") + [0]]


def test_prepare_data_force_only_replaces_files(tmp_path, capsys):
  (tmp_path / "a.txt").write_text("text")
  (tmp_path / "ds.idx").mkdir()
  assert run_cli(tmp_path / "a.txt", "--out", tmp_path / "ds", "--quiet", "--force") == 2
  assert "ds.idx exists and is not a file; --force only replaces a file here" in _one_line_error(capsys)
  assert not (tmp_path / "ds.bin").exists()


def test_prepare_data_refuses_to_replace_a_tokenizer_model_without_force(tmp_path, capsys):
  (tmp_path / "a.txt").write_text("text")
  (tmp_path / "spm.model").write_text("keep me")
  assert run_cli(tmp_path / "a.txt", "--train-spm", tmp_path / "spm.model", "--quiet") == 2
  assert "spm.model already exists; pass --force to replace it" in _one_line_error(capsys)
  assert (tmp_path / "spm.model").read_text() == "keep me"
