"""The Mosaic TPU kernels under JAX's TPU interpret mode on CPU: Mosaic's own rules, far stricter
than the generic Pallas interpreter (test_pallas_interpret.py). Grid points of `parallel`
dimensions run on 2 simulated TensorCores in random order, each with its own VMEM scratch;
memory never written reads as NaN; an out-of-bounds read raises; data races are recorded.

Against the float64 recurrence (outputs, final state) and float64 reference gradients, on ragged
shapes: T not a multiple of the time block, H = 3 heads padded to 2 groups of 2, resets (one on a
time block's first token), a carried state and the strongest decay (batch row 0, `wkv_inputs`).
Small module constants of `pallas_kernels.wkv7` make the blocks tiny, so the grid still has
several head groups and time blocks: TPU interpret mode takes seconds per kernel call.
"""
import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from goosejax.wkv import wkv7_reference
from goosejax.wkv.sequence_parallel import wkv7_sequence_parallel_kernel
from pallas_kernels import mosaic_tpu, wkv7
from wkv_inputs import float32, make_inputs, recurrence
from closeness import relative_error

STRICT = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan",
                               num_cores_or_threads=2, out_of_bounds_reads="raise")
TOLERANCE = 1e-5   # fp32 kernels against float64; measured 1e-7 to 3e-7
BF16_TOLERANCE = 1.5e-2  # bf16 operands in the fast products; measured 4.2e-3 (y)
B, T, H, N = 2, 37, 3, 64


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
  """32-token time blocks (2 chunks of 16, 1 of 64) and head groups of at most 64 lanes: H = 3
  at N = 64 is padded to 4 heads in 2 groups of 2, T = 37 to 2 time blocks at Q = 16."""
  monkeypatch.setattr(wkv7, "_TPU_BLOCK_TOKENS", 32)
  monkeypatch.setattr(wkv7, "_TPU_MAX_GROUP_LANES", 64)


@pytest.fixture(autouse=True)
def no_races(monkeypatch):
  """Every kernel call's race detector (TPU interpret mode makes a new one per call and only
  prints what it finds) is kept; the test fails if any found a race."""
  detectors = []

  class Recorded(interpret_pallas_call.RaceDetectionState):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      detectors.append(self)

  monkeypatch.setattr(interpret_pallas_call, "RaceDetectionState", Recorded)
  pltpu.reset_tpu_interpret_mode_state()
  yield detectors
  pltpu.reset_tpu_interpret_mode_state()  # needed after a kernel raised
  assert not any(d.races_found for d in detectors), "TPU interpret mode detected a data race"


@functools.cache
def _problem(seed=0, length=T, heads=H):
  r, log_w, k, v, a, b, state, reset = float32(make_inputs(np.random.default_rng(seed), B, length,
                                                           heads, N, reset_rate=0.1))
  reset[1, 32] = True  # the first token of the second time block at Q = 16
  rng = np.random.default_rng(seed + 1)
  weights = (rng.normal(size=r.shape).astype(np.float32),
             rng.normal(size=state.shape).astype(np.float32))
  return (r, log_w, k, v, a, b, state, reset), weights


def _loss(wkv, weights, *args):
  y, final = wkv(*args)
  return jnp.sum(y * weights[0]) + jnp.sum(final * weights[1]), (y, final)


def _kernel(chunk_size):
  return lambda *x: wkv7.wkv7_pallas(*x[:7], reset=x[7], backend="tpu", chunk_size=chunk_size,
                                     interpret=True)


def _float64_gradients(args, weights):
  reference = lambda *x: wkv7_reference(*x[:7], reset=x[7])
  with jax.enable_x64(True):
    inputs = [np.asarray(x, np.float64) for x in args[:7]]
    grads = jax.grad(functools.partial(_loss, reference, weights), argnums=tuple(range(7)),
                     has_aux=True)(*inputs, args[7])[0]
    return [np.asarray(g) for g in grads]


def _worst_errors(wkv, args, weights, *, strict=True, gradients=True) -> dict[str, float]:
  """Relative error of each output (and gradient) of `wkv` against float64, run under TPU
  interpret mode (`strict`) or the generic Pallas interpreter."""
  y_want, final_want = recurrence(*args)
  mode = pltpu.force_tpu_interpret_mode(STRICT) if strict else contextlib.nullcontext()
  with mode:
    if gradients:
      grads, (y, final) = jax.jit(jax.grad(functools.partial(_loss, wkv, weights),
                                           argnums=tuple(range(7)), has_aux=True))(*args)
    else:
      y, final = jax.jit(lambda *x: wkv(*x))(*args)
    errors = {"y": relative_error(y, y_want), "final state": relative_error(final, final_want)}
  if gradients:
    for name, got, want in zip(("r", "log_w", "k", "v", "a", "b", "state"), grads,
                               _float64_gradients(args, weights)):
      errors["d" + name] = relative_error(got, want)
  return {name: error if np.isfinite(error) else np.inf for name, error in errors.items()}


def test_the_blocks_are_ragged_and_several():
  """The shapes below exercise padding and several grid steps per dimension."""
  plan = wkv7.plan_kernels((B, T, H, N), jnp.float32, chunk_size=16, backend="tpu", interpret=True,
                           mxu_dtype=None, has_reset=True)
  assert plan.heads == 4 and plan.layout.heads_packed == 2           # 2 head groups, one padded
  assert plan.chunks_per_block == 2 and plan.chunks // plan.chunks_per_block == 2  # 2 time blocks
  assert T % (plan.chunks_per_block * 16)                                          # ragged T


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_forward_and_backward_match_float64(chunk_size):
  """The checkpointing forward and the backward (all seven gradients); 64 is what impl="auto"
  runs on TPU, where the strongest decay spans the most."""
  args, weights = _problem()
  errors = _worst_errors(_kernel(chunk_size), args, weights)
  assert max(errors.values()) <= TOLERANCE, errors


def test_lean_forward_matches_float64():
  args, weights = _problem()
  errors = _worst_errors(_kernel(16), args, weights, gradients=False)
  assert max(errors.values()) <= TOLERANCE, errors


def test_bf16_inputs_as_the_model_sends_them():
  """bf16 r, k, v, a, b (staged to fp32 in VMEM, y written back in bf16) with an fp32 log
  decay, against float64 on the same rounded inputs: bf16 operand rounding only."""
  args, weights = _problem()
  rounded = [x if i == 1 else np.asarray(jnp.asarray(x, jnp.bfloat16)) for i, x in enumerate(args[:6])]
  errors = _worst_errors(_kernel(16), (*rounded, *args[6:]), weights, gradients=False)
  assert max(errors.values()) <= BF16_TOLERANCE, errors


def test_sequence_parallel_spans_match_float64():
  """The span path (goosejax.wkv.sequence_parallel): each of 2 devices runs the kernel on its
  span over doubled rows (from state 0 and from I), forward and backward. One head group:
  the spans double the rows, and TPU interpret mode's cost grows with the grid."""
  mesh = jax.make_mesh((1, 1, 1, 2), ("data", "fsdp", "tensor", "sequence"),
                       devices=jax.devices()[:2], axis_types=(jax.sharding.AxisType.Auto,) * 4)
  kernel = functools.partial(wkv7.wkv7_pallas, backend="tpu", chunk_size=16, interpret=True)
  spans = lambda *x: wkv7_sequence_parallel_kernel(kernel, *x[:7], reset=x[7], mesh=mesh)
  args, weights = _problem(seed=2, length=36, heads=2)
  errors = _worst_errors(spans, args, weights)
  assert max(errors.values()) <= TOLERANCE, errors


def _scratch_never_loaded(monkeypatch):
  monkeypatch.setattr(mosaic_tpu, "_carry_in", lambda *refs: None)


def _time_axis_parallel(monkeypatch):
  monkeypatch.setattr(mosaic_tpu, "_SEMANTICS", ("parallel", "parallel", "parallel"))


@pytest.mark.parametrize("mutate", [_scratch_never_loaded, _time_axis_parallel])
def test_a_broken_kernel_fails_the_check(monkeypatch, mutate):
  """The check above must catch kernel bugs that only the hardware's rules expose: the state
  scratch read before it is written in the first time block, and the time axis declared
  `parallel` (its blocks then run in any order on either core, each core with its own scratch;
  the generic interpreter runs them in order and passes this one)."""
  mutate(monkeypatch)
  args, weights = _problem()
  errors = _worst_errors(_kernel(16), args, weights, gradients=False)
  assert max(errors.values()) > TOLERANCE, errors


def test_two_cores_writing_one_block_is_a_race(monkeypatch, no_races):
  """The race detector is live: with every batch row's end state mapped to one output block,
  the two simulated cores (one batch row each) write it unordered."""
  specs = mosaic_tpu._specs

  def colliding(layout, *args):
    seq, reset, _, checkpoint = specs(layout, *args)
    N, P = layout.head_size, layout.heads_packed
    return seq, reset, pl.BlockSpec((None, None, N, P * N), lambda b, h, t: (0, h, 0, 0)), checkpoint

  monkeypatch.setattr(mosaic_tpu, "_specs", colliding)
  args, _ = _problem()
  with pltpu.force_tpu_interpret_mode(STRICT):
    jax.block_until_ready(jax.jit(lambda *x: _kernel(16)(*x))(*args))
  assert any(detector.races_found for detector in no_races)
  no_races.clear()  # found, as it should be: not a failure of this test
