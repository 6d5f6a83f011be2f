"""Training observability: the FLOPs formula and MFU, progress lines, metrics.jsonl,
TensorBoard event files and W&B scalars (goosejax.train.wandb_log opens the run),
compiled-memory summaries.

FLOPs per token (multiply and add counted separately, i.e. 2 per multiply-accumulate):
  matmuls   2 * (L * (4*C*C + 2*C*F + 2*C*(d_w + d_a + d_v + d_g)) + C*V)
  WKV-7     L * 9 * C * N    per head and token, on the N x N state S:
              S*diag(w) N^2, S@a 2N^2, (S a) b^T N^2 + N^2 add, v k^T N^2 + N^2 add, S@r 2N^2
  training  3 x forward (the backward pass costs about twice the forward)
Rematerialisation is not counted (MFU, not hardware FLOPs utilisation). The embedding
lookup, norms, token shift and elementwise work are left out, as is usual for MFU.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from goosejax.config import ModelConfig

WKV_FLOPS_PER_STATE_ELEMENT = 9

# Dense bf16 peak FLOP/s per chip, by substrings of `device.device_kind` (first match wins).
PEAK_FLOPS = (
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5", 459e12), ("TPU v4", 275e12), ("TPU v3", 123e12),
    ("B200", 2250e12), ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
)


def flops_per_token(cfg: ModelConfig) -> dict[str, float]:
  """{'matmul', 'wkv', 'forward', 'train'} FLOPs per token for `cfg` (see module doc)."""
  C, L, F, V, N = cfg.n_embd, cfg.n_layer, cfg.ffn_dim, cfg.vocab_size, cfg.head_size
  lora = sum(cfg.lora_ranks)
  matmul = 2.0 * (L * (4 * C * C + 2 * C * F + 2 * C * lora) + C * V)
  wkv = float(L * WKV_FLOPS_PER_STATE_ELEMENT * C * N)
  forward = matmul + wkv
  return {"matmul": matmul, "wkv": wkv, "forward": forward, "train": 3.0 * forward}


def measure_matmul_flops(device: jax.Device | None = None, size: int = 1024,
                         dtype=jnp.float32, seconds: float = 0.5) -> float:
  """Achieved FLOP/s of a square matmul on `device`: the ceiling this machine really has."""
  device = device or jax.devices()[0]
  a = jax.device_put(jnp.ones((size, size), dtype), device)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  reps, start = 0, time.perf_counter()
  while True:
    matmul(a).block_until_ready()
    reps += 1
    elapsed = time.perf_counter() - start
    if elapsed >= seconds and reps >= 2:
      return 2.0 * size**3 * reps / elapsed


def peak_flops_per_device(override_tflops: float | None = None) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the number came from)."""
  if override_tflops is not None:
    return override_tflops * 1e12, "run.peak_tflops"
  device = jax.devices()[0]
  for key, flops in PEAK_FLOPS:
    if key.lower() in device.device_kind.lower():
      return flops, f"{device.device_kind} bf16 datasheet peak"
  # No datasheet (CPU, unknown chip): measure. Fake CPU devices share the host's cores.
  measured = measure_matmul_flops(device)
  share = jax.local_device_count() if device.platform == "cpu" else 1
  return measured / share, f"measured fp32 matmul on {device.device_kind}" + (
      f" / {share} local devices" if share > 1 else "")


def memory_summary(compiled: Any) -> str:
  """One line of the compiled step's memory use per device (XLA's own accounting)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return "compiled memory per device: not reported by this backend"
  mib = lambda n: f"{n / 2**20:.1f} MiB"
  arguments = stats.argument_size_in_bytes
  outputs = stats.output_size_in_bytes
  aliased = stats.alias_size_in_bytes
  temp = stats.temp_size_in_bytes
  code = stats.generated_code_size_in_bytes
  total = arguments + outputs - aliased + temp + code
  return (f"compiled train step, memory per device: {mib(total)} total = arguments {mib(arguments)}"
          f" + outputs {mib(outputs)} - aliased {mib(aliased)} + temporaries {mib(temp)}"
          f" + code {mib(code)}")


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def format_count(value: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(value) >= scale:
      return f"{value / scale:.2f}{unit}"
  return f"{value:.0f}"


def progress_line(step: int, total: int, record: Mapping[str, float]) -> str:
  """'step 40/200 | loss 5.1234 | ...' from an interval summary (see MetricsLogger)."""
  parts = [f"step {step}/{total}", f"loss {record['loss']:.4f}"]
  if "val_loss" in record:
    parts.append(f"val {record['val_loss']:.4f}")
  parts += [
      f"{format_count(record['tokens_per_s'])} tok/s",
      f"{format_count(record['tokens_per_s_per_device'])} tok/s/dev",
      f"MFU {100 * record['mfu']:.1f}%",
      f"lr {record['lr']:.3g}",
      f"|g| {record['grad_norm']:.3f}",
      f"{record['step_time']:.3f} s/step",
      f"ETA {format_duration(record['eta_s'])}",
  ]
  return " | ".join(parts)


class MetricsLogger:
  """Per-step records to RUN_DIR/metrics.jsonl, TensorBoard and (given `wandb_run`) W&B, under
  the same names in both: train/*, val/loss, eval/*, perf/*; interval progress lines.

  Only process 0 writes. On resume, records past the restored step are dropped from
  metrics.jsonl first, so the file always describes one consistent history. Each record
  opens the file anew (append), so a metrics.jsonl deleted or rotated mid-run is recreated.
  """

  def __init__(self, run_dir: str | Path, *, total_steps: int, tokens_per_step: int,
               train_flops_per_token: float, peak_flops_total: float, n_devices: int,
               resume_step: int, tensorboard: bool, out: TextIO | None = None,
               enabled: bool = True, progress_bar: bool | None = None, wandb_run: Any = None):
    self.enabled = enabled
    self.total_steps = total_steps
    self.tokens_per_step = tokens_per_step
    self.flops_per_token = train_flops_per_token
    self.peak_flops_total = peak_flops_total
    self.n_devices = n_devices
    self.out = out or sys.stdout
    self.interval: list[dict[str, float]] = []
    self.interval_times: list[float] = []
    self.mark = time.perf_counter()
    self.step_times: list[float] = []
    self.last_val_loss: float | None = None
    self.jsonl: Path | None = None
    self.tb = None
    self.wandb = wandb_run
    self.bar = None
    if not enabled:
      return
    if progress_bar is None:
      progress_bar = sys.stderr.isatty()
    if progress_bar:
      from tqdm import tqdm
      self.bar = tqdm(total=total_steps, initial=resume_step, unit="step", dynamic_ncols=True,
                      leave=False, file=sys.stderr)
    self.jsonl = Path(run_dir) / "metrics.jsonl"
    _truncate_jsonl(self.jsonl, resume_step)
    if tensorboard:
      from tensorboardX import SummaryWriter  # imported here: only the writing process needs it
      self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)

  def restart_clock(self) -> None:
    """Start timing afresh (after compiling, evaluating or checkpointing)."""
    self.mark = time.perf_counter()

  def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
    """Record a finished step; its time is the time since the previous one finished."""
    now = time.perf_counter()
    self.interval_times.append(now - self.mark)
    self.mark = now
    record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    self.interval.append(record)
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
      self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
    self._append(record)
    self._scalars(step, {f"train/{key}": float(value) for key, value in metrics.items()})

  def log_eval(self, step: int, val_loss: float) -> None:
    self.last_val_loss = val_loss
    self._append({"step": step, "val_loss": val_loss})
    self._scalars(step, {"val/loss": val_loss})

  def log_eval_tasks(self, step: int, scalars: Mapping[str, float]) -> None:
    """run.eval_tasks results ({'eval/<task>/<metric>': value}), under the same names."""
    self._append({"step": step, **scalars})
    self._scalars(step, scalars)

  def _scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self.tb is not None:
      for key, value in scalars.items():
        self.tb.add_scalar(key, value, step)
    if self.wandb is not None:
      self.wandb.log(dict(scalars), step=step)

  def _append(self, record: Mapping[str, Any]) -> None:
    if self.jsonl is not None:
      with self.jsonl.open("a") as f:
        f.write(json.dumps(record) + "\n")

  def end_interval(self, step: int) -> dict[str, float] | None:
    """Summarise the steps since the last call; print and return the summary."""
    if not self.interval:
      return None
    step_time = float(np.mean(self.interval_times))
    self.step_times.append(step_time)
    recent = self.step_times[-5:]
    tokens_per_s = self.tokens_per_step / step_time
    summary = {
        "loss": float(np.mean([r["loss"] for r in self.interval])),
        "lr": self.interval[-1]["lr"],
        "grad_norm": self.interval[-1]["grad_norm"],
        "step_time": step_time,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": tokens_per_s / self.n_devices,
        "mfu": tokens_per_s * self.flops_per_token / self.peak_flops_total,
        "eta_s": (self.total_steps - step) * float(np.mean(recent)),
    }
    if self.last_val_loss is not None:
      summary["val_loss"] = self.last_val_loss
    self.interval, self.interval_times = [], []
    if self.enabled:
      self.write(progress_line(step, self.total_steps, summary))
      self._scalars(step, {f"perf/{key}": summary[key] for key in
                           ("tokens_per_s", "tokens_per_s_per_device", "mfu", "step_time")})
    return summary

  def write(self, line: str) -> None:
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.write(line, file=self.out)
    else:
      print(line, file=self.out, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None
    if self.tb is not None:
      self.tb.close()
      self.tb = None
    if self.wandb is not None:
      self.wandb.finish()
      self.wandb = None


def _truncate_jsonl(path: Path, keep_through_step: int) -> None:
  """Drop records with step > keep_through_step (a resumed run redoes those steps)."""
  if not path.exists():
    return
  kept = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut short by a crash
    if record.get("step", 0) <= keep_through_step:
      kept.append(line)
  tmp = path.with_suffix(".jsonl.tmp")
  tmp.write_text("".join(line + "\n" for line in kept))
  tmp.replace(path)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
  """All records of RUN_DIR/metrics.jsonl (train steps and validation entries)."""
  path = Path(run_dir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
