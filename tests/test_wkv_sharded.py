"""The WKV-7 kernels under a multi-device mesh: each device runs its own rows and heads.

On 8 fake CPU devices the kernels run in the Pallas interpreter inside `shard_map`; outputs,
final states and every gradient must equal the unsharded XLA chunked form. Shapes are not
multiples of the chunk size, with resets and the strongest decays (wkv_inputs.make_inputs).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from goosejax.wkv import wkv7
from wkv_inputs import make_inputs, relative_error

MESHES = {"data2-fsdp2-tensor2": (2, 2, 2), "fsdp4-tensor2": (1, 4, 2), "data8": (8, 1, 1)}


def _mesh(shape):
  return jax.make_mesh(shape, ("data", "fsdp", "tensor"), devices=jax.devices()[:8],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _loss_and_grads(impl, mesh, inputs):
  """(loss, y, final state, gradients of all seven differentiable inputs) under `mesh`."""
  *xs, state, reset = inputs
  weights_y = jnp.asarray(np.random.default_rng(7).normal(size=xs[0].shape), jnp.float32)
  weights_s = jnp.asarray(np.random.default_rng(8).normal(size=state.shape), jnp.float32)

  def loss(r, log_w, k, v, a, b, state):
    y, final = wkv7(r, log_w, k, v, a, b, state, reset=reset, impl=impl, chunk_size=16)
    return jnp.sum(y * weights_y) + jnp.sum(final * weights_s), (y, final)

  def run(*args):
    if mesh is None:
      return jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True)(*args)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True)(*args)

  args = (*xs, state)
  if mesh is not None:
    rows_heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    state_sharding = NamedSharding(mesh, P(("data", "fsdp"), "tensor", None, None))
    args = tuple(jax.device_put(x, rows_heads) for x in xs) + (jax.device_put(state, state_sharding),)
  (value, (y, final)), grads = jax.jit(run)(*args)
  return value, y, final, grads


@functools.cache
def _problem():
  numpy_inputs = make_inputs(np.random.default_rng(3), batch=8, length=37, heads=2, head_size=16)
  return tuple(jnp.asarray(x, jnp.float32 if x.dtype == np.float64 else None) for x in numpy_inputs)


@functools.cache
def _unsharded():
  return _loss_and_grads("chunked", None, _problem())


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_kernels_match_the_unsharded_xla_form(mesh_name):
  value, y, final, grads = _loss_and_grads("pallas", _mesh(MESHES[mesh_name]), _problem())
  ref_value, ref_y, ref_final, ref_grads = _unsharded()
  assert abs(float(value) - float(ref_value)) <= 1e-5 * abs(float(ref_value))
  assert relative_error(y, ref_y) < 1e-5 and relative_error(final, ref_final) < 1e-5
  for name, g, ref in zip(("r", "log_w", "k", "v", "a", "b", "state"), grads, ref_grads):
    assert relative_error(g, ref) < 1e-4, f"d{name}: {relative_error(g, ref):.2e}"


def test_auto_emits_one_kernel_per_device_under_a_mesh():
  """Lowered for TPU under a mesh, auto's forward+backward holds the Mosaic kernels inside a
  shard_map (a manual computation), not the XLA form on gathered inputs."""
  *xs, state, reset = _problem()
  mesh = _mesh((2, 2, 2))

  def loss(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      y, final = wkv7(*args, state, reset=reset, impl="auto")
      return jnp.sum(y) + jnp.sum(final)

  text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(*xs).lower(
      lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") == 2          # forward and backward kernels
  assert "shard_map" in text or "sdy.manual_computation" in text
