"""The kernels' first-use self-check: a correct kernel passes, a wrong or failing one is
reported in one line and switched off (on CPU, with the kernel body in the interpreter). Its
outcomes are a value keyed by (platform, chunk size), handed to `wkv7` or installed for a block:
nothing is kept between calls."""
import jax
import jax.numpy as jnp
import pytest

import pallas_kernels
from goosejax.wkv import self_check
from pallas_kernels.wkv_policy import CHUNK_SIZES, LOG_DECAY_MIN, POLICY

CHUNK = 16


def interpreted(r, log_w, k, v, a, b, state, reset):
  return pallas_kernels.wkv7_pallas(r, log_w, k, v, a, b, state, reset=reset, chunk_size=CHUNK,
                                    backend="tpu", interpret=True)


def test_a_correct_kernel_passes_even_when_called_while_tracing():
  warnings, checks = [], []
  # Called from inside a jit trace, as wkv7 does: the check must run, not be staged.
  def traced(x):
    checks.append(self_check.run_check("tpu", CHUNK, interpreted, warnings.append))
    return x

  jax.jit(traced)(jnp.zeros(()))
  (check,) = checks
  assert check.passed and not warnings and check.chunk_size == CHUNK, check
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
  check = self_check.run_check("cuda", CHUNK, kernel, warnings.append)
  assert not check.passed and f"> {self_check.TOLERANCE:g}" in check.detail
  if kernel is wrong_gradient:
    assert "(dr)" in check.detail
  assert len(warnings) == 1 and "cuda" in warnings[0] and "XLA chunked form" in warnings[0]
  assert f"chunk size {CHUNK}" in warnings[0]


def test_a_kernel_that_raises_fails_with_the_error_named():
  def broken(*args):
    raise RuntimeError("Mosaic failed to legalize\nmore detail")

  warnings = []
  check = self_check.run_check("tpu", CHUNK, broken, warnings.append)
  assert not check.passed and check.detail == "RuntimeError: Mosaic failed to legalize"
  assert "RuntimeError: Mosaic failed to legalize" in warnings[0]


def test_on_cpu_nothing_is_checked_and_the_line_says_what_runs(monkeypatch):
  monkeypatch.setattr(self_check, "run_check", lambda *args: pytest.fail("a check ran on CPU"))
  assert self_check.local_platform() is None
  assert self_check.kernels_usable("tpu", CHUNK) and self_check.kernel_check("tpu", CHUNK) is None
  assert self_check.checks_for([16, 64]) == self_check.KernelChecks()
  assert "XLA chunked form on cpu" in self_check.describe_wkv("auto", CHUNK)
  assert "interpreter" in self_check.describe_wkv("pallas", CHUNK)
  assert "impl=chunked" in self_check.describe_wkv("chunked", CHUNK)


def failed(platform, size, detail="worst relative error 3.0e-01 (y)"):
  return self_check.KernelCheck(platform, size, False, detail)


def test_on_a_local_accelerator_the_outcome_is_keyed_by_platform_and_chunk(monkeypatch):
  monkeypatch.setattr(self_check, "local_platform", lambda: "tpu")
  ran = []
  monkeypatch.setattr(self_check, "run_check", lambda platform, size: ran.append(size) or
                      self_check.KernelCheck(platform, size, True, "ran now"))
  checks = self_check.KernelChecks((failed("tpu", 64),))
  assert not self_check.kernels_usable("tpu", 64, checks)
  line = self_check.describe_wkv("auto", 64, checks)
  assert "XLA chunked form on tpu" in line and "3.0e-01" in line and not ran
  # Another chunk size, or no outcome in hand: checked now, every time (nothing is kept).
  assert self_check.kernels_usable("tpu", CHUNK, checks) and ran == [CHUNK]
  assert self_check.kernels_usable("tpu", 64) and ran == [CHUNK, 64]
  # A `use` block hands its outcomes to every call that names none.
  with self_check.use(checks):
    assert not self_check.kernels_usable("tpu", 64) and ran == [CHUNK, 64]
  # checks_for fills in only what is missing.
  more = self_check.checks_for([64, 32, 64], checks)
  assert ran == [CHUNK, 64, 32] and more.get("tpu", 64) == checks.get("tpu", 64)
  assert more.get("tpu", 32).passed and more.get("cuda", 32) is None


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
  checks = self_check.KernelChecks(tuple(failed("tpu", size, "test") for size in CHUNK_SIZES))
  device = SingleDeviceSharding(targets.target_devices("v5e:2x2")[0])
  inputs = [jax.ShapeDtypeStruct((1, 100, 2, 64), jnp.bfloat16, sharding=device) for _ in range(6)]

  def compiled_kernel_calls(fn):
    return _kernel_calls(jax.jit(fn).trace(*inputs).lower().compile(), "tpu")

  assert compiled_kernel_calls(lambda *xs: wkv7(*xs, impl=impl, kernel_checks=checks)) == 0
  with self_check.use(checks):  # as a model's wkv7 calls get them
    assert compiled_kernel_calls(lambda *xs: wkv7(*xs, impl=impl)) == 0
  passed = self_check.KernelChecks(tuple(self_check.KernelCheck("tpu", c.chunk_size, True, "ok")
                                         for c in checks.outcomes))
  assert compiled_kernel_calls(lambda *xs: wkv7(*xs, impl=impl, kernel_checks=passed)) == 1


def test_startup_line_names_the_implementation_and_the_kernel_chunk(monkeypatch):
  from goosejax.wkv import dispatch
  assert "XLA chunked form on cpu" in dispatch.startup_line("auto", None)
  assert dispatch.startup_line("auto", None, spans=4).endswith(
      "; each of the 4 spans of a split sequence runs the XLA associative form")
  assert "spans of a split sequence runs the kernel" in dispatch.startup_line("pallas", None, spans=2)
  checked = []
  monkeypatch.setattr(self_check, "local_platform", lambda: "cuda")
  monkeypatch.setattr(self_check, "run_check", lambda platform, size: checked.append(size) or
                      self_check.KernelCheck(platform, size, True, "ok"))
  line = dispatch.startup_line("auto", 64)
  assert "Pallas kernels on cuda" in line
  # a chunk size the kernel does not take is said, with the one that runs instead
  assert line.endswith("; wkv_chunk_size=64 is not one the cuda kernel takes (16, 32): impl=auto "
                       f"runs it at {POLICY['cuda'].auto.chunk_size}")
  line = dispatch.startup_line("pallas", 64)
  assert "Pallas kernels on cuda" in line and line.endswith("impl=pallas runs it at 32")
  assert "takes" not in dispatch.startup_line("auto", 32) + dispatch.startup_line("pallas", 16)
  # the chunk sizes checked: once per line, the one each impl runs (Triton <= 32)
  assert checked == [POLICY["cuda"].auto.chunk_size, 32, 32, 16]
  given = self_check.KernelChecks((self_check.KernelCheck("cuda", 16, True, "given"),))
  assert "given" in dispatch.startup_line("auto", None, kernel_checks=given)
  assert len(checked) == 4
  assert "spans of a split sequence runs the kernel" in dispatch.startup_line("auto", 64, spans=8)
  assert "runs the XLA associative form" in dispatch.startup_line("chunked", 64, spans=8)
