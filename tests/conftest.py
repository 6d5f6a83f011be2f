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
