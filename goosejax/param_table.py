"""Every RWKV-7 parameter, declared once: shape, logical axes, optimizer group, and its name
and layout in official `.pth` and Hugging Face / FLA checkpoints.

Everything that lists parameters derives from `PARAMS`: goosejax.sharding (logical axes),
goosejax.train.recipe (weight decay and learning-rate groups), goosejax.convert.official and
goosejax.convert.hf_checkpoint (keys, transposes, vector shapes). tests/test_param_table.py checks that
the model creates exactly these parameters with these shapes, so a new parameter cannot be
trained, sharded or converted by accident of a forgotten list.

This module depends on nothing but the config, so every layer of goosejax can import it.
"""
from __future__ import annotations

import dataclasses
import enum
import itertools
import re
from typing import Callable, Iterator, Literal

from goosejax.config import ModelConfig

# Optimizer groups (RWKV-LM's configure_optimizers; docs/architecture.md#initialisation-and-optimizer):
# "decay" gets decoupled weight decay; "w0" (att.w0) gets optimizer.w0_lr_scale x the learning
# rate and no decay; "no_decay" is everything else (LoRAs, vectors, norms).
Group = Literal["decay", "no_decay", "w0"]


def dimension_sizes(cfg: ModelConfig) -> dict[str, int]:
  """The symbolic dimensions shapes are written in, for one model."""
  d_w, d_a, d_v, d_g = cfg.lora_ranks
  return {"L": cfg.n_layer, "V": cfg.vocab_size, "C": cfg.n_embd, "F": cfg.ffn_dim,
          "H": cfg.n_head, "N": cfg.head_size, "D_w": d_w, "D_a": d_a, "D_v": d_v, "D_g": d_g}


class Layout(enum.Enum):
  """How a checkpoint file stores one layer of a parameter, relative to goosejax's array."""
  SAME = "same"
  TRANSPOSED = "transposed"   # PyTorch Linear weights are [out, in]; goosejax stores [in, out]
  ROW = "row"                 # a [C] vector kept as [1, 1, C] (RWKV-LM's nn.Parameter shape)

  def to_file(self, x):
    if self is Layout.TRANSPOSED:
      return x.T
    if self is Layout.ROW and x.ndim == 1:
      return x.reshape(1, 1, -1)
    return x

  def from_file(self, x):
    """The inverse of `to_file`; a vector of another shape is left for the reader's shape
    check to report."""
    if self is Layout.TRANSPOSED:
      return x.T
    if self is Layout.ROW and x.ndim == 3 and x.shape[:2] == (1, 1):
      return x.reshape(-1)
    return x


@dataclasses.dataclass(frozen=True)
class Param:
  """One parameter: what the model, the mesh, the optimizer and the checkpoint files know of it."""
  name: str                  # goosejax's dotted name (goosejax.model.params.param_dict)
  dims: tuple[str, ...]      # symbolic shape (dimension_sizes); "L" first: stacked over layers
  axes: tuple[str, ...]      # logical axis of each dimension (goosejax.sharding.RULES)
  group: Group
  official: str              # key in official .pth files; "{i}" stands for the layer index
  official_layout: Layout
  hf: str                    # FLA / Hugging Face tensor name; "{i}" likewise
  hf_layout: Layout
  unused_in_layer0: bool = False   # v0/v1/v2: layer 0 makes v_first; files may omit them there

  @property
  def stacked(self) -> bool:
    return self.dims[0] == "L"

  def shape(self, cfg: ModelConfig) -> tuple[int, ...]:
    sizes = dimension_sizes(cfg)
    return tuple(sizes[d] for d in self.dims)

  def official_key(self, layer: int | None = None) -> str:
    return self.official.format(i=layer)

  def hf_key(self, layer: int | None = None) -> str:
    return self.hf.format(i=layer)


def _layer(name, dims, axes, group, official, official_layout, hf, hf_layout, **kw) -> Param:
  """A parameter of every block, stacked [L, ...] in goosejax, one tensor per layer in files."""
  return Param(f"blocks.{name}", ("L", *dims), ("layers", *axes), group,
               f"blocks.{{i}}.{official}", official_layout, f"model.layers.{{i}}.{hf}", hf_layout, **kw)


_top = Param          # a parameter outside the blocks
_C = ("channel",)     # per-channel vectors and norm weights: small, kept whole
SAME, TRANSPOSED, ROW = Layout.SAME, Layout.TRANSPOSED, Layout.ROW

# In checkpoint order: the embedding, layer by layer (RWKV-LM's module order), the output.
# Each entry: goosejax name, symbolic shape, logical axes, optimizer group;
#             official key, its layout; FLA / HF name, its layout.
PARAMS: tuple[Param, ...] = (
    _top("emb", ("V", "C"), ("vocab", "embed"), "decay",
         "emb.weight", SAME, "model.embeddings.weight", SAME),
    _top("ln0.weight", ("C",), _C, "no_decay",
         "blocks.0.ln0.weight", SAME, "model.layers.0.pre_norm.weight", SAME),
    _top("ln0.bias", ("C",), _C, "no_decay",
         "blocks.0.ln0.bias", SAME, "model.layers.0.pre_norm.bias", SAME),
    _layer("ln1.weight", ("C",), _C, "no_decay",
           "ln1.weight", SAME, "attn_norm.weight", SAME),
    _layer("ln1.bias", ("C",), _C, "no_decay",
           "ln1.bias", SAME, "attn_norm.bias", SAME),
    _layer("ln2.weight", ("C",), _C, "no_decay",
           "ln2.weight", SAME, "ffn_norm.weight", SAME),
    _layer("ln2.bias", ("C",), _C, "no_decay",
           "ln2.bias", SAME, "ffn_norm.bias", SAME),
    *(_layer(f"att.x_{m}", ("C",), _C, "no_decay",
             f"att.x_{m}", ROW, f"attn.x_{m}", ROW) for m in "rwkvag"),
    # The LoRAs: FLA's are nn.Sequential(Linear, act, Linear), weights [out, in], bias = w0/a0/v0.
    _layer("att.w0", ("C",), _C, "w0",
           "att.w0", ROW, "attn.w_lora.lora.2.bias", SAME),
    _layer("att.w1", ("C", "D_w"), ("embed", "lora"), "no_decay",
           "att.w1", SAME, "attn.w_lora.lora.0.weight", TRANSPOSED),
    _layer("att.w2", ("D_w", "C"), ("lora", "embed"), "no_decay",
           "att.w2", SAME, "attn.w_lora.lora.2.weight", TRANSPOSED),
    _layer("att.a0", ("C",), _C, "no_decay",
           "att.a0", ROW, "attn.a_lora.lora.2.bias", SAME),
    _layer("att.a1", ("C", "D_a"), ("embed", "lora"), "no_decay",
           "att.a1", SAME, "attn.a_lora.lora.0.weight", TRANSPOSED),
    _layer("att.a2", ("D_a", "C"), ("lora", "embed"), "no_decay",
           "att.a2", SAME, "attn.a_lora.lora.2.weight", TRANSPOSED),
    _layer("att.v0", ("C",), _C, "no_decay",
           "att.v0", ROW, "attn.v_lora.lora.2.bias", SAME, unused_in_layer0=True),
    _layer("att.v1", ("C", "D_v"), ("embed", "lora"), "no_decay",
           "att.v1", SAME, "attn.v_lora.lora.0.weight", TRANSPOSED, unused_in_layer0=True),
    _layer("att.v2", ("D_v", "C"), ("lora", "embed"), "no_decay",
           "att.v2", SAME, "attn.v_lora.lora.2.weight", TRANSPOSED, unused_in_layer0=True),
    _layer("att.g1", ("C", "D_g"), ("embed", "lora"), "no_decay",
           "att.g1", SAME, "attn.g_lora.lora.0.weight", TRANSPOSED),
    _layer("att.g2", ("D_g", "C"), ("lora", "embed"), "no_decay",
           "att.g2", SAME, "attn.g_lora.lora.2.weight", TRANSPOSED),
    _layer("att.k_k", ("C",), _C, "no_decay",
           "att.k_k", ROW, "attn.k_k", SAME),
    _layer("att.k_a", ("C",), _C, "no_decay",
           "att.k_a", ROW, "attn.k_a", SAME),
    _layer("att.r_k", ("H", "N"), ("head_index", "head_dim"), "no_decay",
           "att.r_k", SAME, "attn.r_k", SAME),
    # "heads": the H*N channels that r/k/v produce and `output` consumes.
    _layer("att.receptance", ("C", "C"), ("embed", "heads"), "decay",
           "att.receptance.weight", TRANSPOSED, "attn.r_proj.weight", TRANSPOSED),
    _layer("att.key", ("C", "C"), ("embed", "heads"), "decay",
           "att.key.weight", TRANSPOSED, "attn.k_proj.weight", TRANSPOSED),
    _layer("att.value", ("C", "C"), ("embed", "heads"), "decay",
           "att.value.weight", TRANSPOSED, "attn.v_proj.weight", TRANSPOSED),
    _layer("att.output", ("C", "C"), ("heads", "embed"), "decay",
           "att.output.weight", TRANSPOSED, "attn.o_proj.weight", TRANSPOSED),
    _layer("att.ln_x_weight", ("C",), _C, "no_decay",
           "att.ln_x.weight", SAME, "attn.g_norm.weight", SAME),
    _layer("att.ln_x_bias", ("C",), _C, "no_decay",
           "att.ln_x.bias", SAME, "attn.g_norm.bias", SAME),
    _layer("ffn.x_k", ("C",), _C, "no_decay",
           "ffn.x_k", ROW, "ffn.x_k", SAME),
    _layer("ffn.key", ("C", "F"), ("embed", "mlp"), "decay",
           "ffn.key.weight", TRANSPOSED, "ffn.key.weight", TRANSPOSED),
    _layer("ffn.value", ("F", "C"), ("mlp", "embed"), "decay",
           "ffn.value.weight", TRANSPOSED, "ffn.value.weight", TRANSPOSED),
    _top("ln_out.weight", ("C",), _C, "no_decay",
         "ln_out.weight", SAME, "model.norm.weight", SAME),
    _top("ln_out.bias", ("C",), _C, "no_decay",
         "ln_out.bias", SAME, "model.norm.bias", SAME),
    _top("head", ("C", "V"), ("embed", "vocab"), "decay",
         "head.weight", TRANSPOSED, "lm_head.weight", TRANSPOSED),
)

BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}


def layer_major(n_layer: int) -> Iterator[tuple[Param, int | None]]:
  """(parameter, layer index or None) for every tensor of a checkpoint file, in PARAMS order
  with each run of block parameters repeated layer by layer."""
  for stacked, run in itertools.groupby(PARAMS, key=lambda p: p.stacked):
    run = tuple(run)
    for layer in range(n_layer) if stacked else (None,):
      for p in run:
        yield p, layer


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _parser(template_of: Callable[[Param], str]) -> Callable[[str], tuple[Param, int | None] | None]:
  templates = {template_of(p): p for p in PARAMS}

  def parse(key: str) -> tuple[Param, int | None] | None:
    """(parameter, layer index or None) a tensor name stands for; None if no parameter's."""
    if key in templates:                       # a top-level name (never holds "{i}")
      return templates[key], None
    m = _LAYER_INDEX.search(key)
    if m is not None:
      p = templates.get(f"{key[:m.start()]}.{{i}}.{key[m.end():]}")
      if p is not None:
        return p, int(m.group(1))
    return None
  return parse


parse_official_key = _parser(lambda p: p.official)
parse_hf_key = _parser(lambda p: p.hf)
