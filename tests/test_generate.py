"""generate(): greedy and penalised tokens equal the official runtime's; sampling, streaming, errors.

Fixtures: tests/fixtures/make_generate_fixtures.py (run with torch + rwkv==0.8.32).
"""
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer

from closeness import assert_close
from goosejax.convert.official import official_to_params
from goosejax.infer import GenerationError, generate, official_occurrence_weights, sampling_probs
from goosejax.infer.sampling import SamplingConfig, draw
from goosejax.model import RWKV7
from goosejax.model.params import load_param_dict

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_generate_fixtures import random_checkpoint, weights_digest  # noqa: E402

CASES = json.loads((FIXTURES / "generate_official" / "cases.json").read_text())


@pytest.fixture(scope="module")
def model():
  state_dict = random_checkpoint(**{k: tuple(v) if k == "lora" else v
                                    for k, v in CASES["checkpoint"].items()})
  assert weights_digest(state_dict) == CASES["weights_sha256"], (
      "the random checkpoint no longer matches the fixture; rerun make_generate_fixtures.py")
  cfg, params = official_to_params(state_dict, "generate fixture")
  model = nnx.eval_shape(lambda: RWKV7(cfg, rngs=nnx.Rngs(0)))   # no init: weights come next
  load_param_dict(model, params)
  return model


def test_greedy_batch_of_ragged_prompts_matches_official(model):
  prompts = CASES["prompts"]
  names = "abcd"
  out = generate(model, [prompts[n] for n in names], 24, temperature=0)
  assert out == [CASES["greedy"][n] for n in names]


def test_greedy_from_a_cached_state_matches_official(model):
  prompts = CASES["prompts"]
  none, prefix_state = generate(model, prompts["prefix"], 0, return_state=True)
  assert none == []
  _, expected = model(jnp.asarray([prompts["prefix"]]))
  for name, ours, ref in zip(expected._fields, prefix_state, expected):
    assert_close(ours, ref, 1e-5, f"prefill state {name}")
  names = "abcd"
  # Batch-1 state shared by the ragged batch: the tail past the shortest prompt runs as
  # masked one-token steps.
  out = generate(model, [prompts[n] for n in names], 24, temperature=0, state=prefix_state)
  assert out == [CASES["greedy_after_prefix"][n] for n in names]


def test_official_pipeline_penalties_ban_and_stop(model):
  case = CASES["pipeline"]
  s = case["settings"]
  tokenizer = Tokenizer.from_file(str(FIXTURES / "generate_official" / "tokenizer.json"))
  weights = official_occurrence_weights(tokenizer.decode, model.config.vocab_size)
  assert 0 < np.sum(weights == 0) < 20     # space and digit tokens weigh nothing
  out = generate(model, case["context_ids"], case["token_count"], temperature=0,
                 presence_penalty=s["alpha_presence"], frequency_penalty=s["alpha_frequency"],
                 penalty_decay=s["alpha_decay"], banned_ids=s["token_ban"],
                 stop_ids=[case["stop_id"]], occurrence_weights=weights)
  assert case["stopped"] and out == case["tokens"]
  differ_at = case["unpenalised_differs_at"]     # the penalties matter in this run
  plain = generate(model, case["context_ids"], differ_at + 1, temperature=0, banned_ids=s["token_ban"])
  assert plain[:differ_at] == out[:differ_at] and plain[differ_at] != out[differ_at]


def test_sampler_distribution_matches_official():
  data = np.load(FIXTURES / "generate_official" / "sampler.npz")
  logits, official = data["logits"], data["probs"]
  for s, (temperature, top_p, top_k) in enumerate(data["settings"]):
    cfg = SamplingConfig(float(temperature), float(top_p), int(top_k))
    ours = np.asarray(sampling_probs(jnp.asarray(logits), cfg))
    # Row 3 ties 7 tokens at the top: which tied ids top-k keeps is the sort's choice.
    np.testing.assert_allclose(ours[:3], official[s, :3], atol=2e-7, rtol=1e-5)
    np.testing.assert_allclose(np.sort(ours[3]), np.sort(official[s, 3]), atol=2e-7, rtol=1e-5)


def _logit_gaps(model, prompt, tokens):
  """Per generated token: how far its logit lies below the step's largest logit."""
  logits = np.asarray(model(jnp.asarray([prompt + tokens[:-1]]))[0][0], np.float32)[len(prompt) - 1:]
  return np.max(logits, axis=-1) - logits[np.arange(len(tokens)), tokens]


def test_tiny_temperatures_sample_the_greedy_tokens(model):
  # probs ** (1 / T) used to give 0 / 0 here and then the last vocabulary id every step.
  prompts = [CASES["prompts"][n] for n in "ab"]
  greedy = generate(model, prompts, 10, temperature=0)
  for prompt, tokens in zip(prompts, greedy):
    logits = np.asarray(model(jnp.asarray([prompt + tokens[:-1]]))[0][0], np.float32)
    top2 = np.sort(logits[len(prompt) - 1:], axis=-1)[:, -2:]
    assert np.min(top2[:, 1] - top2[:, 0]) > 0.02      # runner-up odds <= exp(-0.02 / 1e-3)
  for temperature in (1e-3, 1e-6):
    assert generate(model, prompts, 10, temperature=temperature, top_p=0.85, seed=1) == greedy
  # At T = 1e-2 the random model's margins are too thin for exactly greedy, but every token
  # lies within 20 T of the top logit (others have odds below exp(-20) each).
  sampled = generate(model, prompts, 10, temperature=1e-2, top_p=0.85, seed=1)
  for prompt, tokens in zip(prompts, sampled):
    assert len(tokens) == 10 and np.all(_logit_gaps(model, prompt, tokens) < 0.2)


def test_draw_is_inverse_cdf_and_never_picks_zero_probability():
  probs = jnp.asarray([[0.0, 0.5, 0.0, 0.5, 0.0]] * 4)
  u = jnp.asarray([0.0, 0.49, 0.51, 1.0 - 1e-9])
  assert draw(probs, u).tolist() == [1, 1, 3, 3]


def test_sampling_streaming_equals_one_call_and_seeds_matter(model):
  prompts = [CASES["prompts"]["a"], CASES["prompts"]["d"]]
  kwargs = dict(temperature=0.9, top_p=0.9, top_k=40, presence_penalty=0.3,
                frequency_penalty=0.2, seed=3)
  whole = generate(model, prompts, 12, **kwargs)
  blocks = []
  streamed = generate(model, prompts, 12, callback=blocks.append, block_size=5, **kwargs)
  assert streamed == whole and all(len(row) == 12 for row in whole)
  assert [sum((b[r] for b in blocks), []) for r in range(2)] == whole
  assert len(blocks) == 3
  assert generate(model, prompts, 12, **{**kwargs, "seed": 4}) != whole


def test_stop_ends_only_its_row(model):
  prompts, greedy = CASES["prompts"], CASES["greedy"]
  at, stop = next((i, t) for i, t in enumerate(greedy["a"]) if i >= 2 and t not in greedy["a"][:i]
                  and all(t not in greedy[n] for n in "bcd"))
  out = generate(model, [prompts[n] for n in "abcd"], 24, temperature=0, stop_ids=[stop])
  assert out == [greedy["a"][:at]] + [greedy[n] for n in "bcd"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_ids=[[1, 2], []]), "prompt_ids\\[1\\] is empty"),
    (dict(prompt_ids=[1, 99999]), "outside \\[0, 320\\)"),
    (dict(prompt_ids=[1], temperature=-1), "temperature=-1"),
    (dict(prompt_ids=[1], top_p=1.5), "top_p=1.5"),
    (dict(prompt_ids=[1], stop_ids=[-3]), "stop_ids contains ids outside"),
    (dict(prompt_ids=[1], max_new_tokens=-1), "max_new_tokens=-1"),
    (dict(prompt_ids=[1], temperature=float("nan")), "temperature=nan"),
    (dict(prompt_ids=[1], temperature=float("inf")), "temperature=inf"),
    (dict(prompt_ids=[1], top_p=float("nan")), "top_p=nan"),
    (dict(prompt_ids=[1], presence_penalty=float("nan")), "presence_penalty=nan"),
    (dict(prompt_ids=[1], frequency_penalty=float("-inf")), "frequency_penalty=-inf"),
    (dict(prompt_ids=[1], penalty_decay=float("nan")), "penalty_decay=nan"),
    (dict(prompt_ids=[1], banned_ids=range(320)), "bans all 320 tokens"),
])
def test_bad_arguments_name_the_problem(model, kwargs, message):
  kwargs = {"max_new_tokens": 2, **kwargs}
  with pytest.raises(GenerationError, match=message):
    generate(model, **kwargs)
