"""The pure functional model (goosejax.model.functional) under jit, vmap, grad and donation."""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from closeness import assert_close
from goosejax.model import functional
from goosejax.model.state import RWKV7State

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_infer import TOKENS, build  # noqa: E402


@pytest.fixture(scope="module")
def model():
  return build()


@pytest.fixture(scope="module")
def params(model):
  return functional.model_params(model)


def _prefix_states(model, count):
  """`count` different states of batch 2 (after prefixes of different lengths)."""
  return [model(TOKENS[:, :n + 1])[1] for n in range(count)]


def test_forward_under_jit_is_the_module(model, params):
  start = _prefix_states(model, 1)[0]
  reset = jnp.zeros(TOKENS.shape, bool).at[1, 2].set(True)
  expected_logits, expected_state = model(TOKENS, start, reset_BT=reset)
  logits, state = jax.jit(functional.forward)(params, TOKENS, start, reset)
  assert_close(logits, expected_logits, 1e-5, "logits")
  for name, ours, ref in zip(RWKV7State._fields, state, expected_state):
    assert_close(ours, ref, 1e-5, name)
  x, _ = jax.jit(functional.hidden_states)(params, TOKENS, start, reset)
  assert_close(functional.logits(params, x), expected_logits, 1e-5, "hidden_states + logits")
  assert params.arrays["emb"] is model.emb[...]          # the model's arrays, not copies
  assert params.config == model.config


def test_vmap_over_a_batch_of_states(model, params):
  states = _prefix_states(model, 3)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  logits_S, states_S = jax.jit(jax.vmap(functional.forward, in_axes=(None, None, 0)))(
      params, TOKENS, stacked)
  for i, start in enumerate(states):
    expected_logits, expected_state = model(TOKENS, start)
    assert_close(logits_S[i], expected_logits, 1e-5, f"logits of state {i}")
    assert_close(states_S.wkv_LBHNN[i], expected_state.wkv_LBHNN, 1e-5, f"wkv of state {i}")


def _loss(params, state):
  logits, _ = functional.forward(params, TOKENS[:, :-1], state)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, TOKENS[:, 1:, None], axis=-1))


def _direction(key, tree):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) * (jnp.std(x) + 1e-2)
                            for k, x in zip(keys, leaves)])


def test_grad_wrt_params_and_initial_state_matches_finite_differences(model, params):
  """Directional derivatives <grad, d> against central differences of the loss. The model
  computes in float32 whatever its inputs (its norms, WKV and matmuls accumulate in fp32), so
  the differences are taken in float32 with a step where rounding (~1e-7 / eps) and the
  step's own error (~eps^2) both stay below the 2% tolerance."""
  start = _prefix_states(model, 2)[1]
  loss_and_grads = jax.jit(jax.value_and_grad(_loss, argnums=(0, 1)))
  _, (grad_params, grad_state) = loss_and_grads(params, start)
  assert set(grad_params.arrays) == set(params.arrays)
  loss = jax.jit(_loss)
  for i, (wrt, tree) in enumerate((("params", params), ("state", start))):
    for trial in range(2):
      d = _direction(jax.random.key(10 * i + trial), tree)
      analytic = sum(jnp.vdot(g, v) for g, v in zip(
          jax.tree.leaves(grad_params if wrt == "params" else grad_state), jax.tree.leaves(d)))
      eps = 3e-3
      shifted = lambda sign: jax.tree.map(lambda x, v: x + sign * eps * v, tree, d)
      at = lambda t: loss(t, start) if wrt == "params" else loss(params, t)
      numeric = (at(shifted(1.0)) - at(shifted(-1.0))) / (2 * eps)
      assert abs(float(analytic)) > 1e-3, f"{wrt}: a vanishing derivative tests nothing"
      np.testing.assert_allclose(float(analytic), float(numeric), rtol=2e-2,
                                 err_msg=f"d loss / d {wrt}, direction {trial}")


def test_donated_state_is_consumed_and_the_result_unchanged(model, params):
  start = _prefix_states(model, 1)[0]
  expected_logits, expected_state = jax.jit(functional.forward)(params, TOKENS, start)
  donated = jax.tree.map(jnp.copy, start)
  logits, state = jax.jit(functional.forward, donate_argnums=2)(params, TOKENS, donated)
  assert all(x.is_deleted() for x in donated)
  assert_close(logits, expected_logits, 0.0, "logits")
  for name, ours, ref in zip(RWKV7State._fields, state, expected_state):
    assert_close(ours, ref, 0.0, name)
