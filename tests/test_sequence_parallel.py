"""One sequence split over the `sequence` mesh axis (8 fake CPU devices) against the unsplit
computation: WKV-7 outputs, final states and every gradient, and the token shift.

T = 40 splits into spans of 20, 10 and 5 tokens for 2, 4 and 8 spans, none a multiple of the
chunk size 16. Row 0 has the strongest decays and iclr -> 1 (wkv_inputs.make_inputs); the resets
fall inside spans and exactly on span starts, and one row has none, so its state crosses every
boundary.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from closeness import assert_close
from goosejax.config import ConfigError, load_config
from goosejax.sharding import previous_tokens
from goosejax.train import train
from goosejax.train.batches import SyntheticBatches
from goosejax.wkv import wkv7, wkv7_chunked, wkv7_reference
from goosejax.wkv.sequence_parallel import SequenceSplitError, wkv7_sequence_parallel
from wkv_inputs import make_inputs, recurrence, relative_error

SPANS = (2, 4, 8)
LENGTH = 40
CHUNK = 16
NAMES = ("r", "log_w", "k", "v", "a", "b", "state")


def _mesh(sequence, data=1, tensor=1):
  shape = (data, 1, tensor, sequence)
  return jax.make_mesh(shape, ("data", "fsdp", "tensor", "sequence"),
                       devices=jax.devices()[:math.prod(shape)],
                       axis_types=(jax.sharding.AxisType.Auto,) * 4)


def _resets():
  reset = np.zeros((4, LENGTH), bool)
  reset[0, [0, 7]] = True       # drops its initial state; 7 is inside a span for every split
  reset[1, [10, 20, 33]] = True  # 20 starts a span in every split, 10 with 4 and 8 spans
  reset[3, [5, 19, 39]] = True   # a span start with 8 spans, a span's last token, the last token
  return reset                   # row 2: none


@functools.cache
def _problem():
  """(inputs r..b + state, reset, output weight, final-state weight) as float64 NumPy arrays."""
  rng = np.random.default_rng(11)
  *inputs, _ = make_inputs(rng, 4, LENGTH, 2, 8)
  y_weight = rng.normal(size=inputs[0].shape)
  final_weight = rng.normal(size=inputs[6].shape)
  return tuple(inputs), _resets(), y_weight, final_weight


def _values_and_grads(wkv, dtype, ambient_mesh=None):
  """jitted (y, final state, gradients of the 7 inputs) of sum(y w_y) + sum(final w_s), traced
  under `ambient_mesh` (`jax.set_mesh`) when given."""
  inputs, reset, y_weight, final_weight = _problem()
  inputs = [jnp.asarray(x, dtype) for x in inputs]

  def loss(*args):
    y, final = wkv(*args, reset=jnp.asarray(reset))
    return jnp.sum(y * y_weight.astype(dtype)) + jnp.sum(final * final_weight.astype(dtype)), (y, final)

  with contextlib.ExitStack() as context:
    if ambient_mesh is not None:
      context.enter_context(jax.set_mesh(ambient_mesh))
    (_, (y, final)), grads = jax.jit(
        jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True))(*inputs)
  return y, final, grads


def _split(mesh, dtype):
  return functools.partial(wkv7_sequence_parallel, mesh=mesh, chunk_size=CHUNK, dtype=dtype)


@functools.cache
def _unsplit_float32():
  return _values_and_grads(functools.partial(wkv7_chunked, chunk_size=CHUNK, mode="associative"),
                           jnp.float32)


@pytest.mark.parametrize("spans", SPANS)
def test_float64_equals_token_recurrence(spans):
  """Outputs and final state against the NumPy recurrence, gradients against autodiff through
  the token scan: 1e-9."""
  inputs, reset, _, _ = _problem()
  y_want, final_want = recurrence(*inputs, reset)
  with jax.enable_x64(True):
    y, final, grads = _values_and_grads(_split(_mesh(spans), jnp.float64), jnp.float64)
    _, _, grads_want = _values_and_grads(wkv7_reference, jnp.float64)
  assert y.dtype == jnp.float64 and y.shape == y_want.shape
  assert_close(y, y_want, 1e-9, "y")
  assert_close(final, final_want, 1e-9, "final state")
  for name, got, want in zip(NAMES, grads, grads_want):
    assert_close(got, want, 1e-9, f"d{name}")


@pytest.mark.parametrize("form", ["xla", "kernels"])
@pytest.mark.parametrize("spans,data,tensor", [(2, 1, 1), (4, 1, 1), (8, 1, 1), (2, 2, 2)],
                         ids=["seq2", "seq4", "seq8", "data2-tensor2-seq2"])
def test_float32_equals_unsplit_chunked_form(form, spans, data, tensor):
  """The same chunk math unsplit (the associative form on one device), in float32; rows and
  heads split over data and tensor at the same time as time over sequence. xla: the
  sequence-parallel associative form; kernels: `wkv7(impl="pallas")` under the ambient mesh,
  every span run by the kernel (the Pallas interpreter here; the kernels take no float64)."""
  mesh = _mesh(spans, data, tensor)
  if form == "xla":
    y, final, grads = _values_and_grads(_split(mesh, jnp.float32), jnp.float32)
  else:
    kernels = functools.partial(wkv7, impl="pallas", chunk_size=CHUNK)
    y, final, grads = _values_and_grads(kernels, jnp.float32, ambient_mesh=mesh)
  y_want, final_want, grads_want = _unsplit_float32()
  assert y.dtype == jnp.float32
  assert_close(y, y_want, 1e-5, "y")
  assert_close(final, final_want, 1e-5, "final state")
  for name, got, want in zip(NAMES, grads, grads_want):
    assert_close(got, want, 1e-5, f"d{name}")


def test_kernels_on_spans_in_bfloat16_lose_no_more_than_unsplit():
  """bf16 inputs (fp32 decay and state, as the model sends them), N = 64: the split kernel
  path's outputs and final state against float64 on the same rounded inputs, next to the
  unsplit kernel's (measured: y 6.2e-3 vs 5.8e-3, final state 1.2e-3 both)."""
  *numpy_inputs, reset = make_inputs(np.random.default_rng(11), 4, 64, 2, 64)
  xs = [jnp.asarray(x, jnp.bfloat16) for x in numpy_inputs[:6]]
  xs[1] = jnp.asarray(numpy_inputs[1], jnp.float32)
  state = jnp.asarray(numpy_inputs[6], jnp.float32)
  y_want, final_want = recurrence(*[np.asarray(x, np.float64) for x in (*xs, state)], reset)
  errors = {}
  for spans in (1, 4):
    with jax.set_mesh(_mesh(spans)):
      y, final = jax.jit(lambda *a: wkv7(*a[:7], reset=a[7], impl="pallas", chunk_size=CHUNK))(
          *xs, state, jnp.asarray(reset))
    assert y.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    errors[spans] = relative_error(y, y_want), relative_error(final, final_want)
  assert errors[4][0] < 1e-2 and errors[4][0] <= 1.25 * errors[1][0], errors
  assert errors[4][1] < 2e-3 and errors[4][1] <= 1.25 * errors[1][1], errors


@pytest.mark.parametrize("target, platform", [("v5e:2x2", "tpu"), ("h100:4", "cuda")])
def test_auto_runs_the_kernels_on_spans_when_compiled_for_accelerators(target, platform):
  """Forward+backward of impl="auto" with T split over 4 chips / GPUs, compiled (Mosaic /
  Triton included): one forward and one backward kernel per device and the span scans'
  collective-permutes, nothing gathered."""
  from goosejax.plan import targets
  from targets import require
  require(platform)
  mesh = jax.make_mesh((1, 1, 1, 4), ("data", "fsdp", "tensor", "sequence"),
                       devices=targets.target_devices(target),
                       axis_types=(jax.sharding.AxisType.Auto,) * 4)
  shape = (2, 512, 4, 64)
  spans = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "sequence"))
  args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=spans)] * 6 + [
      jax.ShapeDtypeStruct((2, 4, 64, 64), jnp.float32, sharding=jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec()))]

  def loss(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # as the train step does
      y, final = wkv7(*args, impl="auto")
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(final)

  text = jax.jit(jax.grad(loss, argnums=tuple(range(7)))).trace(*args).lower().compile().as_text()
  assert targets.custom_call_targets(text).count(targets.KERNEL_CALL_TARGETS[platform]) == 2
  assert "collective-permute" in text and "all-gather" not in text


def test_only_states_cross_devices_in_log_depth():
  """Forward+backward with 8 spans: 2 log2(8) + 1 = 7 collective-permutes each way, every
  collective moves at most one [B, H, N, N] state (nothing of size T), and nothing gathers."""
  inputs, reset, _, _ = _problem()
  args = [jnp.asarray(x, jnp.float32) for x in inputs]
  wkv = _split(_mesh(8), jnp.float32)

  def loss(*args):
    y, final = wkv(*args, reset=jnp.asarray(reset))
    return jnp.sum(y) + jnp.sum(final)

  hlo = jax.jit(jax.grad(loss, argnums=tuple(range(7)))).lower(*args).compile().as_text()
  collectives = re.findall(r"= f32\[([\d,]*)\][^=]* (all-gather|all-reduce|all-to-all|"
                           r"collective-permute|reduce-scatter)\(", hlo)
  kinds = collections.Counter(kind for _, kind in collectives)
  assert kinds["collective-permute"] == 14 and not kinds["all-gather"] and not kinds["all-to-all"]
  state_size = math.prod(inputs[6].shape)
  for shape, kind in collectives:
    assert math.prod(int(d) for d in shape.split(",")) <= state_size, (kind, shape)


def test_length_not_divisible_by_spans_is_refused():
  x = jnp.zeros((1, 42, 1, 4))
  with pytest.raises(SequenceSplitError, match="T=42 .* mesh.sequence=4"):
    wkv7_sequence_parallel(x, x, x, x, x, x, jnp.zeros((1, 1, 4, 4)), mesh=_mesh(4))


@pytest.mark.parametrize("spans,data,length", [(8, 1, 24), (4, 2, 24), (8, 1, 20)],
                         ids=["seq8", "data2-seq4", "seq8-indivisible"])
def test_previous_tokens_cross_span_boundaries(spans, data, length):
  """[last, x_0, ..., x_{T-2}] and its gradient under a mesh that splits T over spans (and rows
  over data); T = 20 does not split into 8 spans, so its time dimension stays whole."""
  rng = np.random.default_rng(5)
  x_BTC = jnp.asarray(rng.normal(size=(2, length, 3)), jnp.float32)
  last_B1C = jnp.asarray(rng.normal(size=(2, 1, 3)), jnp.float32)
  weight = jnp.asarray(rng.normal(size=x_BTC.shape), jnp.float32)
  mesh = _mesh(spans, data)

  def loss(x, last):
    prev = previous_tokens(x, last)
    return jnp.sum(prev * weight), prev

  split = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  with jax.set_mesh(mesh):
    permutes = split.lower(x_BTC, last_B1C).as_text().count("collective_permute")
    (_, prev), (d_x, d_last) = split(x_BTC, last_B1C)
  assert permutes == (2 if length % spans == 0 else 0)  # forward and backward
  np.testing.assert_array_equal(prev, jnp.concatenate([last_B1C, x_BTC[:, :-1]], axis=1))
  np.testing.assert_array_equal(d_x, jnp.pad(weight[:, 1:], ((0, 0), (0, 1), (0, 0))))
  np.testing.assert_array_equal(d_last, weight[:, :1])


def test_per_device_memory_stays_flat_when_spans_double_with_the_context():
  """Compiled forward+backward with 512 tokens per device: the same per-device arguments and
  temporaries at T = 1024, 2048 and 4096 over 2, 4 and 8 spans (compile only)."""
  def memory(spans):
    shape = (1, 512 * spans, 2, 64)
    args = [jax.ShapeDtypeStruct(shape, jnp.float32)] * 6 + [
        jax.ShapeDtypeStruct((1, 2, 64, 64), jnp.float32)]
    wkv = functools.partial(wkv7_sequence_parallel, mesh=_mesh(spans), chunk_size=64)

    def loss(*args):
      y, final = wkv(*args)
      return jnp.sum(y) + jnp.sum(final)

    stats = jax.jit(jax.grad(loss, argnums=tuple(range(7)))).lower(*args).compile().memory_analysis()
    return stats.argument_size_in_bytes, stats.temp_size_in_bytes

  (arguments, temporaries), *doubled = (memory(spans) for spans in SPANS)
  for more_arguments, more_temporaries in doubled:
    assert more_arguments == arguments
    assert abs(more_temporaries - temporaries) <= 0.02 * temporaries, (more_temporaries, temporaries)


def test_training_refuses_a_ctx_len_that_does_not_split(tmp_path):
  cfg = load_config("tiny", ["model.vocab_size=256", "data.ctx_len=20", "mesh.sequence=8"])
  with pytest.raises(ConfigError, match=r"mesh.sequence = 8 does not divide data.ctx_len=20 \(each sequence splits into 8 equal spans\)"):
    train(cfg, tmp_path, train_batches=SyntheticBatches(256, 20, 8), open_validation=lambda: None)
