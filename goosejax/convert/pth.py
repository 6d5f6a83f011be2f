"""PyTorch `.pth` files read and written without torch and without running pickled code.

A file saved by `torch.save` (torch >= 1.6) is an uncompressed zip archive whose records all
sit in one top-level folder (its name varies: `archive/`, the file's stem, ...):

  data.pkl                  the pickled object; for a checkpoint, a dict {name: tensor}
  data/<key>                the raw bytes of each storage, in the byte order below
  byteorder                 "little" or "big" (optional; absent means little)
  version, .format_version, .storage_alignment, .data/serialization_id   bookkeeping

In data.pkl each tensor is the call `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, requires_grad, backward_hooks[, metadata])`, and each storage a persistent id
`('storage', torch.<Type>Storage, key, location, numel)` that names its `data/<key>` record.

`read_pth` runs data.pkl through an unpickler whose `find_class` resolves only a short
allow-list, and resolves it to local stand-ins, never to torch: anything else a file names
(os.system, builtins.eval, torch.load, ...) is refused before any of it can be called.
`write_pth` writes the same layout (the pickle written opcode by opcode), readable by
`torch.load(weights_only=True)` and by the official RWKV runtime.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from goosejax.convert.official import CheckpointFormatError

# torch storage class name -> element dtype (little-endian; byte-swapped for "big" files).
STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
STORAGE_NAMES: dict[np.dtype, str] = {dtype: name for name, dtype in STORAGE_DTYPES.items()}

STORAGE_ALIGNMENT = 64      # torch aligns each data/<key> record to 64 bytes (mmap loading)
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)   # fixed timestamps: the same tensors give the same bytes


class UnsafePickleError(CheckpointFormatError):
  """data.pkl references a callable outside the allow-list; nothing of it was run."""


# ----------------------------------------------------------------------------- reading


class _StorageType:
  """Stand-in for a `torch.<Type>Storage` class: just the element dtype."""
  __slots__ = ("name", "dtype")

  def __init__(self, name: str, dtype: np.dtype):
    self.name, self.dtype = name, dtype


class _StorageRef:
  """A persistent id resolved: which data/<key> record, its dtype and element count."""
  __slots__ = ("key", "dtype", "numel")

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
  """A tensor described by data.pkl; its bytes are read after unpickling finishes."""
  __slots__ = ("storage", "offset", "size", "stride")

  def __init__(self, storage: _StorageRef, offset: int, size: tuple[int, ...],
               stride: tuple[int, ...]):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(
      isinstance(v, int) and not isinstance(v, bool) for v in value):
    raise CheckpointFormatError(f"{what} must be a tuple of ints, got {value!r}")
  return tuple(value)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None) -> _TensorRef:
  """Stand-in for torch._utils._rebuild_tensor_v2: records the view, reads nothing yet."""
  if not isinstance(storage, _StorageRef):
    raise CheckpointFormatError(
        f"_rebuild_tensor_v2 got {type(storage).__name__} as its storage, expected a "
        "persistent storage id")
  if not isinstance(storage_offset, int) or storage_offset < 0:
    raise CheckpointFormatError(f"tensor storage offset {storage_offset!r} is not an int >= 0")
  size = _int_tuple(size, "tensor size")
  stride = _int_tuple(stride, "tensor stride")
  if len(size) != len(stride) or any(s < 0 for s in size + stride):
    raise CheckpointFormatError(f"tensor size {size} and stride {stride} do not describe a view")
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None) -> _TensorRef:
  """Stand-in for torch._utils._rebuild_parameter (an nn.Parameter): the tensor itself."""
  if not isinstance(data, _TensorRef):
    raise CheckpointFormatError(f"_rebuild_parameter got {type(data).__name__}, expected a tensor")
  return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in STORAGE_DTYPES.items()},
}
ALLOWED_GLOBALS = tuple(f"{module}.{name}" for module, name in _ALLOWED_GLOBALS)


class _RestrictedUnpickler(pickle.Unpickler):
  def __init__(self, file, source: str):
    super().__init__(file)
    self.source = source

  def find_class(self, module: str, name: str):
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafePickleError(
          f"{self.source}: refusing to load: data.pkl references {module}.{name}, which is not "
          f"one of the tensor-rebuild callables this reader allows ({', '.join(ALLOWED_GLOBALS)}); "
          "nothing from the file was executed") from None

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise CheckpointFormatError(f"{self.source}: unsupported persistent id {pid!r} in data.pkl; "
                                  "expected ('storage', torch.<Type>Storage, key, location, numel)")
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, _StorageType):
      raise CheckpointFormatError(f"{self.source}: storage {key!r} has type {storage_type!r}; "
                                  f"expected one of torch.{{{', '.join(STORAGE_DTYPES)}}}")
    if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
      raise CheckpointFormatError(f"{self.source}: malformed storage id {pid!r} in data.pkl")
    return _StorageRef(key, storage_type.dtype, numel)


def _open_zip(path: Path) -> zipfile.ZipFile:
  with open(path, "rb") as f:
    head = f.read(8)
  try:
    return zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    if head.startswith(b"PK"):
      raise CheckpointFormatError(
          f"{path}: truncated or corrupted zip archive ({e}); expected a complete .pth file "
          "written by torch.save") from None
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
      raise CheckpointFormatError(
          f"{path}: legacy (pre-1.6, non-zip) torch serialization; re-save it with torch >= 1.6 "
          "(the default zip format) to load it here") from None
    raise CheckpointFormatError(
        f"{path}: not a PyTorch .pth file (a zip archive holding data.pkl); it starts with "
        f"{head!r}") from None


def _find_prefix(archive: zipfile.ZipFile, source: str) -> str:
  pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
  if len(pickles) != 1:
    raise CheckpointFormatError(
        f"{source}: expected exactly one '<folder>/data.pkl' record in the zip archive, found "
        f"{pickles or 'none'}; is this a file written by torch.save?")
  return pickles[0][: -len("data.pkl")]


def _byte_order(archive: zipfile.ZipFile, prefix: str, source: str) -> str:
  name = prefix + "byteorder"
  if name not in archive.NameToInfo:
    return "<"
  order = archive.read(name).strip()
  if order not in (b"little", b"big"):
    raise CheckpointFormatError(f"{source}: record {name!r} says {order!r}; expected little or big")
  return "<" if order == b"little" else ">"


class _StorageReader:
  """Reads data/<key> records as flat arrays, keeping the last one for tensors that share it."""

  def __init__(self, archive: zipfile.ZipFile, prefix: str, order: str, source: str):
    self.archive, self.prefix, self.order, self.source = archive, prefix, order, source
    self.cached_key: str | None = None
    self.cached: np.ndarray | None = None

  def flat(self, ref: _StorageRef) -> np.ndarray:
    if ref.key == self.cached_key:
      return self.cached
    name = f"{self.prefix}data/{ref.key}"
    if name not in self.archive.NameToInfo:
      raise CheckpointFormatError(f"{self.source}: data.pkl references storage {ref.key!r} but the "
                                  f"archive has no record {name!r}")
    try:
      raw = self.archive.read(name)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise CheckpointFormatError(f"{self.source}: cannot read record {name!r}: {e}") from None
    expected = ref.numel * ref.dtype.itemsize
    if len(raw) != expected:
      raise CheckpointFormatError(
          f"{self.source}: record {name!r} holds {len(raw)} bytes, but its storage id says "
          f"{ref.numel} x {ref.dtype.name} = {expected} bytes")
    native = self.order == ("<" if sys.byteorder == "little" else ">")
    flat = np.frombuffer(raw, ref.dtype if native else ref.dtype.newbyteorder(self.order))
    self.cached_key, self.cached = ref.key, flat
    return flat

  def tensor(self, ref: _TensorRef, name: str) -> np.ndarray:
    flat = self.flat(ref.storage)
    if any(s == 0 for s in ref.size):
      return np.zeros(ref.size, ref.storage.dtype)
    last = ref.offset + sum((s - 1) * st for s, st in zip(ref.size, ref.stride))
    if last >= flat.size:
      raise CheckpointFormatError(
          f"{self.source}: tensor {name!r} (size {ref.size}, stride {ref.stride}, offset "
          f"{ref.offset}) reaches element {last} of storage {ref.storage.key!r}, which has only "
          f"{flat.size} elements")
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset:], ref.size, tuple(st * flat.itemsize for st in ref.stride), writeable=False)
    return np.array(view, dtype=ref.storage.dtype)   # an owned, native-order copy


def read_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """{name: array} of a `.pth` state dict, in the stored dtypes (bf16 as ml_dtypes.bfloat16).

  Never imports torch and never calls anything named by the file beyond the allow-list
  (`ALLOWED_GLOBALS`, all replaced by local stand-ins). Raises `CheckpointFormatError` (or
  its subclass `UnsafePickleError`) with the file name and the problem.
  """
  path = Path(path)
  source = str(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file")
  with _open_zip(path) as archive:
    prefix = _find_prefix(archive, source)
    try:
      pickled = archive.read(prefix + "data.pkl")
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise CheckpointFormatError(f"{source}: cannot read {prefix}data.pkl: {e}") from None
    try:
      obj = _RestrictedUnpickler(io.BytesIO(pickled), source).load()
    except CheckpointFormatError:
      raise
    except Exception as e:   # any malformed pickle: the stdlib raises many types
      raise CheckpointFormatError(f"{source}: data.pkl is not a valid pickle of tensors: "
                                  f"{type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
      raise CheckpointFormatError(f"{source}: data.pkl holds a {type(obj).__name__}; expected a "
                                  "dict of tensors (a state dict)")
    for key, value in obj.items():
      if not isinstance(key, str):
        raise CheckpointFormatError(f"{source}: state dict key {key!r} is not a string")
      if isinstance(value, dict):
        raise CheckpointFormatError(
            f"{source}: key {key!r} holds a nested dict; official RWKV .pth files are a plain dict "
            "of tensors (extract the state dict before converting)")
      if not isinstance(value, _TensorRef):
        raise CheckpointFormatError(f"{source}: key {key!r} holds a value of type "
                                    f"{type(value).__name__}, expected a tensor")
    reader = _StorageReader(archive, prefix, _byte_order(archive, prefix, source), source)
    return {key: reader.tensor(ref, key) for key, ref in obj.items()}


# ----------------------------------------------------------------------------- writing


class _PickleWriter:
  """The few protocol-2 opcodes a state dict needs, written directly (no torch to import)."""

  def __init__(self):
    self.out = io.BytesIO()
    self.out.write(b"\x80\x02")                               # PROTO 2

  def op(self, code: bytes) -> None:
    self.out.write(code)

  def global_(self, module: str, name: str) -> None:
    self.out.write(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

  def string(self, text: str) -> None:
    data = text.encode("utf-8")
    self.out.write(b"X" + struct.pack("<I", len(data)) + data)  # BINUNICODE

  def int_(self, value: int) -> None:
    if -2**31 <= value < 2**31:
      self.out.write(b"J" + struct.pack("<i", value))           # BININT
    else:
      data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
      self.out.write(b"\x8a" + bytes([len(data)]) + data)      # LONG1

  def int_tuple(self, values: tuple[int, ...]) -> None:
    self.out.write(b"(")                                        # MARK
    for v in values:
      self.int_(v)
    self.out.write(b"t")                                        # TUPLE

  def empty_ordered_dict(self) -> None:
    self.global_("collections", "OrderedDict")
    self.out.write(b")R")                                       # EMPTY_TUPLE, REDUCE

  def getvalue(self) -> bytes:
    return self.out.getvalue() + b"."                           # STOP


def _state_dict_pickle(tensors: Mapping[str, np.ndarray]) -> bytes:
  """data.pkl for OrderedDict{name: tensor}, tensor i stored whole in data/<i>."""
  w = _PickleWriter()
  w.empty_ordered_dict()
  w.op(b"(")                                                    # MARK for SETITEMS
  for index, (name, array) in enumerate(tensors.items()):
    w.string(name)
    w.global_("torch._utils", "_rebuild_tensor_v2")
    w.op(b"(")                                                  # args of _rebuild_tensor_v2
    w.op(b"(")                                                  # the persistent storage id
    w.string("storage")
    w.global_("torch", STORAGE_NAMES[array.dtype])
    w.string(str(index))
    w.string("cpu")
    w.int_(array.size)
    w.op(b"tQ")                                                 # TUPLE, BINPERSID
    w.int_(0)                                                   # storage offset
    w.int_tuple(array.shape)
    w.int_tuple(tuple(int(np.prod(array.shape[i + 1:])) for i in range(array.ndim)))  # C order
    w.op(b"\x89")                                               # NEWFALSE: requires_grad
    w.empty_ordered_dict()                                      # backward hooks
    w.op(b"tR")                                                 # TUPLE, REDUCE
  w.op(b"u")                                                    # SETITEMS
  return w.getvalue()


def _write_record(archive: zipfile.ZipFile, name: str, data: bytes | memoryview) -> None:
  """A stored record whose data starts on a STORAGE_ALIGNMENT boundary (as torch writes them)."""
  info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
  info.compress_type = zipfile.ZIP_STORED
  info.file_size = len(data)
  zip64 = len(data) * 1.05 > zipfile.ZIP64_LIMIT   # zipfile's own rule for a zip64 local header
  header = 30 + len(name.encode()) + (20 if zip64 else 0)
  start = archive.fp.tell()
  pad = -(start + header + 4) % STORAGE_ALIGNMENT
  info.extra = struct.pack("<HH", 0x4246, pad) + b"\0" * pad     # 'FB' padding field, as torch
  with archive.open(info, "w", force_zip64=zip64) as f:
    f.write(data)


def write_pth(path: str | os.PathLike, tensors: Mapping[str, Any]) -> None:
  """Write {name: array} as a torch `.pth` (zip) state dict; atomic (temp file + rename).

  Arrays keep their dtype (bf16 = ml_dtypes.bfloat16; those in STORAGE_DTYPES), in the host's
  byte order, which the `byteorder` record states.
  """
  path = Path(path)
  arrays = {}
  for name, value in tensors.items():
    array = np.asarray(value, order="C")
    if array.dtype not in STORAGE_NAMES:
      raise ValueError(f"write_pth: tensor {name!r} has dtype {array.dtype}; supported: "
                       f"{sorted(d.name for d in STORAGE_NAMES)}")
    if not array.dtype.isnative:
      array = array.astype(array.dtype.newbyteorder("="))
    arrays[name] = array
  folder = "archive/"
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
        _write_record(archive, folder + "data.pkl", _state_dict_pickle(arrays))
        _write_record(archive, folder + "byteorder", sys.byteorder.encode())
        for index, array in enumerate(arrays.values()):
          _write_record(archive, f"{folder}data/{index}", memoryview(array.reshape(-1).view(np.uint8)))
        _write_record(archive, folder + "version", b"3\n")
        _write_record(archive, folder + ".format_version", b"1")
        _write_record(archive, folder + ".storage_alignment", str(STORAGE_ALIGNMENT).encode())
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
