"""`goosejax.wkv.wkv7`: implementations agree, T == 1 is one step, bf16 inputs, clear errors."""
from __future__ import annotations

import functools
import inspect
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goosejax.wkv import CHUNK_SIZES, IMPLEMENTATIONS, WKVInputError, auto_choice, wkv7
from pallas_kernels.wkv_policy import POLICY
from wkv_inputs import make_inputs, recurrence, relative_error


def _problem(length, dtype=jnp.float32, seed=0):
  inputs = make_inputs(np.random.default_rng(seed), batch=2, length=length, heads=2, head_size=16)
  return inputs, tuple(jnp.asarray(x, dtype if x.dtype == np.float64 else None) for x in inputs)


@functools.partial(jax.jit, static_argnames=("impls", "chunk_size"))
def _run_all(inputs, impls, chunk_size=None):
  *xs, state, reset = inputs
  return [wkv7(*xs, state, reset=reset, impl=impl, chunk_size=chunk_size) for impl in impls]


def test_every_implementation_matches_the_recurrence():
  numpy_inputs, inputs = _problem(length=40)
  y_want, final_want = recurrence(*numpy_inputs)
  for impl, (y, final) in zip(IMPLEMENTATIONS, _run_all(inputs, IMPLEMENTATIONS)):
    assert y.shape == y_want.shape and y.dtype == jnp.float32 and final.dtype == jnp.float32
    assert relative_error(y, y_want) < 1e-5, impl
    assert relative_error(final, final_want) < 1e-5, impl


def test_single_token_is_one_recurrent_step():
  numpy_inputs, inputs = _problem(length=1)
  *xs, state, reset = inputs
  jaxpr = str(jax.make_jaxpr(lambda *a: wkv7(*a[:6], a[6], reset=a[7]))(*inputs))
  assert "scan" not in jaxpr and "while" not in jaxpr
  y, final = jax.jit(lambda *a: wkv7(*a[:6], a[6], reset=a[7]))(*inputs)
  y_want, final_want = recurrence(*numpy_inputs)
  assert relative_error(y, y_want) < 1e-5 and relative_error(final, final_want) < 1e-5


def test_short_sequences_match_the_recurrence():
  """1 < T <= chunk size: auto takes the token scan (no padding to a whole chunk)."""
  numpy_inputs, inputs = _problem(length=5)
  jaxpr = str(jax.make_jaxpr(lambda *a: wkv7(*a[:6], a[6], reset=a[7]))(*inputs))
  assert "custom_vjp" not in jaxpr
  y, final = jax.jit(lambda *a: wkv7(*a[:6], a[6], reset=a[7]))(*inputs)
  y_want, final_want = recurrence(*numpy_inputs)
  assert relative_error(y, y_want) < 1e-5 and relative_error(final, final_want) < 1e-5


def test_state_defaults_to_zeros_and_chunk_size_is_honoured():
  _, inputs = _problem(length=20)
  *xs, state, _ = inputs
  y_none, final_none = wkv7(*xs, impl="chunked", chunk_size=16)
  y_zero, final_zero = wkv7(*xs, jnp.zeros_like(state), impl="reference")
  assert relative_error(y_none, y_zero) < 1e-5 and relative_error(final_none, final_zero) < 1e-5


def test_bfloat16_inputs_keep_fp32_state_and_stay_close_to_float64():
  numpy_inputs, inputs = _problem(length=70, dtype=jnp.bfloat16)
  *xs, state, reset = inputs
  state = state.astype(jnp.float32)
  log_w = jnp.asarray(numpy_inputs[1], jnp.float32)  # the decay arrives in fp32, as the model sends it
  xs[1] = log_w
  # the float64 truth for exactly these (rounded) inputs
  rounded = [np.asarray(x, np.float64) for x in xs] + [np.asarray(state, np.float64), numpy_inputs[7]]
  y_want, final_want = recurrence(*rounded)
  y, final = jax.jit(lambda *a: wkv7(*a[:6], a[6], reset=a[7], impl="chunked"))(*xs, state, reset)
  assert y.dtype == jnp.bfloat16 and final.dtype == jnp.float32
  assert relative_error(y, y_want) < 1e-2      # bf16 rounding of the output itself: ~4e-3
  assert relative_error(final, final_want) < 1e-5
  grads = jax.grad(lambda *a: jnp.sum(wkv7(*a, state, reset=reset)[0].astype(jnp.float32)),
                   argnums=tuple(range(6)))(*xs)
  assert [g.dtype for g in grads] == [x.dtype for x in xs]


def test_auto_has_a_choice_for_every_platform():
  for platform in ("cpu", "tpu", "cuda", "rocm"):
    choice = auto_choice(platform)
    assert choice.impl in IMPLEMENTATIONS and choice.chunk_size in CHUNK_SIZES
    assert choice == POLICY.get(platform, POLICY["default"]).auto
  assert auto_choice("cpu") == auto_choice() or jax.default_backend() != "cpu"


@pytest.mark.parametrize("change,message", [
    (dict(impl="pallas_v9"), "unknown impl"),
    (dict(chunk_size=48), "chunk_size=48"),
    (dict(k=jnp.zeros((1, 4, 2, 7))), "k has shape"),
    (dict(r=jnp.zeros((4, 2, 8))), "r must be"),
    (dict(state=jnp.zeros((1, 2, 8, 7))), "state has shape"),
    (dict(reset=jnp.zeros((1, 5), bool)), "reset has shape"),
])
def test_bad_inputs_raise_clear_errors(change, message):
  x = jnp.zeros((1, 4, 2, 8))
  args = dict(r=x, log_w=x, k=x, v=x, a=x, b=x)
  kwargs = dict(state=None, reset=None, impl="auto", chunk_size=None)
  for key, value in change.items():
    (args if key in args else kwargs)[key] = value
  with pytest.raises(WKVInputError, match=message):
    wkv7(*args.values(), **kwargs)
  assert issubclass(WKVInputError, ValueError)


@pytest.mark.parametrize("platform, present, absent", [
    ("tpu", "tpu_custom_call", "triton"),
    ("cuda", "triton", "tpu_custom_call"),
    ("cpu", None, ("tpu_custom_call", "triton")),
])
def test_auto_lowers_to_the_platforms_kernel(platform, present, absent):
  """One jitted forward+backward: Mosaic kernels on TPU, Triton on CUDA, XLA on CPU."""
  _, inputs = _problem(length=40)
  *xs, state, reset = inputs

  def loss(r, log_w, state):
    y, final = wkv7(r, log_w, *xs[2:], state, reset=reset)
    return jnp.sum(y) + jnp.sum(final)

  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(xs[0], xs[1], state).lower(
      lowering_platforms=(platform,)).as_text().lower()
  if present is not None:
    assert present in text
  for name in (absent if isinstance(absent, tuple) else (absent,)):
    assert name not in text


_OUR_DIRS = tuple(str(pathlib.Path(__file__).resolve().parents[1] / name) + os.sep
                  for name in ("goosejax", "pallas_kernels"))


def _our_frames_at_each_pallas_call(monkeypatch, run) -> list[list[str]]:
  """For every `pl.pallas_call` that `run()` traces, the functions of our own frames on the
  stack (files under goosejax/ or pallas_kernels/), innermost first."""
  from jax.experimental import pallas as pl
  stacks, pallas_call = [], pl.pallas_call

  def recording(*args, **kwargs):
    frames = [f for f in inspect.stack(context=0) if f.filename.startswith(_OUR_DIRS)]
    stacks.append([f"{pathlib.Path(f.filename).stem}.{f.function}" for f in frames])
    return pallas_call(*args, **kwargs)

  monkeypatch.setattr(pl, "pallas_call", recording)
  run()
  return stacks


@pytest.mark.parametrize("impl", ["pallas", "auto"])
@pytest.mark.parametrize("mesh_shape", [None, (2, 2)], ids=["one-device", "rows-and-heads-split"])
def test_wkv7_reaches_the_kernel_in_at_most_four_of_our_frames(monkeypatch, impl, mesh_shape):
  """wkv7 -> wkv7_pallas -> the custom VJP -> mosaic_tpu / triton_gpu forward and backward,
  for every platform's branch (a jitted trace traces them all), forward and gradient."""
  _, inputs = _problem(length=40)
  *xs, state, reset = inputs

  def loss(r, log_w, state):
    y, final = wkv7(r, log_w, *xs[2:], state, reset=reset, impl=impl)
    return jnp.sum(y) + jnp.sum(final)

  def run():
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    if mesh_shape is None:
      return grad.trace(xs[0], xs[1], state)
    mesh = jax.make_mesh(mesh_shape, ("data", "tensor"), devices=jax.devices()[:4],
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return grad.trace(xs[0], xs[1], state)

  stacks = _our_frames_at_each_pallas_call(monkeypatch, run)
  kernel_modules = {stack[0] for stack in stacks}
  assert kernel_modules == {"mosaic_tpu.forward", "mosaic_tpu.backward", "triton_gpu.forward",
                            "triton_gpu.backward"}
  for stack in stacks:  # the backward runs later, from the custom VJP's rule
    if stack[0].endswith(".forward"):
      assert stack[-1] == "dispatch.wkv7" and len(stack) <= 4, stack
