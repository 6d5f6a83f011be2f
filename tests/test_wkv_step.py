"""The WKV-7 single-token form (goosejax.wkv.single_token) against the reference recurrence: outputs,
state and gradients in float64 and float32; every T == 1 call of `wkv7` runs it."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from closeness import assert_close
from goosejax.wkv import IMPLEMENTATIONS, wkv7, wkv7_reference
from goosejax.wkv.single_token import wkv7_fused_step, wkv7_single_token
from wkv_inputs import make_inputs, recurrence

NAMES = ("r", "log_w", "k", "v", "a", "b", "state")


def _problem(seed=0, batch=3, heads=2, head_size=16, reset=True):
  """One token from a random state, with the hardest row of `make_inputs` (strongest decay,
  iclr -> 1) and, with `reset`, row 0 resetting before its token."""
  return make_inputs(np.random.default_rng(seed), batch=batch, length=1, heads=heads,
                     head_size=head_size, reset_rate=0.5 if reset else 0.0)


@pytest.mark.parametrize("dtype, tolerance", [(np.float64, 1e-12), (np.float32, 2e-6)])
def test_single_token_matches_the_recurrence(dtype, tolerance):
  inputs = _problem()
  y_want, final_want = recurrence(*inputs)
  *xs, state, reset = inputs
  with jax.enable_x64(dtype == np.float64):
    xs = [jnp.asarray(x, dtype) for x in xs]
    y, final = jax.jit(wkv7_single_token, static_argnums=8)(
        *xs, jnp.asarray(state, dtype), jnp.asarray(reset), jnp.dtype(dtype))
    assert y.dtype == dtype and final.dtype == dtype and y.shape == y_want.shape
  assert_close(y, y_want, tolerance, "y")
  assert_close(final, final_want, tolerance, "final state")


def test_fused_step_is_the_reference_step():
  """Without the reset and the dispatch around it: the one-read step equals wkv7_step."""
  from goosejax.wkv import wkv7_step
  r, log_w, k, v, a, b, state, _ = _problem(reset=False)
  with jax.enable_x64(True):
    token = [jnp.asarray(x[:, 0]) for x in (r, log_w, k, v, a, b)]
    token[1] = jnp.exp(token[1])
    y, final = wkv7_fused_step(jnp.asarray(state), *token)
    y_want, final_want = wkv7_step(jnp.asarray(state), *token)
  assert_close(y, y_want, 1e-12, "y")
  assert_close(final, final_want, 1e-12, "final state")


@functools.partial(jax.jit, static_argnames="fused")
def _gradients(inputs, reset, y_weight, final_weight, fused):
  """Gradients of a weighted sum of y and the final state w.r.t. r, log_w, k, v, a, b and the
  initial state: through wkv7's T == 1 path (fused) or the reference token scan."""
  def loss(*args):
    if fused:
      y, final = wkv7(*args[:6], args[6], reset=reset)
    else:
      y, final = wkv7_reference(*args[:6], args[6], reset=reset)
    return jnp.sum(y * y_weight) + jnp.sum(final * final_weight)
  return jax.grad(loss, argnums=tuple(range(7)))(*inputs)


@pytest.mark.parametrize("dtype, tolerance", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_gradients_match_the_reference(dtype, tolerance):
  """The model differentiates through T == 1 calls (training on one token, RNN-mode
  fine-tuning): autodiff through the fused step equals autodiff through the token scan."""
  rng = np.random.default_rng(5)
  *inputs, reset = _problem(seed=1)
  with jax.enable_x64(dtype == np.float64):
    inputs = tuple(jnp.asarray(x, dtype) for x in inputs)
    y_weight = jnp.asarray(rng.normal(size=inputs[0].shape), dtype)
    final_weight = jnp.asarray(rng.normal(size=inputs[6].shape), dtype)
    problem = (inputs, jnp.asarray(reset), y_weight, final_weight)
    got = _gradients(*problem, fused=True)
    want = _gradients(*problem, fused=False)
  for name, g, w in zip(NAMES, got, want):
    assert g.dtype == dtype
    assert np.abs(np.asarray(w)).max() > 0, name     # every input matters here
    assert_close(g, w, tolerance, f"d{name}")


@pytest.mark.parametrize("impl", [impl for impl in IMPLEMENTATIONS if impl != "reference"])
def test_every_t1_call_runs_the_single_step(impl):
  """T == 1 is one fused step whatever the sequence form asked for (no scan, no chunk
  padding, no kernel); impl="reference" stays the token scan."""
  numpy_inputs = _problem()
  inputs = tuple(jnp.asarray(x, jnp.float32 if x.dtype == np.float64 else None) for x in numpy_inputs)
  run = lambda *a: wkv7(*a[:6], a[6], reset=a[7], impl=impl)
  jaxpr = str(jax.make_jaxpr(run)(*inputs))
  assert "scan" not in jaxpr and "while" not in jaxpr and "pallas_call" not in jaxpr
  y_want, final_want = recurrence(*numpy_inputs)
  y, final = jax.jit(run)(*inputs)
  assert_close(y, y_want, 2e-6, "y")
  assert_close(final, final_want, 2e-6, "final state")
