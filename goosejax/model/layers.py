"""What every part of the model shares: its one matrix product and the head split of channels."""
from __future__ import annotations

import functools

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
  x's dtype, fp32 accumulation at full precision and the result in `out_dtype` (default x's
  dtype). The one matrix product of the model: every linear layer, LoRA and the head.

  The backward's products run in x's dtype too, as in torch's bf16 training: the product is
  made in x's dtype (MXU, cuBLAS and XLA:CPU accumulate a bf16 product in fp32), so its
  cotangent is bf16. Made in fp32 and then rounded, the cotangent would be fp32 and both
  backward products fp32 at HIGHEST precision: several MXU passes on TPU, no tensor cores on
  GPU, and [B, T, C] fp32 cotangents in memory.
  """
  w, axis = (w.w_out_in, 1) if isinstance(w, Transposed) else (w, 0)
  w = w.astype(x.dtype)
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  if out_dtype == x.dtype:
    return _product(x, w, axis, out_dtype)
  return _wide_product(x, w, axis, out_dtype)


def _product(x, w, axis: int, out_dtype) -> jax.Array:
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (axis,)), ((), ())),
                             precision=jax.lax.Precision.HIGHEST, preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _wide_product(x, w, axis: int, out_dtype) -> jax.Array:
  """x @ w in a wider dtype than x's (the head's fp32 logits from bf16 activations), with a
  backward in x's dtype: the cotangent is rounded to it first, as torch's autocast does."""
  return _product(x, w, axis, jnp.float32).astype(out_dtype)


def _wide_product_forward(x, w, axis, out_dtype):
  return _wide_product(x, w, axis, out_dtype), (x, w)


def _wide_product_backward(axis, out_dtype, residuals, dy):
  x, w = residuals
  dy = dy.astype(x.dtype)
  dx = jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (1 - axis,)), ((), ())),
                           precision=jax.lax.Precision.HIGHEST, preferred_element_type=x.dtype)
  leading = tuple(range(x.ndim - 1))
  dw_in_out = jax.lax.dot_general(x, dy, ((leading, leading), ((), ())),
                                  precision=jax.lax.Precision.HIGHEST,
                                  preferred_element_type=jnp.float32).astype(w.dtype)
  return dx, (dw_in_out if axis == 0 else dw_in_out.T)


_wide_product.defvjp(_wide_product_forward, _wide_product_backward)


def split_heads(x_BTC: jax.Array, head_size: int) -> jax.Array:
  """[..., C] -> [..., H, N] with N = head_size: each head's channels are contiguous."""
  *lead, C = x_BTC.shape
  return x_BTC.reshape(*lead, C // head_size, head_size)


def merge_heads(x_BTHN: jax.Array) -> jax.Array:
  """[..., H, N] -> [..., C]: `split_heads` undone."""
  *lead, H, N = x_BTHN.shape
  return x_BTHN.reshape(*lead, H * N)
