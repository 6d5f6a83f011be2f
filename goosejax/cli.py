"""`goosejax <command> ...`: one entry point; each command lives in its own module.

Every command module exposes `main(argv: list[str]) -> int`. Modules are imported only when
their command runs, so `goosejax --help` stays fast and a broken optional dependency of one
command never breaks another.

Exit statuses shared by every command: 0 success, 2 bad input (a `GoosejaxError` or an
OS error on a named path, printed as one line), 130 interrupted by Ctrl-C; `train` adds 1
(non-finite loss) and 143 (stopped by a signal after checkpointing).
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

# command name -> (module, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "config": ("goosejax.config.cli", "print the resolved config (--explain: each value's source); --keys: every key"),
    "convert": ("goosejax.convert.cli", "convert checkpoints between official .pth and goosejax formats"),
    "train": ("goosejax.train.cli", "pretrain or resume a run directory (sharded, multi-host, checkpointed)"),
    "prepare-data": ("goosejax.data.cli", "tokenize text into binidx (.bin/.idx); train SentencePiece models"),
    "generate": ("goosejax.infer.cli", "generate text from a prompt (streaming; sampling as the official pipeline)"),
    "eval": ("goosejax.eval.cli", "perplexity / bits per byte, LAMBADA, lm-eval tasks"),
    "plan": ("goosejax.plan.cli", "memory, FLOPs and step time of a config on a TPU slice or GPU cluster (compiled here)"),
}

# Commands that run JAX: it starts quietly (goosejax.native_logs) before they do, after the
# environment each needs. plan compiles for other hardware: it never starts this machine's
# accelerators, and its compile-only TPU devices need not hold libtpu's one-process lock.
JAX_COMMANDS: dict[str, dict[str, str]] = {
    "train": {}, "generate": {}, "eval": {}, "convert": {},
    "plan": {"JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}}


def _usage() -> str:
  width = max(len(name) for name in COMMANDS)
  lines = ["usage: goosejax <command> [args...]", "", "commands:"]
  lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in sorted(COMMANDS.items())]
  lines += ["", "Run `goosejax <command> --help` for a command's options."]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(_usage())
    return 0 if argv else 2
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f"goosejax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
    return 2
  if name in JAX_COMMANDS and not {"-h", "--help"} & set(rest):
    _start_jax(JAX_COMMANDS[name])
  return exit_status(name, lambda: importlib.import_module(COMMANDS[name][0]).main(rest))


def _start_jax(environment: dict[str, str]) -> None:
  """JAX imported, its plugins registered, Orbax's metadata warning filtered: without the
  native libraries' start-up noise (goosejax.native_logs)."""
  from goosejax import native_logs
  for key, value in environment.items():
    os.environ.setdefault(key, value)   # JAX reads its environment when imported
  native_logs.start_jax_quietly()
  native_logs.quiet_orbax_metadata_warning()


def exit_status(command: str, body: Callable[[], int | None],
                before_message: Callable[[], None] = lambda: None) -> int:
  """Runs a command's `body` and maps the ways it can end to exit statuses: its own return
  value (None = 0); 2 with one line for a GoosejaxError or an OS error on a named path; 130
  for Ctrl-C. `before_message` runs first (e.g. to close a progress line). Anything else
  is a bug and keeps its traceback."""
  from goosejax.errors import GoosejaxError
  try:
    return int(body() or 0)
  except GoosejaxError as e:
    message, status = f"error: {e}", 2
  except OSError as e:
    message, status = f"error: {describe_os_error(e)}", 2
  except KeyboardInterrupt:
    message, status = "interrupted", 130
  before_message()
  print(f"goosejax {command}: {message}", file=sys.stderr)
  return status


def describe_os_error(error: OSError) -> str:
  """'PATH: reason' for an OS error, without the errno noise."""
  reason = error.strerror or str(error)
  if error.filename is None:
    return reason
  target = f" -> {error.filename2}" if error.filename2 is not None else ""
  return f"{error.filename}{target}: {reason}"


if __name__ == "__main__":
  sys.exit(main())
