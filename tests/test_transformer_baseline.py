"""The causal Transformer baseline: causality, rotary positions, the recipe's parameter groups,
and that the shared training function trains it."""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from goosejax.config import ModelConfig, OptimizerConfig
from goosejax.data.synthetic import GroupWordProblem, make_group
from goosejax.train import recipe

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
from synthetic_training import Budget, accuracy_by_position, masked_cross_entropy, train  # noqa: E402
from transformer_baseline import CausalTransformer, apply_rotary, rotary_angles  # noqa: E402

CFG = ModelConfig(vocab_size=11, n_layer=2, n_embd=32, head_size=8)


def _model(cfg=CFG, seed=0):
  return CausalTransformer(cfg, rngs=nnx.Rngs(seed))


def test_logits_shape_and_dtype():
  logits_BTV, state = _model()(jnp.zeros((3, 7), jnp.int32))
  assert logits_BTV.shape == (3, 7, 11) and logits_BTV.dtype == jnp.float32
  assert state is None


def test_causal_changing_a_token_changes_only_later_logits():
  model = _model()
  tokens_BT = jax.random.randint(jax.random.key(1), (2, 12), 0, 11)
  changed_BT = tokens_BT.at[:, 7].set((tokens_BT[:, 7] + 1) % 11)
  before, _ = model(tokens_BT)
  after, _ = model(changed_BT)
  np.testing.assert_array_equal(before[:, :7], after[:, :7])
  assert np.abs(np.asarray(before[:, 7:] - after[:, 7:])).min(axis=-1).max() > 0
  assert not np.allclose(before[:, 7:], after[:, 7:], atol=1e-4)


def test_rotary_scores_depend_only_on_relative_position():
  cos, sin = rotary_angles(16, 8)
  q_N, k_N = jax.random.normal(jax.random.key(0), (2, 8))
  rotate = lambda x_N: apply_rotary(jnp.broadcast_to(x_N, (1, 16, 1, 8)), cos, sin)[0, :, 0]
  q_TN, k_TN = rotate(q_N), rotate(k_N)
  np.testing.assert_allclose(jnp.linalg.norm(q_TN, axis=-1), jnp.linalg.norm(q_N), rtol=1e-5)
  np.testing.assert_allclose(q_TN[5] @ k_TN[2], q_TN[13] @ k_TN[10], rtol=1e-4)
  assert not np.isclose(q_TN[5] @ k_TN[2], q_TN[5] @ k_TN[3], rtol=1e-3)


def test_odd_head_size_is_refused():
  with pytest.raises(ValueError, match="even head_size"):
    _model(ModelConfig(vocab_size=11, n_layer=1, n_embd=9, head_size=3))


def test_recipe_groups_match_rwkv7s():
  """The weight matrices decay under make_optimizer's groups, norms do not, as in RWKV-7."""
  _, params = recipe.split_params(_model())
  groups = {name: recipe.param_group(name) for name in params}
  decayed = {name for name, group in groups.items() if group == "decay"}
  assert decayed == {"emb", "head", "blocks.att.receptance", "blocks.att.key", "blocks.att.value",
                     "blocks.att.output", "blocks.ffn.key", "blocks.ffn.value"}
  assert all(params[name].ndim == 1 or name.startswith("blocks.ln")
             for name in groups if name not in decayed)


def test_masked_cross_entropy_ignores_unmasked_positions():
  logits_BTV = jax.random.normal(jax.random.key(0), (2, 5, 7))
  targets_BT = jnp.zeros((2, 5), jnp.int32)
  mask_BT = jnp.array([[1, 0, 1, 0, 0], [0, 0, 1, 0, 1]], bool)
  scrambled_BTV = jnp.where(mask_BT[..., None], logits_BTV, 100.0 * logits_BTV)
  loss = masked_cross_entropy(logits_BTV, targets_BT, mask_BT)
  np.testing.assert_allclose(loss, masked_cross_entropy(scrambled_BTV, targets_BT, mask_BT), rtol=1e-6)
  all_BT = jnp.ones((2, 5), bool)
  np.testing.assert_allclose(masked_cross_entropy(logits_BTV, targets_BT, all_BT),
                             recipe.cross_entropy(logits_BTV, targets_BT), rtol=1e-6)


def test_training_function_learns_a_word_problem():
  """Z60 words of two elements (the answer is a sum mod 60 of the last two inputs): two
  independent models side by side, both from the same start, both learn."""
  group = make_group("Z60")
  cfg = ModelConfig(vocab_size=60, n_layer=1, n_embd=64, head_size=16)
  budget = Budget(steps=150, batch_size=64, optimizer=OptimizerConfig(lr_init=1e-2, lr_final=1e-3))
  sources = [GroupWordProblem(group, 2, 150 * 64, seed) for seed in (0, 1)]
  trained = train(_model(cfg), sources, budget)
  assert trained.params_G["head"].shape == (2, 64, 60)
  assert not np.array_equal(trained.params_G["head"][0], trained.params_G["head"][1])
  correct, scored = accuracy_by_position(trained, [GroupWordProblem(group, 2, 256, 9)] * 2, 64)
  assert scored.shape == (2, 2) and (scored == 256).all()
  assert (correct[:, 0] / 256 > 0.9).all()                 # position 0 copies its input
  assert (trained.final_loss_G < 0.6 * np.log(60)).all()


def test_training_is_deterministic():
  """Same seeds, same data -> bitwise the same parameters (what makes the table reproducible)."""
  cfg = ModelConfig(vocab_size=60, n_layer=1, n_embd=32, head_size=8)
  budget = Budget(steps=5, batch_size=8, optimizer=OptimizerConfig(lr_init=1e-2))
  source = [GroupWordProblem(make_group("A5"), 6, 40, 0)]
  first, second = (train(_model(cfg), source, budget) for _ in range(2))
  for name, value in first.params_G.items():
    np.testing.assert_array_equal(value, second.params_G[name], err_msg=name)
