"""(I - L)^{-1} for a strictly lower-triangular L, with matmuls only.

The log-depth product (I + L)(I + L^2)(I + L^4)... is exact in exact arithmetic but loses
everything in fp32 over a whole 64-wide chunk when L is ill-conditioned (aligned removal keys
with in-context learning rate near 1: entries of L^k grow like binomials). So it is used only
on diagonal blocks of at most 16, and blocks are merged by block forward substitution,
doubling the block size each level:

    (I - [[L1, 0], [L21, L2]])^{-1} = [[X1, 0], [X2 L21 X1, X2]],   Xi = (I - Li)^{-1}.

Every level is one batched matmul pair over all blocks of that level, so the depth is
log2(C) and nothing runs a serial row loop.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

PRODUCT_FORM_MAX = 16  # largest block inverted with the product form


def _product_form_inverse(l_XBB, precision):
  """(I - L)^{-1} = (I + L)(I + L^2)(I + L^4)... for nilpotent L of size <= 16."""
  size = l_XBB.shape[-1]
  eye = jnp.eye(size, dtype=l_XBB.dtype)
  inverse_XBB = eye + l_XBB
  power_XBB = l_XBB
  span = 2  # the product so far covers L^0 .. L^(span-1)
  while span < size:
    power_XBB = jnp.matmul(power_XBB, power_XBB, precision=precision)
    inverse_XBB = inverse_XBB + jnp.matmul(inverse_XBB, power_XBB, precision=precision)
    span *= 2
  return inverse_XBB


def _diagonal_blocks(m_XCC, block: int):
  """[..., C, C] -> [..., C/block, block, block], the blocks on the diagonal."""
  count = m_XCC.shape[-1] // block
  return jnp.stack([m_XCC[..., i * block:(i + 1) * block, i * block:(i + 1) * block]
                    for i in range(count)], axis=-3)


def unit_lower_inverse(l_XCC, precision=None):
  """(I - L)^{-1} for strictly lower-triangular L of shape [..., C, C]; C a power of two.

  Only the strictly lower triangle of L is read. The derivative is the closed form
  dL = X^T dX X^T (strictly lower part), two matmuls instead of differentiating every level."""
  size = l_XCC.shape[-1]
  if size & (size - 1):
    raise ValueError(f"unit_lower_inverse: size {size} is not a power of two")
  return _inverse(precision, l_XCC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _inverse(precision, l_XCC):
  return _blocked_inverse(l_XCC, precision)


def _inverse_fwd(precision, l_XCC):
  inverse_XCC = _blocked_inverse(l_XCC, precision)
  return inverse_XCC, inverse_XCC


def _inverse_bwd(precision, inverse_XCC, d_inverse_XCC):
  inverse_t = jnp.swapaxes(inverse_XCC, -1, -2)
  d_l = jnp.matmul(jnp.matmul(inverse_t, d_inverse_XCC, precision=precision), inverse_t,
                   precision=precision)
  return (jnp.tril(d_l, -1),)


_inverse.defvjp(_inverse_fwd, _inverse_bwd)


def _blocked_inverse(l_XCC, precision):
  size = l_XCC.shape[-1]
  block = min(size, PRODUCT_FORM_MAX)
  inverse_XKBB = _product_form_inverse(_diagonal_blocks(l_XCC, block), precision)
  while block < size:
    # Merge block pairs (2i, 2i+1): the lower-left coupling block of each merged pair.
    pairs = size // (2 * block)
    coupling_XPBB = jnp.stack(
        [l_XCC[..., (2 * i + 1) * block:(2 * i + 2) * block, 2 * i * block:(2 * i + 1) * block]
         for i in range(pairs)], axis=-3)
    upper_XPBB = inverse_XKBB[..., 0::2, :, :]
    lower_XPBB = inverse_XKBB[..., 1::2, :, :]
    corner_XPBB = jnp.matmul(jnp.matmul(lower_XPBB, coupling_XPBB, precision=precision),
                             upper_XPBB, precision=precision)
    zeros_XPBB = jnp.zeros_like(upper_XPBB)
    top_XPB2B = jnp.concatenate([upper_XPBB, zeros_XPBB], axis=-1)
    bottom_XPB2B = jnp.concatenate([corner_XPBB, lower_XPBB], axis=-1)
    inverse_XKBB = jnp.concatenate([top_XPB2B, bottom_XPB2B], axis=-2)
    block *= 2
  return inverse_XKBB[..., 0, :, :]
