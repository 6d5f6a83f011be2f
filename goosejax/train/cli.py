"""`goosejax train`: pretrain (or resume) a run directory.

    goosejax train --config configs/tiny.yaml --run-dir runs/tiny
    goosejax train --config rwkv7-0.1b data.paths=[data/pile] --run-dir runs/x --steps 20000

Config overrides (section.key=value) may stand anywhere among the flags; `goosejax config
--keys` lists the keys, and `goosejax config` with the same arguments shows the resolved
config without training. The run directory gets it as RUN_DIR/config.yaml (each value's
source noted), next to config.json.

Re-running the same command on the same run directory resumes from its newest checkpoint.
Multi-host: run the same command on every host; TPU slices, SLURM and Open MPI are detected,
or pass --coordinator-address/--num-processes/--process-id (see launch/).
One `goosejax train` at a time holds a run directory (RUN_DIR/train.lock).
Exit status: 0 finished, 143 stopped by a signal after checkpointing, 1 non-finite loss,
2 bad arguments, config, data or run directory (also: the run directory is in use, a
checkpoint could not be written, e.g. the disk is full, or no checkpoint restores),
130 interrupted by a second Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

from goosejax.config import args as config_args
from goosejax.config.args import StoreOnce, whole_number

DEFAULT_COMPILATION_CACHE = "~/.cache/goosejax/jax"


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="goosejax train", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=config_args.KEYS_HELP + "\n\n" + textwrap.fill(
          "Exit status: 0 finished; 143 stopped by SIGTERM/SIGINT after writing a checkpoint "
          "(rerun to resume); 1 non-finite loss (the last good checkpoint is kept); 2 bad "
          "arguments, config, data or run directory, the run directory in use by another "
          "train, a checkpoint that could not be written (disk full) or none that restores; "
          "130 a second Ctrl-C.", 88))
  config_args.add_config_arguments(parser)
  parser.add_argument("--run-dir", required=True, action=StoreOnce,
                      help="checkpoints, metrics and logs go here")
  parser.add_argument("--init-from", action=StoreOnce,
                      help="start from these weights: a goosejax run directory or "
                           "anything goosejax.load_pretrained reads")
  parser.add_argument("--no-progress-bar", action="store_true", help="log lines only")
  parser.add_argument("--compilation-cache", default=None, action=StoreOnce,
                      help=f"persistent XLA cache directory (default {DEFAULT_COMPILATION_CACHE}, "
                           "or $JAX_COMPILATION_CACHE_DIR; '' disables)")
  group = parser.add_argument_group("multi-process")
  # --distributed and --distributed-timeout may repeat: launch/ sets them, a later one wins.
  group.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                     help="auto: initialise when flags, GOOSEJAX_* variables or a cluster say so")
  group.add_argument("--coordinator-address", action=StoreOnce, help="host:port of process 0")
  group.add_argument("--num-processes", type=whole_number, action=StoreOnce)
  group.add_argument("--process-id", type=whole_number, action=StoreOnce)
  group.add_argument("--distributed-timeout", type=whole_number, default=300,
                     help="seconds to wait for all processes at start-up (default 300)")
  return parser


def _enable_compilation_cache(directory: str | None) -> None:
  import jax
  if directory is None:
    directory = os.environ.get("JAX_COMPILATION_CACHE_DIR", DEFAULT_COMPILATION_CACHE)
  if not directory:
    return
  jax.config.update("jax_compilation_cache_dir", str(Path(directory).expanduser()))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: list[str]) -> int:
  args = config_args.parse_args(build_parser(), argv)
  from goosejax.cli import exit_status
  from goosejax.train import distributed
  from goosejax.train.loop import NonFiniteLossError, train

  def run() -> int:  # config, data, run directory, checkpoints, distributed set-up: exit 2
    distributed.initialize(distributed.DistributedSettings(
        mode=args.distributed, coordinator_address=args.coordinator_address,
        num_processes=args.num_processes, process_id=args.process_id,
        timeout_s=args.distributed_timeout))
    resolved = config_args.resolve(args)
    _enable_compilation_cache(args.compilation_cache)
    try:
      result = train(resolved.config, args.run_dir, init_from=args.init_from,
                     progress_bar=False if args.no_progress_bar else None,
                     config_sources=resolved.sources)
    except NonFiniteLossError as e:
      print(f"goosejax train: {e}", file=sys.stderr)
      return 1
    return {"finished": 0, "stop_at_step": 0, "signal": 143}.get(result.reason, 1)
  return exit_status("train", run)
