"""Typed configuration: dataclasses, YAML presets and `section.key=value` overrides.

Precedence, lowest first: dataclass defaults < the `base:` preset a YAML file names <
the YAML file itself < command-line overrides (dedicated flags such as `--steps` are
overrides under another name). Unknown keys, a key given twice in one source, impossible or
non-finite values, and empty or unreadable files raise `ConfigError` with a one-line message
naming the file and the key.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, NamedTuple, Sequence

import yaml

from goosejax.errors import GoosejaxError
from pallas_kernels.chunk_sizes import CHUNK_SIZES


def _presets_dir() -> Path:
  """The preset YAMLs: goosejax/presets/ in an installed wheel (pyproject maps configs/ there),
  configs/ beside the package in a source checkout or editable install."""
  package = Path(__file__).resolve().parent
  installed = package / "presets"
  return installed if installed.is_dir() else package.parent / "configs"


PRESETS_DIR = _presets_dir()


class ConfigError(GoosejaxError):
  """A configuration problem; the message names the offending key and source."""


def suggested_lora_ranks(n_embd: int) -> tuple[int, int, int, int]:
  """LoRA ranks (decay, iclr, value, gate) for a model trained from scratch, as RWKV-LM
  train_temp sizes them today (src/model.py, RWKV_Tmix_x070.__init__, D_*_LORA "suggestion"):
  max(32, round(k * sqrt(C) / 32) * 32) with k = 2.5, 2.5, 1.7, 5. Presets that copy a
  released checkpoint set the released ranks explicitly."""
  def rank(k: float) -> int:
    return max(32, int(round(k * n_embd**0.5 / 32)) * 32)
  return rank(2.5), rank(2.5), rank(1.7), rank(5.0)


# ModelConfig fields that say how the model is computed, not what it is: a run directory
# may resume with other values (the checkpoint's parameters are the same either way).
EXECUTION_SETTINGS = ("dtype", "wkv_impl", "wkv_chunk_size")


def setting(default: Any, description: str) -> Any:
  """A config field and its description: the one place each key is documented (read by
  `goosejax config --keys`, docs/configuration.md and tests/test_config_docs.py)."""
  return dataclasses.field(default=default, metadata={"description": description})


_EXECUTION = "Execution setting: a run directory may resume with another value."


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The RWKV-7 model: its shape, and how it is computed."""
  vocab_size: int = setting(65536, "token ids the embedding and the output head cover "
                                   "(65536: the World tokenizer)")
  n_layer: int = setting(12, "number of RWKV-7 blocks")
  n_embd: int = setting(768, "model width C in channels; a multiple of head_size")
  head_size: int = setting(64, "channels per head; n_embd / head_size heads (released models: 64)")
  dim_ffn: int | None = setting(None, "channel-mix hidden width; null: 4 * n_embd")
  decay_lora: int | None = setting(None, "rank of the decay LoRA; null: RWKV-LM's suggestion "
                                         "max(32, round(k * sqrt(n_embd) / 32) * 32), k = 2.5")
  iclr_lora: int | None = setting(None, "rank of the in-context learning rate LoRA; null: the "
                                        "suggestion with k = 2.5")
  value_lora: int | None = setting(None, "rank of the value-residual LoRA; null: the suggestion "
                                         "with k = 1.7")
  gate_lora: int | None = setting(None, "rank of the output-gate LoRA; null: the suggestion "
                                        "with k = 5")
  dtype: Literal["float32", "bfloat16"] = setting(
      "float32", f"compute dtype (the decay and the WKV state stay float32). {_EXECUTION}")
  param_dtype: Literal["float32", "bfloat16"] = setting(
      "float32", "storage dtype of the parameters; training needs float32 (fp32 master "
                 "weights: use dtype=bfloat16 for bf16 compute)")
  wkv_impl: Literal["auto", "reference", "chunked", "associative", "pallas"] = setting(
      "auto", "WKV-7 operator: auto (Pallas kernels on TPU and CUDA, the measured fastest XLA "
              "form elsewhere), reference (token scan), chunked (chunks in a sequential scan), "
              f"associative (chunks by associative scan) or pallas. {_EXECUTION}")
  wkv_chunk_size: int | None = setting(
      None, f"tokens per WKV chunk: 16, 32 or 64; null: the implementation's default. {_EXECUTION}")

  @property
  def n_head(self) -> int:
    return self.n_embd // self.head_size

  @property
  def ffn_dim(self) -> int:
    return self.dim_ffn if self.dim_ffn is not None else 4 * self.n_embd

  @property
  def lora_ranks(self) -> tuple[int, int, int, int]:
    """(decay, iclr, value, gate) ranks with the formula filling unset ones."""
    given = (self.decay_lora, self.iclr_lora, self.value_lora, self.gate_lora)
    return tuple(g if g is not None else s for g, s in zip(given, suggested_lora_ranks(self.n_embd)))

  def validate(self) -> None:
    _positive(self, "model", "vocab_size", "n_layer", "n_embd", "head_size", "dim_ffn",
              "decay_lora", "iclr_lora", "value_lora", "gate_lora", "wkv_chunk_size")
    if self.n_embd % self.head_size:
      raise ConfigError(f"model.n_embd={self.n_embd} is not divisible by model.head_size="
                        f"{self.head_size}; RWKV-7 needs whole heads (released models use 64)")
    if self.wkv_chunk_size is not None and self.wkv_chunk_size not in CHUNK_SIZES:
      raise ConfigError(f"model.wkv_chunk_size={self.wkv_chunk_size}: expected one of {CHUNK_SIZES}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW and the learning-rate schedule (RWKV-LM's recipe)."""
  lr_init: float = setting(6e-4, "peak learning rate, reached after the warmup; then a cosine "
                                 "over run.steps down to lr_final")
  lr_final: float = setting(6e-5, "learning rate at the last step")
  warmup_steps: int = setting(10, "steps of linear warmup from 1% of lr_init; 0: none")
  weight_decay: float = setting(0.1, "decoupled AdamW weight decay, on the large weight "
                                     "matrices only (not LoRAs, vectors, norms, att.w0)")
  beta1: float = setting(0.9, "Adam first-moment decay, 0 <= beta1 < 1")
  beta2: float = setting(0.99, "Adam second-moment decay, 0 <= beta2 < 1")
  eps: float = setting(1e-18, "Adam epsilon (RWKV-LM: 1e-18)")
  grad_clip: float = setting(1.0, "clip gradients to this global L2 norm; 0: no clipping")
  l2wrap: bool = setting(True, "L2Wrap: push down each position's top logit in the backward "
                               "pass (the loss value is unchanged)")
  grad_accum: int = setting(1, "micro-batches per step, accumulated inside one compiled step; "
                               "must divide data.batch_size")
  w0_lr_scale: float = setting(2.0, "learning-rate multiplier of att.w0, the decay bias "
                                    "(RWKV-LM: 2; 5 in its Pile stage 2)")

  def validate(self) -> None:
    _finite(self, "optimizer")
    _non_negative(self, "optimizer", "lr_init", "lr_final", "warmup_steps", "weight_decay", "eps",
                  "grad_clip", "w0_lr_scale")
    _positive(self, "optimizer", "grad_accum")
    for key in ("beta1", "beta2"):
      value = getattr(self, key)
      if not 0 <= value < 1:
        raise ConfigError(f"optimizer.{key}={value}: expected 0 <= {key} < 1")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The training corpus and how it is cut into batches."""
  source: str = setting("builtin", "builtin (Python's standard-library source, no files "
                                   "needed), binidx (.bin/.idx, see `goosejax prepare-data`), "
                                   "arrayrecord, jsonl or text (tokenized when loaded)")
  paths: tuple[str, ...] = setting((), "datasets: files, binidx prefixes or glob patterns, "
                                       "one stream each; empty for source=builtin")
  weights: tuple[float, ...] = setting((), "mixture weight per path, >= 0; empty: equal weights")
  tokenizer: str = setting("world", "world (the RWKV World vocabulary), a SentencePiece .model "
                                    "or a Hugging Face tokenizer.json")
  ctx_len: int = setting(512, "tokens per training sequence")
  batch_size: int = setting(8, "global batch in sequences per step, over all devices and "
                               "micro-batches (tokens per step: batch_size * ctx_len)")
  order: Literal["shuffle", "magic_prime"] = setting(
      "shuffle", "sample order: shuffle (seeded, reshuffled every epoch) or magic_prime "
                 "(RWKV-LM's order)")
  pack_documents: bool = setting(False, "reset the WKV state and token shifts where a "
                                        "document starts inside a sequence")
  validation_fraction: float = setting(0.01, "share of each dataset's windows held out for "
                                             "validation, 0 <= fraction < 1")
  seed: int = setting(0, "seed of the shuffle order, 0 <= seed < 2**32")
  magic_prime: int | None = setting(None, "order=magic_prime: the prime P (P % 3 == 2); null: "
                                          "RWKV-LM's prime for each dataset's size")

  def validate(self) -> None:
    _finite(self, "data")
    _positive(self, "data", "ctx_len", "batch_size", "magic_prime")
    sources = ("builtin", "binidx", "arrayrecord", "jsonl", "text")
    if self.source not in sources:
      raise ConfigError(f"data.source={self.source!r}: expected one of {list(sources)}")
    if not 0 <= self.seed < 2**32:
      raise ConfigError(f"data.seed={self.seed}: expected 0 <= seed < 2**32")
    if self.weights and len(self.weights) != len(self.paths):
      raise ConfigError(f"data.weights has {len(self.weights)} entries but data.paths has "
                        f"{len(self.paths)}; give one weight per path or none")
    if any(w < 0 for w in self.weights):
      raise ConfigError(f"data.weights={list(self.weights)}: weights must be >= 0")
    if not 0 <= self.validation_fraction < 1:
      raise ConfigError(f"data.validation_fraction={self.validation_fraction}: expected [0, 1)")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """How the devices are arranged: axis sizes whose product is the device count. One axis
  may be -1 (the devices the other axes leave); mesh.data does that by default unless
  mesh.fsdp, mesh.tensor or mesh.sequence is -1."""
  data: int | None = setting(None, "devices on the data-parallel axis (parameters replicated, "
                                   "batch split); -1: the devices the other axes leave; unset "
                                   "(null): -1, or 1 when mesh.fsdp, mesh.tensor or "
                                   "mesh.sequence is -1")
  fsdp: int = setting(1, "devices on the FSDP axis (parameters and batch split); -1: the "
                         "devices the other axes leave")
  tensor: int = setting(1, "devices on the tensor-parallel axis (heads, FFN hidden and "
                           "vocabulary split); -1: the devices the other axes leave")
  sequence: int = setting(1, "devices on the sequence-parallel axis (every sequence's tokens "
                             "split into this many spans, for contexts one device cannot hold; "
                             "data.ctx_len must be divisible by it); -1: the devices the other "
                             "axes leave")

  def sizes(self) -> dict[str, int]:
    """The axis sizes as given, mesh.data's default resolved (-1 stays -1)."""
    data = self.data
    if data is None:
      data = 1 if -1 in (self.fsdp, self.tensor, self.sequence) else -1
    return {"data": data, "fsdp": self.fsdp, "tensor": self.tensor, "sequence": self.sequence}

  def validate(self) -> None:
    given = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor,
             "sequence": self.sequence}
    for key, size in given.items():
      if size is not None and (isinstance(size, bool) or not isinstance(size, int)
                               or size == 0 or size < -1):
        raise ConfigError(f"mesh.{key}={size!r}: expected a positive size or -1 (use what is left)")
    rest = [f"mesh.{key}" for key, size in self.sizes().items() if size == -1]
    if len(rest) > 1:
      raise ConfigError(f"mesh: {' and '.join(rest)} are -1 but at most one of mesh.data, "
                        "mesh.fsdp, mesh.tensor, mesh.sequence may be -1")

  def shape(self, n_devices: int) -> dict[str, int]:
    """Axis sizes for `n_devices`, resolving the -1 axis; raises if they do not fit."""
    sizes = self.sizes()
    known = math.prod(s for s in sizes.values() if s != -1)
    if any(s == -1 for s in sizes.values()):
      if n_devices % known:
        raise ConfigError(f"mesh: {n_devices} devices are not divisible by the fixed axes' "
                          f"product {known} ({sizes})")
      sizes = {k: (n_devices // known if s == -1 else s) for k, s in sizes.items()}
    elif known != n_devices:
      raise ConfigError(f"mesh: axes {sizes} use {known} devices but {n_devices} are present")
    return sizes


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The training run: length, checkpoints, logging, evaluation."""
  steps: int = setting(1000, "total optimizer steps (also the length of the lr schedule); "
                             "--steps sets it")
  checkpoint_every: int = setting(200, "steps between checkpoints; --checkpoint-every sets it")
  keep_checkpoints: int = setting(3, "newest checkpoints kept in RUN_DIR/checkpoints")
  log_every: int = setting(10, "steps between log lines (loss, tokens/s, MFU, lr, ETA)")
  eval_every: int = setting(200, "steps between validation-loss evaluations")
  eval_batches: int = setting(4, "validation batches per evaluation")
  seed: int = setting(0, "seed of the parameter initialisation")
  remat: Literal["none", "block", "full"] = setting(
      "block", "rematerialisation per block: none (keep activations), block (keep only "
               "matmul outputs) or full (recompute everything in the backward pass)")
  async_checkpointing: bool = setting(True, "write checkpoints in the background while "
                                            "training goes on")
  peak_tflops: float | None = setting(None, "peak TFLOP/s per device for MFU; null: the "
                                            "datasheet of known chips, else measured")
  tensorboard: bool = setting(True, "write TensorBoard event files under RUN_DIR/tensorboard")

  def validate(self) -> None:
    _finite(self, "run")
    _positive(self, "run", "steps", "checkpoint_every", "keep_checkpoints", "log_every",
              "eval_every", "eval_batches", "peak_tflops")


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run uses, by section."""
  model: ModelConfig = ModelConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  data: DataConfig = DataConfig()
  mesh: MeshConfig = MeshConfig()
  run: RunConfig = RunConfig()

  def validate(self) -> "Config":
    for section in dataclasses.fields(self):
      getattr(self, section.name).validate()
    return self

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


class Key(NamedTuple):
  """One setting, as the key reference lists it."""
  name: str           # 'section.key'
  type: Any           # the field's annotation
  default: Any
  description: str    # from setting(); '' when missing (tests/test_config_docs.py refuses that)


def config_keys() -> list[Key]:
  """Every setting, in declaration order."""
  return [Key(f"{section}.{field.name}", _field_types(cls)[field.name], field.default,
              field.metadata.get("description", ""))
          for section, cls in _field_types(Config).items() for field in dataclasses.fields(cls)]


def _finite(cfg, section: str) -> None:
  """Refuse NaN and infinity in every float setting: NaN passes each `<` range check below."""
  for field in dataclasses.fields(cfg):
    value = getattr(cfg, field.name)
    items = value if isinstance(value, tuple) else (value,)
    if any(isinstance(item, float) and not math.isfinite(item) for item in items):
      shown = list(value) if isinstance(value, tuple) else value
      raise ConfigError(f"{section}.{field.name}={shown}: expected a finite number")


def _positive(cfg, section: str, *keys: str) -> None:
  for key in keys:
    value = getattr(cfg, key)
    if value is not None and value <= 0:
      raise ConfigError(f"{section}.{key}={value}: expected a positive value")


def _non_negative(cfg, section: str, *keys: str) -> None:
  for key in keys:
    value = getattr(cfg, key)
    if value < 0:
      raise ConfigError(f"{section}.{key}={value}: expected a value >= 0")


# ----------------------------------------------------------------------------- parsing


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


def _field_types(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _apply(config: Config, flat: Mapping[str, Any], source: str) -> Config:
  """Apply {'section.key': value} to `config`, checking names and types."""
  sections = _field_types(Config)
  updates: dict[str, dict[str, Any]] = {}
  for dotted, value in flat.items():
    section, _, key = dotted.partition(".")
    if section not in sections:
      raise ConfigError(f"unknown config section {section!r} in {dotted!r} ({source}); "
                        f"sections: {sorted(sections)}")
    fields = _field_types(sections[section])
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
