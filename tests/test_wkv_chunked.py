"""The chunked WKV-7 forms against the token recurrence: float64 values, float32 gradients."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goosejax.wkv import (apply_affine, chunk_forward, chunk_summary, chunk_terms, combine_affine,
                          wkv7_chunked, wkv7_reference)
from goosejax.wkv.triangular import unit_lower_inverse
from wkv_inputs import make_inputs, recurrence, relative_error

LENGTHS = (1, 2, 15, 16, 17, 63, 64, 65, 100, 300)
# (mode, intra, chunk size, group, lengths): every length in both modes at C = 64, every
# length sequentially at C = 16 and the multi-chunk ones associatively (each length is a
# separate associative-scan program to compile); C = 32 is covered by the float64 gradient
# test, which runs the same forward. Groups of 3 chunks also pad to a multiple of 3 chunks.
FORWARD_CASES = [
    ("sequential", "matmul", 16, 3, LENGTHS),
    ("sequential", "matmul", 64, 1, LENGTHS),
    ("associative", "matmul", 16, 1, (2, 17, 65, 300)),
    ("associative", "matmul", 64, 1, LENGTHS),
    ("sequential", "recurrent", 16, 1, LENGTHS),
]


@functools.partial(jax.jit, static_argnames=("mode", "intra", "chunk_size", "group"))
def _chunked_many(cases, *, mode, intra, chunk_size, group):
  """One compile for a whole list of (inputs..., state, reset) of different lengths."""
  return [wkv7_chunked(*c[:6], c[6], reset=c[7], chunk_size=chunk_size, mode=mode, intra=intra,
                       group=group, dtype=c[0].dtype) for c in cases]


@pytest.fixture(scope="module")
def float64_cases():
  rng = np.random.default_rng(7)
  cases = {}
  for length in LENGTHS:
    inputs = make_inputs(rng, batch=2, length=length, heads=2, head_size=8)
    cases[length] = (inputs, recurrence(*inputs))
  return cases


@pytest.mark.parametrize("mode,intra,chunk_size,group,lengths", FORWARD_CASES,
                         ids=[f"{m}-{i}-C{c}-G{g}" for m, i, c, g, _ in FORWARD_CASES])
def test_float64_matches_token_recurrence(float64_cases, mode, intra, chunk_size, group, lengths):
  """Outputs and final state to 1e-9 with initial state, resets, strongest decays, iclr -> 1."""
  with jax.enable_x64(True):
    cases = [tuple(jnp.asarray(x) for x in float64_cases[t][0]) for t in lengths]
    results = _chunked_many(cases, mode=mode, intra=intra, chunk_size=chunk_size, group=group)
  for length, (y, final) in zip(lengths, results):
    y_want, final_want = float64_cases[length][1]
    assert y.dtype == jnp.float64 and y.shape == y_want.shape
    assert relative_error(y, y_want) < 1e-9, (length, relative_error(y, y_want))
    assert relative_error(final, final_want) < 1e-9, (length, relative_error(final, final_want))


def test_reference_matches_numpy_recurrence(float64_cases):
  """The lax.scan oracle itself agrees with the NumPy loop (the same 1e-9 standard)."""
  with jax.enable_x64(True):
    inputs, (y_want, final_want) = float64_cases[100]
    *xs, state, reset = (jnp.asarray(x) for x in inputs)
    y, final = wkv7_reference(*xs, state, reset=reset)
  assert relative_error(y, y_want) < 1e-9 and relative_error(final, final_want) < 1e-9


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
        mode, intra, chunk_size, group = config
        y, final = wkv7_chunked(*args[:6], args[6], reset=reset, chunk_size=chunk_size,
                                mode=mode, intra=intra, group=group, dtype=args[0].dtype)
      return _loss(y, final, y_weight, final_weight)
    grads.append(jax.grad(loss, argnums=tuple(range(7)))(*inputs))
  return grads


# The recurrent intra-chunk forward shares the sequential backward (tested here through
# "matmul") and its forward is checked in float64 above.
GRADIENT_CONFIGS = (("sequential", "matmul", 16, 2), ("sequential", "matmul", 64, 1),
                    ("associative", "matmul", 64, 1))
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
      assert relative_error(got, want) < 2e-3, (config, name, relative_error(got, want))


def test_float64_gradients_match_reference():
  """The custom VJP is exact: in float64 the gradients agree with the scan's to 1e-9."""
  configs = (("sequential", "matmul", 32, 1), ("associative", "matmul", 32, 1))
  with jax.enable_x64(True):
    problem = _gradient_problem(jnp.float64, length=65)
    reference, *chunked = _gradients(*problem, configs=(None,) + configs)
  for config, grads in zip(configs, chunked):
    for name, got, want in zip(NAMES, grads, reference):
      assert relative_error(got, want) < 1e-9, (config, name, relative_error(got, want))


@pytest.mark.parametrize("size", [16, 32, 64])
def test_unit_lower_inverse(size):
  rng = np.random.default_rng(size)
  strict = np.tril(rng.normal(size=(3, size, size)) / np.sqrt(size), -1)
  with jax.enable_x64(True):
    got = unit_lower_inverse(jnp.asarray(strict))
  want = np.linalg.inv(np.eye(size) - strict)
  assert relative_error(got, want) < 1e-12
  # The worst case in fp32: aligned removal keys, iclr = 1, strongest decay (entries of L^k
  # grow like binomials, which breaks the product form over a whole 64 chunk).
  g = -0.606531 * np.arange(size)
  aligned = -np.exp(g[:, None] - g[None, :] - 0.606531) * np.tri(size, k=-1)
  got = unit_lower_inverse(jnp.asarray(aligned, jnp.float32))
  assert relative_error(got, np.linalg.inv(np.eye(size) - aligned)) < 1e-6


def test_unit_lower_inverse_rejects_other_sizes():
  with pytest.raises(ValueError, match="power of two"):
    unit_lower_inverse(jnp.zeros((24, 24)))


def test_chunk_summaries_compose_like_the_sequence():
  """(M, B) summaries combined by associative_scan give every chunk's incoming state, and
  combine_affine is associative."""
  rng = np.random.default_rng(11)
  with jax.enable_x64(True):
    r, log_w, k, v, a, b, state, _ = (jnp.asarray(x) for x in
                                      make_inputs(rng, batch=4, length=16, heads=1, head_size=8))
    # the batch axis plays the chunk axis: four consecutive chunks of one head
    terms = chunk_terms(*(x[:, :, 0] for x in (r, log_w, k, v, a, b)))
    summaries = chunk_summary(terms)
    prefix_m, prefix_b = jax.lax.associative_scan(combine_affine, summaries)
    current = state[0, 0]
    for chunk in range(4):
      chunk_terms_c = jax.tree.map(lambda x, c=chunk: x[c], terms)
      _, current = chunk_forward(current, chunk_terms_c)
      via_prefix = apply_affine(state[0, 0], (prefix_m[chunk], prefix_b[chunk]))
      assert relative_error(via_prefix, current) < 1e-12
    first, second, third = (jax.tree.map(lambda x, c=c: x[c], summaries) for c in range(3))
    left = combine_affine(combine_affine(first, second), third)
    right = combine_affine(first, combine_affine(second, third))
    for x, y in zip(left, right):
      assert relative_error(x, y) < 1e-12


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
