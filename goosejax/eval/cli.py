"""`goosejax eval ppl|lambada|lm-eval`: perplexity / bits per byte, LAMBADA, lm-eval tasks.

  goosejax eval ppl --model PATH --data FILE          (.txt, .jsonl or binidx .bin/.idx/prefix)
  goosejax eval lambada --model PATH --data lambada_test.jsonl
  goosejax eval lm-eval --model PATH --tasks lambada_openai,piqa   (needs the `lmeval` extra)

PATH is an official .pth, a goosejax checkpoint or run directory, or an HF/FLA directory.
Results print as one line of text, or as JSON with --json. Exit status: 0 done, 2 bad input
(one line naming the file, line, task or setting), 130 Ctrl-C.
"""
from __future__ import annotations

import argparse
import json


def _common(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", required=True,
                 help="official .pth, goosejax checkpoint / run directory, or HF/FLA directory")
  p.add_argument("--tokenizer", default="world",
                 help="'world', a SentencePiece .model, a tokenizer.json or an rwkv_vocab .txt")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--batch-size", type=int, default=4, help="sequences run side by side")
  p.add_argument("--chunk-len", type=int, default=256,
                 help="tokens per step (memory ~ batch * chunk * vocab floats)")
  p.add_argument("--json", action="store_true", help="print the result as JSON")
  p.add_argument("--quiet", action="store_true", help="no progress line")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="goosejax eval", description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="task", required=True)
  ppl = sub.add_parser("ppl", help="perplexity and bits per byte of documents")
  _common(ppl)
  ppl.add_argument("--data", required=True, help=".txt (one document), .jsonl or binidx")
  ppl.add_argument("--text-field", default="text", help="jsonl field holding the text")
  ppl.add_argument("--max-documents", type=int, help="evaluate only the first N documents")
  lambada = sub.add_parser("lambada", help="LAMBADA accuracy and perplexity (official protocol)")
  _common(lambada)
  lambada.add_argument("--data", required=True, help="LAMBADA jsonl ({'text': ...} per line)")
  lm_eval = sub.add_parser("lm-eval", help="run lm-evaluation-harness tasks")
  _common(lm_eval)
  lm_eval.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
  lm_eval.add_argument("--num-fewshot", type=int)
  lm_eval.add_argument("--limit", type=float, help="documents per task (or a fraction)")
  lm_eval.add_argument("--include-path", help="extra folder of task YAML files")
  return p


def _report(task: str, result: dict, as_json: bool) -> None:
  if as_json:
    print(json.dumps({"task": task, **result}))
    return
  print(f"{task}: " + "  ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in result.items()))


def main(argv: list[str]) -> int:
  """Exit status 0, 2 for bad input (one line naming it), 130 on Ctrl-C."""
  from goosejax.cli import exit_status
  from goosejax.eval.scoring import Progress

  args = _parser().parse_args(argv)
  bar = Progress(f"eval {args.task}", enabled=not args.quiet)

  def run() -> None:   # bad data files, tokenizer, model, task names, settings: exit 2
    if args.task == "lm-eval":
      _run_lm_eval(args)
    else:
      _report(args.task, _run_eval(args, bar).as_dict(), args.json)
  return exit_status("eval", run, before_message=bar.close)


def _run_eval(args, bar):
  """`eval ppl` or `eval lambada`: the PerplexityResult or LambadaResult."""
  from goosejax.infer.loading import load_model_and_tokenizer

  model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, args.tokenizer)
  vocab_size = model.config.vocab_size
  bar.restart_clock()
  if args.task == "ppl":
    from goosejax.eval.ppl import load_documents, perplexity
    docs, n_bytes = load_documents(args.data, tokenizer, text_field=args.text_field,
                                   max_documents=args.max_documents, vocab_size=vocab_size)
    result = perplexity(model, docs, n_bytes, batch_size=args.batch_size,
                        chunk_len=args.chunk_len, progress=bar.update)
  else:
    from goosejax.eval.lambada import evaluate_lambada, read_lambada
    texts = read_lambada(args.data)
    result = evaluate_lambada(model, tokenizer, texts, batch_size=args.batch_size,
                              chunk_len=args.chunk_len, progress=bar.update)
  bar.close()
  return result


def _run_lm_eval(args) -> None:
  from goosejax.eval.scoring import EvalDataError
  try:
    import lm_eval
    from lm_eval.tasks import TaskManager
  except ImportError:
    raise EvalDataError("lm-evaluation-harness is not installed; pip install 'goosejax[lmeval]'") from None
  from goosejax.eval.lm_eval_adapter import GoosejaxLM, check_task_names

  manager = TaskManager(include_path=args.include_path) if args.include_path else TaskManager()
  tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
  check_task_names(manager, tasks)     # before the model load, which can take minutes
  lm = GoosejaxLM(pretrained=args.model, tokenizer=args.tokenizer, dtype=args.dtype,
                  batch_size=args.batch_size, chunk_len=args.chunk_len)
  results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot,
                                    limit=args.limit, task_manager=manager)
  for task, metrics in results["results"].items():
    _report(task, {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, args.json)
