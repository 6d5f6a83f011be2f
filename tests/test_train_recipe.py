"""The training recipe: parameter groups, AdamW update, schedule, L2Wrap, cross-entropy,
micro-batching (gradient accumulation end to end: tests/test_train_loop.py)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goosejax.config import ConfigError, OptimizerConfig, load_config
from goosejax.train import recipe

TINY = ["model.vocab_size=256", "data.ctx_len=16", "data.batch_size=8", "run.steps=12"]


def test_param_groups_follow_rwkv_lm():
  _, shapes = recipe.abstract_model(load_config("tiny", TINY))
  groups = {name: recipe.param_group(name) for name in shapes}
  assert [n for n, g in groups.items() if g == "w0"] == ["blocks.att.w0"]
  decay = {n for n, g in groups.items() if g == "decay"}
  assert decay == {"emb", "head", "blocks.att.receptance", "blocks.att.key", "blocks.att.value",
                   "blocks.att.output", "blocks.ffn.key", "blocks.ffn.value"}
  # Decay only on big matrices; LoRAs are matrices too but never decay.
  assert all(len(shapes[n].shape) >= 2 for n in decay)
  for lora in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"):
    assert groups[f"blocks.att.{lora}"] == "no_decay"


def test_learning_rate_warmup_then_cosine():
  opt = OptimizerConfig(lr_init=1e-3, lr_final=1e-4, warmup_steps=10)
  lr = lambda step: float(recipe.learning_rate(step, opt, 110))
  assert lr(0) == pytest.approx(1e-5)                      # 1% at the first step
  assert lr(5) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))
  assert lr(10) == pytest.approx(1e-3)
  f = 0.1
  assert lr(60) == pytest.approx(1e-3 * ((1 + f) / 2 + (1 - f) / 2 * math.cos(math.pi * 0.5)))
  assert lr(110) == pytest.approx(1e-4)
  assert lr(500) == pytest.approx(1e-4)                     # clipped progress
  after_warmup = [lr(s) for s in range(10, 111)]
  assert all(a >= b for a, b in zip(after_warmup, after_warmup[1:]))


def test_adamw_groups_first_update():
  opt = OptimizerConfig(lr_init=1e-2, lr_final=1e-3, warmup_steps=0, weight_decay=0.5,
                        grad_clip=0.0)
  names = ["blocks.att.w0", "emb", "blocks.att.w1"]
  params = {n: jnp.full((2, 3), 2.0) for n in names}
  grads = {n: jnp.array([[0.5, -1.0, 2.0], [1e-3, -3.0, 4.0]]) for n in names}
  tx = recipe.make_optimizer(opt, 100, names)
  updates, _ = tx.update(grads, tx.init(params), params)
  # First Adam step with bias correction: m_hat / sqrt(v_hat) = sign(g) (eps 1e-18).
  sign = np.sign(np.asarray(grads["emb"]))
  lr = 1e-2
  np.testing.assert_allclose(updates["blocks.att.w1"], -lr * sign, rtol=1e-6)
  np.testing.assert_allclose(updates["blocks.att.w0"], -2 * lr * sign, rtol=1e-6)
  np.testing.assert_allclose(updates["emb"], -lr * (sign + 0.5 * 2.0), rtol=1e-6, atol=1e-7)


def test_clipping_then_adam_over_two_steps():
  opt = OptimizerConfig(lr_init=1.0, lr_final=1.0, warmup_steps=0, weight_decay=0.0, grad_clip=1.0)
  tx = recipe.make_optimizer(opt, 10, ["a"])
  params = {"a": jnp.zeros(2)}
  g1, g2 = np.array([30.0, 40.0]), np.array([0.3, -0.4])   # norms 50 (clipped) and 0.5
  state = tx.init(params)
  _, state = tx.update({"a": jnp.asarray(g1)}, state, params)
  update2, _ = tx.update({"a": jnp.asarray(g2)}, state, params)
  c1 = g1 / 50.0
  m = 0.9 * (0.1 * c1) + 0.1 * g2
  v = 0.99 * (0.01 * c1**2) + 0.01 * g2**2
  expected = -(m / (1 - 0.9**2)) / (np.sqrt(v / (1 - 0.99**2)) + 1e-18)
  np.testing.assert_allclose(update2["a"], expected, rtol=1e-5)


def test_cross_entropy_matches_log_softmax():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 3, 7)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 7, (2, 3)))
  expected = -np.mean(np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)),
                                         np.asarray(targets)[..., None], -1))
  assert float(recipe.cross_entropy(logits, targets)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("outer_scale", [1.0, 3.0])
def test_l2wrap_pushes_the_top_logit(outer_scale):
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 3, 5)) * 4, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 5, (2, 3)))
  plain = lambda l: outer_scale * recipe.cross_entropy(l, targets)
  wrapped = lambda l: outer_scale * recipe.l2wrap(recipe.cross_entropy(l, targets), l)
  assert float(wrapped(logits)) == float(plain(logits))           # loss value unchanged
  top = np.asarray(jnp.argmax(logits, -1))
  expected = np.zeros(logits.shape, np.float32)
  for b in range(2):
    for t in range(3):
      expected[b, t, top[b, t]] = outer_scale * 1e-4 / 6 * float(logits[b, t].max())
  # The custom VJP itself: the loss gradient passes through, the logits get the push.
  _, vjp = jax.vjp(recipe.l2wrap, jnp.float32(2.5), logits)
  through, pushed = vjp(jnp.float32(outer_scale))
  assert float(through) == outer_scale
  np.testing.assert_allclose(pushed, expected, rtol=1e-6)
  # And inside a loss: the total gradient is cross-entropy's plus the push.
  extra = np.asarray(jax.grad(wrapped)(logits) - jax.grad(plain)(logits))
  np.testing.assert_allclose(extra, expected, rtol=0, atol=3e-8 * outer_scale)


def test_micro_batches_interleave_rows():
  batch = {"inputs": jnp.arange(8)[:, None] * jnp.ones((1, 3), jnp.int32)}
  micro = recipe._micro_batches(batch, 2)["inputs"]
  assert micro.shape == (2, 4, 3)
  np.testing.assert_array_equal(micro[0, :, 0], [0, 2, 4, 6])
  np.testing.assert_array_equal(micro[1, :, 0], [1, 3, 5, 7])


def test_trainable_config_checks():
  with pytest.raises(ConfigError, match="param_dtype"):
    recipe.check_trainable(load_config("tiny", TINY + ["model.param_dtype=bfloat16"]))
  with pytest.raises(ConfigError, match="grad_accum"):
    recipe.check_trainable(load_config("tiny", TINY + ["optimizer.grad_accum=3"]))
