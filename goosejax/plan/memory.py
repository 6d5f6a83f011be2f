"""Where a compiled program's temporaries go: the buffers live at its peak, grouped by what they are.

XLA lays every temporary of a program out in one heap (the buffer assignment's
`preallocated-temp` allocation in device memory) and, asked to (`compiler_options`), writes that
layout and each value's live range to files: `*buffer-assignment.txt` (each value's offset and
size in the heap) and `*live-range.txt` (the step of the program's schedule where each value is
defined and last used). The TPU compiler writes them also for a program it then refuses for not
fitting. From these files `breakdown` finds the step at which the most heap bytes are in use (a
value's footprint rounded up to the heap's alignment, 16 KiB on TPU; values that share bytes
counted once) and groups the values live there by the instruction that made them, read in the
optimized HLO the compiler wrote with them:

  saved residuals per layer   made in the forward pass (op_name under jvp, not transposed) and
                              still live: what the backward reads; the layer scan's stacked
                              outputs [L, ...] are these
  kernel checkpoints          outputs of the forward WKV kernels (Pallas custom calls): y and the
                              chunk-start states the backward kernel reads
  gathered weights            all-gathers (FSDP: a weight gathered whole on every device), and
                              copies of the parameters (their compute-dtype casts)
  loss head                   the head's logits, the cross-entropy and L2Wrap (and the fused head
                              of goosejax.train.loss_head)
  optimizer update            optax's transformations (their frames in the op's Python stack)
  backward pass               made in the backward pass (op_name under transpose): gradients,
                              cotangents, activations recomputed under remat; the backward WKV
                              kernels' outputs
  other                       the rest

Rules apply in the order listed but with the kernels, gathers, optimizer and loss head first, to
the instruction that computed a value (followed through copies, bitcasts, tuples, loop-carried
values and the update operand of a dynamic-update-slice, so that a layer scan's stacked output
is attributed to what each layer wrote into it; an op without metadata, such as a layout
transpose XLA added, by its first operand). A group's bytes
are those live at the peak; the heap also holds gaps at that step (alignment and fragmentation),
and the compiler's own temporaries figure can differ from the heap (on TPU it is larger; see
`MemoryBreakdown.outside_heap`).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
from pathlib import Path

from goosejax.plan import hlo

SAVED = "saved residuals per layer"
KERNEL = "kernel checkpoints"
GATHERED = "gathered weights"
LOSS_HEAD = "loss head"
OPTIMIZER = "optimizer update"
GRADIENTS = "backward pass"
OTHER = "other"
GROUPS = (SAVED, KERNEL, GATHERED, LOSS_HEAD, OPTIMIZER, GRADIENTS, OTHER)

# Functions whose ops are the loss head, wherever they sit in an op's Python stack.
_LOSS_HEAD_FUNCTIONS = ("head_logits", "RWKV7.logits", "cross_entropy", "l2wrap", "_l2wrap_fwd",
                        "_l2wrap_bwd", "fused_head_loss")
_LOSS_HEAD_FILES = ("goosejax/train/loss_head.py",)
_KERNEL_CALL_TARGETS = ("tpu_custom_call", "__gpu$xla.gpu.triton")
# Ops that pass a value on without computing it: their operand says what the value is.
_PASS_THROUGH = ("bitcast", "copy", "copy-done", "convert", "reshape", "optimization-barrier")
_MAX_ALIGNMENT = 1 << 16


def compiler_options(directory: str) -> dict[str, object]:
  """What `Lowered.compile(...)` needs to write the files `breakdown` reads into `directory`."""
  return {"xla_dump_to": directory, "xla_dump_hlo_as_text": True}


@dataclasses.dataclass(frozen=True)
class LiveBuffer:
  value: str          # the HLO value, e.g. "while.109{52}" (tuple element 52 of a loop's result)
  bytes: int          # its footprint in the heap
  shape: str          # "f32[2,2,1024,512]" (the per-device shape)
  group: str          # one of GROUPS
  origin: str         # where the op that made it was traced: "time_mix.py:111 TimeMix.__call__"


@dataclasses.dataclass(frozen=True)
class Group:
  name: str
  bytes: int
  buffers: int
  largest: LiveBuffer


@dataclasses.dataclass(frozen=True)
class MemoryBreakdown:
  """The temporaries of one device's program at their peak, bytes per device."""
  groups: tuple[Group, ...]          # the groups that hold anything, largest first
  buffers: tuple[LiveBuffer, ...]    # everything live at the peak, largest first
  heap_bytes: int                    # the temporaries' heap as the buffer assignment lays it out
  compiler_bytes: int                # the compiler's temporaries figure (memory_analysis, or the
                                     # total a refusal names)
  refused: bool = False              # the compiler refused the program for not fitting

  @property
  def live_bytes(self) -> int:
    return sum(group.bytes for group in self.groups)

  @property
  def gaps(self) -> int:
    """Heap bytes not in use at the peak: alignment and fragmentation."""
    return self.heap_bytes - self.live_bytes

  @property
  def outside_heap(self) -> int:
    """The compiler's figure less the heap (TPU: its temporaries exceed the dumped heap; a
    refusal's total counts the parameters too)."""
    return self.compiler_bytes - self.heap_bytes

  def group(self, name: str) -> Group | None:
    return next((group for group in self.groups if group.name == name), None)


class DumpError(RuntimeError):
  """The compiler wrote no buffer assignment where `breakdown` looked."""


def breakdown(directory: str, compiler_bytes: int, refused: bool = False) -> MemoryBreakdown:
  """The buffers live at the peak of the program the compiler dumped into `directory`."""
  assignment, live_ranges, module_text = _read_dump(Path(directory))
  heap_bytes, values = _heap(assignment)
  ranges = _live_ranges(live_ranges)
  alignment = _alignment(values)
  live = _live_at_peak(values, ranges, alignment)
  classifier = _Classifier(hlo.Module(module_text))
  buffers = sorted((classifier.buffer(value, footprint) for value, footprint in live),
                   key=lambda b: -b.bytes)
  return MemoryBreakdown(_groups(buffers), tuple(buffers), heap_bytes, compiler_bytes, refused)


def _groups(buffers: list[LiveBuffer]) -> tuple[Group, ...]:
  members = collections.defaultdict(list)
  for buffer in buffers:
    members[buffer.group].append(buffer)
  groups = [Group(name, sum(b.bytes for b in found), len(found), found[0])
            for name, found in members.items()]
  return tuple(sorted(groups, key=lambda g: -g.bytes))


# ----------------------------------------------------------------------------- the dump's files


def _read_dump(directory: Path) -> tuple[str, str, str]:
  """(buffer assignment, live ranges, optimized HLO) texts of the largest module dumped."""
  assignments = sorted(directory.glob("*after_optimizations-buffer-assignment.txt"),
                       key=lambda p: p.stat().st_size)
  if not assignments:
    raise DumpError(f"no *after_optimizations-buffer-assignment.txt in {directory}")
  prefix = assignments[-1].name.removesuffix("-buffer-assignment.txt")
  read = lambda suffix: (directory / f"{prefix}{suffix}").read_text()
  return read("-buffer-assignment.txt"), read("-live-range.txt"), read(".txt")


@dataclasses.dataclass(frozen=True)
class _HeapValue:
  name: str       # "fusion.12{}" or "while.3{4}", as the live-range file names it
  size: int
  offset: int
  shape: str


_ALLOCATION = re.compile(r"^allocation \d+: size (\d+), (.*):$")
_VALUE = re.compile(r"^ value: <\d+ (\S+)(?: \(phi\))? @\d+> \(size=(\d+),offset=(\d+)\): (.*)$")


def _heap(assignment: str) -> tuple[int, list[_HeapValue]]:
  """(size, values) of the temporaries' heap in device memory: the `preallocated-temp`
  allocation of memory colour 0 (other colours are on-chip memories)."""
  heap, values, current = 0, [], False
  for line in assignment.splitlines():
    if match := _ALLOCATION.match(line):
      current = match[2] == "preallocated-temp"
      heap = int(match[1]) if current else heap
    elif current and (value := _VALUE.match(line)):
      name = value[1] if "{" in value[1] else value[1] + "{}"
      values.append(_HeapValue(name, int(value[2]), int(value[3]), value[4]))
  if not heap:
    raise DumpError("the buffer assignment has no preallocated-temp allocation")
  return heap, values


_RANGE = re.compile(r"^\s+(\S+):(\d+)-(\d+)$")


def _live_ranges(text: str) -> dict[str, tuple[int, int]]:
  """value -> (first, last) step of the schedule (XLA's HloLiveRange, loops flattened)."""
  section = text.split("BufferLiveRange:", 1)[-1].split("Live ranges at", 1)[0]
  return {m[1]: (int(m[2]), int(m[3])) for line in section.splitlines() if (m := _RANGE.match(line))}


def _alignment(values: list[_HeapValue]) -> int:
  """The heap's allocation granule: the largest power of two dividing every offset (capped)."""
  granule = 0
  for value in values:
    granule = math.gcd(granule, value.offset)
  granule = granule or 1
  return min(granule & -granule, _MAX_ALIGNMENT)


def _live_at_peak(values: list[_HeapValue], ranges: dict[str, tuple[int, int]],
                  alignment: int) -> list[tuple[_HeapValue, int]]:
  """(value, footprint) of every value live at the step where the most heap bytes are in use.
  Values at one offset at once share their bytes (a loop's result and its body's parameter);
  each offset counts once, with its largest value."""
  footprint = {v.name: -(-v.size // alignment) * alignment for v in values}
  events = collections.defaultdict(list)
  for value in values:
    if value.name in ranges:
      first, last = ranges[value.name]
      events[first].append((value, 1))
      events[last + 1].append((value, -1))
  by_offset = collections.defaultdict(collections.Counter)
  in_use, peak, peak_step = 0, -1, 0
  for step in sorted(events):
    for value, change in events[step]:
      sizes = by_offset[value.offset]
      before = max(sizes, default=0)
      sizes[footprint[value.name]] += change
      if sizes[footprint[value.name]] == 0:
        del sizes[footprint[value.name]]
      in_use += max(sizes, default=0) - before
    if in_use > peak:
      peak, peak_step = in_use, step
  live = {}
  for value in values:
    first, last = ranges.get(value.name, (1, 0))
    if first <= peak_step <= last:
      held = live.get(value.offset)
      if held is None or footprint[value.name] > footprint[held.name]:
        live[value.offset] = value
  return [(value, footprint[value.name]) for value in live.values()]


# ----------------------------------------------------------------------------- what a value is


def _split_value(value: str) -> tuple[str, tuple[int, ...]]:
  """'while.3{4,1}' -> ('while.3', (4, 1))."""
  name, _, index = value.partition("{")
  return name, tuple(int(i) for i in index.rstrip("}").split(",") if i)


def _short_shape(shape: str) -> str:
  """A tuple (e.g. a loop's whole state) as its element count, not a 70-element line."""
  if not shape.startswith("("):
    return shape
  elements = len(re.findall(r"[a-z]+\d*\[", shape))
  return f"a tuple of {elements} arrays"


class _Classifier:
  def __init__(self, module: hlo.Module):
    self.module = module

  def buffer(self, value: _HeapValue, footprint: int) -> LiveBuffer:
    producer, loop = self.producer(value.name)
    group = self.group(producer, loop)
    shape = _short_shape(re.sub(r"\{[^}]*\}", "", value.shape))
    return LiveBuffer(value.name, footprint, shape, group, self.origin(producer))

  def producer(self, value: str) -> tuple[hlo.Instruction | None, hlo.Instruction | None]:
    """(the instruction that computed `value`, the first `while` whose result or loop-carried
    value it passed through on the way, or None)."""
    instructions = self.module.instructions
    name, index = _split_value(value)
    loop, seen = None, set()
    while name in instructions and (name, index) not in seen:
      seen.add((name, index))
      instruction = instructions[name]
      carrier = self._loop_of(instruction) if index else None
      if carrier is not None:
        loop = loop or carrier
        root = self.module.root_of(carrier.attribute("body"))
        if root.opcode != "tuple":
          return instruction, loop
        name, index = root.operands[index[0]], index[1:]
      elif next_step := self._through(instruction, index):
        name, index = next_step
      elif not instruction.op_name and not instruction.frame_id and instruction.operands:
        name, index = instruction.operands[0], ()   # a layout change XLA added: what it moves
      else:
        return self._fused_producer(instruction, index), loop
    return instructions.get(name), loop

  def _loop_of(self, instruction: hlo.Instruction) -> hlo.Instruction | None:
    """The `while` whose tuple `instruction` is: its result, or its body's parameter."""
    if instruction.opcode == "while":
      return instruction
    if instruction.opcode == "parameter":
      caller = self.module.instructions.get(self.module.callers.get(instruction.computation, ""))
      if caller is not None and caller.opcode == "while" and caller.attribute("body") == instruction.computation:
        return caller
    return None

  def _through(self, instruction: hlo.Instruction, index: tuple[int, ...]):
    """(name, index) of what `instruction` passes on, or None where it computes its value."""
    opcode, operands = instruction.opcode, instruction.operands
    if opcode == "get-tuple-element":
      return operands[0], (int(instruction.attribute("index")),) + index
    if opcode == "tuple" and index:
      return operands[index[0]], index[1:]
    if opcode == "copy-start":
      return operands[0], ()
    if opcode in _PASS_THROUGH and operands:
      return operands[0], ()
    if opcode == "dynamic-update-slice":
      return operands[1], ()
    if opcode == "fusion":
      return self._fusion_update(instruction, index)
    return None

  def _fusion_update(self, fusion: hlo.Instruction, index: tuple[int, ...]):
    """A fusion that writes an operand into a slice of a buffer (its root, or the root tuple's
    element, a dynamic-update-slice whose update is a fusion parameter) passes that operand on."""
    update = self._fused_update(fusion, index)
    if update is not None and update.opcode == "parameter":
      number = int(update.operand_text)
      if number < len(fusion.operands):
        return fusion.operands[number], ()
    return None

  def _fused_update(self, fusion: hlo.Instruction, index: tuple[int, ...]) -> hlo.Instruction | None:
    """The update operand of the dynamic-update-slice a fusion ends in, through converts and
    bitcasts; None when it ends in something else."""
    called = fusion.attribute("calls")
    if called is None or called not in self.module.roots:
      return None
    root = self.module.root_of(called)
    if root.opcode == "tuple" and index:
      root = self.module.instructions[root.operands[index[0]]]
    if root.opcode != "dynamic-update-slice":
      return None
    update = self.module.instructions[root.operands[1]]
    while update.opcode in _PASS_THROUGH and update.operands:
      update = self.module.instructions[update.operands[0]]
    return update

  def _fused_producer(self, instruction: hlo.Instruction, index: tuple[int, ...]) -> hlo.Instruction:
    """For a dynamic-update-slice fusion that computes its update, the op computing it (its
    metadata says what the value is; the fusion's own names the slice update)."""
    update = self._fused_update(instruction, index) if instruction.opcode == "fusion" else None
    return update if update is not None and update.opcode != "parameter" else instruction

  def group(self, producer: hlo.Instruction | None, loop: hlo.Instruction | None) -> str:
    if producer is None:
      return OTHER
    op_name = producer.op_name
    frames = self.module.frames(producer.frame_id)
    if producer.opcode == "custom-call" and _is_kernel(producer):
      return KERNEL if "forward" in op_name else GRADIENTS
    if producer.opcode.startswith("all-gather") or self._is_a_parameter(producer):
      return GATHERED
    if any("/optax/" in frame.file for frame in frames):
      return OPTIMIZER
    if any(frame.function in _LOSS_HEAD_FUNCTIONS or frame.file.endswith(_LOSS_HEAD_FILES)
           for frame in frames):
      return LOSS_HEAD
    loop_name = loop.op_name if loop is not None else ""
    if "transpose(" in op_name or "transpose(" in loop_name:
      return GRADIENTS
    if "jvp(" in op_name or "jvp(" in loop_name:
      return SAVED
    return OTHER

  def _is_a_parameter(self, instruction: hlo.Instruction) -> bool:
    """One of the train state's parameters, as the program receives it."""
    return (instruction.opcode == "parameter" and instruction.computation == self.module.entry
            and instruction.op_name.startswith("state.params"))

  def origin(self, producer: hlo.Instruction | None) -> str:
    """The producing op's innermost frame in goosejax or pallas_kernels, else its op_name."""
    if producer is None:
      return "?"
    for frame in self.module.frames(producer.frame_id):
      if "/site-packages/" not in frame.file and frame.file.endswith(".py"):
        return f"{Path(frame.file).name}:{frame.line} {frame.function}"
    return producer.op_name or producer.opcode


def _is_kernel(instruction: hlo.Instruction) -> bool:
  return (instruction.attribute("custom_call_target") in _KERNEL_CALL_TARGETS
          or "pallas_call" in instruction.op_name)


# ----------------------------------------------------------------------------- report


def format_breakdown(memory: MemoryBreakdown) -> str:
  """One line per group (size, share of the compiler's temporaries, buffers, the largest with
  the code that made it), then the heap's gaps and what the compiler counts outside the heap;
  in GiB, or MiB below 1 GiB."""
  unit, scale = ("GiB", 2.0**30) if memory.compiler_bytes >= 2**30 else ("MiB", 2.0**20)
  total = memory.compiler_bytes or 1
  row = lambda label, size, rest: f"  {label:27}{size / scale:9.3f}  {size / total:5.0%}  {rest}"
  state = "as laid out before the compiler refused it" if memory.refused else "compiled"
  lines = [f"temporaries at their peak, per device ({state}):",
           f"  {'':27}{unit:>9}  share  buffers  largest"]
  for group in memory.groups:
    largest = group.largest
    lines.append(row(group.name, group.bytes, f"{group.buffers:7d}  {largest.shape} "
                                              f"({largest.origin})"))
  lines.append(row("heap gaps at the peak", memory.gaps, "         alignment and fragmentation"))
  if memory.outside_heap:
    lines.append(row("outside the heap", memory.outside_heap,
                     "         in the compiler's figure, not in its buffer assignment"))
  lines.append(row("compiler temporaries", memory.compiler_bytes, ""))
  return "\n".join(lines)
