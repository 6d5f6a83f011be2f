"""The model's parameters as a flat {dotted name: array} dict, and back.

Names are the NNX attribute paths joined by dots, e.g. "emb", "blocks.att.w1" (stacked [L, ...]).
This is the one interchange format the converters and checkpoints use.
"""
from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from flax import nnx


def param_dict(model: nnx.Module) -> dict[str, jax.Array]:
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {".".join(map(str, path)): variable[...] for path, variable in flat}


def load_param_dict(model: nnx.Module, params: Mapping[str, jax.Array | np.ndarray]) -> None:
  """Write `params` into `model` in place, casting to each parameter's dtype.

  Every parameter must be given exactly, with its exact shape; anything else is an error
  that names the parameter.
  """
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  expected = {".".join(map(str, path)): (path, variable) for path, variable in flat.items()}
  missing = sorted(set(expected) - set(params))
  unexpected = sorted(set(params) - set(expected))
  if missing or unexpected:
    raise ValueError(f"parameter names do not match the model: missing {missing}, "
                     f"unexpected {unexpected}")
  updated = {}
  for name, (path, variable) in expected.items():
    value = params[name]
    if tuple(value.shape) != tuple(variable.shape):
      raise ValueError(f"parameter {name!r} has shape {tuple(value.shape)}, the model expects "
                       f"{tuple(variable.shape)}")
    updated[path] = variable.replace(jax.numpy.asarray(value, variable.dtype))
  nnx.update(model, nnx.from_flat_state(updated))
