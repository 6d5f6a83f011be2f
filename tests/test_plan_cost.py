"""goosejax.plan.cost: FLOPs of compiled programs with loop bodies counted per trip, and Pallas
kernel executions. XLA's own cost analysis counts a `while` body once."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import pytest
from jax.sharding import SingleDeviceSharding

from goosejax.plan import targets
from goosejax.plan.cost import program_cost
from goosejax.wkv import wkv7
from targets import require

N = 64
MATMUL = 2 * N**3


def _layers(x, w):
  """A scan over the leading axis of `w`: one N x N x N matmul per step."""
  def step(h, w_l):
    return jnp.tanh(h @ w_l), None
  return jax.lax.scan(step, x, w)[0]


def _unrolled(x, w):
  """Two steps per loop trip and the odd one after it."""
  def step(h, w_l):
    return jnp.tanh(h @ w_l), None
  return jax.lax.scan(step, x, w, unroll=2)[0]


def _nested(x, w):
  """3 outer steps, each scanning the 4 matrices of `w`: 12 matmuls."""
  def outer(h, _):
    return _layers(h, w), None
  return jax.lax.scan(outer, x, None, length=3)[0]


def _compile(fn, *args):
  return jax.jit(fn).trace(*args).lower().compile()


def _args(layers: int, sharding=None):
  return (jax.ShapeDtypeStruct((N, N), jnp.float32, sharding=sharding),
          jax.ShapeDtypeStruct((layers, N, N), jnp.float32, sharding=sharding))


@pytest.mark.parametrize("fn, layers, matmuls", [
    (_layers, 5, 5), (_layers, 9, 9), (_unrolled, 7, 7), (_nested, 4, 12)])
def test_loop_bodies_count_once_per_trip_on_cpu(fn, layers, matmuls):
  cost = program_cost(_compile(fn, *_args(layers)))
  assert cost.flops_counted_once < 0.5 * cost.flops     # what XLA reports: each body once
  assert matmuls * MATMUL <= cost.flops < matmuls * MATMUL * 1.05   # + the tanh's
  assert cost.kernel_runs == {}


@pytest.mark.parametrize("target, platform", [("v5e:2x2", "tpu"), ("h100:1", "cuda")])
def test_trip_counts_of_accelerator_programs(target, platform):
  """TPU programs carry no trip counts (read from the loop condition and increment here); GPU
  ones do."""
  require(platform)
  device = SingleDeviceSharding(targets.target_devices(target)[0])
  for fn, layers, matmuls in ((_nested, 4, 12), (_unrolled, 7, 7)):
    cost = program_cost(_compile(fn, *_args(layers, device)))
    assert matmuls * MATMUL <= cost.flops < matmuls * MATMUL * 1.05


def test_pallas_kernel_runs_are_counted_per_trip():
  """The WKV kernel (interpret mode on CPU is not a custom call, so compile for a TPU) inside a
  scan of 3 steps runs 3 times; its forward+backward 3 times each, on the elements of one step."""
  require("tpu")
  device = SingleDeviceSharding(targets.target_devices("v5e:2x2")[0])
  shape = jax.ShapeDtypeStruct((3, 1, 128, 2, 64), jnp.bfloat16, sharding=device)

  def loss(*xs):
    def step(total, x):
      y, state = wkv7(*x, impl="pallas", chunk_size=64)
      return total + jnp.sum(y.astype(jnp.float32)) + jnp.sum(state), None
    return jax.lax.scan(step, 0.0, xs)[0]

  cost = program_cost(_compile(jax.grad(loss), *[shape] * 6))
  runs = cost.kernel_runs
  assert sorted(runs.values()) == [3, 3] and any("forward" in name for name in runs)
  # each run's first output (y, or its first gradient) holds the T x H x N = 128 x 2 x 64 it ran on
  assert cost.kernel_elements == {name: 3 * 128 * 2 * 64 for name in runs}
