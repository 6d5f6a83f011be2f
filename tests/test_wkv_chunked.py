"""The chunked WKV-7 forms against the token recurrence: float64 values, float32 gradients."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from closeness import assert_close
from goosejax.wkv import wkv7_chunked, wkv7_reference
from wkv_inputs import make_inputs, recurrence

LENGTHS = (1, 2, 15, 16, 17, 63, 64, 65, 100, 300)
# (mode, intra, chunk size, lengths): every length in both modes at Q = 64, every length
# sequentially at Q = 16 and the multi-chunk ones associatively (each length is a separate
# associative-scan program to compile); Q = 32 is covered by the float64 gradient test, which
# runs the same forward.
FORWARD_CASES = [
    ("sequential", "matmul", 16, LENGTHS),
    ("sequential", "matmul", 64, LENGTHS),
    ("associative", "matmul", 16, (2, 17, 65, 300)),
    ("associative", "matmul", 64, LENGTHS),
    ("sequential", "recurrent", 16, LENGTHS),
]


@functools.partial(jax.jit, static_argnames=("mode", "intra", "chunk_size"))
def _chunked_many(cases, *, mode, intra, chunk_size):
  """One compile for a whole list of (inputs..., state, reset) of different lengths."""
  return [wkv7_chunked(*c[:6], c[6], reset=c[7], chunk_size=chunk_size, mode=mode, intra=intra,
                       dtype=c[0].dtype) for c in cases]


@pytest.fixture(scope="module")
def float64_cases():
  rng = np.random.default_rng(7)
  cases = {}
  for length in LENGTHS:
    inputs = make_inputs(rng, batch=2, length=length, heads=2, head_size=8)
    cases[length] = (inputs, recurrence(*inputs))
  return cases


@pytest.mark.parametrize("mode,intra,chunk_size,lengths", FORWARD_CASES,
                         ids=[f"{m}-{i}-Q{c}" for m, i, c, _ in FORWARD_CASES])
def test_float64_matches_token_recurrence(float64_cases, mode, intra, chunk_size, lengths):
  """Outputs and final state to 1e-9 with initial state, resets, strongest decays, iclr -> 1."""
  with jax.enable_x64(True):
    cases = [tuple(jnp.asarray(x) for x in float64_cases[t][0]) for t in lengths]
    results = _chunked_many(cases, mode=mode, intra=intra, chunk_size=chunk_size)
  for length, (y, final) in zip(lengths, results):
    y_want, final_want = float64_cases[length][1]
    assert y.dtype == jnp.float64 and y.shape == y_want.shape
    assert_close(y, y_want, 1e-9, f"y, T={length}")
    assert_close(final, final_want, 1e-9, f"final state, T={length}")


def test_reference_matches_numpy_recurrence(float64_cases):
  """The lax.scan oracle itself agrees with the NumPy loop (the same 1e-9 standard)."""
  with jax.enable_x64(True):
    inputs, (y_want, final_want) = float64_cases[100]
    *xs, state, reset = (jnp.asarray(x) for x in inputs)
    y, final = wkv7_reference(*xs, state, reset=reset)
  assert_close(y, y_want, 1e-9, "y")
  assert_close(final, final_want, 1e-9, "final state")


def _loss(y, final, y_weight, final_weight):
  return jnp.sum(y * y_weight) + jnp.sum(final * final_weight)


@functools.partial(jax.jit, static_argnames=("configs",))
def _gradients(inputs, reset, y_weight, final_weight, configs):
  """Gradients w.r.t. r, log_w, k, v, a, b and the initial state for each config (None = the
  reference token scan)."""
  grads = []
  for config in configs:
    def loss(*args, config=config):
      if config is None:
        y, final = wkv7_reference(*args[:6], args[6], reset=reset)
      else:
        mode, intra, chunk_size = config
        y, final = wkv7_chunked(*args[:6], args[6], reset=reset, chunk_size=chunk_size,
                                mode=mode, intra=intra, dtype=args[0].dtype)
      return _loss(y, final, y_weight, final_weight)
    grads.append(jax.grad(loss, argnums=tuple(range(7)))(*inputs))
  return grads


# The recurrent intra-chunk forward shares the sequential backward (tested here through
# "matmul") and its forward is checked in float64 above.
GRADIENT_CONFIGS = (("sequential", "matmul", 16), ("sequential", "matmul", 64),
                    ("associative", "matmul", 64))
NAMES = ("r", "log_w", "k", "v", "a", "b", "state")


def _gradient_problem(dtype, length=100):
  rng = np.random.default_rng(3)
  *inputs, reset = make_inputs(rng, batch=2, length=length, heads=2, head_size=16)
  inputs = tuple(jnp.asarray(x, dtype) for x in inputs)
  y_weight = jnp.asarray(rng.normal(size=inputs[0].shape), dtype)
  final_weight = jnp.asarray(rng.normal(size=inputs[6].shape), dtype)
  return inputs, jnp.asarray(reset), y_weight, final_weight


def test_float32_gradients_match_reference():
  """Every input's gradient (and the initial state's) within 2e-3 of autodiff through the scan."""
  problem = _gradient_problem(jnp.float32)
  reference, *chunked = _gradients(*problem, configs=(None,) + GRADIENT_CONFIGS)
  for config, grads in zip(GRADIENT_CONFIGS, chunked):
    for name, got, want in zip(NAMES, grads, reference):
      assert got.dtype == jnp.float32
      assert_close(got, want, 2e-3, f"{config} d{name}")


def test_float64_gradients_match_reference():
  """The custom VJP is exact: in float64 the gradients agree with the scan's to 1e-9."""
  configs = (("sequential", "matmul", 32), ("associative", "matmul", 32))
  with jax.enable_x64(True):
    problem = _gradient_problem(jnp.float64, length=65)
    reference, *chunked = _gradients(*problem, configs=(None,) + configs)
  for config, grads in zip(configs, chunked):
    for name, got, want in zip(NAMES, grads, reference):
      assert_close(got, want, 1e-9, f"{config} d{name}")


def _temp_bytes(fn, *args) -> int:
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_backward_memory_is_per_chunk_not_per_token():
  """Forward+backward temporaries: one state per chunk, not per token (compile only)."""
  shape = (1, 1024, 2, 64)
  inputs = [jax.ShapeDtypeStruct(shape, jnp.float32)] * 6
  state = jax.ShapeDtypeStruct((1, 2, 64, 64), jnp.float32)

  def grad_of(run):
    def loss(*x):
      y, final = run(*x)
      return jnp.sum(y) + jnp.sum(final)
    return jax.grad(loss, argnums=tuple(range(7)))
  scan = _temp_bytes(grad_of(lambda *x: wkv7_reference(*x[:6], x[6])), *inputs, state)
  chunked = _temp_bytes(grad_of(lambda *x: wkv7_chunked(*x[:6], x[6], chunk_size=32)),
                        *inputs, state)
  assert chunked * 10 <= scan, (chunked, scan)
