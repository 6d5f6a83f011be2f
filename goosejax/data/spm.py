"""SentencePiece tokenizers: load a `.model`, or train one from `.jsonl`/`.txt` documents.

Models trained here reserve id 0 for `<|endoftext|>` (the end-of-document id, as in World
data), id 1 for `<unk>`, have no BOS/pad, use byte fallback (any text encodes without
`<unk>`) and identity normalization without a dummy prefix, so `decode(encode(text)) == text`.
A foreign `.model` uses its own EOS id as `eot_id`; one without an EOS piece is rejected.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from goosejax.errors import DataError

EOT_PIECE = "<|endoftext|>"
_MAX_SENTENCE_CHARS = 2000  # documents are fed to the trainer in line-aligned chunks this long


class SentencePieceTokenizer:
  """`encode`, `encode_batch`, `decode`, `vocab_size`, `eot_id` over a SentencePiece model."""

  def __init__(self, model_path: str | Path):
    import sentencepiece

    self.model_path = Path(model_path)
    try:
      self._processor = sentencepiece.SentencePieceProcessor(model_file=str(self.model_path))
    except (OSError, RuntimeError) as e:
      raise DataError(f"{self.model_path}: not a readable SentencePiece model: {e}") from None
    self.vocab_size: int = self._processor.get_piece_size()
    self.eot_id: int = self._processor.eos_id()
    if self.eot_id < 0:
      raise DataError(f"{self.model_path}: the SentencePiece model has no end-of-sentence piece; "
                      "goosejax needs one as the end-of-document id (train with eos_id >= 0)")

  def __reduce__(self):
    return (SentencePieceTokenizer, (self.model_path,))

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"

  def encode(self, text: str) -> list[int]:
    return self._processor.encode(text, out_type=int)

  def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
    return self._processor.encode(list(texts), out_type=int)

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise DataError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size}) "
                      f"of {self.model_path}")
    return self._processor.decode(ids)


def _training_chunks(documents: Iterable[str]) -> Iterator[str]:
  """Line-aligned pieces of each document, at most ~_MAX_SENTENCE_CHARS long (newlines kept)."""
  for document in documents:
    chunk: list[str] = []
    size = 0
    for line in document.splitlines(keepends=True):
      if size and size + len(line) > _MAX_SENTENCE_CHARS:
        yield "".join(chunk)
        chunk, size = [], 0
      chunk.append(line[:4 * _MAX_SENTENCE_CHARS])
      size += len(chunk[-1])
    if chunk:
      yield "".join(chunk)


def train_sentencepiece(documents: Iterable[str], model_path: str | Path, vocab_size: int,
                        model_type: str = "bpe", max_sentences: int = 2_000_000,
                        num_threads: int = 2) -> Path:
  """Train a model on `documents` (strings) and write it to `model_path` (a `.model` file)."""
  import sentencepiece

  model_path = Path(model_path)
  if model_path.suffix != ".model":
    raise DataError(f"{model_path}: a SentencePiece model path must end in .model")
  if model_type not in ("bpe", "unigram"):
    raise DataError(f"model_type={model_type!r}: expected 'bpe' or 'unigram'")
  if vocab_size < 262:
    raise DataError(f"vocab_size={vocab_size}: byte fallback needs 256 byte pieces plus "
                    "<|endoftext|>, <unk> and some merges; use at least 262")
  model = io.BytesIO()
  counter = {"chunks": 0}

  def counted() -> Iterator[str]:
    for chunk in _training_chunks(documents):
      counter["chunks"] += 1
      yield chunk

  try:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=counted(), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, eos_id=0, eos_piece=EOT_PIECE, unk_id=1, bos_id=-1, pad_id=-1,
        byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        character_coverage=1.0, max_sentence_length=16 * _MAX_SENTENCE_CHARS,
        input_sentence_size=max_sentences, shuffle_input_sentence=True,
        num_threads=num_threads, minloglevel=2)
  except RuntimeError as e:
    if counter["chunks"] == 0:
      raise DataError("cannot train a SentencePiece model: the inputs contain no text") from None
    raise DataError(f"SentencePiece training failed ({counter['chunks']} text chunks, "
                    f"vocab_size={vocab_size}): {e}") from None
  model_path.parent.mkdir(parents=True, exist_ok=True)
  model_path.write_bytes(model.getvalue())
  return model_path
