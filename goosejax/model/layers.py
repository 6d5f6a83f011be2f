"""What every part of the model shares: its one matrix product and the head split of channels."""
from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.tree_util.register_pytree_node_class
class Transposed:
  """A weight matrix stored [out, in] (the transpose of the model's [in, out]), for `matmul`.

  Decoding stores its large matrices this way: one-row products read them faster on XLA:CPU
  (goosejax.infer.decode). It stands where the [in, out] array would, also inside a Param
  (`param[...]` gives it back), so the model's code runs unchanged on either layout.
  """

  def __init__(self, w_out_in: jax.Array):
    self.w_out_in = w_out_in

  def __getitem__(self, index):
    if index is not Ellipsis:
      raise TypeError("a Transposed weight is only read whole (param[...])")
    return self

  def tree_flatten(self):
    return (self.w_out_in,), None

  @classmethod
  def tree_unflatten(cls, _, children):
    return cls(*children)


def matmul(x: jax.Array, w, out_dtype=None) -> jax.Array:
  """x @ w for w [in, out] (an array, or a `Transposed` one stored [out, in]), with w cast to
  x's dtype and fp32 accumulation at full precision; the result in `out_dtype` (default x's
  dtype). The one matrix product of the model: every linear layer, LoRA and the head."""
  w, axis = (w.w_out_in, 1) if isinstance(w, Transposed) else (w, 0)
  y = jax.lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (axis,)), ((), ())),
                          precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  return y.astype(out_dtype or x.dtype)


def split_heads(x_BTC: jax.Array, head_size: int) -> jax.Array:
  """[..., C] -> [..., H, N] with N = head_size: each head's channels are contiguous."""
  *lead, C = x_BTC.shape
  return x_BTC.reshape(*lead, C // head_size, head_size)


def merge_heads(x_BTHN: jax.Array) -> jax.Array:
  """[..., H, N] -> [..., C]: `split_heads` undone."""
  *lead, H, N = x_BTHN.shape
  return x_BTHN.reshape(*lead, H * N)
