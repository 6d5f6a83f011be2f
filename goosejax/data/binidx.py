"""binidx: the RWKV-LM / Megatron `MMIDIDX` tokenized-data format
(docs/architecture.md#training-data-binidx-and-sample-order).

`<prefix>.idx` (little-endian): magic b"MMIDIDX\\x00\\x00", uint64 version 1, uint8 dtype code,
uint64 n (items), uint64 d (doc-index length), int32 sizes[n], int64 pointers[n] (byte
offsets into .bin), int64 doc_idx[d]. `<prefix>.bin`: the items' tokens back to back.
goosejax writes one item per document (its tokens then the end-of-text id) and
doc_idx = [0, 1, ..., n], exactly as RWKV-LM's make_data.py does.

`BinIdxDataset(prefix)` checks the index against the format and the .bin size, then memory-maps
the tokens: `tokens` is the flat token stream (what RWKV-LM samples from), `len(ds)` and
`ds[i]` give documents, so the dataset is a Grain random-access data source.
`BinIdxWriter(prefix, dtype)` streams documents to disk and writes the index on `close()`.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Sequence

import numpy as np

from goosejax.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34  # 9 magic + 8 version + 1 dtype + 8 n + 8 d
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16), 4: np.dtype(np.int32),
    5: np.dtype(np.int64), 6: np.dtype(np.float64), 7: np.dtype(np.float64), 8: np.dtype(np.uint16),
}
_CODE_FOR_DTYPE = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3,
                   np.dtype(np.int32): 4, np.dtype(np.int64): 5, np.dtype(np.uint16): 8}


def prefix_of(path: str | os.PathLike) -> Path:
  """`data/x`, `data/x.bin` and `data/x.idx` all name the dataset prefix `data/x`."""
  path = Path(path)
  return path.with_suffix("") if path.suffix in (".bin", ".idx") else path


def dtype_for_vocab(vocab_size: int) -> np.dtype:
  """uint16 when every id fits (RWKV World data), else int32."""
  return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


class BinIdxDataset:
  """Memory-mapped reader; a Grain random-access source whose records are documents."""

  def __init__(self, prefix: str | os.PathLike):
    self.prefix = prefix_of(prefix)
    self.idx_path = self.prefix.with_name(self.prefix.name + ".idx")
    self.bin_path = self.prefix.with_name(self.prefix.name + ".bin")
    self._open()

  def _open(self) -> None:
    idx_path, bin_path = self.idx_path, self.bin_path
    for path in (idx_path, bin_path):
      if not path.is_file():
        raise DataError(f"{path}: file not found (a binidx dataset needs both .bin and .idx)")
    idx_size = idx_path.stat().st_size
    with open(idx_path, "rb") as f:
      header = f.read(HEADER_SIZE)
    if not (header.startswith(MAGIC) or MAGIC.startswith(header)):
      raise DataError(f"{idx_path}: not a binidx index (expected magic {MAGIC!r}, found "
                      f"{header[:9]!r}); is it a different format?")
    if len(header) < HEADER_SIZE:
      raise DataError(f"{idx_path}: truncated: {idx_size} bytes, the header alone needs {HEADER_SIZE}")
    version, code, n, d = struct.unpack("<QBQQ", header[9:])
    if version != VERSION:
      raise DataError(f"{idx_path}: index version {version}, only version {VERSION} exists")
    if code not in DTYPE_CODES:
      raise DataError(f"{idx_path}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
    self.dtype = DTYPE_CODES[code]
    if self.dtype.kind == "f":
      raise DataError(f"{idx_path}: dtype code {code} is floating point; token data must be integers")
    expected = HEADER_SIZE + 12 * n + 8 * d
    if idx_size != expected:
      problem = "truncated" if idx_size < expected else "has trailing bytes"
      raise DataError(f"{idx_path}: {problem}: {idx_size} bytes, but the header's n={n} items "
                      f"and d={d} doc-index entries need {expected}")
    self.sizes = np.memmap(idx_path, np.int32, "r", HEADER_SIZE, (n,)) if n else np.zeros(0, np.int32)
    self.pointers = (np.memmap(idx_path, np.int64, "r", HEADER_SIZE + 4 * n, (n,))
                     if n else np.zeros(0, np.int64))
    self.doc_idx = (np.memmap(idx_path, np.int64, "r", HEADER_SIZE + 12 * n, (d,))
                    if d else np.zeros(0, np.int64))
    itemsize = self.dtype.itemsize
    if n and (self.sizes.min() < 0 or self.pointers[0] != 0
              or np.any(self.pointers[1:] != self.pointers[:-1] + self.sizes[:-1].astype(np.int64) * itemsize)):
      raise DataError(f"{idx_path}: item pointers are not the running sum of the item sizes; "
                      "the index is corrupt or was not written for one contiguous .bin")
    n_tokens = int(self.sizes.sum(dtype=np.int64))
    bin_size = bin_path.stat().st_size
    if bin_size != n_tokens * itemsize:
      raise DataError(f"{bin_path}: {bin_size} bytes, but its index {idx_path.name} describes "
                      f"{n_tokens} tokens of {self.dtype.name} = {n_tokens * itemsize} bytes")
    self.tokens = (np.memmap(bin_path, self.dtype, "r", 0, (n_tokens,)) if n_tokens
                   else np.zeros(0, self.dtype))

  # Pickle by path (Grain workers), never by copying the memory map.
  def __getstate__(self) -> dict:
    return {"prefix": str(self.prefix)}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["prefix"])

  def __repr__(self) -> str:
    return f"BinIdxDataset({str(self.prefix)!r}, documents={len(self)}, tokens={self.n_tokens}, dtype={self.dtype.name})"

  def __len__(self) -> int:
    return len(self.sizes)

  def __getitem__(self, index: int) -> np.ndarray:
    if not -len(self) <= index < len(self):
      raise IndexError(f"document {index} out of range for {self.prefix} ({len(self)} documents)")
    start = int(self.pointers[index]) // self.dtype.itemsize
    return np.asarray(self.tokens[start:start + int(self.sizes[index])])

  @property
  def n_tokens(self) -> int:
    return len(self.tokens)

  @property
  def document_starts(self) -> np.ndarray:
    """int64 token offset of each document in the flat stream."""
    return self.pointers // self.dtype.itemsize


class BinIdxWriter:
  """Stream documents into `<prefix>.bin`; `close()` writes `<prefix>.idx`.

  Both files appear under their final names only when `close()` succeeds (written to
  `.tmp` names first), so an interrupted run never leaves a dataset that looks complete.
  """

  def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | str = np.uint16):
    self.prefix = prefix_of(prefix)
    self.dtype = np.dtype(dtype)
    if self.dtype not in _CODE_FOR_DTYPE:
      raise DataError(f"binidx dtype {self.dtype.name}: expected one of "
                      f"{sorted(d.name for d in _CODE_FOR_DTYPE)}")
    self._info = np.iinfo(self.dtype)
    self.prefix.parent.mkdir(parents=True, exist_ok=True)
    self._bin_tmp = self.prefix.with_name(self.prefix.name + ".bin.tmp")
    self._bin = open(self._bin_tmp, "wb")
    self._sizes: list[int] = []
    self.n_tokens = 0

  def add_document(self, ids: Sequence[int] | np.ndarray) -> None:
    array = np.asarray(ids)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
      raise DataError(f"{self.prefix}: a document must be a 1-D sequence of integer ids, got "
                      f"shape {array.shape} dtype {array.dtype}")
    if array.size and (array.min() < self._info.min or array.max() > self._info.max):
      raise DataError(f"{self.prefix}: id {int(array.max())} or {int(array.min())} does not fit "
                      f"{self.dtype.name}; use a wider dtype (int32)")
    if array.size > np.iinfo(np.int32).max:
      raise DataError(f"{self.prefix}: a document of {array.size} tokens exceeds the int32 size field")
    self._bin.write(array.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
    self._sizes.append(int(array.size))
    self.n_tokens += int(array.size)

  @property
  def n_documents(self) -> int:
    return len(self._sizes)

  def close(self) -> None:
    if self._bin.closed:
      return
    self._bin.close()
    sizes = np.asarray(self._sizes, dtype="<i4")
    pointers = np.zeros(len(sizes), dtype="<i8")
    np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
    doc_idx = np.arange(len(sizes) + 1, dtype="<i8")
    idx_tmp = self.prefix.with_name(self.prefix.name + ".idx.tmp")
    with open(idx_tmp, "wb") as f:
      f.write(MAGIC)
      f.write(struct.pack("<QBQQ", VERSION, _CODE_FOR_DTYPE[self.dtype], len(sizes), len(doc_idx)))
      f.write(sizes.tobytes())
      f.write(pointers.tobytes())
      f.write(doc_idx.tobytes())
    os.replace(self._bin_tmp, self.prefix.with_name(self.prefix.name + ".bin"))
    os.replace(idx_tmp, self.prefix.with_name(self.prefix.name + ".idx"))

  def abort(self) -> None:
    """Close and delete the partial output."""
    self._bin.close()
    self._bin_tmp.unlink(missing_ok=True)

  def __enter__(self) -> "BinIdxWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()
