"""`goosejax prepare-data`: tokenize .jsonl/.txt/ArrayRecord/Parquet documents into a binidx dataset,
and/or train a SentencePiece model on them.

  goosejax prepare-data INPUT... --out PREFIX [--tokenizer world|PATH.model|PATH.json] [--force]
  goosejax prepare-data INPUT... --train-spm MODEL.model --vocab-size N [--out PREFIX] [--force]

INPUTs are files, directories or glob patterns (Parquet: the --text-field column, read a row
group at a time). Every document becomes one binidx item: its tokens then
the tokenizer's `eot_id` (0 for World, as RWKV-LM's make_data.py writes it). Ids are stored
as uint16 when the vocabulary fits, else int32 (`--dtype` overrides). With `--train-spm` the
model is trained first and, when `--out` is also given, used to tokenize. A progress line
goes to stderr; a summary (documents, tokens, bytes, RWKV-LM's magic_prime) to stdout.
Existing outputs (PREFIX.bin, PREFIX.idx, MODEL.model) are never replaced without --force,
and --force only replaces files; both are checked before any input is read.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Iterator, TextIO

import numpy as np

from goosejax.data.binidx import BinIdxWriter, dtype_for_vocab, prefix_of
from goosejax.data.documents import expand_paths, read_documents
from goosejax.errors import DataError
from goosejax.data.tokenizer import load_tokenizer


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="goosejax prepare-data",
      description="Tokenize .jsonl (a 'text' field per line), .txt (one document per file), "
                  "ArrayRecord and Parquet (a 'text' column) files into RWKV-LM-compatible "
                  "PREFIX.bin/PREFIX.idx, and/or train a SentencePiece model on them.")
  parser.add_argument("inputs", nargs="+", metavar="INPUT",
                      help="files, directories or glob patterns")
  parser.add_argument("--out", metavar="PREFIX", help="write PREFIX.bin and PREFIX.idx")
  parser.add_argument("--tokenizer", default="world",
                      help="'world' (default), a SentencePiece .model or a tokenizer.json")
  parser.add_argument("--text-field", default="text",
                      help="JSON field or Parquet column holding the text (default: text)")
  parser.add_argument("--dtype", choices=("auto", "uint16", "int32"), default="auto",
                      help="token dtype in .bin (auto: uint16 when the vocabulary fits)")
  parser.add_argument("--ctx-len", type=int, default=4096,
                      help="print RWKV-LM's magic_prime for this context length (default 4096)")
  parser.add_argument("--train-spm", metavar="MODEL.model",
                      help="train a SentencePiece model on the inputs and write it here")
  parser.add_argument("--vocab-size", type=int, default=32000, help="SentencePiece vocabulary size")
  parser.add_argument("--spm-model-type", choices=("bpe", "unigram"), default="bpe")
  parser.add_argument("--force", action="store_true",
                      help="replace an existing PREFIX.bin/.idx or MODEL.model")
  parser.add_argument("--quiet", action="store_true", help="no progress line")
  return parser


class Progress:
  """A one-line progress report on stderr: redrawn in place on a terminal, every 10 s otherwise."""

  def __init__(self, total_bytes: int, stream: TextIO, enabled: bool = True):
    self.total, self.stream, self.enabled = max(total_bytes, 1), stream, enabled
    self.tty = getattr(stream, "isatty", lambda: False)()
    self.start = self.last = time.perf_counter()
    self.bytes = self.documents = self.tokens = 0

  def update(self, n_bytes: int, n_tokens: int) -> None:
    self.bytes += n_bytes
    self.tokens += n_tokens
    self.documents += 1
    now = time.perf_counter()
    if self.enabled and now - self.last >= (0.2 if self.tty else 10.0):
      self.last = now
      self._draw(now)

  def _draw(self, now: float, end: str = "") -> None:
    mb, rate = self.bytes / 1e6, self.bytes / 1e6 / max(now - self.start, 1e-9)
    line = (f"[prepare-data] {min(self.bytes / self.total, 1):6.1%}  {mb:,.1f}/{self.total / 1e6:,.1f} MB  "
            f"{self.documents:,} docs  {self.tokens:,} tokens  {rate:,.1f} MB/s")
    self.stream.write(("\r" + line + end) if self.tty else (line + "\n"))
    self.stream.flush()

  def close(self) -> None:
    if self.enabled:
      self._draw(time.perf_counter(), end="\n" if self.tty else "")


def _documents(files: list[Path], text_field: str, stats: dict) -> Iterator[str]:
  for path in files:
    yield from read_documents(path, text_field, stats)


def _check_output(path: Path, option: str, force: bool) -> None:
  """`path` can be written: its folder is (or can become) a folder, and it is new or --force."""
  folder = path.parent
  while not folder.exists() and folder != folder.parent:
    folder = folder.parent
  if not folder.is_dir():
    raise DataError(f"{option} {path}: {folder} is a file, not a folder")
  if not path.exists():
    return
  if not force:
    raise DataError(f"{path} already exists; pass --force to replace it")
  if not path.is_file():
    raise DataError(f"{path} exists and is not a file; --force only replaces a file here")


def _check_outputs(args) -> None:
  if args.out:
    prefix = prefix_of(args.out)
    for suffix in (".bin", ".idx"):
      _check_output(prefix.with_name(prefix.name + suffix), "--out", args.force)
  if args.train_spm:
    _check_output(Path(args.train_spm), "--train-spm", args.force)


def _input_files(patterns: list[str]) -> list[Path]:
  files = [path for pattern in patterns for path in expand_paths(pattern)]
  for path in files:
    if path.stat().st_size == 0:
      raise DataError(f"{path}: input file is empty")
  return files


def _train_spm(args, files: list[Path]) -> Path:
  from goosejax.data.spm import train_sentencepiece
  started = time.perf_counter()
  stats: dict = {}
  path = train_sentencepiece(_documents(files, args.text_field, stats), args.train_spm,
                             args.vocab_size, args.spm_model_type)
  print(f"trained SentencePiece {args.spm_model_type} model {path} (vocab {args.vocab_size}, "
        f"id 0 = <|endoftext|>) in {time.perf_counter() - started:.1f} s")
  return path


def _write_binidx(args, files: list[Path], tokenizer_spec: str) -> None:
  tokenizer = load_tokenizer(tokenizer_spec)
  dtype = dtype_for_vocab(tokenizer.vocab_size) if args.dtype == "auto" else np.dtype(args.dtype)
  if tokenizer.vocab_size > np.iinfo(dtype).max + 1:
    raise DataError(f"--dtype {dtype.name} cannot hold ids of a {tokenizer.vocab_size}-token vocabulary")
  prefix = prefix_of(args.out)
  stats: dict = {}
  progress = Progress(sum(p.stat().st_size for p in files), sys.stderr, enabled=not args.quiet)
  eot = tokenizer.eot_id
  with BinIdxWriter(prefix, dtype) as writer:
    for document in _documents(files, args.text_field, stats):
      ids = tokenizer.encode(document)
      ids.append(eot)
      writer.add_document(ids)
      progress.update(len(document.encode("utf-8")), len(ids))
  progress.close()
  seconds = time.perf_counter() - progress.start
  _summary(prefix, writer, progress.bytes, stats.get("empty", 0), dtype, seconds, args.ctx_len)


def _summary(prefix: Path, writer: BinIdxWriter, text_bytes: int, empty: int, dtype: np.dtype,
             seconds: float, ctx_len: int) -> None:
  from goosejax.data.order import magic_prime

  skipped = f" (skipped {empty:,} empty)" if empty else ""
  out_bytes = writer.n_tokens * dtype.itemsize
  print(f"wrote {prefix}.bin and {prefix}.idx")
  print(f"  documents  {writer.n_documents:,}{skipped}")
  print(f"  tokens     {writer.n_tokens:,} (including {writer.n_documents:,} end-of-text)")
  print(f"  bytes      {text_bytes:,} of UTF-8 text -> {out_bytes:,} in .bin ({dtype.name})")
  print(f"  time       {seconds:.1f} s ({text_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s)")
  prime = magic_prime(writer.n_tokens, ctx_len)
  if prime is None:
    print(f"  magic_prime: none, fewer than 3 windows of ctx_len {ctx_len}")
  else:
    print(f"  magic_prime {prime} for ctx_len {ctx_len} "
          f"({writer.n_tokens // ctx_len} slots; RWKV-LM's --magic_prime)")


def main(argv: list[str]) -> int:
  """Bad input raises DataError (or OSError); goosejax.cli prints it on one line, exit 2."""
  args = _parser().parse_args(argv)
  if args.out is None and args.train_spm is None:
    _parser().error("give --out PREFIX (write binidx) and/or --train-spm MODEL.model")
  _check_outputs(args)
  files = _input_files(args.inputs)
  tokenizer_spec = args.tokenizer
  if args.train_spm:
    tokenizer_spec = str(_train_spm(args, files))
  if args.out:
    _write_binidx(args, files, tokenizer_spec)
  return 0
