"""LAMBADA with the official RWKV protocol (docs/architecture.md#evaluation-protocol; RWKV-LM's
RWKV-v7/misc/lambada_test.jsonl).

Each text is split at its last space: context = the text before it, target = " " + the last
word. Input = [0] + encode(context) + encode(target). A document is correct when every
target token is the argmax; perplexity = exp(-mean over documents of the summed target
log-probabilities). This is lm-eval's lambada_openai definition up to the leading 0.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from goosejax.eval.ppl import DOCUMENT_START
from goosejax.eval.scoring import EvalDataError, score_sequences
from goosejax.model.rwkv7 import RWKV7


@dataclasses.dataclass(frozen=True)
class LambadaResult:
  documents: int
  correct: int
  logprob_sum: float       # sum over documents of the target log-probability

  @property
  def accuracy(self) -> float:
    return self.correct / self.documents

  @property
  def perplexity(self) -> float:
    return math.exp(-self.logprob_sum / self.documents)

  def as_dict(self) -> dict:
    return {"documents": self.documents, "accuracy": self.accuracy, "perplexity": self.perplexity}


def split_last_word(text: str) -> tuple[str, str]:
  """(context, " " + last word): the official split at the last space."""
  problem = _split_problem(text)
  if problem:
    raise EvalDataError(f"LAMBADA text {text[:60]!r}: {problem}")
  context, word = text.rsplit(" ", 1)
  return context, " " + word


def _split_problem(text: str) -> str | None:
  """Why `text` cannot be split into a context and a last word to score (None if it can)."""
  if not text.strip():
    return "empty or whitespace only"
  if " " not in text:
    return "no space to split the last word off"
  context, word = text.rsplit(" ", 1)
  if not word.strip():
    return "ends in whitespace, so the last word would be empty"
  return None


def read_lambada(path: str | Path, text_field: str = "text") -> list[str]:
  """The texts of a LAMBADA jsonl file (one {"text": ...} object per line)."""
  path = Path(path)
  if not path.is_file():
    raise EvalDataError(f"{path}: file not found (expected LAMBADA jsonl, e.g. RWKV-LM's "
                        "RWKV-v7/misc/lambada_test.jsonl)")
  try:
    with open(path, encoding="utf-8") as f:
      texts = [_lambada_text(path, number, line, text_field) for number, line in enumerate(f, 1)
               if line.strip()]
  except UnicodeDecodeError as e:
    raise EvalDataError(f"{path}: not UTF-8 text ({e.reason})") from None
  if not texts:
    raise EvalDataError(f"{path}: no documents")
  return texts


def _lambada_text(path: Path, number: int, line: str, text_field: str) -> str:
  """The text of line `number`, or an EvalDataError naming the file and line."""
  try:
    text = json.loads(line)[text_field]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise EvalDataError(f"{path}:{number}: expected a JSON object with a string "
                        f"{text_field!r} field ({e})") from None
  if not isinstance(text, str):
    raise EvalDataError(f"{path}:{number}: field {text_field!r} is not a string")
  problem = _split_problem(text)
  if problem:   # scoring it anyway would count a meaningless target
    raise EvalDataError(f"{path}:{number}: LAMBADA text {text[:60]!r}: {problem}")
  return text


def evaluate_lambada(model: RWKV7, tokenizer, texts: Sequence[str], *, batch_size: int = 4,
                     chunk_len: int = 256, progress: Callable[[int, int], None] | None = None
                     ) -> LambadaResult:
  sequences, target_lengths = [], []
  for text in texts:
    context, target = split_last_word(text)
    target_ids = tokenizer.encode(target)
    if not target_ids:
      raise EvalDataError(f"LAMBADA target {target!r} encodes to no tokens")
    sequences.append([DOCUMENT_START] + tokenizer.encode(context) + target_ids)
    target_lengths.append(len(target_ids))
  scores = score_sequences(model, sequences, batch_size=batch_size, chunk_len=chunk_len,
                           progress=progress)
  correct, logprob_sum = 0, 0.0
  for score, n in zip(scores, target_lengths):
    logprob_sum += float(np.sum(score.logprobs[-n:]))
    correct += bool(np.all(score.greedy[-n:]))
  return LambadaResult(len(texts), correct, logprob_sum)
