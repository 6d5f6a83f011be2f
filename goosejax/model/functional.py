"""The model as pure functions of its parameters, for research code that transforms it:

    params = model_params(model)                        # the model's arrays, no copy
    logits_BTV, state = forward(params, tokens_BT, state, reset_BT)
    x_BTC, state = hidden_states(params, tokens_BT, state, reset_BT)

`ModelParams` is a pytree: its leaves are the parameters ({dotted name: array}, the names of
goosejax.model.params.param_dict), its static part the module's structure (config, remat
policy). So `jax.jit(forward)` compiles once per shape and structure, `jax.vmap` maps over
a batch of states, `jax.grad` differentiates with respect to the parameters (a ModelParams of
gradients) or the initial state (state tuning), and `donate_argnums` hands the state's
buffers to the result.

These functions merge the arrays back into the NNX module inside the trace (free under jit)
and call it: `RWKV7.__call__` is the one implementation and these are thin wrappers over it.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
from flax import nnx

from goosejax.model.rwkv7 import RWKV7
from goosejax.model.state import RWKV7State


class Structure(NamedTuple):
  """The static part of `ModelParams`: the module graph and each parameter's variable type."""
  graphdef: Any
  variable_types: tuple[tuple[str, type], ...]


class ModelParams(NamedTuple):
  """arrays: {dotted name: array}; structure: static (see `Structure`)."""
  arrays: dict[str, jax.Array]
  structure: Structure

  @property
  def config(self):
    """The model's ModelConfig."""
    return to_model(self).config


jax.tree_util.register_pytree_node(
    ModelParams, lambda p: ((p.arrays,), p.structure),
    lambda structure, children: ModelParams(children[0], structure))


def model_params(model: RWKV7) -> ModelParams:
  """The model's parameters and structure (the arrays themselves, not copies)."""
  graphdef, state = nnx.split(model)
  flat = nnx.to_flat_state(state)
  names = [".".join(map(str, path)) for path, _ in flat]
  arrays = {name: variable[...] for name, (_, variable) in zip(names, flat)}
  types = tuple((name, type(variable)) for name, (_, variable) in zip(names, flat))
  return ModelParams(arrays, Structure(graphdef, types))


def to_model(params: ModelParams) -> RWKV7:
  """The NNX module holding `params` (inside a trace: a view of the traced arrays)."""
  flat = {tuple(name.split(".")): kind(params.arrays[name])
          for name, kind in params.structure.variable_types}
  return nnx.merge(params.structure.graphdef, nnx.from_flat_state(flat))


def forward(params: ModelParams, tokens_BT: jax.Array, state: RWKV7State | None = None,
            reset_BT: jax.Array | None = None) -> tuple[jax.Array, RWKV7State]:
  """`model(tokens_BT, state, reset_BT=reset_BT)`: (fp32 logits [B, T, V], new state)."""
  return to_model(params)(tokens_BT, state, reset_BT=reset_BT)


def hidden_states(params: ModelParams, tokens_BT: jax.Array, state: RWKV7State | None = None,
                  reset_BT: jax.Array | None = None) -> tuple[jax.Array, RWKV7State]:
  """`model.hidden_states(...)`: (ln_out output [B, T, C] in the compute dtype, new state)."""
  return to_model(params).hidden_states(tokens_BT, state, reset_BT=reset_BT)


def logits(params: ModelParams, x_BTC: jax.Array) -> jax.Array:
  """The head on `hidden_states`' output: fp32 logits [..., V]."""
  return to_model(params).logits(x_BTC)


def init_state(params: ModelParams, batch_size: int) -> RWKV7State:
  """A zero state for `batch_size` rows (what `forward` starts from when state is None)."""
  return to_model(params).init_state(batch_size)
