"""launch/: --dry-run prints the exact commands (tests/test_multihost.py runs real jobs
through launch/local_cpu.sh)."""
import re
import shlex

import pytest

from targets import LAUNCH, run_launcher


def test_local_dry_run_prints_one_exact_command_per_process(tmp_path):
  run_dir = tmp_path / "a run"
  result = run_launcher("local_cpu.sh", "--dry-run", 2, 4, "--", "--config", "tiny",
                        "--run-dir", run_dir, "mesh.fsdp=-1")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == 2 and not run_dir.exists()          # nothing ran, nothing was made
  for i, line in enumerate(lines):
    words = shlex.split(line)
    assert words[:3] == ["env", "JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=4"]
    assert words[3:5] == ["goosejax", "train"] and str(run_dir) in words and "mesh.fsdp=-1" in words
    assert words[words.index("--process-id") + 1] == str(i)
    assert words[words.index("--num-processes") + 1] == "2"
    assert words[-4:] == [">", f"{run_dir}/process_{i}.log", "2>&1", "&"]


def test_cluster_dry_runs_print_the_command(tmp_path):
  slurm = run_launcher("slurm_gpu.sbatch", "--dry-run", "--config", "rwkv7-0.1b", "--run-dir", "/shared/x")
  assert slurm.returncode == 0 and shlex.split(slurm.stdout)[1:5] == ["srun", "--kill-on-bad-exit=1", "goosejax", "train"]
  tpu = run_launcher("tpu_pod.sh", "--dry-run", "--config", "rwkv7-1.5b", "data.paths=[a b]",
                     env={"TPU": "my-tpu", "ZONE": "z"})
  words = shlex.split(tpu.stdout)
  assert tpu.returncode == 0 and words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
  assert shlex.split(words[-1])[-1] == "data.paths=[a b]"   # the remote command keeps the quoting
  missing = run_launcher("tpu_pod.sh", "--dry-run", "--config", "x", env={"TPU": "", "ZONE": ""})
  assert missing.returncode != 0 and "set TPU" in missing.stderr


def test_local_launcher_refuses_bad_usage():
  result = run_launcher("local_cpu.sh", 2)
  assert result.returncode == 2 and "usage:" in result.stderr


@pytest.mark.parametrize("counts, message", [
    (["-2", "4"], "NUM_PROCESSES '-2': expected a whole number from 1 to 9999"),
    (["x", "4"], "NUM_PROCESSES 'x'"), (["2", "0"], "DEVICES_PER_PROCESS '0'"),
    (["2", "x"], "DEVICES_PER_PROCESS 'x'"), (["2", ""], "DEVICES_PER_PROCESS ''"),
])
def test_local_launcher_refuses_counts_that_are_not_positive_numbers(counts, message, tmp_path):
  result = run_launcher("local_cpu.sh", "--dry-run", *counts, "--", "--config", "tiny",
                        "--run-dir", tmp_path / "run")
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr.count("\n") == 1 and message in result.stderr


@pytest.mark.parametrize("tail", [["--run-dir"], ["--run-dir", "--steps", "5"], []])
def test_local_launcher_needs_a_run_dir_value(tail):
  result = run_launcher("local_cpu.sh", "--dry-run", 2, 2, "--", "--config", "tiny", *tail)
  assert result.returncode == 2 and result.stdout == "" and "unbound variable" not in result.stderr
  assert "pass --run-dir DIRECTORY" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--config", "no-such", "--run-dir", "/shared/x"], "config 'no-such' is neither a file nor a preset"),
    (["--config", "tiny", "model.n_layers=3", "--run-dir", "/shared/x"],
     "unknown config key 'model.n_layers'"),
    (["--config", "tiny", "run.steps=0", "--run-dir=/shared/x"], "run.steps=0: expected a positive"),
    (["--config", "tiny"], "pass --run-dir DIRECTORY"),
    (["--config", "tiny", "--run-dir"], "pass --run-dir DIRECTORY"),
])
def test_slurm_dry_run_checks_the_config_and_run_dir_before_the_queue(args, message):
  result = run_launcher("slurm_gpu.sbatch", "--dry-run", *args, env={"JAX_PLATFORMS": "cpu"})
  assert result.returncode == 2 and result.stdout == ""
  assert message in result.stderr.strip().splitlines()[-1]


def test_slurm_dry_run_keeps_train_flags_and_checks_the_rest_with_goosejax_config():
  """The launcher's list of train-only flags is train's parser less config's: a new train flag
  must be added there, or the dry run would refuse it as unknown to `goosejax config`."""
  from goosejax.config.cli import build_parser as config_parser
  from goosejax.train.cli import build_parser as train_parser
  flags = lambda parser: {o for a in parser._actions for o in a.option_strings} - {"-h", "--help"}
  script = (LAUNCH / "slurm_gpu.sbatch").read_text()
  cases = script[script.index("check_train_arguments() {"):script.index("  done")]
  assert set(re.findall(r"(--[a-z-]+)(?=[|)=\\])", cases)) == flags(train_parser()) - flags(config_parser())
  result = run_launcher("slurm_gpu.sbatch", "--dry-run", "--config", "tiny", "--run-dir", "/s/x",
                        "--init-from", "/s/w", "--no-progress-bar", "--process-id=0",
                        "--distributed", "on", "--compilation-cache", "", env={"JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr
  assert shlex.split(result.stdout)[-4:] == ["--distributed", "on", "--compilation-cache", ""]
