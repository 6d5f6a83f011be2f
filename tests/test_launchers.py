"""launch/: --dry-run prints the exact commands (tests/test_multihost.py runs real jobs
through launch/local_cpu.sh)."""
import shlex

from targets import run_launcher


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
