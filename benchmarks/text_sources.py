"""Reading raw-text sources: the same documents from .jsonl and from Parquet, side by side.

  python benchmarks/text_sources.py [--megabytes 32] [--row-group 1000]

Writes the built-in corpus (Python's standard-library sources) cut into documents of about
4 KB, repeated to --megabytes of UTF-8 text, as one .jsonl file and as one Parquet file (snappy, --row-group documents per row
group), then times, for each: `read_documents` alone (the file to document strings), and
`make_train_iterator` up to its first batch (read + World tokenization, what a run does once
at start-up). Batches after that come from the same token stream whatever the source.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from goosejax.config import DataConfig
from goosejax.data import load_tokenizer, make_train_iterator, read_documents
from goosejax.data.documents import builtin_documents


def corpus(megabytes: float, piece: int = 4000) -> list[str]:
  texts = [text[i:i + piece] for _, text in builtin_documents() for i in range(0, len(text), piece)]
  documents, size, copy = [], 0, 0
  while size < megabytes * 1e6:
    for text in texts:
      documents.append(f"# copy {copy}\n{text}")
      size += len(documents[-1].encode("utf-8"))
    copy += 1
  return documents


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--megabytes", type=float, default=32)
  parser.add_argument("--row-group", type=int, default=1000)
  args = parser.parse_args()
  documents = corpus(args.megabytes)
  load_tokenizer("world")   # loaded once per process: not part of either source's time
  text_mb = sum(len(d.encode("utf-8")) for d in documents) / 1e6
  print(f"{len(documents):,} documents, {text_mb:.1f} MB of text; {platform.processor() or platform.machine()}")
  with tempfile.TemporaryDirectory() as tmp:
    files = {"jsonl": Path(tmp) / "corpus.jsonl", "parquet": Path(tmp) / "corpus.parquet"}
    files["jsonl"].write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    pq.write_table(pa.table({"text": documents}), files["parquet"], row_group_size=args.row_group)
    print("| source | file MB | read_documents s | MB/s | first batch (read + tokenize) s |")
    print("|---|---|---|---|---|")
    for source, path in files.items():
      read_s = timed(lambda: sum(1 for _ in read_documents(path)))
      config = DataConfig(source=source, paths=(str(path),), ctx_len=512, batch_size=8)
      first_s = timed(lambda: next(make_train_iterator(config, 0, 1)))
      print(f"| {source} | {path.stat().st_size / 1e6:.1f} | {read_s:.2f} | "
            f"{text_mb / read_s:.0f} | {first_s:.1f} |")


if __name__ == "__main__":
  main()
