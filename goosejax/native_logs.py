"""Keep the native libraries' start-up noise off the terminal; keep everything else.

On a machine without a GPU, each library of the CUDA plugin logs "Could not find cuda drivers"
when it loads (C++ logging, written straight to file descriptor 2, past `sys.stderr`): four
lines, each after absl's "All log messages before absl::InitializeLog()" notice, on every
`import jax` and plugin registration, whatever JAX_PLATFORMS says. libtpu complains that this
is no TPU VM (accelerator type, worker hostnames, with a source trace) whenever `goosejax
plan` builds a compile-only TPU topology. Orbax warns that `_CHECKPOINT_METADATA` is missing
on every load of a goosejax checkpoint, which never writes that file, so a good checkpoint
looks corrupt.

`native_stderr_filtered()` sends descriptor 2 to a temporary file for the duration of a block
and writes back every line that is not such noise; `start_jax_quietly()` imports JAX and
registers its plugins inside that block, before any command runs (no backend starts, so
`jax.distributed.initialize` may still follow); `quiet_orbax_metadata_warning()` filters the
Orbax warning. Anything else a library prints, warnings and errors included, stays.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from typing import Iterator

# One noise line each (bytes: descriptor 2 carries whatever the libraries wrote).
NOISE_LINES = [re.compile(pattern) for pattern in (
    rb"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$",
    rb"^WARNING: Logging before InitGoogle\(\) is written to STDERR$",
    rb"^I\d{4} [\d:. ]+\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine",
    rb"^Failed to find host bounds for accelerator type: WARNING: could not determine TPU "
    rb"accelerator type",
    rb"^E\d{4} [\d:. ]+\d+ common_lib\.cc:\d+\] INVALID_ARGUMENT: Error: unexpected worker "
    rb"hostname 'WARNING: could not determine TPU worker hostnames",
)]
# The source trace libtpu appends to a noise line: dropped with it, kept after anything else.
TRACE_LINES = [re.compile(rb"^=== Source Location Trace: ===$"), re.compile(rb"^[\w/.-]+\.cc:\d+$")]


def without_noise(text: bytes) -> bytes:
  """`text` less the NOISE_LINES and the trace lines that follow one."""
  kept, after_noise = [], False
  for line in text.splitlines(keepends=True):
    bare = line.rstrip()
    if any(pattern.search(bare) for pattern in NOISE_LINES):
      after_noise = True
    elif not (after_noise and any(pattern.match(bare) for pattern in TRACE_LINES)):
      kept.append(line)
      after_noise = False
  return b"".join(kept)


@contextlib.contextmanager
def native_stderr_filtered() -> Iterator[None]:
  """Descriptor 2 into a temporary file for the block, then everything but the noise back
  onto the real stderr, in order (Python's own stderr output in the block included)."""
  sys.stderr.flush()
  real_stderr = os.dup(2)
  try:
    with tempfile.TemporaryFile() as captured:
      os.dup2(captured.fileno(), 2)
      try:
        yield
      finally:
        sys.stderr.flush()
        os.dup2(real_stderr, 2)
        captured.seek(0)
        kept = without_noise(captured.read())
        if kept:
          os.write(2, kept)
  finally:
    os.close(real_stderr)


def start_jax_quietly() -> None:
  """Import JAX and register its PJRT plugins (what prints the CUDA plugin's lines) with the
  noise filtered. Starts no backend; a no-op once JAX has started."""
  with native_stderr_filtered():
    import jax  # noqa: F401
    from jax._src import xla_bridge
    # Private but stable across JAX releases; without it the plugins register (and print)
    # at the first backend use instead.
    getattr(xla_bridge, "_discover_and_register_pjrt_plugins", lambda: None)()


class _OrbaxMetadataWarning(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return "_CHECKPOINT_METADATA" not in record.getMessage()


def quiet_orbax_metadata_warning() -> None:
  """Drop Orbax's 'Metadata file does not exist: .../_CHECKPOINT_METADATA' (logged through
  absl's Python logger): goosejax checkpoints are complete without that file."""
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _OrbaxMetadataWarning) for f in absl_logger.filters):
    absl_logger.addFilter(_OrbaxMetadataWarning())
