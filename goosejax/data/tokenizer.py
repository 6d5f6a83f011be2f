"""`load_tokenizer(spec)`: one interface over the World, SentencePiece and Hugging Face tokenizers.

spec: `"world"` (the packaged `rwkv_vocab_v20230424`), a path to an `rwkv_vocab`-format
`.txt`, a SentencePiece `.model`, or a Hugging Face `tokenizer.json` (any `.json`).
Every tokenizer has `encode(str) -> list[int]`, `encode_batch(texts) -> list[list[int]]`,
`decode(ids) -> str` (invalid UTF-8 becomes U+FFFD), `vocab_size` (number of ids it can
produce) and `eot_id` (the end-of-document id appended after every training document:
0 for World and for SentencePiece models trained by goosejax). Tokenizers pickle by path.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterable, Protocol, Sequence, runtime_checkable

from goosejax.errors import DataError


@runtime_checkable
class Tokenizer(Protocol):
  vocab_size: int
  eot_id: int

  def encode(self, text: str) -> list[int]: ...
  def encode_batch(self, texts: Iterable[str]) -> list[list[int]]: ...
  def decode(self, ids: Sequence[int]) -> str: ...


def load_tokenizer(spec: str | Path = "world") -> Tokenizer:
  """The tokenizer named by `spec` (see the module docstring); loads are cached per file."""
  if str(spec) == "world":
    return _load("world", "", 0)
  path = Path(spec).expanduser()
  if path.suffix not in (".model", ".json", ".txt"):
    raise DataError(f"tokenizer {str(spec)!r}: expected 'world', a SentencePiece .model, a "
                    "Hugging Face tokenizer.json or an rwkv_vocab .txt file")
  if not path.is_file():
    raise DataError(f"tokenizer file {str(path)!r} does not exist")
  path = path.resolve()
  return _load(path.suffix, str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _load(kind: str, path: str, mtime_ns: int) -> Tokenizer:
  del mtime_ns  # part of the cache key only: a rewritten file is loaded again
  if kind in ("world", ".txt"):
    from goosejax.data.world import VOCAB_PATH, WorldTokenizer
    return WorldTokenizer(path or VOCAB_PATH)
  if kind == ".model":
    from goosejax.data.spm import SentencePieceTokenizer
    return SentencePieceTokenizer(path)
  from goosejax.data.hf_tokenizer import HFTokenizer
  return HFTokenizer(path)
