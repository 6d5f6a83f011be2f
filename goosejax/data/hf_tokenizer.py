"""Hugging Face `tokenizer.json` files (e.g. the GPT-NeoX-20B tokenizer of the Pile RWKV-7
models) through the `tokenizers` library.

Encoding adds no special tokens (`add_special_tokens=False`); as in `tokenizers` itself,
special-token text such as `<|endoftext|>` inside the input maps to its id. `eot_id` is
the first of `<|endoftext|>`, `<|end_of_text|>`, `</s>`, `<eos>` that the vocabulary has.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from goosejax.errors import DataError

EOT_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


class HFTokenizer:
  """`encode`, `encode_batch`, `decode`, `vocab_size`, `eot_id` over a `tokenizer.json`."""

  def __init__(self, path: str | Path):
    try:
      import tokenizers
    except ImportError:
      raise DataError(f"{path}: reading a tokenizer.json needs the `tokenizers` package "
                      "(pip install tokenizers)") from None
    self.path = Path(path)
    try:
      self._tokenizer = tokenizers.Tokenizer.from_file(str(self.path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
      raise DataError(f"{self.path}: not a valid Hugging Face tokenizer.json: {e}") from None
    self.vocab_size: int = self._tokenizer.get_vocab_size(with_added_tokens=True)
    for piece in EOT_CANDIDATES:
      token_id = self._tokenizer.token_to_id(piece)
      if token_id is not None:
        self.eot_id: int = token_id
        break
    else:
      raise DataError(f"{self.path}: none of {list(EOT_CANDIDATES)} is in the vocabulary; "
                      "goosejax needs an end-of-text token to separate documents")

  def __reduce__(self):
    return (HFTokenizer, (self.path,))

  def __repr__(self) -> str:
    return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
    return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise DataError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size}) of {self.path}")
    return self._tokenizer.decode(ids, skip_special_tokens=False)
