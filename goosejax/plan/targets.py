"""Compile for hardware this machine does not have: compile-only devices of TPU slices and GPU nodes.

    devices = target_devices("v5p:2x2x1")      # a 4-chip TPU v5p slice
    devices = target_devices("h100:8")         # one host with 8 H100s
    devices = target_devices("h200:4x8")       # 4 hosts with 8 H200s each
    mesh = goosejax.sharding.make_mesh(cfg.mesh, devices)
    compiled = jax.jit(f, ...).trace(*abstract_args).lower().compile()   # the real compiler

TPU targets are `<chip>:<topology>` as Cloud TPU names slices (v4:2x2x1, v5e:2x2, v5p:4x4x4,
v6e:2x2, ...) and need the `tpu` extra (libtpu); GPU targets are `<gpu>:<per host>` or
`<gpu>:<hosts>x<per host>` and need the `cuda` extra (the CUDA PJRT plugin, which carries
ptxas). Run with JAX_PLATFORMS=cpu: the compile-only devices come from the plugins directly,
and no accelerator is initialised. The compiled programs' `memory_analysis()` and
`cost_analysis()` are the compiler's own figures; nothing is autotuned without the hardware,
so GPU programs say nothing about speed.

The GPU target configs are written here from the published device facts (NVIDIA datasheets
and the CUDA occupancy tables) rather than queried from a device.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import re

import jax

from goosejax.errors import GoosejaxError
from goosejax.native_logs import native_stderr_filtered

MIB = 2**20
GIB = 2**30


class TargetError(GoosejaxError):
  """An unknown or malformed target name, or a target whose compiler plugin is not installed."""


@dataclasses.dataclass(frozen=True)
class TpuChip:
  device_kind: str        # what jax reports
  hbm_bytes: int          # per chip
  peak_bf16_flops: float  # dense, per chip (datasheet)


# Cloud TPU system architecture pages, per chip (HBM, peak bf16):
# cloud.google.com/tpu/docs/v4 (32 GiB, 275 TFLOP/s), .../v5e (16 GiB, 197 TFLOP/s),
# .../v5p (95 GiB, 459 TFLOP/s), .../v6e (32 GiB, 918 TFLOP/s).
TPU_CHIPS: dict[str, TpuChip] = {
    "v4": TpuChip("TPU v4", 32 * GIB, 275e12),
    "v5e": TpuChip("TPU v5 lite", 16 * GIB, 197e12),
    "v5p": TpuChip("TPU v5", 95 * GIB, 459e12),
    "v6e": TpuChip("TPU v6 lite", 32 * GIB, 918e12),
}
# Slices are laid out in 2-D (v5e, v6e) or 3-D (v4, v5p) torus topologies.
_TPU_TOPOLOGY_DIMS = {"v4": 3, "v5e": 2, "v5p": 3, "v6e": 2}


@dataclasses.dataclass(frozen=True)
class GpuSpec:
  name: str                    # the device description, as the driver reports it
  compute_capability: tuple[int, int]
  sm_count: int
  memory_bytes: int
  memory_bandwidth: float      # bytes/s
  boost_clock_ghz: float
  l2_cache_bytes: int
  shared_memory_per_sm: int    # bytes
  shared_memory_per_block_optin: int
  peak_bf16_flops: float       # dense tensor-core bf16 (datasheet)


# NVIDIA datasheets: A100 SXM4 80GB (312 TFLOP/s bf16 dense), H100 SXM5 80GB and H200 SXM 141GB
# (989 TFLOP/s bf16 dense, half the with-sparsity figure). Memory as the driver reports it
# (nvidia-smi memory.total): 81920 MiB (A100 80GB), 81559 MiB (H100), 143771 MiB (H200); the
# datasheets' "80GB" / "141GB" are rounded.
GPU_SPECS: dict[str, GpuSpec] = {
    "a100": GpuSpec("NVIDIA A100-SXM4-80GB", (8, 0), 108, 81920 * MIB, 2.039e12, 1.41, 40 * MIB,
                    164 * 1024, 163 * 1024, 312e12),
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", (9, 0), 132, 81559 * MIB, 3.35e12, 1.98, 50 * MIB,
                    228 * 1024, 227 * 1024, 989e12),
    "h200": GpuSpec("NVIDIA H200 141GB HBM3e", (9, 0), 132, 143771 * MIB, 4.8e12, 1.98, 50 * MIB,
                    228 * 1024, 227 * 1024, 989e12),
}


def gpu_target_config(spec: GpuSpec) -> str:
  """A GpuTargetConfigProto in text format describing `spec` (what XLA's GPU compiler reads
  instead of querying a device). Limits common to every CUDA GPU since Volta are spelled out."""
  major, minor = spec.compute_capability
  return "\n".join([
      "gpu_device_info {",
      "  threads_per_block_limit: 1024",
      "  threads_per_warp: 32",
      "  shared_memory_per_block: 49152",
      f"  shared_memory_per_core: {spec.shared_memory_per_sm}",
      "  threads_per_core_limit: 2048",
      f"  core_count: {spec.sm_count}",
      "  fpus_per_core: 128",
      "  block_dim_limit_x: 2147483647",
      "  block_dim_limit_y: 65535",
      "  block_dim_limit_z: 65535",
      f"  memory_bandwidth: {int(spec.memory_bandwidth)}",
      f"  l2_cache_size: {spec.l2_cache_bytes}",
      f"  clock_rate_ghz: {spec.boost_clock_ghz}",
      f"  device_memory_size: {spec.memory_bytes}",
      f"  shared_memory_per_block_optin: {spec.shared_memory_per_block_optin}",
      f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
      "  registers_per_core_limit: 65536",
      "  registers_per_block_limit: 65536",
      "  thread_dim_limit_x: 1024",
      "  thread_dim_limit_y: 1024",
      "  thread_dim_limit_z: 64",
      "}",
      'platform_name: "CUDA"',
      "dnn_version_info { major: 9 minor: 10 }",
      f'device_description_str: "{spec.name}"',
      "",
  ])


@dataclasses.dataclass(frozen=True)
class Target:
  """A parsed target name."""
  name: str
  platform: str               # "tpu" or "cuda"
  kind: str                   # a key of TPU_CHIPS or GPU_SPECS
  topology: str               # TPU: "2x2x1"; GPU: "<hosts>x<per host>"
  hosts: int
  devices_per_host: int


_TPU_NAME = re.compile(r"(v\d+[a-z]?):(\d+(?:x\d+){1,2})")
_GPU_NAME = re.compile(r"([a-z]\d+):(?:(\d+)x)?(\d+)")


def parse_target(name: str) -> Target:
  """'v5p:2x2x1' or 'h100:8' / 'h100:4x8' (hosts x GPUs per host)."""
  if match := _TPU_NAME.fullmatch(name):
    kind, topology = match.groups()
    if kind not in TPU_CHIPS:
      raise TargetError(f"target {name!r}: unknown TPU chip {kind!r}; known: {sorted(TPU_CHIPS)}")
    return Target(name, "tpu", kind, topology, 0, 0)   # host layout comes from libtpu
  if match := _GPU_NAME.fullmatch(name):
    kind, hosts, per_host = match.groups()
    if kind not in GPU_SPECS:
      raise TargetError(f"target {name!r}: unknown GPU {kind!r}; known: {sorted(GPU_SPECS)}")
    hosts, per_host = int(hosts or 1), int(per_host)
    if hosts < 1 or not 1 <= per_host <= 16:
      raise TargetError(f"target {name!r}: expected 1 or more hosts and 1-16 GPUs per host")
    return Target(name, "cuda", kind, f"{hosts}x{per_host}", hosts, per_host)
  raise TargetError(
      f"target {name!r}: expected a TPU slice '<chip>:<topology>' (chips {sorted(TPU_CHIPS)}, "
      f"e.g. v5p:2x2x1, v5e:4x4) or GPUs '<gpu>:<per host>' / '<gpu>:<hosts>x<per host>' "
      f"({sorted(GPU_SPECS)}, e.g. h100:8, h200:4x8)")


GPUS_PER_HOST = 8


def target_for(kind: str, devices: int) -> str:
  """The target name of `devices` chips of `kind`: the usual slice shape for a TPU (v5p 64 ->
  'v5p:4x4x4', v6e 16 -> 'v6e:4x4'), hosts of 8 GPUs beyond one host (h100 32 -> 'h100:4x8')."""
  if kind in GPU_SPECS:
    if devices > GPUS_PER_HOST and devices % GPUS_PER_HOST:
      raise TargetError(f"{kind} x {devices}: more than one host needs a multiple of "
                        f"{GPUS_PER_HOST} GPUs (or name the layout: {kind}:<hosts>x<per host>)")
    hosts = max(devices // GPUS_PER_HOST, 1)
    return f"{kind}:{devices}" if hosts == 1 else f"{kind}:{hosts}x{GPUS_PER_HOST}"
  if kind not in TPU_CHIPS:
    raise TargetError(f"unknown chip {kind!r}; known: {sorted(TPU_CHIPS) + sorted(GPU_SPECS)}")
  if devices < 1 or devices & (devices - 1):
    raise TargetError(f"{kind} x {devices}: TPU slices come in powers of two chips; "
                      f"name another layout as {kind}:<topology>")
  # Double the smallest side (the last of equals) from the smallest slice: 2x2x1, 2x2x2, 2x2x4,
  # 2x4x4, 4x4x4, ... in 3-D and 1x1, 1x2, 2x2, 2x4, 4x4, ... in 2-D, as Cloud TPU names them.
  shape = [2, 2, 1] if _TPU_TOPOLOGY_DIMS[kind] == 3 and devices >= 4 else [1] * _TPU_TOPOLOGY_DIMS[kind]
  while math.prod(shape) < devices:
    smallest = min(shape)
    shape[max(i for i, side in enumerate(shape) if side == smallest)] *= 2
  return f"{kind}:{'x'.join(map(str, shape))}"


# The module each platform's compile-only devices come from (the `tpu` and `cuda` extras).
_COMPILER_PLUGINS = {"tpu": "libtpu", "cuda": "jax_cuda12_plugin"}


@functools.cache
def target_devices(name: str) -> tuple[jax.Device, ...]:
  """The compile-only devices of target `name` (all hosts' devices, process order)."""
  from jax.experimental import topologies
  target = parse_target(name)
  try:
    with native_stderr_filtered():   # libtpu's complaints that this is no TPU VM
      description = _topology(topologies, target)
  except Exception as e:  # the plugins raise RuntimeError / JaxRuntimeError / ValueError
    reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    extra = "tpu" if target.platform == "tpu" else "cuda"
    if importlib.util.find_spec(_COMPILER_PLUGINS[target.platform]) is None:
      raise TargetError(f"target {name!r}: no compile-only {target.platform.upper()} devices "
                        f"({reason}); the `{extra}` extra is not installed (pip install "
                        f"'goosejax[{extra}]')") from None
    raise TargetError(f"target {name!r}: the {target.platform.upper()} compiler plugin refuses "
                      f"it: {reason}") from None
  return tuple(description.devices)


def _topology(topologies, target: Target):
  """The plugin's compile-only topology of `target`."""
  if target.platform == "tpu":
    return topologies.get_topology_desc(topology_name=target.name, platform="tpu")
  return topologies.get_topology_desc(
      topology_name=target.kind, platform="cuda",
      target_config=gpu_target_config(GPU_SPECS[target.kind]),
      topology=f"1x{target.hosts}x{target.devices_per_host}")


@dataclasses.dataclass(frozen=True)
class TargetFacts:
  """Per-device figures of a target, for plans and reports."""
  device_kind: str
  devices: int
  memory_bytes: int         # per device
  peak_bf16_flops: float    # per device


def target_facts(name: str) -> TargetFacts:
  target = parse_target(name)
  devices = target_devices(name)
  if target.platform == "tpu":
    chip = TPU_CHIPS[target.kind]
    chips = math.prod(int(d) for d in target.topology.split("x"))
    share = chips / len(devices)    # below 1 where libtpu lists each TensorCore (v4)
    return TargetFacts(chip.device_kind, len(devices), int(chip.hbm_bytes * share),
                       chip.peak_bf16_flops * share)
  spec = GPU_SPECS[target.kind]
  return TargetFacts(spec.name, len(devices), spec.memory_bytes, spec.peak_bf16_flops)


def custom_call_targets(compiled_text: str) -> list[str]:
  """The custom-call targets in a compiled program's text, one entry per call: Pallas kernels
  show up as 'tpu_custom_call' (Mosaic) or '__gpu$xla.gpu.triton' (Triton)."""
  return re.findall(r'custom_call_target="([^"]+)"', compiled_text)


KERNEL_CALL_TARGETS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


def abstract_batch(cfg, mesh: jax.sharding.Mesh, with_reset: bool) -> dict[str, jax.ShapeDtypeStruct]:
  """A training batch of shapes only, split over the mesh's batch axes as the train job feeds it."""
  from goosejax import sharding
  placed = sharding.batch_sharding(mesh)
  shape = (cfg.data.batch_size, cfg.data.ctx_len)
  batch = {"inputs": jax.ShapeDtypeStruct(shape, jax.numpy.int32, sharding=placed),
           "targets": jax.ShapeDtypeStruct(shape, jax.numpy.int32, sharding=placed)}
  if with_reset:
    batch["reset"] = jax.ShapeDtypeStruct(shape, jax.numpy.bool_, sharding=placed)
  return batch


def _train_state(cfg, mesh: jax.sharding.Mesh):
  """(graph definition, optimizer, abstract train state carrying its shardings, the shardings)."""
  from goosejax.train import recipe
  graphdef, shapes = recipe.abstract_model(cfg)
  tx = recipe.make_optimizer(cfg.optimizer, cfg.run.steps, list(shapes))
  abstract_state, shardings = recipe.abstract_train_state(cfg, tx, mesh)
  return graphdef, tx, abstract_state, shardings


def train_step_inputs(cfg, mesh: jax.sharding.Mesh, *, with_reset: bool = True):
  """(abstract train state, abstract batch) of the train job's step on `mesh`: shapes and
  dtypes only, every leaf carrying its sharding."""
  return _train_state(cfg, mesh)[2], abstract_batch(cfg, mesh, with_reset)


def compile_train_step(cfg, target: str, *, with_reset: bool = True,
                       compiler_options: dict | None = None):
  """The train job's sharded step for `cfg`, compiled for `target` (a mesh over its devices
  shaped by cfg.mesh): returns jax's Compiled (memory_analysis, cost_analysis, as_text).
  `compiler_options`: XLA debug options for this compile (e.g. goosejax.plan.memory's dump)."""
  from goosejax import sharding
  from goosejax.train import recipe
  mesh = sharding.make_mesh(cfg.mesh, target_devices(target))
  graphdef, tx, abstract_state, shardings = _train_state(cfg, mesh)
  step = recipe.jit_train_step(recipe.make_train_step(graphdef, tx, cfg, mesh), shardings, mesh)
  lowered = step.trace(abstract_state, abstract_batch(cfg, mesh, with_reset)).lower()
  return lowered.compile(compiler_options)
