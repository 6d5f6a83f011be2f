"""lm-evaluation-harness model "goosejax" (needs the `lmeval` extra: lm-eval >= 0.4.13).

    import goosejax.eval.lm_eval_adapter          # registers the model name "goosejax"
    lm_eval.simple_evaluate(model="goosejax", model_args="pretrained=PATH,tokenizer=world", ...)
or `goosejax eval lm-eval --model PATH --tasks ...`.

Every request is scored from a fresh state after the document-start token 0, exactly as
`goosejax eval` scores (docs/architecture.md#evaluation-protocol), so loglikelihood_rolling equals `eval ppl`'s document
log-likelihood and loglikelihood(context, " " + word) equals LAMBADA's. Contexts and
continuations are split as lm-eval's causal models do: trailing spaces of the context move
to the continuation, and the continuation's tokens are those of encode(context +
continuation) past encode(context) when that is a prefix. Requests of any length need no
windowing: the recurrent state carries the whole context. generate_until is greedy unless
do_sample is set, and stops at the end-of-text token or the first `until` string.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from goosejax.eval.ppl import DOCUMENT_START
from goosejax.eval.scoring import EvalDataError, score_sequences
from goosejax.infer.generate import Generator


def check_task_names(task_manager, names: Sequence[str]) -> None:
  """An EvalDataError naming the first of `names` that is neither a task, group or tag of
  `task_manager` nor a task YAML file, with the closest known names."""
  if not names:
    raise EvalDataError("--tasks: expected at least one lm-eval task name")
  known = task_manager.all_tasks
  for name in names:
    if name in known or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
      continue
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `lm-eval ls tasks`"
    raise EvalDataError(f"unknown lm-eval task {name!r}{hint}")


@register_model("goosejax")
class GoosejaxLM(LM):
  """model_args: pretrained=PATH (any format goosejax reads), tokenizer=world|PATH,
  dtype=float32|bfloat16, batch_size=N, chunk_len=T, max_gen_toks=N, seed=S; or, from Python,
  model=<RWKV7> and tokenizer=<goosejax tokenizer object>."""

  def __init__(self, pretrained: str | None = None, model=None, tokenizer: Any = "world",
               dtype: str = "float32", batch_size: int | str = 4, chunk_len: int | str = 256,
               max_gen_toks: int | str = 256, seed: int | str = 0, **unused: Any):
    super().__init__()
    from goosejax.data.tokenizer import load_tokenizer
    from goosejax.infer.loading import load_model

    if (pretrained is None) == (model is None):
      raise ValueError("goosejax lm-eval model: give exactly one of pretrained=PATH or model=<RWKV7>")
    self.model = model if model is not None else load_model(pretrained, dtype)
    self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    self.batch_size = 4 if str(batch_size).startswith("auto") else int(batch_size)
    self.chunk_len = int(chunk_len)
    self.max_gen_toks = int(max_gen_toks)
    self.seed = int(seed)
    self.eot_id = int(getattr(self.tokenizer, "eot_id", 0))
    self._generator: Generator | None = None   # the decode layout, made on the first generation

  @property
  def generator(self) -> Generator:
    """This adapter's `Generator`: every generate_until call reuses its decode layout."""
    if self._generator is None:
      self._generator = Generator(self.model)
    return self._generator

  @property
  def tokenizer_name(self) -> str:
    return type(self.tokenizer).__name__

  def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
      return [], self.tokenizer.encode(continuation)
    context_ids = self.tokenizer.encode(context)
    whole = self.tokenizer.encode(context + continuation)
    if whole[:len(context_ids)] == context_ids:
      return context_ids, whole[len(context_ids):]
    return context_ids, self.tokenizer.encode(continuation)

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    pairs = [self._encode_pair(*request.args) for request in requests]
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    to_score = [i for i, (_, cont) in enumerate(pairs) if cont]
    for i, (_, cont) in enumerate(pairs):
      if not cont:
        results[i] = (0.0, True)
    scores = score_sequences(self.model, [[DOCUMENT_START] + pairs[i][0] + pairs[i][1] for i in to_score],
                             batch_size=self.batch_size, chunk_len=self.chunk_len)
    for i, score in zip(to_score, scores):
      n = len(pairs[i][1])
      results[i] = (float(np.sum(score.logprobs[-n:])), bool(np.all(score.greedy[-n:])))
    for request, result in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood", request.args, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    texts = [request.args[0] for request in requests]
    scores = score_sequences(self.model, [[DOCUMENT_START] + self.tokenizer.encode(t) for t in texts],
                             batch_size=self.batch_size, chunk_len=self.chunk_len)
    results = [float(np.sum(score.logprobs)) for score in scores]
    for request, result in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
    return results

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    results: list[str | None] = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    for i, request in enumerate(requests):
      settings = self._generation_settings(request.args[1] if len(request.args) > 1 else {})
      groups.setdefault(tuple(sorted((k, v if not isinstance(v, list) else tuple(v))
                                     for k, v in settings.items())), []).append(i)
    for key, indices in groups.items():
      settings = {k: list(v) if isinstance(v, tuple) else v for k, v in key}
      until = settings.pop("until")
      for start in range(0, len(indices), self.batch_size):
        batch = indices[start:start + self.batch_size]
        prompts = [[DOCUMENT_START] + self.tokenizer.encode(requests[i].args[0]) for i in batch]
        outputs = self.generator.generate(prompts, stop_ids=[self.eot_id], seed=self.seed,
                                          **settings)
        for i, ids in zip(batch, outputs):
          text = self.tokenizer.decode(ids)
          cut = min((text.find(s) for s in until if s and s in text), default=-1)
          results[i] = text[:cut] if cut >= 0 else text
          self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
    return results

  def _generation_settings(self, gen_kwargs: dict) -> dict:
    kwargs = dict(gen_kwargs or {})
    until = kwargs.pop("until", None)
    until = [until] if isinstance(until, str) else list(until or [])
    max_new = next((kwargs[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens") if k in kwargs),
                   self.max_gen_toks)
    do_sample = bool(kwargs.get("do_sample", False))
    temperature = float(kwargs.get("temperature", 1.0)) if do_sample else 0.0
    return {"until": until, "max_new_tokens": int(max_new), "temperature": temperature,
            "top_p": float(kwargs.get("top_p", 1.0)) if do_sample else 1.0,
            "top_k": int(kwargs.get("top_k", 0) or 0) if do_sample else 0}
