"""Decoding and prefill on weights split per layer: the model's own code, laid out for speed.

Decoding is memory-bound: every token reads all weights once. `RWKV7.__call__` runs its
layers as a `lax.scan` over weights stacked [L, ...], which slices (copies) every layer's
weights out of the stacked arrays on every call. Here the weights are split per layer once,
outside jit (`decode_weights`), and a step runs `goosejax.model.rwkv7.run_layers`: the model's
`Blocks` on each layer's weights, unrolled, T = 1 for a decode step (the WKV operator then
takes its fused single-token form, goosejax.wkv.single_token). No layer math lives here: embedding,
blocks, norms and head are the model's functions, so a step computes `model(tokens_B1, state)`.

Layout (`transposed=True`, what a held `Generator` makes): each layer's six large matrices
and the head are stored [out, in] (`TRANSPOSED`) and given to the model as `Transposed` weights, which its one `matmul` contracts on their second
axis: XLA:CPU's one-row products read them faster than [in, out]. Not as transposed views
(x @ w_out_in.T): XLA:CPU fuses those into a loop, slower for whole decode steps and far
slower for the narrow LoRA matrices, which stay [in, out] ([out, in] was no faster for them).
benchmarks/inference.py measures decoding against chains of these matrix-vector products;
the figures are in the README's "Inference speed". Transposing costs a pass over the weights
that a one-call `goosejax.generate(model, ...)` would pay on every call, so it splits without
transposing (`transposed=False`: the model's [in, out] layout, a plain copy per layer).

The split is one module-level jitted function (`_split_layers`): building a `DecodeWeights`
again for the same shapes compiles nothing.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from goosejax.model.layers import Transposed
from goosejax.model.norms import layer_norm
from goosejax.model.params import param_dict
from goosejax.model.rwkv7 import Blocks, embed, head_logits, run_layers
from goosejax.model.state import LayerStates, RWKV7State, join_state, split_state
from goosejax.param_table import PARAMS, Layout

_LAYER_PREFIX = "blocks."

# Per-layer matrices stored [out, in] for decoding (the head too): the blocks' Linear weights,
# which official files hold [out, in] as PyTorch does (goosejax.param_table); every other
# parameter as the model stores it.
TRANSPOSED = tuple(p.name[len(_LAYER_PREFIX):] for p in PARAMS
                   if p.stacked and p.official_layout is Layout.TRANSPOSED)


class DecodeWeights(NamedTuple):
  """The model's weights split per layer, as `decode_step` and `prefill_split` read them.

  top: {"emb" [V, C], "ln0.weight", "ln0.bias", "ln_out.weight", "ln_out.bias", "head" [V, C]}
  layers: one {"att.receptance", "ln1.weight", ...: array} per layer (the names of
    `Blocks`' parameters, no [L] axis); the TRANSPOSED names and the head hold [out, in].
  blocks: the graph of `Blocks` (static), which each layer's weights are merged into.
  dtype: the compute dtype (static).
  transposed: whether the TRANSPOSED matrices and the head are stored [out, in] (static).
  """
  top: dict[str, jax.Array]
  layers: tuple[dict[str, jax.Array], ...]
  blocks: Any
  dtype: Any
  transposed: bool = True


jax.tree_util.register_pytree_node(
    DecodeWeights,
    lambda w: ((w.top, w.layers), (w.blocks, jnp.dtype(w.dtype).name, w.transposed)),
    lambda aux, children: DecodeWeights(children[0], children[1], aux[0], jnp.dtype(aux[1]),
                                        aux[2]))


@functools.partial(jax.jit, static_argnames="transposed")
def _split_layers(stacked: dict[str, jax.Array], transposed: bool):
  """Per-layer copies of the stacked [L, ...] arrays (fresh buffers, so no step slices)."""
  layout = lambda name, x: x.T if transposed and name in TRANSPOSED else x
  n_layer = next(iter(stacked.values())).shape[0]
  return tuple({name: layout(name, value[i]) for name, value in stacked.items()}
               for i in range(n_layer))


_transpose = jax.jit(jnp.transpose)


def decode_weights(model: nnx.Module, transposed: bool = True) -> DecodeWeights:
  """Split the model's stacked [L, ...] parameters into per-layer arrays (done once per
  `Generator`); `transposed`: store the large matrices [out, in] (see the module doc)."""
  params = param_dict(model)
  top = {name: value for name, value in params.items() if not name.startswith(_LAYER_PREFIX)}
  stacked = {name[len(_LAYER_PREFIX):]: value for name, value in params.items()
             if name.startswith(_LAYER_PREFIX)}
  layers = _split_layers(stacked, transposed)
  if transposed:
    top["head"] = _transpose(top["head"])
  return DecodeWeights(top, layers, nnx.graphdef(model.blocks), jnp.dtype(model.config.dtype),
                       transposed)


def layer_blocks(weights: DecodeWeights) -> list[Blocks]:
  """One `Blocks` per layer holding that layer's weights (the TRANSPOSED ones as `Transposed`
  when the weights are stored so)."""
  is_transposed = lambda name: weights.transposed and name in TRANSPOSED
  view = lambda name, x: Transposed(x) if is_transposed(name) else x
  return [nnx.merge(weights.blocks, nnx.from_flat_state(
              {tuple(name.split(".")): nnx.Param(view(name, value)) for name, value in layer.items()}))
          for layer in weights.layers]


def last_logits(weights: DecodeWeights, tokens_BT: jax.Array, layers: LayerStates,
                reset_BT: jax.Array | None = None) -> tuple[jax.Array, LayerStates]:
  """[B, T] tokens through the model: (the last position's logits [B, V] fp32, new per-layer
  states). `model(tokens_BT, state, reset_BT=...)` but for the head on one position only."""
  top = weights.top
  x_BTC = embed(tokens_BT, top["emb"], top["ln0.weight"], top["ln0.bias"], weights.dtype)
  x_BTC, layers = run_layers(layer_blocks(weights), x_BTC, layers, reset_BT)
  x_BC = layer_norm(x_BTC[:, -1], top["ln_out.weight"], top["ln_out.bias"])
  head = Transposed(top["head"]) if weights.transposed else top["head"]
  return head_logits(x_BC, head), layers


def decode_step_layers(weights: DecodeWeights, tokens_B: jax.Array, layers: LayerStates):
  """`decode_step` on per-layer states: (logits [B, V] fp32, new per-layer states)."""
  return last_logits(weights, tokens_B[:, None], layers)


def decode_step(weights: DecodeWeights, tokens_B: jax.Array, state: RWKV7State):
  """One token per row: (logits [B, V] fp32, new state). Same function as model(tokens[:, None])."""
  logits_BV, layers = decode_step_layers(weights, tokens_B, split_state(state))
  return logits_BV, join_state(layers)


__all__ = ["DecodeWeights", "LayerStates", "TRANSPOSED", "decode_step", "decode_step_layers",
           "decode_weights", "join_state", "last_logits", "layer_blocks", "split_state"]
