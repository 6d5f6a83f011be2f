"""Mesh, logical axes and sharded training on the 8 fake CPU devices (tests/conftest.py)."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from goosejax import sharding
from goosejax.config import ConfigError, MeshConfig, load_config
from goosejax.train import recipe, train
from goosejax.train.batches import SyntheticBatches
from goosejax.train.metrics import read_metrics
from closeness import assert_close
from test_train_loop import COMPILED_STEPS

# Shared with tests/test_train_loop.py so compiled steps are reused within one pytest process.
TINY = ["model.vocab_size=256", "data.ctx_len=16", "data.batch_size=8", "run.steps=12",
        "run.checkpoint_every=4", "run.log_every=4", "run.eval_every=6", "run.eval_batches=1",
        "run.tensorboard=false", "run.peak_tflops=0.05"]
STEPS = 3


def mesh_of(data, fsdp, tensor):
  n = data * fsdp * tensor
  return sharding.make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), jax.devices()[:n])


def test_eight_fake_devices():
  assert jax.device_count() == 8


def test_every_parameter_has_logical_axes():
  _, shapes = recipe.abstract_model(load_config("tiny", TINY))
  assert set(shapes) == set(sharding.PARAM_AXES)
  for name, shape in shapes.items():
    assert len(sharding.param_axes(name)) == len(shape.shape), name


def test_logical_spec_rules():
  mesh = mesh_of(2, 2, 2)
  spec = lambda names, shape: sharding.logical_spec(names, shape, mesh)
  assert spec(("layers", "embed", "heads"), (2, 128, 128)) == P(None, "fsdp", "tensor")
  assert spec(("vocab", "embed"), (256, 128)) == P("tensor", "fsdp")
  assert spec(("batch", "length"), (8, 16)) == P(("data", "fsdp"), None)
  split_time = sharding.make_mesh(MeshConfig(data=2, sequence=4), jax.devices()[:8])
  assert sharding.logical_spec(("batch", "length"), (8, 16), split_time) == P("data", "sequence")
  assert sharding.logical_spec(("batch", "length"), (8, 18), split_time) == P("data", None)
  assert spec(("layers", "embed", "lora"), (2, 128, 32)) == P(None, "fsdp", None)
  assert spec(("embed", "vocab"), (128, 255)) == P("fsdp", None)      # 255 does not split: whole
  assert spec(("batch",), (6,)) == P(None)                             # 6 rows over 4 shards
  with pytest.raises(sharding.ShardingError, match="no rule"):
    spec(("nonsense",), (4,))
  with pytest.raises(sharding.ShardingError, match="used twice"):
    spec(("embed", "embed"), (8, 8))
  with pytest.raises(sharding.ShardingError, match="PARAM_AXES"):
    sharding.param_axes("blocks.att.unknown")
  # Axes of size 1 are dropped: on one device nothing is split.
  assert sharding.logical_spec(("vocab", "embed"), (256, 128), mesh_of(1, 1, 1)) == P(None, None)


def test_mesh_from_config():
  assert dict(sharding.make_mesh(MeshConfig(data=-1, tensor=2)).shape) == {"data": 4, "fsdp": 1, "tensor": 2,
                                                                           "sequence": 1}
  assert dict(sharding.make_mesh(MeshConfig(data=1, fsdp=-1)).shape) == {"data": 1, "fsdp": 8, "tensor": 1,
                                                                         "sequence": 1}
  with pytest.raises(ConfigError, match="not divisible"):
    sharding.make_mesh(MeshConfig(data=-1, tensor=3))
  with pytest.raises(ConfigError, match="use 4 devices but 8"):
    sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=1))


def test_sharded_init_places_every_array_as_declared():
  cfg = load_config("tiny", TINY)
  mesh = mesh_of(2, 2, 2)
  _, shapes = recipe.abstract_model(cfg)
  tx = recipe.make_optimizer(cfg.optimizer, cfg.run.steps, list(shapes))
  state, _ = recipe.init_train_state(cfg, tx, mesh)
  split = 0
  for name, value in state.params.items():
    expected = sharding.logical_spec(sharding.param_axes(name), value.shape, mesh)
    assert value.sharding.spec == expected, name
    local = value.addressable_shards[0].data.shape
    if any(axis is not None for axis in expected):
      assert np.prod(local) < np.prod(value.shape), name     # really split, not replicated
      split += 1
  assert split == 16         # emb, head, r/k/v/o, ffn key/value, the 8 LoRA matrices
  adam = state.opt_state[1]
  for moment in (adam.mu, adam.nu):
    for name, value in moment.items():
      assert value.sharding.spec == state.params[name].sharding.spec, name
  # Same values as a single-device initialisation.
  single, _ = recipe.init_train_state(cfg, tx, mesh_of(1, 1, 1))
  for name in ("emb", "blocks.att.receptance", "blocks.att.w0"):
    np.testing.assert_array_equal(np.asarray(state.params[name]), np.asarray(single.params[name]))


def run_steps(mesh, run_dir):
  cfg = load_config("tiny", TINY)
  batches = SyntheticBatches(256, 16, 8, split="train")
  train(cfg, run_dir, mesh=mesh, train_batches=batches, stop_at_step=STEPS,
        open_validation=lambda: SyntheticBatches(256, 16, 8, split="validation"),
        progress_bar=False, compiled_steps=COMPILED_STEPS)
  return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


@pytest.fixture(scope="module")
def single_device_losses(tmp_path_factory):
  return run_steps(mesh_of(1, 1, 1), tmp_path_factory.mktemp("single"))


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1)], ids=["data2-fsdp2-tensor2", "fsdp8"])
def test_mesh_shapes_give_the_single_device_loss(shape, single_device_losses, tmp_path):
  losses = run_steps(mesh_of(*shape), tmp_path)
  assert len(losses) == STEPS
  np.testing.assert_allclose(losses, single_device_losses, rtol=2e-6)


def test_host_batches_become_global_arrays():
  mesh = mesh_of(4, 1, 2)
  local = {"inputs": np.arange(8 * 3, dtype=np.int32).reshape(8, 3)}
  global_batch = sharding.host_to_global(local, mesh)["inputs"]
  assert global_batch.shape == (8, 3)
  assert global_batch.sharding.spec == P("data", None)
  np.testing.assert_array_equal(np.asarray(global_batch), local["inputs"])
  assert {s.data.shape for s in global_batch.addressable_shards} == {(2, 3)}


def test_constrain_uses_the_ambient_mesh():
  mesh = mesh_of(2, 2, 2)
  f = lambda x: sharding.constrain(x * 2, ("batch", "length", None))
  x = np.ones((8, 4, 16), np.float32)
  assert np.asarray(jax.jit(f)(x)).sum() == 2 * x.sum()           # no mesh: a no-op

  def with_mesh(x):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):    # what the train step does
      return f(x)
  text = jax.jit(with_mesh).lower(x).as_text()
  assert 'sharding_constraint %1 <@mesh, [{"data", "fsdp"}, {}, {}]>' in text


@pytest.mark.slow
def test_initialisation_inside_the_sharded_jit():
  # The accelerator path: the random init itself runs sharded under jit. One layer keeps
  # every orthogonal init a single QR, which jaxlib's CPU kernel runs without deadlocking.
  cfg = load_config("tiny", TINY + ["model.n_layer=1"])
  mesh = mesh_of(2, 2, 2)
  _, shapes = recipe.abstract_model(cfg)
  tx = recipe.make_optimizer(cfg.optimizer, cfg.run.steps, list(shapes))
  jitted, _ = recipe.init_train_state(cfg, tx, mesh, init_on_host=False)
  host, _ = recipe.init_train_state(cfg, tx, mesh, init_on_host=True)
  for name, value in jitted.params.items():
    assert value.sharding.spec == host.params[name].sharding.spec, name
    assert_close(value, host.params[name], 1e-5, what=name)


# ------------------------------------------------------- which rows each process loads


def test_processes_load_the_rows_their_devices_hold():
  # A v5e 4x4 slice (4 hosts of 4 chips) has devices of 4 processes; nothing runs on them.
  from goosejax.plan import targets
  from targets import require
  require("tpu")
  devices = targets.target_devices("v5e:4x4")
  blocks = lambda **axes: [sharding.process_row_block(sharding.make_mesh(MeshConfig(**axes), devices), p)
                           for p in range(4)]
  # sequence over all 16 chips: every host holds, and loads, every row
  assert blocks(data=1, sequence=16) == [(0, 1)] * 4
  # tensor=4 inside a 4x4 slice spans hosts: pairs of hosts hold the same rows
  assert sorted(blocks(data=4, tensor=4)) == [(0, 2), (0, 2), (1, 2), (1, 2)]
  # one own block per host, in whatever order the slice's device order gives
  assert sorted(blocks(data=8, sequence=2)) == [(i, 4) for i in range(4)]
  assert sorted(blocks(data=1, fsdp=16)) == [(i, 4) for i in range(4)]
  # hosts sharing only some of their rows cannot be fed: refused, each host's rows named
  by_host = sorted(devices, key=lambda d: d.process_index)
  mesh = jax.sharding.Mesh(np.array(by_host[2:] + by_host[:2]).reshape(2, 1, 1, 8), sharding.MESH_AXES)
  with pytest.raises(sharding.ShardingError, match=r"overlapping sets of batch row shards \(process 0: \[0, 1\];"):
    sharding.process_row_block(mesh, 0)
