"""Raw-text documents: `.jsonl`, `.txt`, ArrayRecord and Parquet files, and the built-in corpus.

- `.jsonl`: one JSON object per line; its `text` field (a string) is one document.
- `.parquet`: each row's `text` column (a string column) is one document; the file is read
  one row group at a time and only that column, so memory holds one row group's texts.
- `.txt`: the whole file is one document.
- `.array_record` / `.arrayrecord`: each record is one document as UTF-8 bytes.
Text must be valid UTF-8; a bad byte, bad JSON or a missing field raises `DataError` naming
the file, line and offset (for Parquet: a missing or non-string column, or a file pyarrow
cannot read, names the file and the column). Empty documents (and Parquet nulls) are skipped (and counted in `stats["empty"]`); a
file without any non-empty document is an error.

`builtin_documents()` is the corpus `data.source: builtin` trains on when no data is given:
the `.py` source files of the running Python's standard library (every CPython install
has them), in sorted path order, up to `max_bytes`. goosejax's own sources fill in if the
standard library's sources are missing.
"""
from __future__ import annotations

import glob
import json
import sysconfig
from pathlib import Path
from typing import Iterator, MutableMapping

from goosejax.errors import DataError

JSONL_SUFFIXES = (".jsonl",)
TEXT_SUFFIXES = (".txt",)
ARRAY_RECORD_SUFFIXES = (".array_record", ".arrayrecord")
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = JSONL_SUFFIXES + TEXT_SUFFIXES + ARRAY_RECORD_SUFFIXES + PARQUET_SUFFIXES
BUILTIN_MAX_BYTES = 4 << 20


def expand_paths(pattern: str, suffixes: tuple[str, ...] = SUFFIXES) -> list[Path]:
  """A file, a directory (its files with one of `suffixes`, at any depth: published Parquet
  corpora ship as folders of shards) or a glob pattern matching files, in sorted order;
  raises if nothing matches."""
  path = Path(pattern).expanduser()
  if path.is_file():
    return [path]
  if path.is_dir():
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not found:
      raise DataError(f"{pattern}: a directory without {list(suffixes)} files")
    return found
  matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
  if not matches:
    raise DataError(f"{pattern}: no such file (nor a glob pattern matching files)")
  return matches


def _decode(data: bytes, where: str) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{where}: not valid UTF-8 at byte {e.start} ({data[e.start:e.start + 4]!r}); "
                    "convert the file to UTF-8 first") from None


def read_documents(path: str | Path, text_field: str = "text",
                   stats: MutableMapping[str, int] | None = None) -> Iterator[str]:
  """Yield the non-empty documents of one file (type from the suffix, see the module doc)."""
  path = Path(path)
  stats = {} if stats is None else stats
  suffix = path.suffix.lower()
  if suffix not in SUFFIXES:
    raise DataError(f"{path}: unsupported input type {suffix or '(no suffix)'!r}; expected one of "
                    f"{list(SUFFIXES)}")
  if not path.is_file():
    raise DataError(f"{path}: file not found")
  count = 0
  if suffix in TEXT_SUFFIXES:
    documents: Iterator[str] = iter([_decode(path.read_bytes(), str(path))])
  elif suffix in JSONL_SUFFIXES:
    documents = _jsonl_documents(path, text_field)
  elif suffix in PARQUET_SUFFIXES:
    documents = _parquet_documents(path, text_field)
  else:
    documents = _array_record_documents(path)
  for document in documents:
    if document:
      count += 1
      yield document
    else:
      stats["empty"] = stats.get("empty", 0) + 1
  if count == 0:
    raise DataError(f"{path}: contains no non-empty document (empty file or empty texts)")


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, 1):
      where = f"{path}:{line_no}"
      line = _decode(raw, where)
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(record, dict) or text_field not in record:
        raise DataError(f"{where}: expected a JSON object with a {text_field!r} field, got "
                        f"{line[:80].strip()!r}")
      text = record[text_field]
      if not isinstance(text, str):
        raise DataError(f"{where}: field {text_field!r} is {type(text).__name__}, expected a string")
      yield text


def _array_record_documents(path: Path) -> Iterator[str]:
  try:
    from array_record.python.array_record_module import ArrayRecordReader
  except ImportError:
    raise DataError(f"{path}: reading ArrayRecord files needs the `array_record` package") from None
  try:
    reader = ArrayRecordReader(str(path))
  except Exception as e:  # the C++ reader raises a bare RuntimeError/ValueError for bad files
    raise DataError(f"{path}: not a readable ArrayRecord file: {e}") from None
  try:
    for index in range(reader.num_records()):
      yield _decode(reader.read([index])[0], f"{path} record {index}")
  finally:
    reader.close()


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
  """The `text_field` column, one row group at a time (a null is an empty document)."""
  try:
    import pyarrow as pa
    import pyarrow.parquet as pq
  except ImportError:
    raise DataError(f"{path}: reading Parquet files needs pyarrow; pip install "
                    "'goosejax[parquet]'") from None
  try:
    parquet = pq.ParquetFile(path)
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"{path}: not a readable Parquet file ({_one_line(e)})") from None
  with parquet:
    schema = parquet.schema_arrow
    if schema.get_field_index(text_field) < 0:
      raise DataError(f"{path}: no column {text_field!r} (columns: {schema.names}); set "
                      "data.text_field (--text-field) to the column holding the text")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_string_view(kind)):
      raise DataError(f"{path}: column {text_field!r} is {kind}, expected a string column")
    for group in range(parquet.num_row_groups):
      try:
        texts = parquet.read_row_group(group, columns=[text_field]).column(0).to_pylist()
      except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: column {text_field!r}, row group {group} cannot be read "
                        f"({_one_line(e)})") from None
      for text in texts:
        yield text or ""


def _one_line(error: Exception) -> str:
  return " ".join(str(error).split())


def builtin_documents(max_bytes: int = BUILTIN_MAX_BYTES) -> list[tuple[str, str]]:
  """[(name, text)] of the built-in corpus (see the module docstring)."""
  stdlib = Path(sysconfig.get_paths()["stdlib"])
  own = Path(__file__).resolve().parent.parent
  candidates = [(stdlib, p) for p in sorted(stdlib.glob("*.py"))]
  candidates += [(own.parent, p) for p in sorted(own.rglob("*.py"))]
  documents, total = [], 0
  for root, path in candidates:
    try:
      text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
      continue
    if not text.strip():
      continue
    documents.append((str(path.relative_to(root)), text))
    total += len(text)
    if total >= max_bytes:
      break
  if not documents:
    raise DataError(f"built-in corpus: found no readable .py sources in {stdlib} or {own}")
  return documents
