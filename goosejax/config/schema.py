"""The configuration schema: one frozen dataclass per section (model, optimizer, data, mesh,
run), each field documented once with `setting`, and the checks `validate` runs. Impossible or
non-finite values raise `ConfigError` naming the key. Reading YAML and overrides is
`goosejax.config.load`."""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal, NamedTuple


from goosejax.errors import GoosejaxError
from pallas_kernels.wkv_policy import CHUNK_SIZES


class ConfigError(GoosejaxError):
  """A configuration problem; the message names the offending key and source."""


# Every integer setting fits a signed 32-bit integer: JAX computes with int32 (x64 is off),
# so a larger run.steps or warmup_steps cannot reach the step counter or the schedule.
MAX_INTEGER_SETTING = 2**31 - 1


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
                                   "arrayrecord, jsonl, parquet or text (tokenized when loaded)")
  paths: tuple[str, ...] = setting((), "datasets: files, directories (their files of the "
                                       "source's type), binidx prefixes or glob patterns, "
                                       "one stream each; empty for source=builtin")
  text_field: str = setting("text", "source=jsonl: the JSON field, source=parquet: the "
                                    "string column, holding each document's text")
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
  seed: int = setting(0, "seed of the shuffle order, 0 <= seed < 2**31")
  magic_prime: int | None = setting(None, "order=magic_prime: the prime P (P % 3 == 2); null: "
                                          "RWKV-LM's prime for each dataset's size")

  def validate(self) -> None:
    _finite(self, "data")
    _positive(self, "data", "ctx_len", "batch_size", "magic_prime")
    sources = ("builtin", "binidx", "arrayrecord", "jsonl", "parquet", "text")
    if self.source not in sources:
      raise ConfigError(f"data.source={self.source!r}: expected one of {list(sources)}")
    if not 0 <= self.seed < 2**31:
      raise ConfigError(f"data.seed={self.seed}: expected 0 <= seed < 2**31")
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


# `run.remat`: what each policy keeps is goosejax.model.remat's docstring.
Remat = Literal["none", "full", "minimal", "save_wkv", "block", "offload"]


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
  eval_tasks: tuple[str, ...] = setting(
      (), "evaluations run with the validation loss every eval_every steps (goosejax.train."
          "eval_tasks), each 'ppl:FILE' (perplexity and bits per byte of a .txt, .jsonl, "
          ".parquet or binidx file, as `goosejax eval ppl`) or 'lambada:FILE' (LAMBADA "
          "last-word accuracy of a jsonl file, as `goosejax eval lambada`); logged to "
          "metrics.jsonl, TensorBoard and W&B")
  eval_max_documents: int | None = setting(None, "evaluate only the first N documents of "
                                                 "each eval_tasks file; null: all")
  seed: int = setting(0, "seed of the parameter initialisation")
  remat: Remat = setting(
      "full", "what each layer keeps for the backward pass (goosejax.model.remat): none (every "
              "activation); full (only its input, recomputing the rest); minimal (the block "
              "input by name: the same program as full); save_wkv (the block input, the WKV "
              "output and the WKV's chunk-start states: the WKV forward is not rerun); block "
              "(every matmul output: the most memory); offload (the block input, in pinned "
              "host memory between the passes)")
  loss_vocab_tile: int = setting(
      0, "0: the head's fp32 logits [batch, tokens, vocab] are materialised, then the loss; "
         "N > 0: the head, cross-entropy and L2Wrap fused over tiles of N vocabulary columns "
         "(of each device's vocabulary shard), only [batch, tokens, N] fp32 at a time; the "
         "same loss and gradients (goosejax.train.loss_head)")
  async_checkpointing: bool = setting(True, "write checkpoints in the background while "
                                            "training goes on")
  peak_tflops: float | None = setting(None, "peak TFLOP/s per device for MFU; null: the "
                                            "datasheet of known chips, else measured")
  tensorboard: bool = setting(True, "write TensorBoard event files under RUN_DIR/tensorboard")
  profile_steps: tuple[int, ...] = setting(
      (), "[start, stop]: a JAX profiler trace of training steps start..stop (XProf "
          ".xplane.pb and Perfetto) under RUN_DIR/profile (goosejax.train.profile); "
          "empty: none")
  profile_all_hosts: bool = setting(False, "profile_steps: trace on every process, not "
                                           "only process 0")
  wandb_project: str | None = setting(None, "log metrics.jsonl's scalars and the config to "
                                            "this Weights & Biases project (the wandb "
                                            "extra); null: no W&B")
  wandb_entity: str | None = setting(None, "W&B team or user; null: your default entity")
  wandb_name: str | None = setting(None, "W&B display name; null: the run directory's name")
  wandb_tags: tuple[str, ...] = setting((), "W&B tags of the run")
  wandb_mode: Literal["online", "offline"] | None = setting(
      None, "online, or offline (files under RUN_DIR/wandb, upload later with `wandb "
            "sync`); null: $WANDB_MODE, else online")

  def validate(self) -> None:
    _finite(self, "run")
    _positive(self, "run", "steps", "checkpoint_every", "keep_checkpoints", "log_every",
              "eval_every", "eval_batches", "peak_tflops", "eval_max_documents")
    _non_negative(self, "run", "loss_vocab_tile")
    for task in self.eval_tasks:
      kind, _, path = task.partition(":")
      if kind not in ("ppl", "lambada") or not path:
        raise ConfigError(f"run.eval_tasks entry {task!r}: expected 'ppl:FILE' or 'lambada:FILE'")
    if self.profile_steps and not (len(self.profile_steps) == 2
                                   and 1 <= self.profile_steps[0] <= self.profile_steps[1]):
      raise ConfigError(f"run.profile_steps={list(self.profile_steps)}: expected [start, stop] "
                        "with 1 <= start <= stop")
    if self.profile_steps and self.profile_steps[0] > self.steps:
      raise ConfigError(f"run.profile_steps={list(self.profile_steps)} starts after the last "
                        f"step (run.steps={self.steps})")
    if self.wandb_project is not None and not self.wandb_project.strip():
      raise ConfigError("run.wandb_project='': expected a project name, or null for no W&B")


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
      _int32(getattr(self, section.name), section.name)
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
  return [Key(f"{section}.{field.name}", field_types(cls)[field.name], field.default,
              field.metadata.get("description", ""))
          for section, cls in field_types(Config).items() for field in dataclasses.fields(cls)]


def _finite(cfg, section: str) -> None:
  """Refuse NaN and infinity in every float setting: NaN passes each `<` range check below."""
  for field in dataclasses.fields(cfg):
    value = getattr(cfg, field.name)
    items = value if isinstance(value, tuple) else (value,)
    if any(isinstance(item, float) and not math.isfinite(item) for item in items):
      shown = list(value) if isinstance(value, tuple) else value
      raise ConfigError(f"{section}.{field.name}={shown}: expected a finite number")


def _int32(cfg, section: str) -> None:
  """Refuse an integer setting (or list item) outside int32, before anything uses it."""
  for field in dataclasses.fields(cfg):
    value = getattr(cfg, field.name)
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
      if isinstance(item, int) and abs(item) > MAX_INTEGER_SETTING:
        digits = str(item)
        shown = digits if len(digits) <= 24 else f"{digits[:12]}... ({len(digits)} digits)"
        raise ConfigError(f"{section}.{field.name}={shown}: expected an integer of magnitude "
                          f"at most {MAX_INTEGER_SETTING} (2**31 - 1, JAX's int32)")


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


def field_types(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)
