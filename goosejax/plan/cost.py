"""What a compiled XLA program executes: FLOPs with every loop body counted once per trip, and
how many times each Pallas kernel runs.

`Compiled.cost_analysis()` walks the optimized HLO once, so a `while` body (the model's
`lax.scan` over layers, gradient-accumulation micro-batches) is counted once however many
times it runs: a 24-layer step reads as if it had one layer (and compile-only GPU programs
return no analysis at all). Here XLA's own HloCostAnalysis runs (through the CPU client) on
the compiled program's text, once on the whole module and once on a module rooted at each loop
body, and the bodies are multiplied by their trip counts, which XLA:GPU records on each loop
(`known_trip_count`) and which on TPU are read from the loop condition (`i < N`, i starting at
a constant).

Pallas kernels are custom calls that the cost analysis sees as free; `kernel_runs` counts their
executions (by the kernel's name in each call's metadata) and `kernel_elements` the elements of
each run's first output (the WKV kernels': y or its first gradient, [B, T, H, N] as the kernel
runs it: rows, padded length and heads of that device), so callers can add their work.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re

import jax

from goosejax.plan import hlo

_COMPUTATION = re.compile(r"^(ENTRY )?%([\w.\-]+) ")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ")
_REFERENCE = re.compile(r"%([\w.\-]+)")
_WHILE = re.compile(r"\bwhile\(%([\w.\-]+)\).*?condition=%([\w.\-]+), body=%([\w.\-]+)")
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_KERNEL = re.compile(r'custom_call_target="[^"]+".*?op_name="[^"]*/(\w+)/pallas_call"')
_COMPARE = re.compile(r"compare\(%([\w.\-]+), %([\w.\-]+)\), direction=(LT|GT)")
_TUPLE_INDEX = re.compile(r"get-tuple-element\(%([\w.\-]+)\), index=(\d+)")
_CONSTANT = re.compile(r"\bconstant\((-?\d+)\)")
_PASS_THROUGH = re.compile(r"\b(?:copy|bitcast|copy-done|convert)\(%([\w.\-]+)\)")
_TUPLE = re.compile(r"\btuple\((.*?)\)(?:, |$)")
_ADD = re.compile(r"\badd\(%([\w.\-]+), %([\w.\-]+)\)")


class UnknownTripCount(RuntimeError):
  """A loop whose trip count is neither recorded by XLA nor of the `i < N` form read here."""


@dataclasses.dataclass(frozen=True)
class ProgramCost:
  flops: float                          # per device, every loop body counted per trip
  flops_counted_once: float             # what Compiled.cost_analysis() says (on TPU)
  kernel_runs: dict[str, int]           # Pallas kernel name -> executions per step
  kernel_elements: dict[str, int] = dataclasses.field(default_factory=dict)
                                        # Pallas kernel name -> elements of the first output,
                                        # summed over its executions per step


@dataclasses.dataclass
class _Computation:
  name: str
  lines: list[str]
  is_entry: bool


def program_cost(compiled: jax.stages.Compiled) -> ProgramCost:
  """FLOPs and Pallas kernel executions of one run of `compiled` (per device for SPMD)."""
  program = _Program(compiled.as_text())
  once = program.flops_counted_once(program.entry)
  runs, elements = program.kernel_work()
  return ProgramCost(once + program.loop_correction(program.entry), once, runs, elements)


class _Program:
  """The computations of one HLO module text and the loops between them."""

  def __init__(self, text: str):
    self.text = text
    self.computations: dict[str, _Computation] = {}
    current = None
    for line in text.splitlines():
      if current is None:
        if match := _COMPUTATION.match(line):
          current = _Computation(match[2], [], bool(match[1]))
          self.computations[current.name] = current
      elif line.startswith("}"):
        current = None
      else:
        current.lines.append(line)
    self.entry = next(c.name for c in self.computations.values() if c.is_entry)
    # Memoised per program (a class-level functools.cache would keep every program's text alive
    # for the whole process).
    for method in ("loops", "callees", "loop_correction", "flops_counted_once"):
      setattr(self, method, functools.cache(getattr(self, method)))

  def loops(self, name: str) -> tuple[tuple[str, str, int], ...]:
    """(condition, body, trips) of each `while` in computation `name`."""
    found = []
    for line in self.computations[name].lines:
      if loop := _WHILE.search(line):
        found.append((loop[2], loop[3], self.trip_count(name, line, loop)))
    return tuple(found)

  def callees(self, name: str) -> tuple[tuple[str, int], ...]:
    """(computation called from `name`, times per run of `name`), loop trips included; a
    loop's condition runs once more than its body."""
    loops = self.loops(name)
    in_loops = {c for condition, body, _ in loops for c in (condition, body)}
    calls = [(c, trips + (c == condition)) for condition, body, trips in loops for c in (condition, body)]
    for line in self.computations[name].lines:
      calls += [(c, 1) for c in _REFERENCE.findall(line.partition(" = ")[2])
                if c in self.computations and c not in in_loops]
    return tuple(calls)

  def runs(self) -> dict[str, int]:
    """How many times each computation runs per execution of the entry."""
    order, seen = [], set()

    def visit(name):            # post-order: callees before their callers
      seen.add(name)
      for callee, _ in self.callees(name):
        if callee not in seen:
          visit(callee)
      order.append(name)

    visit(self.entry)
    runs = collections.Counter({self.entry: 1})
    for name in reversed(order):
      for callee, times in self.callees(name):
        runs[callee] += runs[name] * times
    return runs

  def kernel_work(self) -> tuple[dict[str, int], dict[str, int]]:
    """(executions, first-output elements summed over executions) per Pallas kernel name."""
    counts, elements = collections.Counter(), collections.Counter()
    for name, times in self.runs().items():
      for line in self.computations[name].lines:
        if kernel := _KERNEL.search(line):
          counts[kernel[1]] += times
          first_output = hlo.array_shapes(hlo.parse_instruction(line, name).shape)[0][1]
          elements[kernel[1]] += times * math.prod(first_output)
    return dict(counts), dict(elements)

  def loop_correction(self, name: str) -> float:
    """FLOPs the once-through count misses in `name`: every loop under it runs its body `trips`
    times, each run costing the body's own corrected count (loop conditions are compares and
    left at one run)."""
    bodies = {body: trips for _, body, trips in self.loops(name)}
    missing = 0.0
    for callee, _ in self.callees(name):
      if callee in bodies:
        once = self.flops_counted_once(callee)
        missing += bodies[callee] * (once + self.loop_correction(callee)) - once
      else:
        missing += self.loop_correction(callee)
    return missing

  def flops_counted_once(self, root: str) -> float:
    """XLA's cost analysis of the module with `root` as its entry computation."""
    from jax._src.lib import _jax
    from jaxlib import _hlo
    lines = []
    for line in self.text.splitlines():
      if line.startswith("HloModule "):   # its aliasing and layouts describe the real entry
        line = "HloModule " + root
      if line.startswith("ENTRY "):
        line = line[len("ENTRY "):]
      if line.startswith(f"%{root} "):
        line = "ENTRY " + line
      lines.append(line)
    module = _hlo.hlo_module_from_text("\n".join(lines))
    analysis = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
    return float(analysis.get("flops", 0.0))   # absent when nothing in it computes

  def trip_count(self, name: str, line: str, loop: re.Match) -> int:
    if known := _KNOWN_TRIPS.search(line):
      return int(known[1])
    condition = self.computations[loop[2]].lines
    root = next(l for l in condition if l.lstrip().startswith("ROOT "))
    values = self._definitions(condition)
    if compare := _COMPARE.search(root):
      left, right, direction = compare.groups()
      counter, bound = (left, right) if direction == "LT" else (right, left)
      limit = self._constant(values, bound)
      index = _TUPLE_INDEX.search(values.get(counter, ""))
      if limit is not None and index:
        start = self._initial_value(name, loop[1], int(index[2]))
        if start is not None:
          step = self._step(loop[3], int(index[2]))
          return max(-(-(limit - start) // step), 0)
    raise UnknownTripCount(f"loop {loop[3]} in {name}: no known trip count and no `i < N` condition")

  def _initial_value(self, name: str, operand: str, index: int) -> int | None:
    values = self._definitions(self.computations[name].lines)
    elements = _TUPLE.search(values.get(operand, ""))
    if not elements:
      return None
    names = _REFERENCE.findall(elements[1])
    return self._constant(values, names[index]) if index < len(names) else None

  def _step(self, body: str, index: int) -> int:
    """The constant the body adds to loop variable `index` (an unrolled loop steps by more than
    1); 1, as jax's loops step, where the increment is not a visible `add`."""
    lines = self.computations[body].lines
    values = self._definitions(lines)
    root = next(l for l in lines if l.lstrip().startswith("ROOT "))
    elements = _TUPLE.search(root.split(" = ", 1)[1])
    names = _REFERENCE.findall(elements[1]) if elements else []
    if index < len(names) and (add := _ADD.search(values.get(names[index], ""))):
      for operand in add.groups():
        step = self._constant(values, operand)
        if step:
          return step
    return 1

  @staticmethod
  def _definitions(lines: list[str]) -> dict[str, str]:
    return {match[1]: line for line in lines if (match := _INSTRUCTION.match(line))}

  @staticmethod
  def _constant(values: dict[str, str], name: str) -> int | None:
    """The integer `name` holds, following copies and bitcasts; None when not a constant."""
    while name in values:
      line = values[name].split("=", 1)[1]
      if constant := _CONSTANT.search(line.split(", metadata")[0]):
        return int(constant[1])
      through = _PASS_THROUGH.search(line)
      if not through:
        return None
      name = through[1]
    return None
