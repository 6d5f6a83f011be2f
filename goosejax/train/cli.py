"""`goosejax train`: pretrain (or resume) a run directory.

    goosejax train --config configs/tiny.yaml --run-dir runs/tiny
    goosejax train --config rwkv7-0.1b --run-dir runs/x data.paths=[data/pile] --steps 20000

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
from pathlib import Path

DEFAULT_COMPILATION_CACHE = "~/.cache/goosejax/jax"


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="goosejax train", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Any config key can be set as section.key=value, e.g. optimizer.lr_init=3e-4 "
             "mesh.data=1 mesh.fsdp=-1 model.dtype=bfloat16.\n\nExit status: 0 finished; "
             "143 stopped by SIGTERM/SIGINT after writing a checkpoint (rerun to resume); "
             "1 non-finite loss (the last good checkpoint is kept); 2 bad arguments, config, "
             "data or run directory, the run directory in use by another train, a checkpoint "
             "that could not be written (disk full) or none that restores; 130 a second Ctrl-C.")
  parser.add_argument("--config", required=True,
                      help="YAML file or preset name (tiny, rwkv7-0.1b, ...)")
  parser.add_argument("--run-dir", required=True, help="checkpoints, metrics and logs go here")
  parser.add_argument("--steps", type=int, help="total training steps (run.steps)")
  parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (run.checkpoint_every)")
  parser.add_argument("--init-from", help="start from these weights: a goosejax run directory or "
                                          "anything goosejax.load_pretrained reads")
  parser.add_argument("--no-progress-bar", action="store_true", help="log lines only")
  parser.add_argument("--compilation-cache", default=None,
                      help=f"persistent XLA cache directory (default {DEFAULT_COMPILATION_CACHE}, "
                           "or $JAX_COMPILATION_CACHE_DIR; '' disables)")
  group = parser.add_argument_group("multi-process")
  group.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                     help="auto: initialise when flags, GOOSEJAX_* variables or a cluster say so")
  group.add_argument("--coordinator-address", help="host:port of process 0")
  group.add_argument("--num-processes", type=int)
  group.add_argument("--process-id", type=int)
  group.add_argument("--distributed-timeout", type=int, default=300,
                     help="seconds to wait for all processes at start-up (default 300)")
  parser.add_argument("overrides", nargs="*", metavar="section.key=value")
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
  args = build_parser().parse_args(argv)
  from goosejax.cli import exit_status
  from goosejax.config import load_config
  from goosejax.train import distributed
  from goosejax.train.loop import NonFiniteLossError, train

  def run() -> int:  # config, data, run directory, checkpoints, distributed set-up: exit 2
    distributed.initialize(distributed.DistributedSettings(
        mode=args.distributed, coordinator_address=args.coordinator_address,
        num_processes=args.num_processes, process_id=args.process_id,
        timeout_s=args.distributed_timeout))
    cfg = load_config(args.config, args.overrides,
                      {"run.steps": args.steps, "run.checkpoint_every": args.checkpoint_every})
    _enable_compilation_cache(args.compilation_cache)
    try:
      result = train(cfg, args.run_dir, init_from=args.init_from,
                     progress_bar=False if args.no_progress_bar else None)
    except NonFiniteLossError as e:
      print(f"goosejax train: {e}", file=sys.stderr)
      return 1
    return {"finished": 0, "stop_at_step": 0, "signal": 143}.get(result.reason, 1)
  return exit_status("train", run)
