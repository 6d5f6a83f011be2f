"""Perplexity and bits per byte of documents (txt, jsonl or binidx).

Each document is scored from a fresh state with the document-start token 0 in front
(docs/architecture.md#evaluation-protocol): input [0] + doc, every doc token predicted once.
Perplexity is exp(total NLL / tokens); bits per byte is total NLL / ln 2 / UTF-8 bytes of the
documents' text, which makes models with different tokenizers comparable.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from goosejax.eval.scoring import EvalDataError, score_sequences
from goosejax.model.rwkv7 import RWKV7

DOCUMENT_START = 0


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
  documents: int
  tokens: int
  bytes: int
  nll: float             # total negative log-likelihood, nats

  @property
  def loss(self) -> float:
    """Mean NLL per token (nats)."""
    return self.nll / self.tokens

  @property
  def perplexity(self) -> float:
    return math.exp(self.loss)

  @property
  def bits_per_byte(self) -> float:
    return self.nll / math.log(2) / self.bytes if self.bytes else float("nan")

  def as_dict(self) -> dict:
    return {"documents": self.documents, "tokens": self.tokens, "bytes": self.bytes,
            "loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


def perplexity(model: RWKV7, documents: Sequence[Sequence[int]], byte_counts: Sequence[int] | None = None,
               *, batch_size: int = 4, chunk_len: int = 256,
               progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
  """Perplexity of token documents; `byte_counts` (UTF-8 bytes per document) enables bpb."""
  docs = [list(map(int, d)) for d in documents]
  if not docs or not all(docs):
    raise EvalDataError("perplexity: expected at least one document and no empty documents")
  if byte_counts is not None and len(byte_counts) != len(docs):
    raise EvalDataError(f"perplexity: {len(byte_counts)} byte counts for {len(docs)} documents")
  scores = score_sequences(model, [[DOCUMENT_START] + d for d in docs], batch_size=batch_size,
                           chunk_len=chunk_len, progress=progress)
  nll = -sum(float(np.sum(s.logprobs)) for s in scores)
  return PerplexityResult(len(docs), sum(len(d) for d in docs),
                          int(sum(byte_counts)) if byte_counts is not None else 0, nll)


def load_documents(path: str | Path, tokenizer, *, text_field: str = "text",
                   max_documents: int | None = None, vocab_size: int | None = None
                   ) -> tuple[list[list[int]], list[int]]:
  """(token documents, UTF-8 byte count per document) from a .txt, .jsonl or binidx file.

  .txt is one document, .jsonl one per line (its `text_field`), binidx one per item (a
  `.bin`/`.idx` path or the common prefix); binidx items drop their trailing end-of-text id
  and their bytes are counted from the decoded text. Token ids beyond the tokenizer's or
  (given vocab_size) the model's vocabulary are an error naming the file and document, e.g.
  binidx made with another tokenizer.
  """
  from goosejax.data.binidx import BinIdxDataset, prefix_of
  from goosejax.data.documents import read_documents
  from goosejax.errors import DataError

  path = Path(path)
  prefix = prefix_of(path)
  is_binidx = path.suffix in (".bin", ".idx") or (
      not path.exists() and prefix.with_name(prefix.name + ".idx").is_file())
  limit, whose = _id_limit(tokenizer, vocab_size)
  docs, n_bytes = [], []
  try:
    if is_binidx:
      dataset = BinIdxDataset(prefix)
      eot = getattr(tokenizer, "eot_id", 0)
      for i in range(len(dataset)):
        if max_documents is not None and len(docs) >= max_documents:
          break
        ids = [int(t) for t in dataset[i]]
        if ids and ids[-1] == eot:
          ids = ids[:-1]
        if ids:
          _check_ids(f"{path}: item {i}", ids, limit, whose)   # before decoding them
          docs.append(ids)
          n_bytes.append(len(tokenizer.decode(ids).encode("utf-8")))
    else:
      for number, text in enumerate(read_documents(path, text_field=text_field), 1):
        if max_documents is not None and len(docs) >= max_documents:
          break
        ids = tokenizer.encode(text)
        if ids:
          _check_ids(f"{path}: document {number}", ids, limit, whose)
          docs.append(ids)
          n_bytes.append(len(text.encode("utf-8")))
  except DataError as e:
    raise EvalDataError(str(e)) from None
  if not docs:
    raise EvalDataError(f"{path}: no non-empty documents to evaluate")
  return docs, n_bytes


def _id_limit(tokenizer, vocab_size: int | None) -> tuple[int, str]:
  """(the first id the tokenizer or the model cannot take, whose vocabulary ends there)."""
  if vocab_size is not None and vocab_size < tokenizer.vocab_size:
    return vocab_size, "the model's"
  return tokenizer.vocab_size, "the tokenizer's"


def _check_ids(where: str, ids: Sequence[int], limit: int, whose: str) -> None:
  bad = sorted({t for t in ids if not 0 <= t < limit})
  if bad:
    raise EvalDataError(f"{where} has token ids outside [0, {limit}) ({whose} vocabulary): "
                        f"{bad[:8]}; was it tokenized for another model?")
