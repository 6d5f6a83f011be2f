"""The RWKV7 model: RNN / split / whole agreement, resets, bf16, jit, and the official init.

One tiny model with random (non-init) weights: the official init zeroes the output
projections, which would make every sequence give the same logits.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from goosejax.config import ModelConfig
from goosejax.model import RWKV7
from goosejax.model.params import load_param_dict, param_dict
from closeness import assert_close
from jitted_forward import forward

CFG = ModelConfig(vocab_size=97, n_layer=2, n_embd=128, head_size=64, decay_lora=32,
                  iclr_lora=32, value_lora=32, gate_lora=32)
T = 8


def abstract_model(cfg: ModelConfig) -> RWKV7:
  """Parameters as shapes only (running the init costs dozens of eager compiles)."""
  return nnx.eval_shape(lambda: RWKV7(cfg, rngs=nnx.Rngs(0)))


def randomized(cfg: ModelConfig, seed: int = 0) -> RWKV7:
  """A model whose every weight is random with a sensible scale (nothing zero)."""
  model = abstract_model(cfg)
  rng = np.random.default_rng(seed)
  params = {}
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name, shape = ".".join(map(str, path)), variable.shape
    if len(shape) >= 3 or name in ("emb", "head"):        # matrices: [L, in, out], [V,C], [C,V]
      scale = 1.0 if name == "emb" else shape[-2] ** -0.5
      params[name] = scale * rng.standard_normal(shape)
    elif name.endswith(("weight", "k_a", "k_k")):         # norm gains and multipliers near 1
      params[name] = 1 + 0.1 * rng.standard_normal(shape)
    else:                                                 # lerps, biases, LoRA biases
      params[name] = rng.uniform(-1, 1, shape)
  load_param_dict(model, params)
  return model


MODEL = randomized(CFG)
TOKENS = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (2, T)), jnp.int32)


@functools.cache
def whole():
  return forward(MODEL, TOKENS)


def test_logits_are_fp32_and_state_has_the_documented_layout():
  logits, state = whole()
  L, C, H, N = CFG.n_layer, CFG.n_embd, CFG.n_head, CFG.head_size
  assert logits.shape == (2, T, CFG.vocab_size) and logits.dtype == jnp.float32
  assert state.att_shift_LBC.shape == (L, 2, C) and state.ffn_shift_LBC.shape == (L, 2, C)
  assert state.wkv_LBHNN.shape == (L, 2, H, N, N) and state.wkv_LBHNN.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  # random weights: different sequences must give different logits (the test can fail)
  assert np.abs(np.asarray(logits[0] - logits[1])).max() > 1e-2


def test_rnn_mode_matches_whole_sequence():
  logits, final = whole()
  state, steps = None, []
  for t in range(T):
    step_logits, state = forward(MODEL, TOKENS[:, t:t + 1], state)
    steps.append(step_logits[:, 0])
  assert_close(jnp.stack(steps, 1), logits, what="step logits")
  for name in final._fields:
    assert_close(getattr(state, name), getattr(final, name), what=f"step state {name}")


def test_rnn_mode_gradients_match_the_token_scan():
  """A T = 1 call runs the WKV operator's fused single step; training through it (RNN-mode
  fine-tuning) gives the gradients of the token-scan reference, parameters and state alike."""
  reference = abstract_model(dataclasses.replace(CFG, wkv_impl="reference"))
  load_param_dict(reference, param_dict(MODEL))
  _, state = whole()
  weight = jnp.asarray(np.random.default_rng(2).normal(size=(2, 1, CFG.vocab_size)), jnp.float32)

  @functools.partial(jax.jit, static_argnums=0)
  def grads(graphdef, params, state):
    def loss(params, state):
      logits, new_state = nnx.merge(graphdef, params)(TOKENS[:, :1], state)
      return jnp.sum(logits * weight) + jnp.sum(new_state.wkv_LBHNN)
    return jax.grad(loss, argnums=(0, 1))(params, state)

  got_params, got_state = grads(*nnx.split(MODEL), state)
  want_params, want_state = grads(*nnx.split(reference), state)
  for (path, got), (_, want) in zip(nnx.to_flat_state(got_params), nnx.to_flat_state(want_params)):
    assert_close(got[...], want[...], 1e-5, f"d{'.'.join(map(str, path))}")
  for name, got, want in zip(state._fields, got_state, want_state):
    assert_close(got, want, 1e-5, f"d state {name}")


def test_split_with_carried_state_matches_whole_sequence():
  logits, final = whole()
  first, state = forward(MODEL, TOKENS[:, :T // 2])
  second, state = forward(MODEL, TOKENS[:, T // 2:], state)
  assert_close(jnp.concatenate([first, second], 1), logits, what="split logits")
  for name in final._fields:
    assert_close(getattr(state, name), getattr(final, name), what=f"split state {name}")


def test_reset_equals_two_fresh_calls_per_row():
  """Row 0 restarts at position 3; row 1 has no reset and must equal the plain call."""
  r = 3
  reset = jnp.zeros((2, T), bool).at[0, r].set(True)
  logits, _ = forward(MODEL, TOKENS, reset_BT=reset)
  first, _ = forward(MODEL, TOKENS[:1, :r])
  second, _ = forward(MODEL, TOKENS[:1, r:])
  assert_close(logits[0], jnp.concatenate([first, second], 1)[0], what="reset row")
  assert_close(logits[1], whole()[0][1], what="row without reset")
  # and the reset really changed something
  assert np.abs(np.asarray(logits[0, r:] - whole()[0][0, r:])).max() > 1e-3


def test_reset_at_start_ignores_the_incoming_state():
  _, carried = whole()
  reset = jnp.zeros((2, T), bool).at[:, 0].set(True)
  logits, state = forward(MODEL, TOKENS, carried, reset)
  fresh, fresh_state = whole()
  assert_close(logits, fresh, what="logits after reset at 0")
  assert_close(state.wkv_LBHNN, fresh_state.wkv_LBHNN, what="wkv after reset at 0")


def test_jit_matches_eager():
  eager, eager_state = MODEL(TOKENS[:, :4])
  jitted, jitted_state = forward(MODEL, TOKENS[:, :4])
  assert_close(jitted, eager, 1e-5, "jit vs eager logits")
  assert_close(jitted_state.wkv_LBHNN, eager_state.wkv_LBHNN, 1e-5, "jit vs eager state")


def test_bf16_compute_runs_and_is_close_to_fp32():
  import dataclasses
  model = abstract_model(dataclasses.replace(CFG, dtype="bfloat16"))
  load_param_dict(model, param_dict(MODEL))
  logits, state = forward(model, TOKENS)
  assert logits.dtype == jnp.float32
  assert state.wkv_LBHNN.dtype == jnp.float32 and state.att_shift_LBC.dtype == jnp.bfloat16
  reference = np.asarray(whole()[0])
  error = np.abs(np.asarray(logits) - reference).max() / np.abs(reference).max()
  assert 0 < error < 0.05, f"bf16 vs fp32 relative logit error {error:.3g}"
  # the top choice agrees almost everywhere
  agree = (np.asarray(logits).argmax(-1) == reference.argmax(-1)).mean()
  assert agree >= 0.8, f"bf16 and fp32 argmax agree on only {agree:.0%} of positions"


def test_bad_inputs_are_rejected_with_shapes_in_the_message():
  with pytest.raises(ValueError, match=r"tokens must be \[batch, time\]"):
    MODEL(TOKENS[0])
  with pytest.raises(ValueError, match=r"reset_BT has shape \(2, 3\)"):
    MODEL(TOKENS, reset_BT=jnp.zeros((2, 3), bool))


# ----------------------------------------------------------------------------- official init


INIT_CFG = ModelConfig(vocab_size=300, n_layer=3, n_embd=128, head_size=64, decay_lora=32,
                       iclr_lora=32, value_lora=32, gate_lora=64)


@functools.cache
def init_params():
  return {k: np.asarray(v, np.float64) for k, v in
          param_dict(RWKV7(INIT_CFG, rngs=nnx.Rngs(0))).items()}


def spec_ramps(layer: int):
  """The helper quantities of docs/architecture.md#initialisation-and-optimizer, written from the table."""
  L, C, N = INIT_CFG.n_layer, INIT_CFG.n_embd, INIT_CFG.head_size
  i = np.arange(C, dtype=np.float64)
  r01, r10 = layer / (L - 1), 1 - layer / L
  ddd, lin = i / C, i / (C - 1) - 0.5
  q = ((i % N) - (N - 1) / 2) / ((N - 1) / 2)
  zz = q * np.abs(q)
  www = -6 + 6 * (i / (C - 1)) ** (1 + r01**0.3)
  return r10, ddd, lin, zz, www


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_init_vectors_follow_the_spec_formulas(layer):
  p = init_params()
  r10, ddd, lin, zz, www = spec_ramps(layer)
  L = INIT_CFG.n_layer
  expected = {
      "blocks.att.x_r": 1 - ddd ** (0.2 * r10), "blocks.att.x_g": 1 - ddd ** (0.2 * r10),
      "blocks.att.x_w": 1 - ddd ** (0.9 * r10), "blocks.att.x_a": 1 - ddd ** (0.9 * r10),
      "blocks.att.x_k": 1 - ddd ** (0.7 * r10), "blocks.att.x_v": 1 - ddd ** (0.7 * r10),
      "blocks.att.w0": www + 0.5 + 2.5 * zz, "blocks.att.a0": -0.19 + 0.3 * zz + 0.4 * lin,
      "blocks.att.v0": 0.73 - 0.4 * lin, "blocks.att.k_k": 0.71 - 0.1 * lin,
      "blocks.att.k_a": np.full_like(lin, 1.02),
      "blocks.att.ln_x_weight": np.full_like(lin, ((layer + 1) / L) ** 0.7),
      "blocks.att.ln_x_bias": np.zeros_like(lin),
      "blocks.ffn.x_k": 1 - ddd ** (r10**4),
  }
  for name, values in expected.items():
    np.testing.assert_allclose(p[name][layer], values, rtol=1e-6, atol=1e-6, err_msg=name)
  np.testing.assert_array_equal(p["blocks.att.r_k"][layer], -0.04 * np.ones((2, 64), np.float32))


# Each matrix's scale in RWKV-LM @524481d, RWKV-v7/train_temp/src/model.py, written out here
# (not taken from goosejax.model.init) so a changed constant there fails this test.
# generate_init_weight, lines 936-963: orthogonal gain 1.0 for every other 2-D weight.
RWKV_LM_ORTHOGONAL_GAINS = {
    "blocks.att.receptance": 1.0,   # line 914 default scale = 1.0
    "blocks.att.key": 0.1,          # line 944-946: ".att.key." -> 0.1
    "blocks.att.value": 1.0,        # line 914 default
    "blocks.ffn.key": 1.0,          # line 914 default; no sqrt(4C/C) factor (RWKV-5/6 only)
}
RWKV_LM_ZERO = ("blocks.att.output", "blocks.ffn.value")   # line 938: the `zero` list
RWKV_LM_LORA_UP_GAIN = 0.1        # lines 549-565: ortho_init(zeros(D, C), 0.1), D < C -> gain 1
RWKV_LM_LORA_DOWN = ("blocks.att.w1", "blocks.att.a1", "blocks.att.v1", "blocks.att.g1")  # torch.zeros


def columns_gram(stored_in_out: np.ndarray) -> np.ndarray:
  """W^T W of the official [out, in] weight, from goosejax's [in, out] storage."""
  return stored_in_out @ stored_in_out.T


def test_init_matrices_follow_rwkv_lm():
  p = init_params()
  C, V = INIT_CFG.n_embd, INIT_CFG.vocab_size
  for name in RWKV_LM_ZERO + RWKV_LM_LORA_DOWN + ("blocks.att.ln_x_bias",):
    assert not p[name].any(), f"{name} should start at zero"
  for name in ("blocks.att.w2", "blocks.att.a2", "blocks.att.v2", "blocks.att.g2"):
    for up in p[name]:                                   # [D, C], rows orthonormal * 0.1
      assert_close(up @ up.T, RWKV_LM_LORA_UP_GAIN**2 * np.eye(up.shape[0]), 1e-5, name)
  for name, gain in RWKV_LM_ORTHOGONAL_GAINS.items():
    for w in p[name]:                                    # official [out, in] has orthonormal
      assert_close(columns_gram(w), gain**2 * np.eye(C), 1e-5, name)   # columns (out >= in)
  # Lines 927-933: head.weight [V, C] orthogonal with gain 0.5 * sqrt(V / C) when V > C.
  assert_close(columns_gram(p["head"]), 0.25 * (V / C) * np.eye(C), 1e-5, "head")
  # Lines 922-925: emb.weight uniform in [-1e-4, 1e-4].
  assert np.abs(p["emb"]).max() <= 1e-4 and np.abs(p["emb"]).max() > 5e-5
  for name in ("ln0.weight", "ln_out.weight", "blocks.ln1.weight", "blocks.ln2.weight"):
    assert (p[name] == 1).all(), name
