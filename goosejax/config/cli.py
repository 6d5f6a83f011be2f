"""`goosejax config`: the configuration a run will use, and what every key means.

    goosejax config --config rwkv7-1.5b mesh.fsdp=-1                         # resolved YAML
    goosejax config --config my.yaml --steps 500 data.ctx_len=1024 --explain  # + each source
    goosejax config --keys                                                   # key reference

The resolved YAML names every key; `--config` reads it back to the same config, and
`goosejax train` writes it to RUN_DIR/config.yaml. The config is printed before its values
are checked, so a refused one can still be seen (with --explain: where the bad value came
from). Exit status: 0 valid, 2 refused (one line saying why) or bad arguments.
"""
from __future__ import annotations

import argparse
import shutil
import sys

from goosejax.config import args as config_args


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="goosejax config", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=config_args.KEYS_HELP)
  config_args.add_config_arguments(parser, config_required=False)
  parser.add_argument("--explain", action="store_true",
                      help="end each line with where its value came from (default, preset, "
                           "file, command line)")
  parser.add_argument("--keys", action="store_true",
                      help="list every key (type, default, description) instead")
  parser.add_argument("--markdown", action="store_true",
                      help="with --keys: as Markdown, the text of docs/configuration.md")
  return parser


def main(argv: list[str]) -> int:
  parser = build_parser()
  args = config_args.parse_args(parser, argv)
  from goosejax.cli import exit_status
  from goosejax.config.text import keys_markdown, keys_table, to_yaml

  if args.keys:
    if args.config or args.overrides or args.explain:
      parser.error("--keys lists the keys of every config; it takes no --config, overrides "
                   "or --explain")
    print(keys_markdown() if args.markdown else keys_table(shutil.get_terminal_size().columns),
          end="")
    return 0
  if args.markdown:
    parser.error("--markdown goes with --keys")
  if args.config is None:
    parser.error("--config is required (or --keys for the key reference)")

  def show() -> None:
    resolved = config_args.resolve(args, validate=False)
    sys.stdout.write(to_yaml(resolved.config, resolved.sources if args.explain else None))
    sys.stdout.flush()   # before a refusal's line on stderr
    resolved.config.validate()
  return exit_status("config", show)
