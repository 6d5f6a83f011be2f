"""`goosejax train` as users run it: argument errors, overrides among the flags, and the tiny
preset on the built-in corpus trained straight for 12 steps (its config.yaml read back) vs.
stopped by SIGTERM, killed with SIGKILL and resumed with the same command: the losses agree
bit for bit at every step."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from goosejax.config import args as config_args
from goosejax.checkpoint.format import checkpoint_steps
from goosejax.cli import main as goosejax_main
from goosejax.config import load_config
from goosejax.train.cli import build_parser

ARGS = ["--config", "tiny", "--steps", "12", "--checkpoint-every", "4", "--no-progress-bar",
        "data.ctx_len=16", "data.batch_size=8", "run.log_every=4", "run.eval_every=100",
        "run.eval_batches=1", "run.peak_tflops=0.05"]


def test_bad_arguments_exit_2_with_a_message(tmp_path, capsys):
  assert goosejax_main(["train", "--config", "tiny", "--run-dir", str(tmp_path), "model.nope=1"]) == 2
  assert "unknown config key 'model.nope'" in capsys.readouterr().err
  assert goosejax_main(["train", "--config", "tiny", "--run-dir", str(tmp_path),
                        "--process-id", "0"]) == 2
  assert "needs all of --coordinator-address, --num-processes and --process-id" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    goosejax_main(["train", "--run-dir", str(tmp_path)])            # --config is required


def refuse_to_train(cfg, run_dir, **kwargs):
  raise AssertionError("a refused command line reached training")


@pytest.mark.parametrize("argv, fragment", [
    (["--steps", "99999999999999999999"], "run.steps=99999999999999999999: expected an integer "
                                          "of magnitude at most 2147483647"),
    (["optimizer.warmup_steps=4294967296"], "optimizer.warmup_steps=4294967296: expected"),
    (["--run-dir", "elsewhere"], "--run-dir is given twice"),
    (["--config", "rwkv7-0.1b"], "--config is given twice ('tiny' and 'rwkv7-0.1b')"),
    (["--init-from", "a", "--init-from", "b"], "--init-from is given twice ('a' and 'b')"),
    (["--coordinator-address", "h:1", "--coordinator-address", "h:2"],
     "--coordinator-address is given twice ('h:1' and 'h:2')"),
])
def test_refused_before_anything_is_written(argv, fragment, tmp_path, monkeypatch, capsys):
  from goosejax.train import loop
  monkeypatch.setattr(loop, "train", refuse_to_train)
  monkeypatch.chdir(tmp_path)
  try:
    status = goosejax_main(["train", "--config", "tiny", "--run-dir", "run", *argv])
  except SystemExit as e:   # argparse's usage errors
    status = e.code
  err = capsys.readouterr().err
  assert status == 2 and fragment in err.splitlines()[-1] and "Traceback" not in err
  assert list(tmp_path.iterdir()) == []


def test_overrides_stand_anywhere_among_the_flags(tmp_path, monkeypatch):
  from goosejax.train import loop
  seen = {}

  def train(cfg, run_dir, **kwargs):   # the parsed config is all this test needs: do not train
    seen.update(cfg=cfg, run_dir=run_dir)
    return loop.RunResult(step=0, reason="finished", losses={}, val_loss=None)

  monkeypatch.setattr(loop, "train", train)
  run_dir = str(tmp_path / "x")
  assert goosejax_main(["train", "model.n_layer=3", "--config", "tiny", "data.ctx_len=256",
                        "--run-dir", run_dir, "mesh.data=8", "--steps", "5", "run.seed=4"]) == 0
  cfg = seen["cfg"]
  assert (cfg.model.n_layer, cfg.data.ctx_len, cfg.mesh.data, cfg.run.steps, cfg.run.seed) == (3, 256, 8, 5, 4)
  assert seen["run_dir"] == run_dir


def test_help_points_to_the_key_reference(capsys):
  with pytest.raises(SystemExit):
    goosejax_main(["train", "--help"])
  out = capsys.readouterr().out
  assert "goosejax config --keys" in out and "docs/configuration.md" in out
  assert "anywhere on the command line" in out


def losses(run_dir):
  records = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


def start(run_dir, cache):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  command = [sys.executable, "-m", "goosejax.cli", "train", "--run-dir", str(run_dir),
             "--compilation-cache", str(cache), *ARGS]
  return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, process, what, timeout=240):
  deadline = time.monotonic() + timeout
  while not condition():
    if process.poll() is not None:
      pytest.fail(f"training exited ({process.returncode}) before {what}:\n{process.stdout.read()}")
    if time.monotonic() > deadline:
      process.kill()
      pytest.fail(f"timed out waiting for {what}")
    time.sleep(0.02)


def logged_step(run_dir):
  path = Path(run_dir) / "metrics.jsonl"
  return max(losses(run_dir), default=0) if path.exists() else 0


@pytest.mark.slow
def test_sigterm_and_kill9_then_resume_reproduce_the_straight_run(tmp_path):
  cache = tmp_path / "xla-cache"
  straight = tmp_path / "straight"
  process = start(straight, cache)
  output = process.communicate(timeout=300)[0]
  assert process.returncode == 0, output
  assert "compiled train step, memory per device" in output and "step 12/12 |" in output
  assert f"resolved config: {straight / 'config.yaml'}" in output
  args = config_args.parse_args(build_parser(), ["--run-dir", str(straight), *ARGS])
  assert load_config(straight / "config.yaml") == config_args.resolve(args).config

  run_dir = tmp_path / "interrupted"
  # 1. Preemption: SIGTERM once training is under way -> checkpoint, exit 143.
  process = start(run_dir, cache)
  wait_for(lambda: logged_step(run_dir) >= 2, process, "step 2")
  process.send_signal(signal.SIGTERM)
  output = process.communicate(timeout=120)[0]
  assert process.returncode == 143, output
  stopped = checkpoint_steps(run_dir)[-1]
  assert 2 <= stopped < 12 and f"stopped after step {stopped}" in output

  # 2. A crash: SIGKILL after the next regular checkpoint, in the middle of later steps.
  process = start(run_dir, cache)
  next_checkpoint = (stopped // 4 + 1) * 4
  wait_for(lambda: next_checkpoint in checkpoint_steps(run_dir), process, f"checkpoint {next_checkpoint}")
  process.kill()
  process.communicate(timeout=60)
  assert process.returncode == -signal.SIGKILL, "training finished before it could be killed"

  # 3. The same command again finishes the run, taking over the killed run's lock.
  killed = process.pid
  process = start(run_dir, cache)
  output = process.communicate(timeout=300)[0]
  assert process.returncode == 0, output
  assert "resumed" in output
  assert f"train.lock: taking over the lock left by pid {killed} on host " in output
  assert losses(run_dir) == losses(straight)
  assert sorted(losses(run_dir)) == list(range(1, 13))
  assert checkpoint_steps(run_dir)[-1] == 12
