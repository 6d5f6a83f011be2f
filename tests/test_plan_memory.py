"""goosejax.plan.memory: the temporaries live at a compiled program's peak, grouped by what they
are, from the buffer assignment and live ranges XLA writes; goosejax.plan.hlo, which reads the
optimized HLO they refer to."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax
import pytest

from goosejax.config import load_config
from goosejax.plan import cli as plan_cli, hlo, memory, targets
from targets import require

MIB = 2**20


def _value(name, size, offset):
  return memory._HeapValue(name, size, offset, "f32[1]")


def test_the_peak_counts_shared_bytes_once_and_rounds_up_to_the_heap_granule():
  """A loop's result and its body's parameter at one offset are one buffer; a 100-byte value
  in a heap of 256-byte granules holds 256 bytes."""
  values = [_value("a{}", 1024, 0), _value("while.1{0}", 512, 1024), _value("param.2{0}", 512, 1024),
            _value("small{}", 100, 1536), _value("late{}", 512, 0)]
  ranges = {"a{}": (0, 5), "while.1{0}": (2, 6), "param.2{0}": (3, 4), "small{}": (1, 3),
            "late{}": (6, 9)}
  assert memory._alignment(values) == 512
  live = memory._live_at_peak(values, ranges, alignment=256)
  assert sorted((v.name, footprint) for v, footprint in live) == [
      ("a{}", 1024), ("small{}", 256), ("while.1{0}", 512)]   # step 3: 1792 bytes; step 6: 1024
  live = memory._live_at_peak(values + [_value("big{}", 4096, 4096)],
                              {**ranges, "big{}": (6, 6)}, alignment=256)
  assert sorted(v.name for v, _ in live) == ["big{}", "late{}", "while.1{0}"]


def _nested():
  def inner(x):
    return jnp.sin(x)

  def middle(x):
    return inner(x * 3.0)

  def outer(x):
    return middle(jnp.cos(x))
  return outer


def test_stack_frames_read_innermost_first():
  module = hlo.Module(jax.jit(_nested()).lower(1.0).compile().as_text())
  sine = next(i for i in module.instructions.values() if "jit(outer)/sin" in i.op_name)
  functions = [frame.function for frame in module.frames(sine.frame_id)]
  assert [f.rsplit(".", 1)[-1] for f in functions[:3]] == ["inner", "middle", "outer"]
  assert functions[3] == "test_stack_frames_read_innermost_first"


def test_hlo_instructions_keep_operands_and_attributes():
  text = """HloModule m, is_scheduled=true

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %x)
}

ENTRY %main (a: f32[4,8]) -> f32[4,8] {
  %a = f32[4,8]{1,0:T(8,128)} parameter(0), metadata={op_name="x[\\'k\\']"}
  %w = (s32[], f32[4,8]{1,0}) while(%init), condition=%cond, body=%body, metadata={op_name="jit(f)/while" stack_frame_id=3}
}
"""
  module = hlo.Module(text)
  loop = module.instructions["w"]
  assert (loop.opcode, loop.operands, loop.attribute("body"), loop.frame_id) == ("while", ("init",), "body", 3)
  assert module.root_of("body").operands == ("i", "x") and module.callers["body"] == "w"
  assert module.entry == "main" and module.instructions["p"].computation == "body"
  assert module.instructions["i"].attribute("index") == "0"
  assert module.instructions["a"].op_name == "x['k']"
  assert hlo.array_shapes(loop.shape) == [("s32", ()), ("f32", (4, 8))]


def _train_like_step(tmp_path):
  """A 4-layer scan, its gradient and an Adam update, compiled for the CPU with the dump."""
  tx = optax.adam(1e-3)
  layers, width, rows = 4, 256, 512

  def loss(ws, x):
    return jnp.sum(jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0] ** 2)

  def step(ws, opt_state, x):
    updates, opt_state = tx.update(jax.grad(loss)(ws, x), opt_state, ws)
    return optax.apply_updates(ws, updates), opt_state

  ws = jax.ShapeDtypeStruct((layers, width, width), jnp.float32)
  x = jax.ShapeDtypeStruct((rows, width), jnp.float32)
  opt_state = jax.eval_shape(tx.init, ws)
  compiled = jax.jit(step).lower(ws, opt_state, x).compile(memory.compiler_options(str(tmp_path)))
  return compiled, layers * rows * width * 4


def test_a_layer_scan_compiled_for_the_cpu_is_broken_down(tmp_path):
  """The stacked activations the backward reads are the saved residuals; the report's lines add
  up to the compiler's temporaries."""
  compiled, stacked_bytes = _train_like_step(tmp_path)
  temporaries = compiled.memory_analysis().temp_size_in_bytes
  result = memory.breakdown(str(tmp_path), temporaries)
  assert result.heap_bytes == temporaries and result.outside_heap == 0
  assert result.live_bytes + result.gaps == temporaries and result.gaps >= 0
  saved = result.group(memory.SAVED)
  assert saved is not None and saved.bytes >= stacked_bytes
  assert result.group(memory.OTHER) is None or result.group(memory.OTHER).bytes < 0.1 * temporaries
  text = memory.format_breakdown(result)
  assert re.search(r"saved residuals per layer\s+[\d.]+\s+\d+%", text)
  assert "compiler temporaries" in text and "MiB" in text


# ----------------------------------------------------------------------------- compiled plans

PLAN = ["model.vocab_size=512", "mesh.data=1", "mesh.fsdp=-1"]


def _lines_of(text: str) -> dict[str, float]:
  """label -> size of each row of the printed breakdown."""
  rows = re.findall(r"^  ([a-z][a-z ,]+?)\s+([\d.]+)\s+\d+%", text, re.MULTILINE)
  return {label: float(size) for label, size in rows}


@pytest.mark.slow
@pytest.mark.parametrize("target, ctx", [("v5p:2x2x1", 512), ("h100:4", 256)])
def test_memory_groups_add_up_to_the_compilers_temporaries(target, ctx):
  """The tiny model with FSDP over 4 devices: the groups, the heap's gaps at the peak and what
  the compiler counts outside its heap add up to memory_analysis's temporaries. The grouped
  buffers are within 10% of the heap on GPU (which is the compiler's figure there); a tiny
  program on TPU leaves ~15% of its heap as gaps at the peak (16 KiB granules, fragmentation:
  no two values overlap in both bytes and steps), so 20% there, and the TPU compiler's figure
  exceeds the heap it dumps (`outside the heap`). TPU's peak comes at the end of the forward
  pass (a layer's gathered weights live), GPU's in the backward (the loss head's gradient)."""
  platform = targets.parse_target(target).platform
  require(platform)
  cfg = load_config("tiny", [*PLAN, f"data.ctx_len={ctx}"])
  plan = plan_cli.make_plan(cfg, target, "tiny", memory_breakdown=True)
  result = plan.memory_breakdown
  assert result.compiler_bytes == plan.memory.temporaries
  assert sum(g.bytes for g in result.groups) + result.gaps + result.outside_heap == result.compiler_bytes
  if platform == "cuda":
    assert result.heap_bytes == result.compiler_bytes
  assert result.live_bytes >= (0.9 if platform == "cuda" else 0.8) * result.heap_bytes
  assert 0 <= result.outside_heap < 0.3 * result.compiler_bytes
  at_peak = (memory.GATHERED,) if platform == "tpu" else (memory.LOSS_HEAD, memory.GRADIENTS)
  for name in (memory.SAVED, memory.KERNEL, *at_peak):
    assert result.group(name) is not None and result.group(name).bytes > 0, name
  other = result.group(memory.OTHER)
  assert other is None or other.bytes < 0.05 * result.live_bytes
  assert any("ChannelMix" in b.origin for b in result.buffers if b.group == memory.SAVED)

  rows = _lines_of(plan_cli.format_plan(plan, cfg))
  total = rows.pop("compiler temporaries")
  assert sum(rows.values()) == pytest.approx(total, abs=0.002 * len(rows))


def test_without_a_dump_the_plan_says_why(tmp_path):
  with pytest.raises(memory.DumpError, match="buffer-assignment"):
    memory.breakdown(str(tmp_path), 1)
  assert plan_cli._breakdown(str(tmp_path), 1, refused=False).startswith("no memory breakdown: no ")


def test_a_tuple_buffer_is_named_by_its_element_count():
  """A loop's whole state is one tuple buffer: its 70 shapes would fill the line."""
  from goosejax.plan.memory import _short_shape
  assert _short_shape("(s32[], bf16[4,4096,2560], /*index=5*/f32[32,2560])") == "a tuple of 3 arrays"
  assert _short_shape("f32[4,4096,65536]") == "f32[4,4096,65536]"
