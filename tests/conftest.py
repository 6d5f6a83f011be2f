"""Test setup: 8 fake CPU devices for the sharding tests, set before JAX is imported."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# `goosejax train` run in-process would switch on JAX's persistent compilation cache
# (~/.cache/goosejax/jax) for the rest of the session, and compile-only tests would then try
# to read it; '' keeps it off here and in the jobs tests start (tests that want it pass it).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "")
# Compile-only TPU devices (goosejax plan, its tests) need not hold libtpu's one-process lock,
# which another test session on this machine may hold (`goosejax plan` sets the same).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # noqa: E402  (after the environment above, as JAX must be)


@pytest.fixture
def counted_kernel_checks(monkeypatch):
  """This CPU process posing as a TPU host whose kernel self-check passes and records each
  (platform, chunk size) it is run for, in the list returned (the programs compiled stay CPU's)."""
  from goosejax.wkv import self_check
  runs = []

  def counted_check(platform, chunk_size, *args, **kwargs):
    runs.append((platform, chunk_size))
    return self_check.KernelCheck(platform, chunk_size, True, "counted")

  monkeypatch.setattr(self_check, "local_platform", lambda: "tpu")
  monkeypatch.setattr(self_check, "run_check", counted_check)
  return runs
