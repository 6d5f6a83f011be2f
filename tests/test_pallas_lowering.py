"""The Pallas WKV-7 kernels lower, forward and backward, for TPU (Mosaic) and CUDA (Triton) from a CPU-only
machine, one platform per lowering call. This checks the JAX -> Mosaic / Triton IR lowering; Mosaic's
layout passes and the Triton compiler run only on the hardware."""
import jax
import jax.numpy as jnp
import pytest
from jax import lax

from goosejax.wkv import wkv7_reference
from pallas_kernels import platform_callables, wkv7_pallas

KERNEL_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
BACKEND = {"tpu": "tpu", "cuda": "triton"}
B, T, H, N = 2, 37, 4, 64  # T is not a multiple of any chunk size


def _inputs(dtype, with_extras=True):
  sequence = jax.ShapeDtypeStruct((B, T, H, N), dtype)
  state = jax.ShapeDtypeStruct((B, H, N, N), jnp.float32) if with_extras else None
  reset = jax.ShapeDtypeStruct((B, T), jnp.bool_) if with_extras else None
  return [sequence] * 6, state, reset


def _lowered_text(fn, args, platform):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_forward_and_backward_lower(platform, dtype):
  sequences, state, reset = _inputs(dtype)

  def loss(r, log_w, k, v, a, b, state, reset):
    y, state_end = wkv7_pallas(r, log_w, k, v, a, b, state, reset=reset, backend=BACKEND[platform],
                               interpret=False)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(state_end)

  text = _lowered_text(jax.grad(loss, argnums=tuple(range(7))), (*sequences, state, reset), platform)
  assert text.count(KERNEL_CALL[platform]) == 2
  assert f"wkv7_forward_{BACKEND[platform]}" in text
  assert f"wkv7_backward_{BACKEND[platform]}" in text


def test_triton_lowers_with_ieee_fp32_dots():
  sequences, state, reset = _inputs(jnp.float32)
  fn = lambda *x, reset: wkv7_pallas(*x, reset=reset, backend="triton", interpret=False,
                                     fp32_dot="highest")
  text = _lowered_text(lambda *x: fn(*x[:7], reset=x[7]), (*sequences, state, reset), "cuda")
  assert text.count(KERNEL_CALL["cuda"]) == 1


@pytest.mark.parametrize("platform,chunk_size", [("tpu", 64), ("cuda", 32)])
def test_forward_lowers_at_larger_chunks_without_state(platform, chunk_size):
  sequences, _, _ = _inputs(jnp.bfloat16, with_extras=False)
  fn = lambda *x: wkv7_pallas(*x, chunk_size=chunk_size, backend=BACKEND[platform], interpret=False)
  text = _lowered_text(fn, sequences, platform)
  assert text.count(KERNEL_CALL[platform]) == 1


@pytest.mark.parametrize("platform", ["tpu", "cuda", "cpu"])
def test_platform_dependent_lowers_only_its_platforms_kernel(platform):
  kernels = platform_callables()

  def reference(r, log_w, k, v, a, b, state, reset):
    return wkv7_reference(r, log_w, k, v, a, b, state, reset=reset)

  def loss(*args):
    y, state_end = lax.platform_dependent(*args, default=reference, **kernels)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(state_end)

  sequences, state, reset = _inputs(jnp.bfloat16)
  text = _lowered_text(jax.grad(loss, argnums=tuple(range(7))), (*sequences, state, reset), platform)
  for other, call in KERNEL_CALL.items():
    assert text.count(call) == (2 if other == platform else 0)


def _pallas_call_grids(jaxpr) -> list[tuple]:
  """The grid of every pallas_call in `jaxpr`, nested jaxprs (custom VJP, jit, scan) included."""
  grids = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      grids.append(eqn.params["grid_mapping"].grid)
    for param in eqn.params.values():
      for value in param if isinstance(param, (list, tuple)) else (param,):
        inner = getattr(value, "jaxpr", value)
        if hasattr(inner, "eqns"):
          grids += _pallas_call_grids(inner)
  return grids


@pytest.mark.parametrize("backend", ["tpu", "triton"])
@pytest.mark.parametrize("heads", [2, 3, 9], ids=["H2-groups-of-2", "H3-one-group", "H9-padded"])
def test_every_grid_dimension_is_a_python_int(backend, heads):
  """A grid dimension that is not a Python int (a NumPy integer, a traced value) is a dynamic
  grid bound to Pallas: passed at run time, refused by TPU interpret mode, and on v4 / v5p it can
  keep Mosaic from splitting a `parallel` dimension over the chip's two TensorCores. Every
  kernel (lean and checkpointing forward, backward) of every head grouping."""
  sequence = jax.ShapeDtypeStruct((B, T, heads, N), jnp.bfloat16)
  state = jax.ShapeDtypeStruct((B, heads, N, N), jnp.float32)
  reset = jax.ShapeDtypeStruct((B, T), jnp.bool_)
  run = lambda *x: wkv7_pallas(*x[:7], reset=x[7], backend=backend, interpret=False)
  loss = lambda *x: jnp.sum(run(*x)[0].astype(jnp.float32))
  grids = []
  for fn in (run, jax.grad(loss, argnums=tuple(range(7)))):
    grids += _pallas_call_grids(jax.make_jaxpr(fn)(*[sequence] * 6, state, reset).jaxpr)
  assert len(grids) == 3  # lean forward; checkpointing forward and backward
  for grid in grids:
    assert all(type(size) is int for size in grid), grid
