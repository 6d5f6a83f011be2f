"""Reading an optimized HLO module's text (`Compiled.as_text()` or an XLA dump): computations,
instructions with their operands, attributes and metadata, and the module's stack frames.

Only what the plan needs: which instruction defines a value, what it reads, which computation
it calls, its op_name (jax's name stack, e.g. `jit(train_step)/jvp()/while/body/...`) and the
Python call stack it was traced from (`stack_frame_id`, resolved through the module's
FileNames / FunctionNames / FileLocations / StackFrames tables).
"""
from __future__ import annotations

import dataclasses
import functools
import re

_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{$")
_DEFINITION = re.compile(r"^\s*(ROOT )?%?([\w.\-]+) = ")
_REFERENCE = re.compile(r"%([\w.\-]+)")
_TABLE_ROW = re.compile(r"^(\d+) (.*)$")
_FIELD = re.compile(r"(\w+)=(\d+)")


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  computation: str
  shape: str                 # "f32[2,128]{1,0}" or a tuple "(s32[], f32[...])"
  opcode: str
  operands: tuple[str, ...]
  operand_text: str          # the operand list as written ("0" for parameter(0))
  attributes: str            # everything after the operand list
  is_root: bool

  def attribute(self, key: str) -> str | None:
    """The value of `key=...` (a computation name without its %, a number, or a quoted string)."""
    match = re.search(rf'\b{key}=(?:%([\w.\-]+)|"([^"]*)"|(\w+))', self.attributes)
    return None if match is None else next(g for g in match.groups() if g is not None)

  @property
  def op_name(self) -> str:
    return (self.attribute("op_name") or "").replace("\\'", "'")

  @property
  def frame_id(self) -> int:
    return int(self.attribute("stack_frame_id") or 0)


@dataclasses.dataclass(frozen=True)
class Frame:
  file: str
  function: str
  line: int


class Module:
  """The instructions of one HLO module text, by name, and its stack frames."""

  def __init__(self, text: str):
    self.instructions: dict[str, Instruction] = {}
    self.roots: dict[str, str] = {}          # computation -> its ROOT instruction
    self.callers: dict[str, str] = {}        # called computation -> the instruction calling it
    self.entry = ""                          # the entry computation
    tables: dict[str, dict[int, str]] = {}
    table, computation = None, None
    for line in text.splitlines():
      if computation is not None:
        if line.startswith("}"):
          computation = None
        elif instruction := parse_instruction(line, computation):
          self._add(instruction)
      elif match := _COMPUTATION.match(line):
        computation = match[2]
        self.entry = computation if match[1] else self.entry
      elif line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
        table = tables.setdefault(line, {})
      elif table is not None and (row := _TABLE_ROW.match(line)):
        table[int(row[1])] = row[2]
      else:
        table = None
    self._tables = tables
    self.frames = functools.cache(self.frames)

  def _add(self, instruction: Instruction) -> None:
    self.instructions[instruction.name] = instruction
    if instruction.is_root:
      self.roots[instruction.computation] = instruction.name
    for key in ("body", "calls", "to_apply", "condition"):
      if called := instruction.attribute(key):
        self.callers.setdefault(called, instruction.name)

  def root_of(self, computation: str) -> Instruction:
    return self.instructions[self.roots[computation]]

  def frames(self, frame_id: int) -> tuple[Frame, ...]:
    """The call stack of `frame_id`, innermost first. XLA prints each frame's parent id one
    above the id it means (a root frame names itself), so parent p is frame p - 1."""
    stack, seen = [], set()
    while frame_id > 0 and frame_id not in seen:
      seen.add(frame_id)
      row = dict(_FIELD.findall(self._tables.get("StackFrames", {}).get(frame_id, "")))
      if not row:
        break
      location = dict(_FIELD.findall(self._tables["FileLocations"].get(int(row["file_location_id"]), "")))
      stack.append(Frame(
          file=self._tables["FileNames"].get(int(location.get("file_name_id", 0)), "").strip('"'),
          function=self._tables["FunctionNames"].get(int(location.get("function_name_id", 0)), "").strip('"'),
          line=int(location.get("line", 0))))
      frame_id = int(row["parent_frame_id"]) - 1
    return tuple(stack)


def parse_instruction(line: str, computation: str) -> Instruction | None:
  match = _DEFINITION.match(line)
  if not match:
    return None
  rest = line[match.end():]
  shape, rest = _split_shape(rest)
  opcode, _, rest = rest.partition("(")
  operand_text, attributes = _split_at_closing(rest)
  return Instruction(
      name=match[2], computation=computation, shape=shape, opcode=opcode.strip(),
      operands=tuple(_REFERENCE.findall(operand_text)), operand_text=operand_text,
      attributes=attributes,
      is_root=bool(match[1]))


def _split_shape(text: str) -> tuple[str, str]:
  """(the result shape, the rest) of `SHAPE opcode(...)...`; a tuple shape has nested parens."""
  if not text.startswith("("):
    shape, _, rest = text.partition(" ")
    return shape, rest
  inside, rest = _split_at_closing(text[1:])
  return f"({inside})", rest.lstrip()


def _split_at_closing(text: str) -> tuple[str, str]:
  """(text up to the parenthesis closing an already open one, what follows it)."""
  depth = 1
  for i, char in enumerate(text):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if depth == 0:
      return text[:i], text[i + 1:]
  return text, ""


_ARRAY = re.compile(r"([a-z]\w*)\[([\d,]*)\]")


def array_shapes(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  """[(dtype, dims)] of every array in a shape text, tuples flattened in order."""
  return [(dtype, tuple(int(d) for d in dims.split(",") if d))
          for dtype, dims in _ARRAY.findall(re.sub(r"\{[^}]*\}", "", shape))]
