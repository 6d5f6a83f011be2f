"""Per-device memory of the compiled train step when mesh.sequence grows with the context:
the tokens per device stay the same, so the memory should too (compile only, no step runs).

  python benchmarks/sequence_parallel_memory.py                      # tiny, 2048 tokens/device
  python benchmarks/sequence_parallel_memory.py --tokens-per-device 4096 --layouts 1,2,4,8
  python benchmarks/sequence_parallel_memory.py --preset rwkv7-0.1b --overrides model.n_layer=2
  python benchmarks/sequence_parallel_memory.py --target v5p:2x2x2   # the TPU compiler, Mosaic kernels

Each layout is mesh.sequence = n over n devices at ctx = n x tokens-per-device, batch 1;
layout 1 is the unsplit step on one device at the per-device context. On a CPU host run it with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (fake devices; XLA's accounting is the
same per-device program an accelerator would compile, not its exact figures). With --target the
step is compiled for that TPU slice or GPU node (goosejax.plan.targets; no accelerator needed), where
the WKV runs the Pallas kernels on every span.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from goosejax import sharding
from goosejax.config import MeshConfig, load_config
from goosejax.train import recipe


def compiled_memory(preset: str, overrides: list[str], spans: int, tokens_per_device: int,
                    devices=None):
  """XLA's memory analysis of the train step with ctx = spans x tokens_per_device, on the
  first `spans` of `devices` (default: this host's)."""
  ctx = spans * tokens_per_device
  cfg = load_config(preset, overrides + [f"data.ctx_len={ctx}", "data.batch_size=1"])
  devices = list(jax.devices() if devices is None else devices)
  mesh = sharding.make_mesh(MeshConfig(data=1, sequence=spans), devices[:spans])
  graphdef, shapes = recipe.abstract_model(cfg)
  tx = recipe.make_optimizer(cfg.optimizer, cfg.run.steps, list(shapes))
  abstract, shardings = recipe.abstract_train_state(cfg, tx, mesh)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       abstract, shardings)
  tokens = jax.ShapeDtypeStruct((1, ctx), jnp.int32, sharding=sharding.batch_sharding(mesh))
  batch = {"inputs": tokens, "targets": tokens}
  step = recipe.jit_train_step(recipe.make_train_step(graphdef, tx, cfg, mesh), shardings, mesh)
  return step.lower(state, batch).compile().memory_analysis()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--overrides", nargs="*", default=["model.vocab_size=256"])
  parser.add_argument("--tokens-per-device", type=int, default=2048)
  parser.add_argument("--layouts", default="1,2,4,8", help="mesh.sequence sizes, comma-separated")
  parser.add_argument("--target", help="compile for this TPU slice / GPU node (e.g. v5p:2x2x2, "
                                       "h100:8) instead of this host's devices")
  args = parser.parse_args(argv)
  devices = None
  if args.target:
    from goosejax.plan import targets
    devices = targets.target_devices(args.target)
  mib = lambda n: f"{n / 2**20:9.1f}"
  where = args.target or f"{jax.device_count()} {jax.default_backend()} devices"
  print(f"{args.preset} {' '.join(args.overrides)}, {args.tokens_per_device} tokens per device, {where}")
  print("mesh.sequence      ctx   arguments MiB  temporaries MiB  total MiB")
  for spans in (int(s) for s in args.layouts.split(",")):
    stats = compiled_memory(args.preset, args.overrides, spans, args.tokens_per_device, devices)
    total = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
             + stats.temp_size_in_bytes)
    print(f"{spans:13d} {spans * args.tokens_per_device:8d}   {mib(stats.argument_size_in_bytes)}"
          f"      {mib(stats.temp_size_in_bytes)}      {mib(total)}", flush=True)


if __name__ == "__main__":
  main()
