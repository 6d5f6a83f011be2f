"""The one error type of the data layer: bad files, bad tokens, datasets too small."""
from __future__ import annotations

from goosejax.errors import GoosejaxError


class DataError(GoosejaxError):
  """A data or tokenizer problem; the message names the file (or key) and what was expected."""
