"""Training with every sequence split over mesh.sequence (8 fake CPU devices): the loss and every
parameter gradient of the tiny model equal the unsplit step's, alone and mixed with data, fsdp,
tensor and gradient accumulation.

ctx 48 splits into spans of 24, 12 and 6 tokens for 2, 4 and 8 spans, none a multiple of the WKV
chunk size 16; the batch's document starts fall inside spans and exactly on span starts.
"""
from __future__ import annotations

import functools
import io

import jax
import numpy as np
import pytest

from closeness import assert_close
from goosejax import sharding
from goosejax.config import MeshConfig, load_config
from goosejax.train import CompiledSteps, recipe, train
from goosejax.train.batches import SyntheticBatches
from goosejax.train.metrics import read_metrics

CTX = 48
TINY = ["model.vocab_size=256", "model.wkv_chunk_size=16", f"data.ctx_len={CTX}",
        "data.batch_size=4", "run.remat=block"]


def _batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, size=(4, CTX + 1), dtype=np.int32)
  reset = np.zeros((4, CTX), bool)
  reset[0, [0, 7]] = True        # 7: inside a span for every split
  reset[1, [12, 24, 30]] = True  # 24 starts a span in every split, 12 with 4 and 8 spans
  reset[2, [6, 47]] = True       # a span start with 8 spans; the last token
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "reset": reset}  # row 3: none


@functools.cache
def _model(grad_accum: int, wkv_impl: str):
  cfg = load_config("tiny", TINY + [f"optimizer.grad_accum={grad_accum}", f"model.wkv_impl={wkv_impl}"])
  graphdef, params = recipe.split_params(recipe.build_model(cfg, seed=0))
  return cfg, graphdef, params


def _loss_and_grads(grad_accum=1, data=1, fsdp=1, tensor=1, sequence=1, wkv_impl="auto"):
  """(loss, gradients, the step's collective-permutes) with the train step's layout on this mesh."""
  cfg, graphdef, params = _model(grad_accum, wkv_impl)
  mesh = sharding.make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor, sequence=sequence),
                            jax.devices()[:data * fsdp * tensor * sequence])
  params_in = sharding.param_shardings(params, mesh)
  grad_fn = jax.jit(recipe.make_grad_fn(graphdef, cfg, mesh),
                    in_shardings=(params_in, sharding.batch_sharding(mesh)))
  lowered = grad_fn.lower(params, _batch())
  loss, grads = lowered.compile()(params, _batch())
  return loss, grads, lowered.as_text().count("collective_permute")


@functools.cache
def _unsplit(grad_accum: int):
  return _loss_and_grads(grad_accum)


CASES = {"seq2": dict(sequence=2), "seq4": dict(sequence=4), "seq8": dict(sequence=8),
         "fsdp2-tensor2-seq2": dict(fsdp=2, tensor=2, sequence=2),
         "data2-seq4-accum2": dict(data=2, sequence=4, grad_accum=2),
         # every span run by the Pallas kernel (interpreted here), against the unsplit XLA form
         "seq4-kernels": dict(sequence=4, wkv_impl="pallas")}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_split_sequences_give_the_unsplit_loss_and_gradients(case):
  loss, grads, permutes = _loss_and_grads(**CASES[case])
  loss_want, grads_want, _ = _unsplit(CASES[case].get("grad_accum", 1))
  assert permutes > 0  # the sequence-parallel WKV and token shift ran
  assert_close(loss, loss_want, 1e-5, "loss")
  assert set(grads) == set(grads_want)
  for name, grad in grads.items():
    assert_close(grad, grads_want[name], 1e-4, f"d{name}")


LONG_CTX = 16384


def _long_run(run_dir, stop_at_step, compiled_steps):
  cfg = load_config("tiny", ["model.vocab_size=256", f"data.ctx_len={LONG_CTX}", "data.batch_size=1",
                             "run.steps=3", "run.checkpoint_every=2", "run.log_every=1",
                             "run.tensorboard=false", "mesh.sequence=8"])
  out = io.StringIO()
  train(cfg, run_dir, train_batches=SyntheticBatches(256, LONG_CTX, 1), open_validation=lambda: None,
        stop_at_step=stop_at_step, out=out, progress_bar=False, compiled_steps=compiled_steps)
  return out.getvalue(), [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.slow
def test_long_context_trains_and_resumes(tmp_path):
  """ctx 16384 split over 8 devices (2048 tokens each): the loss falls, and a run stopped after
  step 2 resumes from its checkpoint to the uninterrupted run's step 3."""
  compiled = CompiledSteps()
  _, straight = _long_run(tmp_path / "straight", None, compiled)
  first, _ = _long_run(tmp_path / "resumed", 2, compiled)
  second, resumed = _long_run(tmp_path / "resumed", None, compiled)
  assert "'sequence': 8" in first and "resumed" in second
  assert len(straight) == 3 and straight[1] < straight[0]
  np.testing.assert_allclose(resumed, straight, rtol=1e-6)


def test_long_context_preset_splits_each_sequence_over_8_devices():
  cfg = load_config("long-context")
  assert cfg.mesh.shape(8) == {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 8}
  assert cfg.data.ctx_len == 65536 and cfg.data.ctx_len // 8 == 8192
  assert cfg.data.batch_size // cfg.optimizer.grad_accum == 1   # one sequence per micro-batch
