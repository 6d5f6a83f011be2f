"""`goosejax generate --model PATH --prompt TEXT`: stream generated text to the terminal.

Sampling defaults are the official `rwkv` pipeline's (PIPELINE_ARGS: temperature 1.0,
top_p 0.85, presence 0.2, frequency 0.2, decay 0.996), with its zero occurrence weight for
whitespace and digit tokens. Generation stops at --max-new-tokens, at the end-of-text token
(unless --no-stop-eot), at any --stop-id, or when the text contains a --stop string (which is
not printed). --state-out saves the recurrent state right after the prompt, --state-in
starts from a saved one (prompt caching, tuned states).

Exit status: 0 done, 2 bad input (one line naming the argument or file), 130 Ctrl-C.
"""
from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="goosejax generate", description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True,
                 help="official .pth, goosejax checkpoint / run directory, or HF/FLA directory")
  source = p.add_mutually_exclusive_group()
  source.add_argument("--prompt", help="prompt text")
  source.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
  p.add_argument("--tokenizer", default="world",
                 help="'world', a SentencePiece .model, a tokenizer.json or an rwkv_vocab .txt")
  p.add_argument("--max-new-tokens", type=_whole_number, default=200,
                 help="at most this many tokens (also written 1e6)")
  p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
  p.add_argument("--top-p", type=float, default=0.85)
  p.add_argument("--top-k", type=int, default=0, help="0 = no limit")
  p.add_argument("--presence-penalty", type=float, default=0.2)
  p.add_argument("--frequency-penalty", type=float, default=0.2)
  p.add_argument("--penalty-decay", type=float, default=0.996)
  p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                 help="stop when the generated text contains TEXT (repeatable)")
  p.add_argument("--stop-id", type=int, action="append", default=[], metavar="ID")
  p.add_argument("--ban-id", type=int, action="append", default=[], metavar="ID")
  p.add_argument("--no-stop-eot", action="store_true",
                 help="do not stop at the tokenizer's end-of-text token")
  p.add_argument("--document-start", action="store_true",
                 help="prepend the document-start token 0 (as evaluation does; the official "
                      "pipeline does not)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--block-size", type=int, default=8, help="tokens per streamed block")
  p.add_argument("--state-in", help="start from this saved state (.npz)")
  p.add_argument("--state-out", help="save the state after the prompt to this file (.npz)")
  return p


def _whole_number(text: str) -> int:
  """An integer, also in exponent notation (1e6); the range is checked with the settings."""
  try:
    return int(text)
  except ValueError:
    pass
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
  if not value.is_integer():
    raise argparse.ArgumentTypeError(f"invalid integer {text!r}: not a whole number")
  return int(value)


class _TextStream:
  """Prints decoded text as it grows, holding back incomplete UTF-8 and stop strings."""

  def __init__(self, decode, stops: list[str], out):
    self.decode, self.stops, self.out = decode, stops, out
    self.ids: list[int] = []
    self.printed = 0
    self.stopped = False

  def feed(self, new_ids: list[int]) -> bool:
    self.ids += new_ids
    text = self.decode(self.ids)
    cut = min((text.find(s) for s in self.stops if s in text), default=-1)
    if cut >= 0:
      self.stopped = True
      text = text[:cut]
    else:
      # Hold back what could still become a stop string or a multi-byte character.
      hold = max((len(s) - 1 for s in self.stops), default=0)
      text = text[:len(text) - hold] if hold else text
      if text.endswith("\ufffd"):
        text = text.rstrip("\ufffd")
    if len(text) > self.printed:
      new_text, self.printed = text[self.printed:], len(text)   # counted first: Ctrl-C may
      self.out.write(new_text)                                   # land inside the write
      self.out.flush()
    return self.stopped

  def finish(self) -> None:
    if not self.stopped:
      text = self.decode(self.ids)
      self.out.write(text[self.printed:])
    self.out.write("\n")
    self.out.flush()

  def end_line(self) -> None:
    """After an interrupt: close the partly printed line so the shell prompt starts clean."""
    if self.printed:
      self.out.write("\n")
      self.out.flush()


def main(argv: list[str]) -> int:
  """Exit status 0, 2 for bad input (one line naming it), 130 on Ctrl-C."""
  from goosejax.cli import exit_status

  args = _parser().parse_args(argv)
  if args.prompt is None and args.prompt_file is None:
    print("goosejax generate: error: give --prompt TEXT or --prompt-file FILE", file=sys.stderr)
    return 2
  return exit_status("generate", lambda: _run(args))


def _run(args) -> None:
  from goosejax.infer.generate import (GenerationError, check_max_new_tokens, generate,
                                       official_occurrence_weights)
  from goosejax.infer.loading import load_model_and_tokenizer
  from goosejax.infer.sampling import SamplingConfig
  from goosejax.infer.state_io import load_state, save_state

  # Checked before the (slow) model load; generate() checks them again.
  SamplingConfig(args.temperature, args.top_p, args.top_k, args.presence_penalty,
                 args.frequency_penalty, args.penalty_decay).validate()
  check_max_new_tokens(args.max_new_tokens)
  if "" in args.stop:   # it would match before the first character: nothing would print
    raise GenerationError("--stop '': an empty stop string would end generation before any "
                          "text; give non-empty TEXT")
  prompt = args.prompt if args.prompt_file is None else _read_prompt(args.prompt_file)
  model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, args.tokenizer)
  V = model.config.vocab_size
  ids = ([0] if args.document_start else []) + tokenizer.encode(prompt)
  if not ids:
    raise GenerationError("the prompt encodes to no tokens; give a non-empty prompt")
  state = load_state(args.state_in, model) if args.state_in else None
  stop_ids = list(args.stop_id) + ([] if args.no_stop_eot else [tokenizer.eot_id])
  uses_penalties = args.presence_penalty != 0 or args.frequency_penalty != 0
  weights = official_occurrence_weights(tokenizer.decode, V) if uses_penalties else None
  stream = _TextStream(tokenizer.decode, args.stop, sys.stdout)
  try:
    _, prompt_state = generate(
        model, ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, penalty_decay=args.penalty_decay,
        stop_ids=stop_ids, banned_ids=args.ban_id, seed=args.seed, state=state,
        occurrence_weights=weights, callback=stream.feed, block_size=args.block_size,
        return_state=True)
  except KeyboardInterrupt:
    stream.end_line()
    raise
  stream.finish()
  if args.state_out:
    save_state(args.state_out, prompt_state)
    print(f"[state after the prompt saved to {args.state_out}]", file=sys.stderr)


def _read_prompt(path: str) -> str:
  from goosejax.infer.generate import GenerationError

  with open(path, "rb") as f:
    data = f.read()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise GenerationError(f"{path}: the prompt file is not UTF-8 text ({e.reason} at byte "
                          f"{e.start})") from None
