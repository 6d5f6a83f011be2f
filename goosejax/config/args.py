"""The command-line side of configuration, shared by every command that builds a Config
(`goosejax train`, `goosejax config`, `goosejax plan`): `--config`, the flags that set a key
under another name, and `section.key=value` overrides, which may stand before, between and
after flags."""
from __future__ import annotations

import argparse
from typing import Sequence

from goosejax.config import ResolvedConfig, preset_names, resolve_config

KEYS_HELP = """\
Overrides: any config key as section.key=value, anywhere on the command line
(e.g. optimizer.lr_init=3e-4 mesh.fsdp=-1 data.paths=[a,b]).
`goosejax config --keys` lists every key with its type, default and meaning (as does
docs/configuration.md); `goosejax config` with the same --config, flags and overrides
prints the resolved configuration, with --explain each value's source."""


def whole_number(text: str) -> int:
  """argparse `type` of integer flags: junk, or an integer of thousands of digits (which
  Python refuses to convert), is one short line naming the flag."""
  try:
    return int(text)
  except ValueError:
    shown = text if len(text) <= 24 else f"{text[:12]}... ({len(text)} characters)"
    raise argparse.ArgumentTypeError(f"expected an integer, got {shown!r}") from None


class StoreOnce(argparse.Action):
  """Store a flag's value, refusing the flag given twice (plain `store` keeps the last
  silently), as a config key given twice is refused."""

  def __call__(self, parser, namespace, values, option_string=None):
    given = namespace.__dict__.setdefault("_flags_given", set())
    if self.dest in given:
      parser.error(f"{option_string} is given twice ({getattr(namespace, self.dest)!r} and "
                   f"{values!r}); give it once")
    given.add(self.dest)
    setattr(namespace, self.dest, values)


def add_config_arguments(parser: argparse.ArgumentParser, *, config_required: bool = True) -> None:
  """--config, --steps, --checkpoint-every (each at most once) and the section.key=value
  overrides."""
  parser.add_argument("--config", required=config_required, metavar="YAML_OR_PRESET",
                      action=StoreOnce,
                      help=f"YAML file or preset name ({', '.join(preset_names())})")
  parser.add_argument("--steps", type=whole_number, action=StoreOnce,
                      help="total training steps (run.steps)")
  parser.add_argument("--checkpoint-every", type=whole_number, action=StoreOnce,
                      help="steps between checkpoints (run.checkpoint_every)")
  parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                      help="set a config key; see below")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
  """Like parser.parse_args, but overrides may come anywhere: plain parse_args takes the
  positionals in one run and refuses any after a later flag."""
  return parser.parse_intermixed_args(argv)


def resolve(args: argparse.Namespace, *, validate: bool = True) -> ResolvedConfig:
  """The config these arguments describe, with each value's source."""
  return resolve_config(args.config, args.overrides,
                        {"run.steps": args.steps, "run.checkpoint_every": args.checkpoint_every},
                        validate=validate)
