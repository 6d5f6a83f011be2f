"""Recurrent states on disk (`goosejax generate --state-in/--state-out`): one .npz file.

Arrays `att_shift_LBC`, `wkv_LBHNN` (fp32, [value, key] as the official runtime) and
`ffn_shift_LBC` in goosejax's layout, plus `format` = "goosejax-rwkv7-state-v1". A state is
tied to a model's shape (layers, width, heads); loading checks it against the model.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from goosejax.errors import GoosejaxError
from goosejax.model.state import RWKV7State

FORMAT = "goosejax-rwkv7-state-v1"


class StateFileError(GoosejaxError):
  """A state file is missing, malformed or does not fit the model."""


def save_state(path: str | os.PathLike, state: RWKV7State) -> None:
  path = Path(path)
  with open(path, "wb") as f:   # a file object: np.savez would otherwise append ".npz"
    np.savez(f, format=np.array(FORMAT), att_shift_LBC=np.asarray(state.att_shift_LBC, np.float32),
             wkv_LBHNN=np.asarray(state.wkv_LBHNN, np.float32),
             ffn_shift_LBC=np.asarray(state.ffn_shift_LBC, np.float32))


def load_state(path: str | os.PathLike, model) -> RWKV7State:
  """The state in `path`, checked against `model` and cast to its compute dtype."""
  path = Path(path)
  if not path.is_file():
    raise StateFileError(f"{path}: state file not found")
  arrays = _read_npz(path)
  if str(arrays.get("format")) != FORMAT:
    raise StateFileError(f"{path}: not a goosejax state file (format {arrays.get('format')!r}, "
                         f"expected {FORMAT!r})")
  cfg = model.config
  L, C, H, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size
  att, wkv, ffn = (arrays.get(k) for k in ("att_shift_LBC", "wkv_LBHNN", "ffn_shift_LBC"))
  if att is None or wkv is None or ffn is None:
    raise StateFileError(f"{path}: missing att_shift_LBC / wkv_LBHNN / ffn_shift_LBC")
  B = att.shape[1] if att.ndim == 3 else -1
  expected = {"att_shift_LBC": (L, B, C), "wkv_LBHNN": (L, B, H, N, N), "ffn_shift_LBC": (L, B, C)}
  for name, array in (("att_shift_LBC", att), ("wkv_LBHNN", wkv), ("ffn_shift_LBC", ffn)):
    if array.shape != expected[name]:
      raise StateFileError(f"{path}: {name} has shape {array.shape}, but this model (L={L}, C={C}, "
                           f"H={H}, N={N}) needs {expected[name]}")
  dtype = model.compute_dtype
  return RWKV7State(jnp.asarray(att, dtype), jnp.asarray(wkv, jnp.float32), jnp.asarray(ffn, dtype))


_NPZ_MAGIC = b"PK\x03\x04"   # an .npz is a zip archive


def _read_npz(path: Path) -> dict[str, np.ndarray]:
  with open(path, "rb") as f:
    if f.read(len(_NPZ_MAGIC)) != _NPZ_MAGIC:   # else numpy would try to unpickle it and advise
      raise StateFileError(f"{path}: not a goosejax state file (expected the .npz archive "
                           "that --state-out writes)")   # allow_pickle=True, never right here
  try:
    loaded = np.load(path, allow_pickle=False)
    is_archive = isinstance(loaded, np.lib.npyio.NpzFile)
    if is_archive:
      with loaded:
        return {k: loaded[k] for k in loaded.files}
  # A truncated or corrupted archive fails in zipfile (BadZipFile, EOFError, zlib.error).
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise StateFileError(f"{path}: not a readable goosejax state file, truncated or corrupted? "
                         f"({e})") from None
  raise StateFileError(f"{path}: not a goosejax state file (one array, not an .npz archive)")
