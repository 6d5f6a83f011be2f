"""The Pallas WKV-7 kernels run in interpret mode on CPU (the kernel code itself, both grid layouts):
outputs and final state against the float64 recurrence, gradients against the reference's."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goosejax.wkv import wkv7_reference
from pallas_kernels import PallasWKVError, wkv7_pallas
from closeness import assert_close, relative_error
from wkv_inputs import float32, make_inputs, recurrence

FP32_TOLERANCE = 1e-4        # the bar; measured 1.4e-7 to 5.7e-7
GRAD_TOLERANCE = 2e-3        # the bar; measured 3e-7 to 4.3e-7 in fp32 operand mode
BF16_MXU_TOLERANCE = 1.5e-2  # measured worst 8.6e-3 (a gradient) over 4 seeds, y 5.2e-3, state 4.4e-3


@functools.lru_cache(maxsize=None)
def _forward(**options):
  return jax.jit(lambda *args, reset: wkv7_pallas(*args, reset=reset, **options))


@functools.lru_cache(maxsize=None)
def _grads(options=None):
  """Gradient of a random linear function of (y, final state) for all of r..b and the initial state,
  with the Pallas kernels (options given) or the reference (options None)."""
  def loss(r, log_w, k, v, a, b, state, reset, weight_y, weight_state):
    if options is None:
      y, state_end = wkv7_reference(r, log_w, k, v, a, b, state, reset=reset)
    else:
      y, state_end = wkv7_pallas(r, log_w, k, v, a, b, state, reset=reset, **dict(options))
    return jnp.sum(y.astype(jnp.float32) * weight_y) + jnp.sum(state_end * weight_state)

  return jax.jit(jax.grad(loss, argnums=tuple(range(7))))


def _inputs(seed, B, T, H, N, **options):
  """float32 inputs (wkv_inputs.make_inputs: batch row 0 the hardest case)."""
  return float32(make_inputs(np.random.default_rng(seed), B, T, H, N, **options))


def _loss_weights(r, state):
  rng = np.random.default_rng(7)
  return (rng.normal(size=r.shape).astype(np.float32), rng.normal(size=state.shape).astype(np.float32))


@pytest.mark.parametrize("backend,H,N,chunk_size,with_extras", [
    ("tpu", 2, 64, 16, True),       # two heads packed into 128 lanes
    ("triton", 2, 24, 16, True),    # N padded to 32
    ("tpu", 1, 16, 32, False),      # no state, no resets, another chunk size
])
def test_forward_matches_float64_recurrence(backend, H, N, chunk_size, with_extras):
  T = 37  # not a multiple of the chunk size
  r, log_w, k, v, a, b, state, reset = _inputs(0, 2, T, H, N, reset_rate=0.15 if with_extras else 0,
                                               with_state=with_extras)
  y_want, state_want = recurrence(r, log_w, k, v, a, b, state, reset)
  y, state_end = _forward(backend=backend, chunk_size=chunk_size)(
      r, log_w, k, v, a, b, state, reset=None if reset is None else jnp.asarray(reset))
  assert y.shape == r.shape and y.dtype == jnp.float32
  assert state_end.shape == (2, H, N, N) and state_end.dtype == jnp.float32
  assert_close(y, y_want, FP32_TOLERANCE, "y")
  assert_close(state_end, state_want, FP32_TOLERANCE, "final state")


@pytest.mark.parametrize("options", [
    (("backend", "tpu"),),
    (("backend", "triton"), ("value_block", 16)),  # value rows split over two programs
], ids=["tpu", "triton-value-tiles"])
def test_gradients_match_reference(options):
  r, log_w, k, v, a, b, state, reset = _inputs(1, 2, 37, 2, 32, reset_rate=0.2)
  args = (r, log_w, k, v, a, b, state, jnp.asarray(reset), *_loss_weights(r, state))
  got = _grads(options)(*args)
  want = _grads(None)(*args)
  for name, g, w in zip(("r", "log_w", "k", "v", "a", "b", "state"), got, want):
    assert_close(g, w, GRAD_TOLERANCE, f"d{name}")


def test_bf16_mxu_mode_within_its_measured_tolerance():
  r, log_w, k, v, a, b, state, reset = _inputs(2, 2, 40, 2, 32, reset_rate=0.15)
  options = (("backend", "tpu"), ("mxu_dtype", jnp.bfloat16))
  y, state_end = _forward(**dict(options))(r, log_w, k, v, a, b, state, reset=jnp.asarray(reset))
  y_want, state_want = recurrence(r, log_w, k, v, a, b, state, reset)
  errors = [relative_error(y, y_want), relative_error(state_end, state_want)]
  args = (r, log_w, k, v, a, b, state, jnp.asarray(reset), *_loss_weights(r, state))
  errors += [relative_error(g, w) for g, w in zip(_grads(options)(*args), _grads(None)(*args))]
  assert max(errors) < BF16_MXU_TOLERANCE
  # The mode must really round operands to bf16 (fp32 operand mode is ~1e-7 here).
  assert min(errors) > 1e-4


def test_bf16_inputs_give_bf16_outputs_and_gradients():
  """As the model calls it: bf16 r, k, v, a, b with an fp32 log decay."""
  r, log_w, k, v, a, b, state, _ = _inputs(3, 2, 20, 2, 16, reset_rate=0)
  inputs = [jnp.asarray(x, jnp.float32 if x is log_w else jnp.bfloat16) for x in (r, log_w, k, v, a, b)]
  y, state_end = _forward(backend="triton")(*inputs, state, reset=None)
  assert y.dtype == jnp.bfloat16 and state_end.dtype == jnp.float32
  y_want, state_want = recurrence(*[np.asarray(x, np.float32) for x in inputs], state)
  assert_close(y, y_want, BF16_MXU_TOLERANCE, "y")
  assert_close(state_end, state_want, BF16_MXU_TOLERANCE, "final state")
  grads = jax.grad(lambda *x: jnp.sum(wkv7_pallas(*x, backend="triton")[0].astype(jnp.float32)),
                   argnums=tuple(range(7)))(*inputs, jnp.asarray(state))
  assert [g.dtype for g in grads] == [x.dtype for x in inputs] + [jnp.float32]


@pytest.mark.parametrize("change,message", [
    (dict(k=np.zeros((1, 8, 1, 8), np.float32)), "k has shape"),
    (dict(v=np.zeros((1, 8, 1, 16), np.int32)), "v has dtype"),
    (dict(state=np.zeros((1, 1, 16, 8), np.float32)), "state has shape"),
    (dict(reset=np.zeros((1, 7), bool)), "reset has shape"),
    (dict(chunk_size=24), "chunk_size=24"),
    (dict(backend="triton", chunk_size=64), "chunk_size=64 with backend='triton'"),
    (dict(backend="cuda"), "backend='cuda'"),
    (dict(mxu_dtype=jnp.float16), "mxu_dtype"),
    (dict(backend="tpu", value_block=16), "value_block"),
    (dict(backend="triton", value_block=8), "value_block=8"),
    (dict(backend="tpu", fp32_dot="tf32x3"), "fp32_dot='tf32x3' needs"),
    (dict(fp32_dot="ieee"), "fp32_dot='ieee'"),
])
def test_bad_arguments_raise_clear_errors(change, message):
  args = dict(zip(("r", "log_w", "k", "v", "a", "b"), [np.zeros((1, 8, 1, 16), np.float32)] * 6))
  args.update(change)
  with pytest.raises(PallasWKVError, match=message.replace("(", r"\(")):
    wkv7_pallas(**args)


@pytest.mark.parametrize("backend", ["tpu", "triton"])
def test_lean_forward_equals_the_checkpointing_forward(backend):
  """Without a gradient the lean kernel runs (no checkpoints written); its outputs must equal
  the checkpointing kernel's, which the custom VJP's forward runs."""
  r, log_w, k, v, a, b, state, reset = _inputs(4, 2, 37, 2, 32, reset_rate=0.15)
  run = lambda *x: wkv7_pallas(*x, reset=jnp.asarray(reset), backend=backend, chunk_size=16)
  with_vjp = lambda *x: jax.vjp(run, *x)[0]
  lean = jax.jit(run)(r, log_w, k, v, a, b, state)
  checkpointing = jax.jit(with_vjp)(r, log_w, k, v, a, b, state)
  for got, want in zip(lean, checkpointing):
    np.testing.assert_array_equal(got, want)

  def kernels(fn):
    jaxpr = str(jax.make_jaxpr(fn)(r, log_w, k, v, a, b, state))
    return set(re.findall(r"wkv7_(?:forward|backward)\w*", jaxpr))

  assert kernels(run) == {f"wkv7_forward_lean_{backend}"}
  assert kernels(with_vjp) == {f"wkv7_forward_{backend}"}
