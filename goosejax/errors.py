"""The base class of goosejax's user-facing errors, and the data layer's error.

A `GoosejaxError` says what input was wrong (the file, key or value and what was expected);
the CLI prints its message on one line and exits with status 2. Anything else escaping a
command is a bug in goosejax and keeps its traceback.
"""
from __future__ import annotations


class GoosejaxError(ValueError):
  """Bad input: a config, file, argument or directory goosejax cannot use as given."""


class DataError(GoosejaxError):
  """A data or tokenizer problem; the message names the file (or key) and what was expected."""
