"""The kernels' first-use self-check: a correct kernel passes, a wrong or failing one is
reported in one line and switched off (on CPU, with the kernel body in the interpreter)."""
import jax
import jax.numpy as jnp
import pytest

import pallas_kernels
from goosejax.wkv import self_check
from pallas_kernels.wkv_policy import CHUNK_SIZES, LOG_DECAY_MIN, POLICY

CHUNK = 16


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch):
  monkeypatch.setattr(self_check, "KERNEL_CHECKS", {})


def interpreted(r, log_w, k, v, a, b, state, reset):
  return pallas_kernels.wkv7_pallas(r, log_w, k, v, a, b, state, reset=reset, chunk_size=CHUNK,
                                    backend="tpu", interpret=True)


def test_a_correct_kernel_passes_even_when_called_while_tracing():
  warnings = []
  # Called from inside a jit trace, as wkv7 does: the check must run, not be staged.
  jax.jit(lambda x: x + self_check.check_platform("tpu", interpreted, CHUNK, warnings.append)
          .passed)(jnp.zeros(()))
  check = self_check.KERNEL_CHECKS["tpu", CHUNK]
  assert check.passed and not warnings, check
  worst = float(check.detail.split()[3])
  assert worst < 1e-4, check.detail


def test_check_inputs_use_the_strongest_decay_and_a_ragged_length():
  r, log_w, *_, state, reset = self_check.check_inputs(CHUNK)
  assert r.shape[1] % CHUNK != 0
  assert float(log_w.min()) == pytest.approx(LOG_DECAY_MIN)
  assert bool(reset.any()) and float(jnp.abs(state).max()) > 0


@jax.custom_vjp
def gradient_times_1_05(x):
  return x


gradient_times_1_05.defvjp(lambda x: (x, None), lambda _, g: (1.05 * g,))


def wrong_output(r, log_w, k, v, a, b, state, reset):
  y, final = interpreted(r, log_w, k, v, a, b, state, reset)
  return y.at[:, -1].multiply(1.05), final


def wrong_gradient(r, log_w, k, v, a, b, state, reset):
  """Exact forward; the gradient with respect to r 5% off."""
  return interpreted(gradient_times_1_05(r), log_w, k, v, a, b, state, reset)


@pytest.mark.parametrize("kernel", [wrong_output, wrong_gradient])
def test_a_wrong_kernel_fails_with_one_warning_naming_the_error(kernel):
  warnings = []
  check = self_check.check_platform("cuda", kernel, CHUNK, warnings.append)
  assert not check.passed and f"> {self_check.TOLERANCE:g}" in check.detail
  if kernel is wrong_gradient:
    assert "(dr)" in check.detail
  assert len(warnings) == 1 and "cuda" in warnings[0] and "XLA chunked form" in warnings[0]
  # Once per process: a second call returns the first outcome without warning again.
  assert self_check.check_platform("cuda", interpreted, CHUNK, warnings.append) is check
  assert len(warnings) == 1


def test_a_kernel_that_raises_fails_with_the_error_named():
  def broken(*args):
    raise RuntimeError("Mosaic failed to legalize\nmore detail")

  warnings = []
  check = self_check.check_platform("tpu", broken, CHUNK, warnings.append)
  assert not check.passed and check.detail == "RuntimeError: Mosaic failed to legalize"
  assert "RuntimeError: Mosaic failed to legalize" in warnings[0]


def test_on_cpu_nothing_is_checked_and_the_line_says_what_runs():
  assert self_check.local_platform() is None
  assert self_check.kernels_usable("tpu", CHUNK) and not self_check.KERNEL_CHECKS
  assert "XLA chunked form on cpu" in self_check.describe_wkv("auto", CHUNK)
  assert "interpreter" in self_check.describe_wkv("pallas", CHUNK)
  assert "impl=chunked" in self_check.describe_wkv("chunked", CHUNK)


def test_on_a_local_accelerator_the_line_reports_the_check(monkeypatch):
  monkeypatch.setattr(self_check, "local_platform", lambda: "tpu")
  for size in (CHUNK, 64):
    monkeypatch.setitem(self_check.KERNEL_CHECKS, ("tpu", size),
                        self_check.KernelCheck("tpu", False, "worst relative error 3.0e-01 (y)"))
  assert not self_check.kernels_usable("tpu", CHUNK)
  line = self_check.describe_wkv("auto", 64)
  assert "XLA chunked form on tpu" in line and "3.0e-01" in line


@pytest.mark.parametrize("impl", ["auto", "pallas"])
def test_a_failed_check_keeps_the_kernel_out_of_the_compiled_program(monkeypatch, impl):
  """As if this process ran on a TPU whose kernel failed its check: the program compiled for
  that TPU (real Mosaic/XLA:TPU compiler) runs the XLA form, no kernel call."""
  from jax.sharding import SingleDeviceSharding

  from goosejax.plan import targets
  from goosejax.wkv import wkv7
  from targets import require
  from test_plan_targets import _kernel_calls

  require("tpu")
  monkeypatch.setattr(self_check, "local_platform", lambda: "tpu")
  for size in CHUNK_SIZES:
    monkeypatch.setitem(self_check.KERNEL_CHECKS, ("tpu", size),
                        self_check.KernelCheck("tpu", False, "test"))
  device = SingleDeviceSharding(targets.target_devices("v5e:2x2")[0])
  inputs = [jax.ShapeDtypeStruct((1, 100, 2, 64), jnp.bfloat16, sharding=device) for _ in range(6)]
  compiled = jax.jit(lambda *xs: wkv7(*xs, impl=impl)).trace(*inputs).lower().compile()
  assert _kernel_calls(compiled, "tpu") == 0


def test_startup_line_names_the_implementation_and_the_kernel_chunk(monkeypatch):
  from goosejax.wkv import dispatch
  assert "XLA chunked form on cpu" in dispatch.startup_line("auto", None)
  assert dispatch.startup_line("auto", None, spans=4).endswith(
      "; each of the 4 spans of a split sequence runs the XLA associative form")
  assert "spans of a split sequence runs the kernel" in dispatch.startup_line("pallas", None, spans=2)
  checked = []
  monkeypatch.setattr(self_check, "local_platform", lambda: "cuda")
  monkeypatch.setattr(self_check, "kernels_usable", lambda platform, size: checked.append(size) or True)
  for size in (16, 32):
    monkeypatch.setitem(self_check.KERNEL_CHECKS, ("cuda", size),
                        self_check.KernelCheck("cuda", True, "ok"))
  line = dispatch.startup_line("auto", 64)
  assert "Pallas kernels on cuda" in line
  # a chunk size the kernel does not take is said, with the one that runs instead
  assert line.endswith("; wkv_chunk_size=64 is not one the cuda kernel takes (16, 32): impl=auto "
                       f"runs it at {POLICY['cuda'].auto.chunk_size}")
  line = dispatch.startup_line("pallas", 64)
  assert "Pallas kernels on cuda" in line and line.endswith("impl=pallas runs it at 32")
  assert "takes" not in dispatch.startup_line("auto", 32) + dispatch.startup_line("pallas", 16)
  # the chunk sizes checked (kernels_usable caches; the line asks it again for the spans' form)
  assert list(dict.fromkeys(checked)) == [POLICY["cuda"].auto.chunk_size, 32]  # Triton <= 32
  assert "spans of a split sequence runs the kernel" in dispatch.startup_line("auto", 64, spans=8)
  assert "runs the XLA associative form" in dispatch.startup_line("chunked", 64, spans=8)
