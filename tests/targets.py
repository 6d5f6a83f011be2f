"""What tests that compile for hardware, or start worker processes, share.

`run_launcher(script, *args)`: runs a launch/ script as a user would, with this Python's
`goosejax` first on PATH.

`require(platform)`: the `tpu` / `cuda` extras' compiler plugins are optional on a developer's
machine (the test skips, saying what to install) but required in CI, which sets
GOOSEJAX_REQUIRE_TARGETS=1 so that a missing plugin fails instead of skipping.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parent.parent / "launch"
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


def run_launcher(script: str, *args, env: dict[str, str] | None = None,
                 timeout: int = 600) -> subprocess.CompletedProcess:
  """launch/<script> with `args` (stringified), stdout and stderr captured."""
  environment = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                     **(env or {}))
  return subprocess.run(["bash", str(LAUNCH / script), *map(str, args)], env=environment,
                        capture_output=True, text=True, timeout=timeout)
