"""`run.eval_tasks`: downstream evaluations during training, by `goosejax eval`'s functions.

Each task is 'ppl:FILE' (goosejax.eval.ppl: perplexity and bits per byte of the documents of a
.txt, .jsonl, .parquet or binidx file) or 'lambada:FILE' (goosejax.eval.lambada: last-word
accuracy and perplexity of a LAMBADA jsonl file), both with the run's tokenizer
(data.tokenizer) and the documents' `text` field. Files are read and tokenized once, when
the run opens, so a bad file stops the run before its first step, as bad training data
does. Every run.eval_every steps the current parameters score them (on the training mesh,
parameters as sharded for training), and the results are scalars named
`eval/<kind>/<file stem>/<metric>`, e.g. `eval/lambada/lambada_test/accuracy`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from goosejax.config import ConfigError

BATCH_SIZE, CHUNK_LEN = 4, 256       # `goosejax eval`'s defaults


@dataclasses.dataclass(frozen=True)
class EvalTask:
  """One task, its file read: token documents and their bytes (ppl) or texts (lambada)."""
  name: str                          # '<kind>/<file stem>'
  kind: str                          # 'ppl' or 'lambada'
  tokenizer: Any
  documents: list[list[int]]
  n_bytes: list[int]
  texts: list[str]


def load_eval_tasks(specs: Sequence[str], tokenizer_spec: str, vocab_size: int,
                    max_documents: int | None) -> list[EvalTask]:
  """Read every 'kind:FILE' of run.eval_tasks (EvalDataError naming a bad file)."""
  if not specs:
    return []
  from goosejax.data.tokenizer import load_tokenizer
  from goosejax.eval.lambada import read_lambada
  from goosejax.eval.ppl import load_documents

  tokenizer = load_tokenizer(tokenizer_spec)
  tasks: list[EvalTask] = []
  for spec in specs:
    kind, _, path = spec.partition(":")
    name = f"{kind}/{Path(path).stem}"
    if any(task.name == name for task in tasks):
      raise ConfigError(f"run.eval_tasks: two tasks would be named {name!r} (the file stem); "
                        "rename one of the files")
    if kind == "ppl":
      documents, n_bytes = load_documents(path, tokenizer, max_documents=max_documents,
                                          vocab_size=vocab_size)
      tasks.append(EvalTask(name, kind, tokenizer, documents, n_bytes, []))
    else:
      texts = read_lambada(path)[:max_documents]
      tasks.append(EvalTask(name, kind, tokenizer, [], [], texts))
  return tasks


def run_eval_tasks(tasks: Sequence[EvalTask], model) -> dict[str, float]:
  """{'eval/<name>/<metric>': value} of every task, scored by `model` (an RWKV7)."""
  from goosejax.eval.lambada import evaluate_lambada
  from goosejax.eval.ppl import perplexity

  scalars: dict[str, float] = {}
  for task in tasks:
    if task.kind == "ppl":
      result = perplexity(model, task.documents, task.n_bytes, batch_size=BATCH_SIZE,
                          chunk_len=CHUNK_LEN).as_dict()
      metrics = {k: result[k] for k in ("loss", "perplexity", "bits_per_byte")}
    else:
      result = evaluate_lambada(model, task.tokenizer, task.texts, batch_size=BATCH_SIZE,
                                chunk_len=CHUNK_LEN).as_dict()
      metrics = {k: result[k] for k in ("accuracy", "perplexity")}
    scalars.update({f"eval/{task.name}/{k}": float(v) for k, v in metrics.items()})
  return scalars


def summary_line(step: int, scalars: dict[str, float]) -> str:
  """'step 6: eval ppl/wiki perplexity 123.4 ... | lambada/test accuracy 0.25 ...'."""
  by_task: dict[str, list[str]] = {}
  for key, value in scalars.items():
    task, _, metric = key.removeprefix("eval/").rpartition("/")
    by_task.setdefault(task, []).append(f"{metric} {value:.4g}")
  return f"step {step}: eval " + " | ".join(f"{t} {' '.join(m)}" for t, m in by_task.items())
