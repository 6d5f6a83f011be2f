"""Compiled train and eval steps that a caller keeps to reuse across runs in one process.

Compiling the step is most of a short run's start-up. A notebook or a test suite that trains
several times with the same model, optimizer and mesh passes one `CompiledSteps` to every
`train(...)` call; a plain `train(...)` compiles afresh and keeps nothing after it returns.
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Hashable


class CompiledSteps:
  """A bounded map from everything a compiled step depends on to the compiled step."""

  def __init__(self, max_entries: int = 8):
    if max_entries < 1:
      raise ValueError(f"CompiledSteps: max_entries={max_entries}, expected >= 1")
    self.max_entries = max_entries
    self._entries: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()

  def __len__(self) -> int:
    return len(self._entries)

  def get_or_build(self, key: Hashable, build: Callable[[], Any]) -> Any:
    """The step stored under `key`, or `build()` stored there (evicting the least recent)."""
    if key in self._entries:
      self._entries.move_to_end(key)
      return self._entries[key]
    value = self._entries[key] = build()
    while len(self._entries) > self.max_entries:
      self._entries.popitem(last=False)
    return value
