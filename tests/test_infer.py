"""The inference building blocks agree with the model: one-token step, prefill, pure decode loop."""
import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from closeness import assert_close
from goosejax.convert.official import official_to_params
from goosejax.infer import decode_loop, decode_step, decode_weights, generate, prefill_last
from goosejax.infer.generate import init_carry
from goosejax.infer.sampling import SamplingConfig
from goosejax.model import RWKV7
from goosejax.model.params import load_param_dict

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
from make_generate_fixtures import random_checkpoint  # noqa: E402

SMALL = dict(seed=3, n_layer=2, n_embd=128, vocab_size=96, lora=(32, 32, 32, 64))


def build(dtype: str = "float32") -> RWKV7:
  cfg, params = official_to_params(random_checkpoint(**SMALL))
  cfg = dataclasses.replace(cfg, dtype=dtype)
  model = nnx.eval_shape(lambda: RWKV7(cfg, rngs=nnx.Rngs(0)))
  load_param_dict(model, params)
  return model


@pytest.fixture(scope="module")
def model():
  return build()


TOKENS = jnp.asarray([[3, 0, 95, 17, 42, 8], [1, 2, 3, 4, 5, 6]], jnp.int32)


def _steps(model, tokens_BT):
  step = jax.jit(decode_step)
  weights = decode_weights(model)
  state = model.init_state(tokens_BT.shape[0])
  logits = []
  for t in range(tokens_BT.shape[1]):
    out, state = step(weights, tokens_BT[:, t], state)
    logits.append(out)
  return jnp.stack(logits, 1), state


def test_decode_step_equals_the_sequence_model(model):
  ref_logits, ref_state = model(TOKENS)
  logits, state = _steps(model, TOKENS)
  scale = float(jnp.max(jnp.abs(ref_logits)))
  assert float(jnp.max(jnp.abs(logits - ref_logits))) < 1e-5 * scale
  for name, ours, ref in zip(ref_state._fields, state, ref_state):
    assert_close(ours, ref, 1e-5, f"decode state {name}")


def test_decode_step_is_the_model_on_one_token_per_row(model):
  """The decoder is the model's own code on per-layer weights: one step from a carried state
  equals model(tokens_B1, state), logits and every part of the state, with the layers
  unrolled (no scan) and the WKV operator's single-token step (no token scan either)."""
  _, state = model(TOKENS[:, :4])
  weights = decode_weights(model)
  jaxpr = str(jax.make_jaxpr(decode_step)(weights, TOKENS[:, 4], state))
  assert "scan" not in jaxpr and "while" not in jaxpr
  logits, new_state = jax.jit(decode_step)(weights, TOKENS[:, 4], state)
  ref_logits, ref_state = model(TOKENS[:, 4:5], state)
  assert logits.dtype == jnp.float32
  assert_close(logits, ref_logits[:, 0], 1e-5, "decode logits")
  for name, ours, ref in zip(ref_state._fields, new_state, ref_state):
    assert ours.dtype == ref.dtype
    assert_close(ours, ref, 1e-5, f"decode state {name}")


def test_decode_step_in_bfloat16_tracks_the_bfloat16_model():
  model = build("bfloat16")
  ref_logits, ref_state = model(TOKENS)
  logits, state = _steps(model, TOKENS)
  assert state.att_shift_LBC.dtype == jnp.bfloat16 and state.wkv_LBHNN.dtype == jnp.float32
  err = float(jnp.max(jnp.abs(logits - ref_logits))) / float(jnp.max(jnp.abs(ref_logits)))
  assert err < 0.03


def test_prefill_last_equals_the_models_last_logits(model):
  ref_logits, ref_state = model(TOKENS)
  logits, state = prefill_last(model, TOKENS)
  assert_close(logits, ref_logits[:, -1], 1e-5, "prefill_last logits")
  for name, ours, ref in zip(ref_state._fields, state, ref_state):
    assert_close(ours, ref, 1e-5, f"prefill_last state {name}")


def test_the_pure_decode_loop_composes_with_jit(model):
  weights = decode_weights(model)
  cfg = SamplingConfig(temperature=0.0)
  V = model.config.vocab_size

  @jax.jit
  def greedy_tokens(weights, tokens_BT):
    logits, state = model(tokens_BT)
    carry = init_carry(logits[:, -1], state, 7, 0)
    no_tokens = jnp.zeros((V,), bool)
    carry = decode_loop(weights, carry, jnp.int32(7), cfg, no_tokens, no_tokens, jnp.ones((V,)))
    return carry.tokens_BT

  tokens = greedy_tokens(weights, TOKENS)
  assert tokens.tolist() == generate(model, TOKENS, 7, temperature=0)


def test_prefill_split_equals_prefill_last_with_a_state_and_resets(model):
  """Resets and an incoming state; prefill_last itself is checked against the model above."""
  from goosejax.infer.prefill import prefill_split
  from goosejax.model.state import join_state, split_state
  _, start = model(TOKENS[:, :2])
  reset = jnp.zeros(TOKENS.shape, bool).at[1, 3].set(True)
  ref_logits, ref_state = prefill_last(model, TOKENS, start, reset_BT=reset)
  logits, layers = prefill_split(decode_weights(model), TOKENS, split_state(start), reset_BT=reset)
  assert_close(logits, ref_logits, 1e-5, "prefill_split logits")
  for name, ours, ref in zip(ref_state._fields, join_state(layers), ref_state):
    assert_close(ours, ref, 1e-5, f"prefill_split state {name}")


def test_prefill_and_decoding_run_the_kernel_self_check_once_per_trace(counted_kernel_checks):
  """The unrolled layers of prefill and decoding share one self-check outcome per trace (a
  CPU process posing as a TPU host, with a check that counts its runs), not one per layer."""
  from goosejax.config import load_config
  from goosejax.infer.prefill import prefill_split
  from goosejax.model.state import split_state
  model = RWKV7(load_config("tiny", ["model.n_layer=3", "model.wkv_impl=pallas"]).model,
                rngs=nnx.Rngs(0))
  tokens_BT = jnp.arange(2 * 40, dtype=jnp.int32).reshape(2, 40) % 256
  prefill_split(decode_weights(model), tokens_BT, split_state(model.init_state(2)))
  assert len(counted_kernel_checks) == 1, counted_kernel_checks
