"""The `goosejax` entry point: help, unknown commands, every registered command importable."""
import importlib
import os
import subprocess
import sys

import pytest

from goosejax import cli


def test_help_lists_every_command(capsys):
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  for name in cli.COMMANDS:
    assert name in out


def test_no_arguments_prints_usage_and_fails(capsys):
  assert cli.main([]) == 2
  assert "usage: goosejax" in capsys.readouterr().out


def test_unknown_command_is_rejected(capsys):
  assert cli.main(["trian"]) == 2
  assert "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_registered_command_modules_expose_main(name):
  module = importlib.import_module(cli.COMMANDS[name][0])
  assert callable(module.main)


# What the native libraries printed before goosejax.native_logs (JAX_PLATFORMS=cpu, no GPU).
NOISE = b"""WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796692440.451646   17794 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
Failed to find host bounds for accelerator type: WARNING: could not determine TPU accelerator type, please set env var `TPU_ACCELERATOR_TYPE` manually, otherwise libtpu.so may not properly initialize.
WARNING: Logging before InitGoogle() is written to STDERR
E0000 00:00:1796694109.035281    5567 common_lib.cc:554] INVALID_ARGUMENT: Error: unexpected worker hostname 'WARNING: could not determine TPU worker hostnames or IP addresses' from env var TPU_WORKER_HOSTNAMES.
=== Source Location Trace: === 
learning/45eac/tfrc/runtime/libtpu_init_utils.cc:327
"""
# What stays: other native errors (with their trace), Python warnings, progress lines.
KEPT = b"""E0000 00:00:1796694109.035281    5567 pjrt_client.cc:80] INTERNAL: a real failure
=== Source Location Trace: ===
xla/pjrt/pjrt_client.cc:80
/x/y.py:3: UserWarning: something to read
step 3/12 | loss 5.1\r"""


def test_native_noise_is_dropped_and_everything_else_kept():
  from goosejax.native_logs import without_noise
  assert without_noise(NOISE) == b""
  assert without_noise(NOISE + KEPT + NOISE) == KEPT
  assert without_noise(KEPT.replace(b"step", NOISE + b"step")) == KEPT


def test_filtered_stderr_writes_back_what_is_kept_in_order(capfd):
  from goosejax.native_logs import native_stderr_filtered
  with native_stderr_filtered():
    os.write(2, NOISE + b"first\n")
    os.write(2, b"second\n" + NOISE)
  os.write(2, b"third\n")
  assert capfd.readouterr().err == "first\nsecond\nthird\n"


def test_commands_under_jax_platforms_cpu_print_no_native_noise(tmp_path):
  """train, generate from its run directory (Orbax's load) and plan (libtpu's compile-only
  topology) as subprocesses, as a user runs them: their stderr holds what the user must see
  and none of the libraries' start-up noise."""
  env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}  # one device
  env["JAX_PLATFORMS"] = "cpu"
  goosejax = lambda *argv: subprocess.run([sys.executable, "-m", "goosejax.cli", *map(str, argv)],
                                          capture_output=True, text=True, env=env, timeout=600)
  run_dir = tmp_path / "run"
  runs = [goosejax("train", "--config", "tiny", "--run-dir", run_dir, "--steps", 1,
                   "--no-progress-bar", "data.ctx_len=16", "data.batch_size=1", "model.n_layer=1",
                   "run.tensorboard=false", "--compilation-cache", ""),
          goosejax("generate", "--model", run_dir, "--prompt", "The", "--max-new-tokens", 1),
          goosejax("plan", "--config", "tiny", "--topology", "v5e:2x2", "mesh.tensor=3")]
  assert [run.returncode for run in runs] == [0, 0, 2], [run.stderr for run in runs]
  stderr = "".join(run.stderr for run in runs)
  for noise in ("absl::InitializeLog", "cudart_stub", "InitGoogle", "TPU_WORKER_HOSTNAMES",
                "host bounds", "Source Location Trace", "_CHECKPOINT_METADATA"):
    assert noise not in stderr
  assert "resolved config:" in runs[0].stdout
  assert runs[2].stderr.strip().splitlines()[-1].startswith(
      "goosejax plan: error: v5e:2x2 has 4 devices: mesh: 4 devices are not divisible")
