"""The sampler against a NumPy transcription of the official pipeline's numpy path, on the
cases the official-runtime fixture does not reach: the top-p bisection fallback, argmax ties,
inverse-CDF draws over many blocks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goosejax.infer.sampling import (TOP_P_CANDIDATES, SamplingConfig, argmax, draw,
                                     sampling_probs)

sampling_probs_jit = jax.jit(sampling_probs, static_argnums=1)


def official_probs(logits: np.ndarray, temperature: float, top_p: float, top_k: int) -> np.ndarray:
  """rwkv==0.8.32 PIPELINE.sample_logits on CPU, up to its np.random.choice (one row)."""
  e = np.exp(logits - logits.max())
  probs = (e / e.sum()).astype(np.float32)
  sorted_ids = np.argsort(probs, kind="stable")
  sorted_probs = probs[sorted_ids][::-1]
  cutoff = float(sorted_probs[np.argmax(np.cumsum(sorted_probs) >= top_p)])
  probs[probs < cutoff] = 0
  if 0 < top_k < len(probs):
    probs[sorted_ids[:-top_k]] = 0
  if temperature != 1.0:
    probs = probs ** (1.0 / temperature)
  return probs / np.sum(probs)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 0.9), (0.8, 0.5), (1.5, 0.97)])
def test_top_p_beyond_the_candidates_uses_the_exact_bisection(temperature, top_p):
  rng = np.random.default_rng(int(top_p * 100))
  logits = (0.3 * rng.standard_normal((3, 5000))).astype(np.float32)   # flat: a wide nucleus
  ours = np.asarray(sampling_probs_jit(jnp.asarray(logits), SamplingConfig(temperature, top_p)))
  for row in range(3):
    ref = official_probs(logits[row], temperature, top_p, 0)
    assert np.count_nonzero(ref) > TOP_P_CANDIDATES
    assert np.array_equal(ours[row] > 0, ref > 0)
    np.testing.assert_allclose(ours[row], ref, rtol=1e-5, atol=1e-9)


def test_top_k_keeps_exactly_k_and_top_p_inside_it():
  rng = np.random.default_rng(3)
  logits = (2.0 * rng.standard_normal((2, 3000))).astype(np.float32)
  for top_p, top_k in ((0.3, 50), (0.999, 7)):
    ours = np.asarray(sampling_probs_jit(jnp.asarray(logits), SamplingConfig(1.0, top_p, top_k)))
    for row in range(2):
      ref = official_probs(logits[row], 1.0, top_p, top_k)
      assert np.count_nonzero(ours[row]) == np.count_nonzero(ref) <= top_k
      np.testing.assert_allclose(ours[row], ref, rtol=1e-5, atol=1e-9)


def test_argmax_takes_the_first_of_ties():
  x = jnp.asarray([[0.0, 3.0, 1.0, 3.0], [-1.0, -2.0, -1.0, -5.0], [2.0, 2.0, 2.0, 2.0]])
  assert argmax(x).tolist() == [1, 0, 0]
  big = np.random.default_rng(0).standard_normal((4, 70000)).astype(np.float32)
  assert argmax(jnp.asarray(big)).tolist() == np.argmax(big, axis=-1).tolist()


def test_draw_matches_the_inverse_cdf_and_skips_zero_probabilities():
  rng = np.random.default_rng(1)
  V = 1000                                  # four blocks of 256, the last one padded
  probs = rng.random((1, V)).astype(np.float32) * (rng.random((1, V)) < 0.3)
  probs /= probs.sum()
  cdf = np.cumsum(probs[0].astype(np.float64))
  u = rng.random(400)
  ours = np.asarray(draw(jnp.asarray(np.repeat(probs, len(u), 0)), jnp.asarray(u, jnp.float32)))
  for token, value in zip(ours, u):
    target = value * cdf[-1]
    if np.min(np.abs(cdf - target)) < 1e-6:
      continue                              # too close to a boundary for float32 to decide
    assert token == np.searchsorted(cdf, target, side="right")
  edges = draw(jnp.asarray(np.repeat(probs, 2, 0)), jnp.asarray([0.0, 1.0 - 1e-9], jnp.float32))
  assert all(probs[0, t] > 0 for t in np.asarray(edges))


@pytest.mark.parametrize("temperature", [1e-2, 1e-3, 1e-6, 1e-40])
def test_tiny_temperatures_concentrate_on_the_top_kept_tokens(temperature):
  # probs ** (1 / T) underflows to 0 / 0 here; the distribution must stay finite and normalised.
  logits = np.array([[0.0, 2.0, 1.0, -3.0, 1.9],        # clear top token: id 1
                     [5.0, 1.0, 5.0, 0.0, -1.0],        # tied top tokens: ids 0 and 2
                     [-40.0, -38.0, -39.0, -41.0, -45.0]], np.float32)   # far below zero
  for top_p, top_k in ((1.0, 0), (0.9, 0), (0.5, 2)):
    probs = np.asarray(sampling_probs(jnp.asarray(logits), SamplingConfig(temperature, top_p, top_k)))
    assert np.all(np.isfinite(probs)) and np.allclose(probs.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(probs[0], [0, 1, 0, 0, 0], atol=1e-6 if temperature < 1e-2 else 1e-4)
    np.testing.assert_allclose(probs[1], [0.5, 0, 0.5, 0, 0], atol=1e-6)
    np.testing.assert_allclose(probs[2], [0, 1, 0, 0, 0], atol=1e-6)
    draws = np.asarray(draw(jnp.asarray(probs), jnp.asarray([0.0, 0.3, 0.999999], jnp.float32)))
    assert draws[0] == 1 and draws[1] in (0, 2) and draws[2] == 1


def test_tempering_keeps_the_official_result_and_the_kept_set():
  rng = np.random.default_rng(5)
  logits = (3.0 * rng.standard_normal((2, 600))).astype(np.float32)
  for temperature, top_p, top_k in ((0.3, 0.8, 0), (0.05, 0.95, 30), (2.5, 0.6, 0)):
    ours = np.asarray(sampling_probs_jit(jnp.asarray(logits), SamplingConfig(temperature, top_p, top_k)))
    for row in range(2):
      ref = official_probs(logits[row], temperature, top_p, top_k)
      dropped = official_probs(logits[row], 1.0, top_p, top_k) == 0
      assert np.all(ours[row][dropped] == 0)      # never a token the cut dropped
      np.testing.assert_allclose(ours[row], ref, rtol=1e-4, atol=1e-8)
