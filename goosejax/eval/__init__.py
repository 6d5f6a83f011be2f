"""Evaluation: batched per-token scoring, perplexity / bits per byte, LAMBADA, lm-eval adapter.

The lm-eval adapter lives in goosejax.eval.lm_eval_adapter (imported on demand: it needs the
optional lm-eval package).
"""
from goosejax.eval.lambada import LambadaResult, evaluate_lambada, read_lambada, split_last_word
from goosejax.eval.ppl import EvalDataError, PerplexityResult, load_documents, perplexity
from goosejax.eval.scoring import SequenceScore, score_sequences

__all__ = ["EvalDataError", "LambadaResult", "PerplexityResult", "SequenceScore",
           "evaluate_lambada", "load_documents", "perplexity", "read_lambada", "score_sequences",
           "split_last_word"]
