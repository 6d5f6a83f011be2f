"""`goosejax convert SRC DST [--to goosejax|official|hf]`: official .pth <-> goosejax checkpoint.

Hugging Face / flash-linear-attention directories (config.json + safetensors, see
goosejax/convert/hf_checkpoint.py) are read as SRC and written with --to hf (head size 64 only: FLA
cannot reproduce the official GroupNorm eps for other head sizes).

SRC is anything `goosejax.load_pretrained` reads (checkpoint/pretrained.py: an official RWKV-7
x070 `.pth`, an HF directory, a goosejax checkpoint directory or a training run directory,
its latest checkpoint). Without --to, a .pth becomes a goosejax checkpoint and a
directory becomes a .pth. DST is never overwritten without --force, and --force only replaces
something of the kind being written (a goosejax checkpoint, or a file). Both writers build the
result beside DST and rename it into place, so a failure leaves nothing at DST.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from goosejax.checkpoint import format as checkpoint_format
from goosejax.config import ModelConfig
from goosejax.convert.hf_checkpoint import check_fla_exact, is_hf_checkpoint, save_hf
from goosejax.convert.official import params_to_official
from goosejax.checkpoint.pretrained import SOURCE_NAMES, read_params, source_kind
from goosejax.convert.pth import write_pth
from goosejax.errors import GoosejaxError

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="goosejax convert",
      description="Convert RWKV-7 checkpoints between the official .pth and the goosejax "
                  "checkpoint directory (both ways; official logits are preserved).")
  p.add_argument("src", help="official .pth, Hugging Face directory, goosejax checkpoint "
                              "directory or run directory")
  p.add_argument("dst", help="output: a checkpoint directory (--to goosejax) or a .pth file")
  p.add_argument("--to", choices=("goosejax", "official", "hf"),
                 help="output format (default: the other one than SRC's)")
  p.add_argument("--dtype", choices=tuple(DTYPES),
                 help="stored dtype of the output (default: float32 for goosejax; for official, "
                      "the source's parameter dtype). goosejax checkpoints take float32 or bfloat16")
  p.add_argument("--vectors", choices=("1x1xC", "C"), default="1x1xC",
                 help="official output: shape of the per-channel vectors (RWKV-LM writes [1,1,C])")
  p.add_argument("--no-layer0-value-lora", action="store_true",
                 help="official output: omit layer 0's unused v0/v1/v2")
  p.add_argument("--force", action="store_true", help="replace DST if it exists")
  return p


class ConvertError(GoosejaxError):
  """A destination or option that `goosejax convert` refuses; the message says why."""


def _megabytes(n_bytes: int) -> str:
  return f"{n_bytes / 2**20:.1f} MiB"


def _path_size(path: Path) -> int:
  if path.is_file():
    return path.stat().st_size
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _describe(cfg: ModelConfig) -> str:
  d_w, d_a, d_v, d_g = cfg.lora_ranks
  return (f"RWKV-7 x070: L={cfg.n_layer} C={cfg.n_embd} H={cfg.n_head}x{cfg.head_size} "
          f"V={cfg.vocab_size} F={cfg.ffn_dim} LoRA w/a/v/g={d_w}/{d_a}/{d_v}/{d_g}")


def _check_destination(dst: Path, target: str, force: bool) -> None:
  if not dst.exists():
    if dst.parent.is_file():
      raise ConvertError(f"{dst}: {dst.parent} is a file, not a folder")
    if not dst.parent.is_dir():
      raise ConvertError(f"{dst}: parent folder {dst.parent} does not exist")
    return
  if not force:
    raise ConvertError(f"{dst} already exists; pass --force to replace it")
  if target == "official" and not dst.is_file():
    raise ConvertError(f"{dst} exists and is not a file; --force only replaces a file here")
  if target == "hf" and not is_hf_checkpoint(dst):
    raise ConvertError(f"{dst} exists and is not a Hugging Face model directory; --force only "
                       "replaces one (config.json + model.safetensors)")
  if target == "goosejax" and not checkpoint_format.is_checkpoint(dst):
    raise ConvertError(f"{dst} exists and is not a goosejax checkpoint directory; --force "
                                "only replaces a goosejax checkpoint")


def convert(src: Path, dst: Path, target: str | None = None, *, dtype: str | None = None,
            vectors: str = "1x1xC", layer0_value_lora: bool = True, force: bool = False,
            log=print) -> dict:
  """Convert SRC to DST; returns a summary dict. Raises GoosejaxError or OSError on bad input."""
  started = time.perf_counter()
  kind = source_kind(src)
  target = target or ("goosejax" if kind == "official" else "official")
  if target == "goosejax" and dtype not in (None, "float32", "bfloat16"):
    raise ConvertError(f"--dtype {dtype}: a goosejax checkpoint stores float32 or bfloat16")
  _check_destination(dst, target, force)

  log(f"reading {src} ({SOURCE_NAMES[kind]}, {_megabytes(_path_size(src))})")
  cfg, params, facts = read_params(src)
  if target == "hf":
    check_fla_exact(cfg)
  n_params = sum(int(np.prod(v.shape)) for v in params.values())
  log(f"  {_describe(cfg)}; {n_params:,} parameters")
  if "stored_dtypes" in facts:
    log(f"  stored dtypes: {facts['stored_dtypes']}; layer-0 v0/v1/v2 "
        f"{'present' if facts['has_layer0_value_lora'] else 'absent'}")
  read_s = time.perf_counter() - started

  if target == "goosejax":
    out_dtype = dtype or "float32"
    log(f"writing goosejax checkpoint {dst} ({out_dtype})")
    cfg = dataclasses.replace(cfg, param_dtype=out_dtype)
    stored = {name: np.asarray(value).astype(DTYPES[out_dtype]) for name, value in params.items()}
    checkpoint_format.save_checkpoint(dst, stored, cfg, overwrite=force,
                               metadata={"converted_from": str(src.resolve()), "source_kind": kind})
  elif target == "hf":
    out_dtype = dtype or cfg.param_dtype
    log(f"writing Hugging Face / FLA directory {dst} ({out_dtype})")
    _write_hf(params, cfg, dst, DTYPES[out_dtype])
  else:
    out_dtype = dtype or cfg.param_dtype
    log(f"writing official .pth {dst} ({out_dtype}, vectors [{vectors.replace('x', ',')}], "
        f"layer-0 v0/v1/v2 {'included' if layer0_value_lora else 'omitted'})")
    state_dict = params_to_official(params, cfg, vectors_as_1x1xC=vectors == "1x1xC",
                                    include_layer0_value_lora=layer0_value_lora)
    write_pth(dst, {k: v.astype(DTYPES[out_dtype]) for k, v in state_dict.items()})
  total_s = time.perf_counter() - started
  summary = {"src": str(src), "dst": str(dst), "to": target, "dtype": out_dtype,
             "parameters": n_params, "bytes": _path_size(dst), "read_s": read_s, "total_s": total_s}
  log(f"done: {dst} ({target}, {out_dtype}, {_megabytes(summary['bytes'])}, {n_params:,} "
      f"parameters) in {total_s:.1f} s (reading {read_s:.1f} s)")
  return summary


def _write_hf(params, cfg: ModelConfig, dst: Path, dtype) -> None:
  """save_hf beside DST, then rename into place (a failure leaves nothing at DST)."""
  import shutil
  partial = dst.with_name(f".{dst.name}.partial")
  shutil.rmtree(partial, ignore_errors=True)
  try:
    save_hf(params, cfg, partial, dtype=dtype)
    if dst.exists():
      shutil.rmtree(dst)
    partial.rename(dst)
  finally:
    shutil.rmtree(partial, ignore_errors=True)


def main(argv: list[str]) -> int:
  """Bad input raises GoosejaxError (or OSError); goosejax.cli prints it on one line, exit 2."""
  args = _parser().parse_args(argv)
  convert(Path(args.src), Path(args.dst), args.to, dtype=args.dtype, vectors=args.vectors,
          layer0_value_lora=not args.no_layer0_value_lora, force=args.force)
  return 0
