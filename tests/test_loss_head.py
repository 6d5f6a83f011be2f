"""The fused head + cross-entropy + L2Wrap (goosejax.train.loss_head, run.loss_vocab_tile)
against today's unfused head_logits -> cross_entropy -> l2wrap: the loss and its gradients
w.r.t. x and the head in float64 and float32, ties, vocabularies that are not a multiple of
the tile, the 8 fake devices' meshes, the whole model, and the compiled temporaries."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from goosejax import sharding
from goosejax.config import ConfigError, MeshConfig, load_config
from goosejax.model import RWKV7
from goosejax.model.rwkv7 import head_logits
from goosejax.train import recipe
from goosejax.train.loss_head import fused_head_loss
from closeness import assert_close

V = 40   # a multiple of none of the tiles below but 8, and split 2 or 4 ways by `tensor`


def mesh_of(data=1, fsdp=1, tensor=1, sequence=1):
  cfg = MeshConfig(data=data, fsdp=fsdp, tensor=tensor, sequence=sequence)
  return sharding.make_mesh(cfg, jax.devices()[:data * fsdp * tensor * sequence])


def unfused_loss(x_BTC, head_CV, targets_BT, l2wrap):
  """Today's loss; a float64 x gets float64 logits (head_logits' product is fp32 at most)."""
  if x_BTC.dtype == jnp.float64:
    logits_BTV = jax.lax.dot_general(x_BTC, head_CV, (((2,), (0,)), ((), ())),
                                     precision=jax.lax.Precision.HIGHEST)
  else:
    logits_BTV = head_logits(x_BTC, head_CV)
  loss = recipe.cross_entropy(logits_BTV, targets_BT)
  return recipe.l2wrap(loss, logits_BTV) if l2wrap else loss


def fused_loss(x_BTC, head_CV, targets_BT, l2wrap, tile, mesh=None):
  return fused_head_loss(x_BTC, head_CV, targets_BT, tile=tile, mesh=mesh,
                         l2wrap_scale=recipe.L2WRAP_SCALE if l2wrap else 0.0)


def loss_and_grads(loss_fn, x_BTC, head_CV, targets_BT):
  """(loss, d x, d head) of loss_fn(x, head, targets), jitted."""
  loss, (dx, dw) = jax.jit(jax.value_and_grad(loss_fn, (0, 1)))(x_BTC, head_CV, targets_BT)
  return loss, dx, dw


def inputs(dtype, B=2, T=6, C=8, vocab=V, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(B, T, C)), dtype),
          jnp.asarray(rng.normal(size=(C, vocab)) * 2, dtype if dtype == jnp.float64 else jnp.float32),
          jnp.asarray(rng.integers(0, vocab, (B, T)), jnp.int32))


def assert_same(fused, unfused, tolerance):
  for what, ours, reference in zip(("loss", "d x", "d head"), fused, unfused):
    assert ours.dtype == reference.dtype, what
    assert_close(ours, reference, tolerance, what)


@pytest.mark.parametrize("l2wrap", [True, False])
@pytest.mark.parametrize("tile", [7, 8, 16, 64])
def test_float64_equals_unfused(l2wrap, tile):
  with jax.enable_x64(True):
    x_BTC, head_CV, targets_BT = inputs(jnp.float64)
    fused = loss_and_grads(lambda *a: fused_loss(*a, l2wrap, tile), x_BTC, head_CV, targets_BT)
    unfused = loss_and_grads(lambda *a: unfused_loss(*a, l2wrap), x_BTC, head_CV, targets_BT)
    assert_same(fused, unfused, 1e-12)


@pytest.mark.parametrize("l2wrap", [True, False])
@pytest.mark.parametrize("tile", [7, 64])
def test_float32_equals_unfused(l2wrap, tile):
  x_BTC, head_CV, targets_BT = inputs(jnp.float32)
  fused = loss_and_grads(lambda *a: fused_loss(*a, l2wrap, tile), x_BTC, head_CV, targets_BT)
  unfused = loss_and_grads(lambda *a: unfused_loss(*a, l2wrap), x_BTC, head_CV, targets_BT)
  assert_same(fused, unfused, 2e-6)


def test_bfloat16_compute_keeps_the_dtypes():
  # bf16 x, fp32 master head: the loss fp32, d x bf16, d head fp32 (from bf16), as unfused
  x_BTC, head_CV, targets_BT = inputs(jnp.bfloat16)
  fused = loss_and_grads(lambda *a: fused_loss(*a, True, 7), x_BTC, head_CV, targets_BT)
  unfused = loss_and_grads(lambda *a: unfused_loss(*a, True), x_BTC, head_CV, targets_BT)
  assert [a.dtype for a in fused] == [jnp.float32, jnp.bfloat16, jnp.float32]
  assert_close(fused[0], unfused[0], 1e-6, "loss")
  assert_close(fused[1], unfused[1], 1e-2, "d x")      # one bf16 rounding apart at most
  assert_close(fused[2], unfused[2], 1e-2, "d head")


def tied_rows(C, ties):
  """A head whose row c holds the logits of a token with x = e_c: small integers (exact in
  any dtype) with the row's max repeated at the columns `ties[c]`."""
  rng = np.random.default_rng(3)
  head_CV = rng.integers(-3, 3, (C, V)).astype(np.float64)
  for c, columns in enumerate(ties):
    head_CV[c, list(columns)] = 5.0
  return head_CV


@pytest.mark.parametrize("mesh_shape", [None, (1, 1, 4), (2, 1, 2)])
def test_ties_push_the_first_top_logit(mesh_shape):
  # x one-hot per token, so row c of d head is token c's gradient on its logits: L2Wrap's
  # difference must sit on the first of the tied columns, as jnp.argmax picks. Ties within a
  # tile (3, 5), across tiles (3, 10), in the last tile's overlap (33 after 36: tile 7 of 40
  # ends at 35, the last tile starts at 33) and across tensor shards of 10 or 20 (12, 25).
  ties = [(3, 5), (3, 10, 39), (36, 33), (12, 25), (25, 39), (0, 1), (39,), (17, 24, 31)]
  C = len(ties)
  mesh = None if mesh_shape is None else mesh_of(*mesh_shape)
  with jax.enable_x64(True):
    x_BTC = jnp.eye(C, dtype=jnp.float64).reshape(2, C // 2, C)
    head_CV = jnp.asarray(tied_rows(C, ties))
    targets_BT = jnp.zeros((2, C // 2), jnp.int32)
    grads = [loss_and_grads(lambda *a: fused_loss(*a, l2wrap, 7, mesh), x_BTC, head_CV, targets_BT)[2]
             for l2wrap in (True, False)]
    push_CV = np.asarray(grads[0] - grads[1])
    top_C = np.argmax(np.asarray(head_CV), axis=-1)
    assert list(top_C) == [min(columns) for columns in ties]
    expected_CV = np.zeros_like(push_CV)
    expected_CV[np.arange(C), top_C] = recipe.L2WRAP_SCALE / C * 5.0
    np.testing.assert_allclose(push_CV, expected_CV, rtol=1e-10, atol=1e-18)
    unfused = loss_and_grads(lambda *a: unfused_loss(*a, True), x_BTC, head_CV, targets_BT)
    fused = loss_and_grads(lambda *a: fused_loss(*a, True, 7, mesh), x_BTC, head_CV, targets_BT)
    assert_same(fused, unfused, 1e-12)


@pytest.mark.parametrize("mesh_shape,B", [((8, 1, 1, 1), 8), ((1, 8, 1, 1), 8), ((1, 1, 4, 1), 8),
                                          ((2, 2, 2, 1), 8), ((2, 1, 2, 2), 8), ((1, 2, 1, 4), 8),
                                          ((1, 4, 2, 1), 2)])
def test_meshes_equal_unfused(mesh_shape, B):
  # (data, fsdp, tensor, sequence); the tensor meshes split V = 40 into 10 or 20 columns,
  # which tiles of 8 do not divide either; fsdp splits the head's 8 channels, and with 2 rows
  # over 4 shards the rows stay whole (fsdp then splits the head only)
  x_BTC, head_CV, targets_BT = inputs(jnp.float32, B=B, T=8)
  mesh = mesh_of(*mesh_shape)
  fused = loss_and_grads(lambda *a: fused_loss(*a, True, 8, mesh), x_BTC, head_CV, targets_BT)
  unfused = loss_and_grads(lambda *a: unfused_loss(*a, True), x_BTC, head_CV, targets_BT)
  assert_same(fused, unfused, 2e-6)


def test_a_negative_tile_is_refused():
  with pytest.raises(ConfigError, match="run.loss_vocab_tile"):
    load_config("tiny", ["run.loss_vocab_tile=-1"])
  with pytest.raises(ValueError, match="tile"):
    fused_head_loss(*inputs(jnp.float32), tile=0)


TINY = ["model.vocab_size=250", "model.n_layer=1", "data.ctx_len=16", "data.batch_size=4",
        "optimizer.grad_accum=2"]


def train_grads(overrides, mesh=None):
  cfg = load_config("tiny", TINY + overrides)
  graphdef, params = recipe.split_params(recipe.build_model(cfg))
  rng = np.random.default_rng(5)
  shape = (cfg.data.batch_size, cfg.data.ctx_len)
  batch = {"inputs": jnp.asarray(rng.integers(0, 250, shape), jnp.int32),
           "targets": jnp.asarray(rng.integers(0, 250, shape), jnp.int32)}
  return jax.jit(recipe.make_grad_fn(graphdef, cfg, mesh))(params, batch)


def assert_same_train_grads(fused, unfused, tolerance):
  assert_close(fused[0], unfused[0], tolerance, "loss")
  for name in unfused[1]:
    assert_close(fused[1][name], unfused[1][name], tolerance, name)


def test_train_step_gradients_equal_unfused():
  # the tiny model's loss and every parameter's gradient, L2Wrap on, 2 micro-batches, tiles of
  # 64 over 250 columns; and the same on a data x fsdp x tensor mesh
  unfused = train_grads([])
  assert_same_train_grads(train_grads(["run.loss_vocab_tile=64"]), unfused, 2e-5)
  assert_same_train_grads(train_grads(["run.loss_vocab_tile=64"], mesh_of(2, 2, 2)), unfused, 2e-5)


def test_whole_model_float64_equals_unfused():
  # the model run in float64 (not a config choice: the test builds it), every parameter's
  # gradient through the fused head against today's loss on float64 logits
  with jax.enable_x64(True):
    cfg = load_config("tiny", ["model.vocab_size=50", "model.n_layer=1"]).model
    model = RWKV7(dataclasses.replace(cfg, dtype="float64", param_dtype="float64"), rngs=nnx.Rngs(0))
    graphdef, params = recipe.split_params(model)
    rng = np.random.default_rng(0)
    tokens_BT, targets_BT = (jnp.asarray(rng.integers(0, 50, (2, 8)), jnp.int32) for _ in range(2))

    def loss(head_loss, params):
      model = recipe.merge_params(graphdef, params)
      x_BTC, _ = model.hidden_states(tokens_BT)
      return head_loss(x_BTC, model.head[...], targets_BT)

    fused = jax.jit(jax.value_and_grad(lambda p: loss(lambda *a: fused_loss(*a, True, 16), p)))(params)
    unfused = jax.jit(jax.value_and_grad(lambda p: loss(lambda *a: unfused_loss(*a, True), p)))(params)
    assert_same_train_grads(fused, unfused, 1e-12)


def test_eval_step_equals_unfused():
  cfg = load_config("tiny", TINY)
  graphdef, params = recipe.split_params(recipe.build_model(cfg))
  rng = np.random.default_rng(6)
  batch = {key: jnp.asarray(rng.integers(0, 250, (4, 16)), jnp.int32) for key in ("inputs", "targets")}
  fused = jax.jit(recipe.make_eval_step(graphdef, None, vocab_tile=100))(params, batch)
  assert_close(fused, jax.jit(recipe.make_eval_step(graphdef, None))(params, batch), 1e-6)


def temporaries(loss_fn, B, T, C, vocab):
  shapes = (jax.ShapeDtypeStruct((B, T, C), jnp.float32), jax.ShapeDtypeStruct((C, vocab), jnp.float32),
            jax.ShapeDtypeStruct((B, T), jnp.int32))
  compiled = jax.jit(jax.value_and_grad(loss_fn, (0, 1))).trace(*shapes).lower().compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_no_tokens_by_vocabulary_fp32_buffer():
  # where the logits dominate (C 16, V 4096, 4096 tokens: B T V x 4 bytes = 64 MiB), the fused
  # loss and gradients need a small part of that: the tile's [B, T, 256] is 4 MiB
  B, T, C, vocab = 1, 4096, 16, 4096
  logits_bytes = B * T * vocab * 4
  unfused = temporaries(lambda *a: unfused_loss(*a, True), B, T, C, vocab)
  fused = temporaries(lambda *a: fused_loss(*a, True, 256), B, T, C, vocab)
  assert unfused >= logits_bytes
  assert unfused - fused >= 0.75 * logits_bytes, (unfused, fused)
