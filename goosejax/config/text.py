"""The configuration as text for people: the resolved YAML (optionally with each value's
source) and the key reference (a terminal table and docs/configuration.md), all from the
dataclasses and descriptions in goosejax.config."""
from __future__ import annotations

import dataclasses
import itertools
import math
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from goosejax.config import Config, Key, config_keys

YAML_HEADER = ("# goosejax configuration, fully resolved: `--config` reads this file back to "
               "exactly these values.\n")
SOURCES_HEADER = ("# After each value, where it came from. Later sources win: default <\n"
                  "# `base:` presets and files < the --config file < command line.\n")
MARKDOWN_COMMAND = "goosejax config --keys --markdown > docs/configuration.md"


def yaml_value(value: Any) -> str:
  """`value` as YAML on one line (flow lists, quoted where a string would read as another
  type), as it appears after `key: ` in the config files."""
  text = yaml.safe_dump(list(value) if isinstance(value, tuple) else value,
                        default_flow_style=True, width=math.inf)
  return text.removesuffix("\n...\n").removesuffix("\n")


def to_yaml(cfg: Config, sources: Mapping[str, str] | None = None) -> str:
  """`cfg` as a YAML config file with every key; with `sources` ({'section.key': where}),
  each line ends in a comment naming where its value came from."""
  lines: list[tuple[str, str | None]] = []   # (YAML line, the key it sets)
  for section in dataclasses.fields(cfg):
    values = getattr(cfg, section.name)
    lines.append((f"{section.name}:", None))
    lines += [(f"  {field.name}: {yaml_value(getattr(values, field.name))}",
               f"{section.name}.{field.name}") for field in dataclasses.fields(values)]
  if sources:
    width = max(len(text) for text, _ in lines)
    lines = [(f"{text:<{width}}  # {sources[key]}" if key else text, key) for text, key in lines]
  body = "".join(f"{text}\n" for text, _ in lines)
  return YAML_HEADER + (SOURCES_HEADER if sources else "") + body


def type_name(annotation: Any) -> str:
  """'int', 'int | null', 'float32 | bfloat16', 'list of str': the YAML a key accepts."""
  origin, args = typing.get_origin(annotation), typing.get_args(annotation)
  if origin in (typing.Union, types.UnionType):
    return " | ".join("null" if arg is type(None) else type_name(arg) for arg in args)
  if origin is Literal:
    return " | ".join(map(str, args))
  if origin is tuple:
    return f"list of {type_name(args[0])}"
  return annotation.__name__


def _sections() -> list[tuple[str, str, list[Key]]]:
  """(section name, its docstring, its keys) in declaration order."""
  classes = typing.get_type_hints(Config)
  keys = itertools.groupby(config_keys(), key=lambda key: key.name.partition(".")[0])
  return [(name, " ".join(classes[name].__doc__.split()), list(group)) for name, group in keys]


def _rows(keys: Sequence[Key]) -> list[tuple[str, str, str, str]]:
  return [(key.name, type_name(key.type), yaml_value(key.default), key.description) for key in keys]


def keys_table(width: int = 100) -> str:
  """Every key as a table for a terminal `width` columns wide: key, type, default,
  description, the last two wrapped inside their columns."""
  rows = _rows(config_keys())
  key_w, type_w, default_w = (max(len(row[i]) for row in rows) for i in range(3))
  gaps, min_description = 2 * 3, 30
  type_w = min(type_w, 22, max(12, width - key_w - default_w - gaps - min_description))  # choices wrap
  widths = [key_w, type_w, default_w, max(min_description, width - key_w - type_w - default_w - gaps)]
  wrap = lambda text, w: textwrap.wrap(text, w, break_on_hyphens=False) or [""]
  blocks = []
  for name, doc, keys in _sections():
    lines = wrap(f"{name}: {doc}", width)
    for row in [("key", "type", "default", "description"), *_rows(keys)]:
      cells = [wrap(text, w) for text, w in zip(row, widths)]
      lines += ["  ".join(f"{cell:<{w}}" for cell, w in zip(line, widths)).rstrip()
                for line in itertools.zip_longest(*cells, fillvalue="")]
    blocks.append("\n".join(lines) + "\n")
  return "\n".join(blocks)


def _cell(text: str) -> str:
  return text.replace("|", "\\|")


def keys_markdown() -> str:
  """docs/configuration.md: the precedence, then one table per section."""
  lines = [
      "# Configuration keys",
      "",
      f"<!-- Generated from goosejax/config/schema.py; regenerate with `{MARKDOWN_COMMAND}`. -->",
      "",
      "Every setting a run uses, by section. A config is a YAML file or preset "
      "(`--config tiny`); a file may start from another with `base: <preset or path>`. Any "
      "key can be set on the command line as `section.key=value`, anywhere among the "
      "flags. Later sources win: defaults < `base:` chain < the `--config` file < command "
      "line. `goosejax config --config X [section.key=value ...]` prints the resolved "
      "configuration (`--explain`: with each value's source) and `goosejax config --keys` "
      "this reference. Values are YAML: `null`, `true`, `[a, b]`.",
      "",
      "Execution settings (`model.dtype`, `model.wkv_impl`, `model.wkv_chunk_size`) say how "
      "the model is computed, not what it is: a run directory may resume with other values.",
  ]
  for name, doc, keys in _sections():
    lines += ["", f"## {name}", "", doc, "", "| key | type | default | description |",
              "| --- | --- | --- | --- |"]
    lines += [f"| `{key}` | {_cell(type_)} | `{default}` | {_cell(description)} |"
              for key, type_, default, description in _rows(keys)]
  return "\n".join(lines) + "\n"


def write_config_yaml(path: Path, cfg: Config, sources: Mapping[str, str] | None = None) -> None:
  """`to_yaml(cfg, sources)` into `path`, replaced whole (a reader never sees half a file)."""
  tmp = path.with_name(f"{path.name}.tmp")
  tmp.write_text(to_yaml(cfg, sources))
  tmp.replace(path)
