"""Reading configuration: YAML files and presets (with their `base:` chain), `section.key=value`
overrides, and each value's source.

Precedence, lowest first: dataclass defaults < the `base:` preset a YAML file names <
the YAML file itself < command-line overrides (dedicated flags such as `--steps` are
overrides under another name). Unknown keys, a key given twice in one source, and empty or
unreadable files raise `ConfigError` with a one-line message naming the file and the key.
"""
from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from goosejax.config.schema import (MAX_INTEGER_SETTING, Config, ConfigError, ModelConfig,
                                    config_keys, field_types)


def _presets_dir() -> Path:
  """The preset YAMLs: goosejax/presets/ in an installed wheel (pyproject maps configs/ there),
  configs/ beside the package in a source checkout or editable install."""
  package = Path(__file__).resolve().parent.parent
  installed = package / "presets"
  return installed if installed.is_dir() else package.parent / "configs"


PRESETS_DIR = _presets_dir()


class _UniqueKeyLoader(yaml.SafeLoader):
  """A YAML loader that rejects a mapping key given twice (PyYAML keeps the last silently)."""


def _construct_unique_mapping(loader, node, deep=False):
  seen = {}
  for key_node, _ in node.value:
    key = loader.construct_object(key_node, deep=deep)
    if key in seen:
      raise ConfigError(f"key {key!r} is given twice (lines {seen[key] + 1} and "
                        f"{key_node.start_mark.line + 1}) in {node.start_mark.name}")
    seen[key] = key_node.start_mark.line
  return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _construct_unique_mapping)


def _coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
  """Check `value` against a field annotation, converting where it is lossless."""
  origin = typing.get_origin(annotation)
  args = typing.get_args(annotation)
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    errors = []
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _coerce(value, arg, key, source)
      except ConfigError as e:
        errors.append(str(e))
    raise errors[0] if len(errors) == 1 else ConfigError(errors[0])
  if origin is Literal:
    if value not in args:
      raise ConfigError(f"{key}={value!r} ({source}): expected one of {list(args)}")
    return value
  if origin is tuple:
    items = value if isinstance(value, (list, tuple)) else [value]
    return tuple(_coerce(item, args[0], key, source) for item in items)
  if annotation is bool:
    if isinstance(value, bool):
      return value
  elif annotation is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
  elif annotation is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if isinstance(value, str):
      try:
        return float(value)  # YAML 1.1 reads "1e-18" as a string
      except ValueError:
        pass
  elif annotation is str:
    if isinstance(value, str):
      return value
  raise ConfigError(f"{key}={value!r} ({source}): expected {getattr(annotation, '__name__', annotation)}")




def _apply(config: Config, flat: Mapping[str, Any], source: str) -> Config:
  """Apply {'section.key': value} to `config`, checking names and types."""
  sections = field_types(Config)
  updates: dict[str, dict[str, Any]] = {}
  for dotted, value in flat.items():
    section, _, key = dotted.partition(".")
    if section not in sections:
      raise ConfigError(f"unknown config section {section!r} in {dotted!r} ({source}); "
                        f"sections: {sorted(sections)}")
    fields = field_types(sections[section])
    if not key:
      raise ConfigError(f"{dotted!r} ({source}): expected section.key=value")
    if key not in fields:
      raise ConfigError(f"unknown config key {dotted!r} ({source}); keys of {section!r}: "
                        f"{sorted(fields)}")
    updates.setdefault(section, {})[key] = _coerce(value, fields[key], dotted, source)
  return dataclasses.replace(config, **{
      section: dataclasses.replace(getattr(config, section), **values)
      for section, values in updates.items()})


def _flatten(tree: Mapping[str, Any], source: str) -> dict[str, Any]:
  flat = {}
  for section, values in tree.items():
    if not isinstance(values, Mapping):
      raise ConfigError(f"{source}: top-level key {section!r} must be a mapping of settings, "
                        f"got {values!r}")
    for key, value in values.items():
      flat[f"{section}.{key}"] = value
  return flat


def resolve_preset(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
  """A YAML path, or the name of a preset in configs/ (`tiny`, `rwkv7-0.1b`, ...)."""
  candidates = [Path(name_or_path)]
  if relative_to is not None:
    candidates.insert(0, relative_to / name_or_path)
  candidates += [PRESETS_DIR / f"{name_or_path}.yaml", PRESETS_DIR / str(name_or_path)]
  for path in candidates:
    if path.is_file():
      return path
  raise ConfigError(f"config {str(name_or_path)!r} is neither a file nor a preset; presets: {preset_names()}")


def _one_line(error: Exception) -> str:
  """PyYAML's multi-line messages (problem, context, file marks) as one line."""
  return " ".join(str(error).split())


def _unreadable_value(error: ValueError) -> str:
  """A value PyYAML could not build, such as an integer of more digits than Python converts."""
  if "integer string conversion" in str(error):
    return (f"an integer has more than {sys.get_int_max_str_digits()} digits; integer settings "
            f"are at most {MAX_INTEGER_SETTING}")
  return f"a value cannot be read: {error}"


def preset_names() -> list[str]:
  """The packaged presets `--config NAME` accepts."""
  return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _read_tree(path: Path) -> dict[str, Any]:
  """The top-level mapping of a YAML config file; refuses binary, invalid and empty files."""
  try:
    with path.open("rb") as stream:   # a named stream: PyYAML's marks (and ours) name the file
      tree = yaml.load(stream, Loader=_UniqueKeyLoader)
  except yaml.reader.ReaderError as e:   # not UTF-8, or control characters: a binary file
    found = f"character U+{e.character:04X}" if e.encoding == "unicode" else f"byte 0x{e.character:02x}"
    raise ConfigError(f"{path}: not a YAML text file ({found} at position {e.position}: "
                      f"{e.reason})") from None
  except yaml.YAMLError as e:
    raise ConfigError(f"{path}: not valid YAML: {_one_line(e)}") from None
  except ValueError as e:   # Python refuses to parse an integer of over 4300 digits
    raise ConfigError(f"{path}: {_unreadable_value(e)}") from None
  if tree is None or tree == {}:   # a default model trained from an empty file is never intended
    raise ConfigError(f"{path}: the config file is empty; give at least `base: <preset>` "
                      f"(presets: {preset_names()})")
  if not isinstance(tree, dict):
    raise ConfigError(f"{path}: expected a mapping of sections, got {type(tree).__name__}")
  return tree


def _base_path(path: Path, base: Any) -> Path:
  """The file a config's `base:` names, resolved next to the config first."""
  if not isinstance(base, str):
    raise ConfigError(f"{path}: base={base!r}: expected a preset name or a YAML path "
                      f"(presets: {preset_names()})")
  try:
    return resolve_preset(base, path.parent)
  except ConfigError as e:
    raise ConfigError(f"{path}: base: {e}") from None


def _source_name(path: Path) -> str:
  """How --explain names a config file: 'preset tiny' for a packaged preset, else its path."""
  if path.resolve().parent == PRESETS_DIR.resolve():
    return f"preset {path.stem}"
  return f"file {path}"


def _load_yaml(path: Path, config: Config, sources: dict[str, str],
               chain: tuple[Path, ...] = ()) -> Config:
  """`config` updated by `path` and its `base:` chain; `sources` records who set each key."""
  if path in chain:
    raise ConfigError(f"{path}: `base:` chain loops back to itself ({' -> '.join(map(str, chain))})")
  tree = _read_tree(path)
  if "base" in tree:
    config = _load_yaml(_base_path(path, tree.pop("base")), config, sources, chain + (path,))
  flat = _flatten(tree, str(path))
  config = _apply(config, flat, str(path))
  sources.update(dict.fromkeys(flat, _source_name(path)))
  return config


def parse_overrides(overrides: Sequence[str], source: str = "command line") -> dict[str, Any]:
  """['model.n_layer=4', ...] -> {'model.n_layer': 4}; values parse as YAML scalars/lists."""
  flat: dict[str, Any] = {}
  for item in overrides:
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq or "." not in key:
      raise ConfigError(f"override {item!r} ({source}): expected section.key=value")
    if key in flat:
      raise ConfigError(f"key {key!r} is given twice on the {source}")
    try:
      flat[key] = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
      raise ConfigError(f"override {item!r} ({source}): value is not valid YAML: {_one_line(e)}") from None
    except ValueError as e:
      raise ConfigError(f"override {key}=... ({source}): {_unreadable_value(e)}") from None
  return flat


DEFAULT_SOURCE = "default"
COMMAND_LINE_SOURCE = "command line"


@dataclasses.dataclass(frozen=True)
class ResolvedConfig:
  """A config and where each value came from: {'model.n_layer': 'preset tiny', ...} with
  DEFAULT_SOURCE, 'preset NAME', 'file PATH' or COMMAND_LINE_SOURCE for every key."""
  config: Config
  sources: Mapping[str, str]


def resolve_config(config: str | Path | None = None, overrides: Sequence[str] = (),
                   flags: Mapping[str, Any] | None = None, *, validate: bool = True) -> ResolvedConfig:
  """Defaults < YAML file or preset (after its `base:` chain) < `overrides`
  (section.key=value) and `flags`, noting each value's source.

  `flags` maps dotted keys to values from dedicated options (`{'run.steps': 10}`); None
  values mean "flag not given". A key set both by a flag and by an override is an error.
  validate=False skips the value checks (not the key and type checks), so that a refused
  config can still be shown.
  """
  result = Config()
  sources = {key.name: DEFAULT_SOURCE for key in config_keys()}
  if config is not None:
    result = _load_yaml(resolve_preset(config), result, sources)
  flat = parse_overrides(overrides)
  for key, value in (flags or {}).items():
    if value is None:
      continue
    if key in flat:
      raise ConfigError(f"key {key!r} is given twice: as a flag and as {key}=... on the command line")
    flat[key] = value
  result = _apply(result, flat, COMMAND_LINE_SOURCE)
  sources.update(dict.fromkeys(flat, COMMAND_LINE_SOURCE))
  return ResolvedConfig(result.validate() if validate else result, sources)


def load_config(config: str | Path | None = None, overrides: Sequence[str] = (),
                flags: Mapping[str, Any] | None = None) -> Config:
  """The validated config of `resolve_config` (same arguments), without the sources."""
  return resolve_config(config, overrides, flags).config


def config_from_dict(tree: Mapping[str, Any], source: str = "dict") -> Config:
  """Rebuild a Config from `Config.to_dict()` output (e.g. a checkpoint's config.json)."""
  return _apply(Config(), _flatten(tree, source), source).validate()


def model_config_from_dict(tree: Mapping[str, Any], source: str = "dict") -> ModelConfig:
  return config_from_dict({"model": dict(tree)}, source).model
