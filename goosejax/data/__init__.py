"""Data layer: tokenizers, binidx files, Grain training/validation pipelines.

Public API (heavy modules, which import Grain or JAX, load on first use):

Tokenizers (`goosejax.data.tokenizer`)
  load_tokenizer(spec) -> Tokenizer     "world" | PATH.model | PATH tokenizer.json | PATH rwkv_vocab.txt
  Tokenizer: encode(str) -> list[int], encode_batch(texts), decode(ids) -> str, vocab_size, eot_id
  train_sentencepiece(documents, model_path, vocab_size, model_type="bpe")   (`goosejax.data.spm`)

binidx (`goosejax.data.binidx`, the RWKV-LM / Megatron MMIDIDX format)
  BinIdxDataset(prefix)                 memory-mapped reader; a Grain random-access source of documents
  BinIdxWriter(prefix, dtype)           writer: add_document(ids), close() (context manager)
  dtype_for_vocab(vocab_size)           uint16 when ids fit, else int32

Documents (`goosejax.data.documents`)
  read_documents(path, text_field="text")   .jsonl / .txt / ArrayRecord / Parquet files -> documents
  builtin_documents()                   the default corpus: Python's own stdlib source text

Pipelines (`goosejax.data.pipeline`)
  make_train_iterator(config, process_index=None, process_count=None) -> BatchIterator
  make_validation_iterator(config, ...) -> BatchIterator | None
  BatchIterator: __next__() -> {"inputs": int32 [b, T], "targets": int32 [b, T],
                 "reset": bool [b, T] (only with data.pack_documents)}; get_state() -> dict
                 (JSON-serializable); set_state(dict) resumes exactly
  magic_prime(n_tokens, ctx_len)        RWKV-LM's prime for its sample order

Errors: every bad input raises `DataError` (a ValueError) naming the file and the problem.
"""
from __future__ import annotations

import importlib

from goosejax.errors import DataError
from goosejax.data.tokenizer import Tokenizer, load_tokenizer

_LAZY = {
    "train_sentencepiece": "goosejax.data.spm",
    "BinIdxDataset": "goosejax.data.binidx",
    "BinIdxWriter": "goosejax.data.binidx",
    "dtype_for_vocab": "goosejax.data.binidx",
    "read_documents": "goosejax.data.documents",
    "builtin_documents": "goosejax.data.documents",
    "make_train_iterator": "goosejax.data.pipeline",
    "make_validation_iterator": "goosejax.data.pipeline",
    "BatchIterator": "goosejax.data.pipeline",
    "magic_prime": "goosejax.data.order",
}

__all__ = ["DataError", "Tokenizer", "load_tokenizer", *_LAZY]


def __getattr__(name: str):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'goosejax.data' has no attribute {name!r}")
