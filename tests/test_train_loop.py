"""The training loop in-process on one device: exact resume, checkpoints (keep N, atomic,
other meshes, load_pretrained), NaN stop, logs and the FLOPs formula."""
import io
import json
import math

import jax
import numpy as np
import pytest

import goosejax
from goosejax import sharding
from goosejax.checkpoint.format import checkpoint_steps
from goosejax.config import ConfigError, MeshConfig, load_config
from goosejax.train import CompiledSteps, NonFiniteLossError, recipe, train
from goosejax.train.batches import SyntheticBatches
from goosejax.train.run_checkpoints import CheckpointError, TrainCheckpointer
from goosejax.train.metrics import flops_per_token, read_metrics

# The same settings as tests/test_sharding.py, so the compiled single-device step is shared.
TINY = ["model.vocab_size=256", "data.ctx_len=16", "data.batch_size=8", "run.steps=12",
        "run.checkpoint_every=4", "run.log_every=4", "run.eval_every=6", "run.eval_batches=1",
        "run.tensorboard=false", "run.peak_tflops=0.05"]
# One compiled train/eval step per distinct setting for the whole test session.
COMPILED_STEPS = CompiledSteps(max_entries=16)


def one_device():
  return sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])


class PoisonedBatches(SyntheticBatches):
  """Synthetic batches with an out-of-vocabulary token in batch `bad` (0-based): the
  embedding lookup fills it with NaN, as a diverging run would produce."""

  def __init__(self, bad: int):
    super().__init__(256, 16, 8)
    self.bad = bad

  def __next__(self):
    index = self.batch_index
    batch = super().__next__()
    if index == self.bad:
      batch["inputs"][0, 0] = 10**6
    return batch


def tiny(overrides=()):
  """TINY with `overrides` replacing keys it sets."""
  keys = {o.split("=")[0] for o in overrides}
  return load_config("tiny", [o for o in TINY if o.split("=")[0] not in keys] + list(overrides))


def run(run_dir, overrides=(), batches=None, **kwargs):
  cfg = tiny(overrides)
  out = io.StringIO()
  result = train(cfg, run_dir, mesh=one_device(), train_batches=batches or SyntheticBatches(256, 16, 8),
                 open_validation=lambda: SyntheticBatches(256, 16, 8, split="validation"),
                 out=out, progress_bar=False, compiled_steps=COMPILED_STEPS, **kwargs)
  return result, out.getvalue()


def losses_of(run_dir):
  return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("straight")
  result, output = run(run_dir, ["run.tensorboard=true"])
  return run_dir, result, output


def test_straight_run_logs_and_learns(straight):
  run_dir, result, output = straight
  assert result.reason == "finished" and result.step == 12
  losses = losses_of(run_dir)
  assert sorted(losses) == list(range(1, 13))
  assert losses[12] < losses[1] - 1.0                      # the synthetic stream is learnable
  lines = output.splitlines()
  memory = next(i for i, l in enumerate(lines) if l.startswith("compiled train step, memory per device"))
  first_step = next(i for i, l in enumerate(lines) if l.startswith("step 4/12 |"))
  assert memory < first_step                                # printed before step 1
  for field in ("loss", "tok/s", "tok/s/dev", "MFU", "lr", "|g|", "ETA"):
    assert field in lines[first_step]
  assert "step 6: validation loss" in output
  assert "wkv: impl=auto runs the XLA chunked form on cpu" in output   # which WKV runs
  val = [r for r in read_metrics(run_dir) if "val_loss" in r]
  assert [r["step"] for r in val] == [6, 12] and val[-1]["val_loss"] == pytest.approx(result.val_loss)
  events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
  assert len(events) == 1 and b"train/loss" in events[0].read_bytes()
  assert checkpoint_steps(run_dir) == [4, 8, 12]            # keep_checkpoints=3
  assert json.loads((run_dir / "config.json").read_text())["model"]["vocab_size"] == 256


def test_stop_and_resume_is_bit_identical(straight, tmp_path):
  result, output = run(tmp_path, stop_at_step=5)
  assert result.reason == "stop_at_step" and result.step == 5
  assert "rerun the same command to resume" in output
  assert checkpoint_steps(tmp_path) == [4, 5]
  result, output = run(tmp_path)
  assert "resumed" in output and "from step 5" in output
  assert result.step == 12 and checkpoint_steps(tmp_path) == [5, 8, 12]
  assert losses_of(tmp_path) == losses_of(straight[0])      # exact, every step
  val = lambda d: [r["val_loss"] for r in read_metrics(d) if "val_loss" in r]
  assert val(tmp_path) == val(straight[0])


def test_finished_run_reruns_as_a_no_op(straight):
  run_dir, _, _ = straight
  result, output = run(run_dir)
  assert result.step == 12 and result.losses == {} and "already finished" in output


def test_a_finished_run_resumed_with_fewer_steps_leaves_its_config_files_alone(straight):
  run_dir = straight[0]
  before = {name: (run_dir / name).read_bytes() for name in ("config.json", "config.yaml")}
  result, output = run(run_dir, ["run.steps=1"])
  assert result.losses == {} and "already finished 12 of run.steps=1 steps" in output
  assert {name: (run_dir / name).read_bytes() for name in before} == before
  assert json.loads(before["config.json"])["run"]["steps"] == 12


def test_load_pretrained_reads_the_run_directory(straight):
  run_dir, _, _ = straight
  model = goosejax.load_pretrained(run_dir)
  cfg = load_config("tiny", TINY)
  _, shapes = recipe.abstract_model(cfg)
  tx = recipe.make_optimizer(cfg.optimizer, 12, list(shapes))
  abstract, _ = recipe.abstract_train_state(cfg, tx, one_device())
  checkpointer = TrainCheckpointer(run_dir, 3)
  params, _, data_state, meta = checkpointer.restore(12, abstract.params, abstract.opt_state)
  checkpointer.close()
  assert meta["step"] == 12 and data_state == {"batch_index": 12}
  from goosejax.model.params import param_dict
  loaded = param_dict(model)
  for name, value in params.items():
    np.testing.assert_array_equal(np.asarray(loaded[name]), np.asarray(value), err_msg=name)


def test_restore_onto_another_mesh(straight):
  run_dir, _, _ = straight
  cfg = load_config("tiny", TINY)
  _, shapes = recipe.abstract_model(cfg)
  tx = recipe.make_optimizer(cfg.optimizer, 12, list(shapes))
  restored = {}
  for mesh in (one_device(), sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))):
    abstract, _ = recipe.abstract_train_state(cfg, tx, mesh)
    checkpointer = TrainCheckpointer(run_dir, 3)
    restored[len(mesh.devices.flat)] = checkpointer.restore(8, abstract.params, abstract.opt_state)
    checkpointer.close()
  params8, opt8 = restored[8][0], restored[8][1]
  assert params8["blocks.att.key"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert opt8[1].mu["emb"].sharding.spec == params8["emb"].sharding.spec
  for name, value in restored[1][0].items():
    np.testing.assert_array_equal(np.asarray(params8[name]), np.asarray(value), err_msg=name)


def test_incomplete_save_is_never_restored(straight, tmp_path):
  import shutil
  run_dir = tmp_path / "run"
  shutil.copytree(straight[0], run_dir)
  # What a crash in the middle of writing step 16 leaves behind: Orbax's temporary folder.
  partial = run_dir / "checkpoints" / "16.orbax-checkpoint-tmp-1795946500"
  (partial / "params").mkdir(parents=True)
  (partial / "params" / "half_written").write_bytes(b"\0" * 100)
  assert checkpoint_steps(run_dir) == [4, 8, 12]
  checkpointer = TrainCheckpointer(run_dir, 3)
  assert checkpointer.latest_step() == 12
  checkpointer.close()


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  with pytest.raises(NonFiniteLossError, match=r"step 7: loss nan.*last good checkpoint is step 4"):
    run(tmp_path, batches=PoisonedBatches(bad=6))
  assert checkpoint_steps(tmp_path) == [4]
  assert max(losses_of(tmp_path)) == 6                      # nothing logged from the bad step
  checkpointer = TrainCheckpointer(tmp_path, 3)
  cfg = load_config("tiny", TINY)
  _, shapes = recipe.abstract_model(cfg)
  abstract, _ = recipe.abstract_train_state(cfg, recipe.make_optimizer(cfg.optimizer, 12, list(shapes)),
                                            one_device())
  params, _, _, _ = checkpointer.restore(4, abstract.params, abstract.opt_state)
  checkpointer.close()
  assert all(bool(np.isfinite(np.asarray(v)).all()) for v in params.values())


def test_run_directory_of_another_model_is_refused(straight):
  with pytest.raises(CheckpointError, match="different model"):
    run(straight[0], ["model.n_layer=3"])


def test_resume_with_another_wkv_implementation_is_allowed_and_logged(straight, tmp_path):
  """Execution settings are not the model's identity: the README's switch away from the
  kernels must work on an existing run directory; n_layer is refused (test above)."""
  run(tmp_path, stop_at_step=5)
  result, output = run(tmp_path, ["model.wkv_impl=chunked", "model.wkv_chunk_size=16"])
  assert result.reason == "finished" and result.step == 12
  assert "execution settings changed" in output and "model.wkv_impl 'auto' -> 'chunked'" in output
  reference, resumed = losses_of(straight[0]), losses_of(tmp_path)
  assert all(abs(resumed[s] - reference[s]) <= 1e-4 * abs(reference[s]) for s in range(6, 13))
  assert json.loads((tmp_path / "config.json").read_text())["model"]["wkv_impl"] == "chunked"


def test_batch_that_does_not_split_over_the_mesh_is_refused(tmp_path):
  cfg = tiny(["data.batch_size=6"])
  with pytest.raises(ConfigError, match=r"mesh.data x mesh.fsdp = 4 does not divide data.batch_size / optimizer.grad_accum"):
    train(cfg, tmp_path, mesh=sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)),
          train_batches=SyntheticBatches(256, 16, 6))


def test_flops_formula_counts_every_matmul_weight():
  cfg = load_config("rwkv7-0.1b").model
  _, shapes = recipe.abstract_model(load_config("rwkv7-0.1b"))
  matmul_weights = [n for n in shapes if n.split(".")[-1] in (
      "receptance", "key", "value", "output", "w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2", "head")]
  n_matmul = sum(math.prod(shapes[n].shape) for n in matmul_weights)
  flops = flops_per_token(cfg)
  assert flops["matmul"] == 2 * n_matmul
  assert flops["wkv"] == cfg.n_layer * 9 * cfg.n_embd * cfg.head_size
  assert flops["train"] == 3 * (flops["matmul"] + flops["wkv"])


def test_init_from_trained_weights(straight, tmp_path):
  result, output = run(tmp_path / "finetune", init_from=straight[0], stop_at_step=1)
  assert f"weights from {straight[0]}" in output
  trained = losses_of(straight[0])
  assert result.losses[1] < trained[1] - 1.0              # starts where the first run ended



def test_init_from_a_model_of_another_shape_is_summarised(straight, tmp_path, monkeypatch):
  from goosejax.train import loop
  with pytest.raises(CheckpointError) as refused:
    run(tmp_path / "other", ["model.vocab_size=512", "model.n_layer=3"], init_from=straight[0])
  message = str(refused.value)
  assert message == (f"--init-from {straight[0]}: the weights are of another model than the "
                     "configured one (vocab_size 256 vs 512, n_layer 2 vs 3: the weights' vs model.*)")
  monkeypatch.setattr(loop, "_shape_differences", lambda found, configured: [])
  with pytest.raises(CheckpointError, match=r"\(blocks\.att\.a0 \(2, 128\) vs \(3, 128\), "
                                            r"blocks\.att\.a1 .*, and 32 more: the weights' vs"):
    run(tmp_path / "other", ["model.vocab_size=512", "model.n_layer=3"], init_from=straight[0])


def test_gradient_accumulation_matches_one_batch(straight, tmp_path):
  run(tmp_path, ["optimizer.grad_accum=2"], stop_at_step=2)
  one = {r["step"]: r for r in read_metrics(straight[0]) if "loss" in r}
  two = {r["step"]: r for r in read_metrics(tmp_path) if "loss" in r}
  # Step 1 starts from the same weights: same loss and gradient up to summation order.
  assert two[1]["loss"] == pytest.approx(one[1]["loss"], rel=1e-6)
  assert two[1]["grad_norm"] == pytest.approx(one[1]["grad_norm"], rel=1e-5)
  assert two[2]["loss"] == pytest.approx(one[2]["loss"], rel=1e-5)


def test_sigterm_during_evaluation_still_checkpoints_that_step(straight, tmp_path):
  import os
  import signal

  def open_validation():
    os.kill(os.getpid(), signal.SIGTERM)            # arrives after step 6's checkpoint decision
    return SyntheticBatches(256, 16, 8, split="validation")

  handler_before = signal.getsignal(signal.SIGTERM)
  result = train(tiny(), tmp_path, mesh=one_device(), train_batches=SyntheticBatches(256, 16, 8),
                 open_validation=open_validation, out=io.StringIO(), progress_bar=False)
  assert result.reason == "signal" and result.step == 6
  assert checkpoint_steps(tmp_path) == [4, 6]
  assert signal.getsignal(signal.SIGTERM) == handler_before      # the loop's handler is removed
  run(tmp_path)
  assert losses_of(tmp_path) == losses_of(straight[0])


def test_compiled_steps_are_reused_by_key_and_bounded():
  steps, built = CompiledSteps(max_entries=2), []
  build = lambda name: lambda: built.append(name) or name
  assert steps.get_or_build("a", build("a")) == "a"
  assert steps.get_or_build("a", build("again")) == "a"      # reused, not rebuilt
  steps.get_or_build("b", build("b"))
  steps.get_or_build("a", build("a2"))                       # touch "a": "b" is now oldest
  steps.get_or_build("c", build("c"))
  assert built == ["a", "b", "c"] and len(steps) == 2
  assert steps.get_or_build("b", build("b2")) == "b2"        # "b" was evicted


def test_the_kernel_self_check_runs_once_per_run_not_per_trace(tmp_path, counted_kernel_checks):
  """On a device with kernels the self-check runs once when the run opens and every step
  compiled in it reads that outcome (here: a CPU process posing as a TPU host, with a check
  that counts its runs; the program compiled is still the CPU one)."""
  from goosejax.wkv.dispatch import kernel_chunk_sizes
  chunks = kernel_chunk_sizes("pallas", None)
  assert chunks, "a TPU process has kernel chunk sizes to check"
  _, output = run(tmp_path / "run", ["run.steps=3", "model.wkv_impl=pallas"])
  assert sorted(counted_kernel_checks) == sorted(("tpu", size) for size in chunks), output
