"""What tests that compile for hardware, or start worker processes, share.

`require(platform)`: the `tpu` / `cuda` extras' compiler plugins are optional on a developer's
machine (the test skips, saying what to install) but required in CI, which sets
GOOSEJAX_REQUIRE_TARGETS=1 so that a missing plugin fails instead of skipping.
"""
from __future__ import annotations

import importlib.util
import os
import socket

import pytest

PLUGINS = {"tpu": "libtpu", "cuda": "jax_cuda12_plugin"}


def require(platform: str) -> None:
  if importlib.util.find_spec(PLUGINS[platform]) is None:
    if os.environ.get("GOOSEJAX_REQUIRE_TARGETS") == "1":
      pytest.fail(f"the `{platform}` extra is not installed (pip install 'goosejax[{platform}]')")
    pytest.skip(f"needs the `{platform}` extra (Linux x86-64): pip install 'goosejax[{platform}]'")


def free_port() -> int:
  """A TCP port on localhost nobody listens on now (for a coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]
