"""Compiling for hardware this machine does not have: TPU slices and GPU nodes (goosejax.plan.targets).

The real compilers run here (Mosaic and XLA:TPU from libtpu; XLA:GPU and ptxas from the CUDA
plugin), so a kernel or sharded step that would not compile on the hardware fails here. Needs
the `tpu` and `cuda` extras; CI installs both and sets GOOSEJAX_REQUIRE_TARGETS=1 so that a
missing plugin fails instead of skipping.
"""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import SingleDeviceSharding

from goosejax.plan import targets
from goosejax.config import load_config
from goosejax.wkv import wkv7
from targets import require


def _kernel_calls(compiled, platform: str) -> int:
  return targets.custom_call_targets(compiled.as_text()).count(targets.KERNEL_CALL_TARGETS[platform])


_MOVE_FREE = {"parameter", "constant", "bitcast", "tuple", "get-tuple-element", "broadcast",
              "custom-call", "copy-start", "copy-done"}  # copy-start/done: memory-space moves


def _sequence_moves(compiled, elements: int) -> list[str]:
  """Instructions of the entry computation that produce an array of >= `elements` values by
  moving data between layouts (copies, transposes, pads, slices, non-broadcast fusions): every
  op but parameters, bitcasts, tuples, broadcasts and the kernels' custom calls."""
  computations, name, body = {}, None, []
  for line in compiled.as_text().splitlines():
    if line.rstrip().endswith("{") and "=" not in line.split("(")[0]:
      name, body = line.split()[1 if line.startswith("ENTRY") else 0], []
    elif line.strip() == "}":
      computations["ENTRY" if name and name.startswith("%main") else name] = body
    elif name is not None:
      found = re.search(r"= (.*?) ([a-z][\w-]*)\(", line)
      if found:
        body.append((found.group(2), found.group(1), line))
  moves = []
  for op, result, line in computations.get("ENTRY", []):
    dims = re.search(r"\w+\[([\d,]*)\]", result)
    size = math.prod(int(d) for d in dims.group(1).split(",") if d) if dims else 0
    if size < elements or op in _MOVE_FREE:
      continue
    called = re.search(r"calls=(%[\w.\-]+)", line)
    if op == "fusion" and called and all(o in _MOVE_FREE for o, _, _ in computations[called.group(1)]):
      continue  # a broadcast fusion (e.g. the loss's cotangent of y)
    moves.append(line.strip()[:200])
  return moves


@pytest.mark.parametrize("name, error", [
    ("v9:2x2", "unknown TPU chip 'v9'"), ("h300:8", "unknown GPU 'h300'"),
    ("h100:0", "1-16 GPUs per host"), ("tpu", "expected a TPU slice"),
])
def test_bad_target_names_say_what_is_expected(name, error):
  with pytest.raises(targets.TargetError, match=error):
    targets.parse_target(name)


def test_gpu_targets_parse_hosts_and_devices():
  target = targets.parse_target("h200:4x8")
  assert (target.platform, target.kind, target.hosts, target.devices_per_host) == ("cuda", "h200", 4, 8)
  assert targets.parse_target("h100:8").hosts == 1


@pytest.mark.parametrize("target, platform, devices", [
    ("v5e:2x2", "tpu", 4), ("v5p:2x2x1", "tpu", 4), ("v6e:2x2", "tpu", 4), ("h100:4", "cuda", 4),
    ("h200:2x8", "cuda", 16),
])
def test_targets_give_compile_only_devices(target, platform, devices):
  require(platform)
  facts = targets.target_facts(target)
  assert facts.devices == devices == len(targets.target_devices(target))
  assert facts.memory_bytes >= 16 * targets.GIB and facts.peak_bf16_flops > 1e14


@pytest.mark.parametrize("target, platform", [("v5e:2x2", "tpu"), ("v5p:2x2x1", "tpu"),
                                              ("h100:4", "cuda")])
def test_wkv_kernels_compile_forward_and_backward(target, platform):
  """impl="auto" on one device of the target: exactly one kernel in the forward, two (forward
  and backward) in forward+backward. T = 200 is not a multiple of any chunk size."""
  require(platform)
  device = SingleDeviceSharding(targets.target_devices(target)[0])
  inputs = [jax.ShapeDtypeStruct((2, 200, 4, 64), jnp.bfloat16, sharding=device) for _ in range(6)]

  def forward(*xs):
    return wkv7(*xs, impl="auto")

  def loss(*xs):
    y, state = wkv7(*xs, impl="pallas")
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(state)

  compiled_forward = jax.jit(forward).trace(*inputs).lower().compile()
  compiled_backward = jax.jit(jax.grad(loss, argnums=tuple(range(6)))).trace(*inputs).lower().compile()
  assert _kernel_calls(compiled_forward, platform) == 1
  assert _kernel_calls(compiled_backward, platform) == 2


@pytest.mark.parametrize("target, platform", [("v5e:2x2", "tpu"), ("h100:4", "cuda")])
def test_wkv_kernels_read_and_write_sequences_in_place(target, platform):
  """With T a multiple of the kernels' time block and H of the TPU head group nothing around
  the kernels moves a [B, T, H, N] sequence between layouts (TPU keeps [B, T, H, N] time-minor
  for N = 64; its kernel reads it so), forward or backward; the forward's lean kernel writes no
  state checkpoints, so its temporaries stay below one sequence."""
  require(platform)
  shape = (2, 256, 4, 64)
  device = SingleDeviceSharding(targets.target_devices(target)[0])
  inputs = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=device) for _ in range(6)]

  def loss(*xs):
    y, state = wkv7(*xs, impl="auto")
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(state)

  forward = jax.jit(lambda *xs: wkv7(*xs, impl="auto")).trace(*inputs).lower().compile()
  backward = jax.jit(jax.grad(loss, argnums=tuple(range(6)))).trace(*inputs).lower().compile()
  elements = math.prod(shape)
  assert _sequence_moves(forward, elements) == []
  assert _sequence_moves(backward, elements) == []
  assert forward.memory_analysis().temp_size_in_bytes < 2 * elements  # one bf16 sequence


@pytest.mark.slow
@pytest.mark.parametrize("target, platform, mesh", [
    ("v5p:2x2x1", "tpu", ["mesh.data=1", "mesh.fsdp=4"]),
    ("v5e:2x2", "tpu", ["mesh.data=2", "mesh.tensor=2"]),
    ("h100:4", "cuda", ["mesh.data=1", "mesh.fsdp=4"]),
    ("v5e:2x2", "tpu", ["mesh.data=1", "mesh.sequence=4"]),   # each chip a span of 16 tokens
])
def test_sharded_train_step_compiles_with_the_kernels(target, platform, mesh):
  """The train job's step (tiny model, packed documents with resets) compiled for a 4-chip
  slice / 4-GPU node: the WKV kernels run per device inside it, forward and backward."""
  require(platform)
  cfg = load_config("tiny", ["model.vocab_size=512", "data.ctx_len=64", *mesh])
  compiled = targets.compile_train_step(cfg, target)
  assert _kernel_calls(compiled, platform) == 2
  assert compiled.memory_analysis().temp_size_in_bytes < 256 * 2**20
