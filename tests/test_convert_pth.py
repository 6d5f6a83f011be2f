"""The torch-free .pth reader and writer: round trips, torch's own files, safety, bad files."""
import importlib.util
import struct
import sys
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from goosejax.convert import pth
from goosejax.convert.official import CheckpointFormatError
from goosejax.convert.pth import UnsafePickleError, read_pth, write_pth

FIXTURES = Path(__file__).parent / "fixtures"


def _generator():
  spec = importlib.util.spec_from_file_location("make_official_fixtures",
                                                FIXTURES / "make_official_fixtures.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


TENSORS = {
    "f32": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "bf16": (np.arange(8, dtype=np.float32).reshape(1, 1, 8) / 3).astype(ml_dtypes.bfloat16),
    "f16": np.linspace(-2, 2, 5).astype(np.float16),
    "f64": np.array([[1e-300, -2.5]]),
    "i64": np.arange(-3, 3, dtype=np.int64),
    "flags": np.array([True, False, True]),
    "scalar": np.array(1.25, np.float32),
    "empty": np.zeros((0, 4), np.float32),
}


def records(path: Path) -> dict[str, bytes]:
  with zipfile.ZipFile(path) as archive:
    return {name: archive.read(name) for name in archive.namelist()}


def write_zip(path: Path, entries: dict[str, bytes]) -> Path:
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
    for name, data in entries.items():
      archive.writestr(name, data)
  return path


def write_pickle(path: Path, pickled: bytes, extra: dict[str, bytes] | None = None) -> Path:
  return write_zip(path, {"archive/data.pkl": pickled, **(extra or {})})


# ----------------------------------------------------------------------------- round trips


def test_round_trip_keeps_names_order_dtypes_shapes_and_bits(tmp_path):
  path = tmp_path / "t.pth"
  write_pth(path, TENSORS)
  loaded = read_pth(path)
  assert list(loaded) == list(TENSORS)
  for name, value in TENSORS.items():
    assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape, name
    assert loaded[name].tobytes() == value.tobytes(), name
    assert loaded[name].flags.writeable and loaded[name].flags.c_contiguous


def test_writer_is_deterministic_aligned_and_has_the_torch_layout(tmp_path):
  a, b = tmp_path / "a.pth", tmp_path / "b.pth"
  write_pth(a, TENSORS)
  write_pth(b, TENSORS)
  assert a.read_bytes() == b.read_bytes()
  raw = a.read_bytes()
  with zipfile.ZipFile(a) as archive:
    names = archive.namelist()
    assert names[0] == "archive/data.pkl"
    assert {"archive/byteorder", "archive/version", "archive/.format_version"} <= set(names)
    assert archive.read("archive/byteorder") == sys.byteorder.encode()
    for info in archive.infolist():
      assert info.compress_type == zipfile.ZIP_STORED
      name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
      data_offset = info.header_offset + 30 + name_len + extra_len
      assert data_offset % pth.STORAGE_ALIGNMENT == 0, info.filename
  assert sorted(n for n in names if "/data/" in n) == sorted(f"archive/data/{i}" for i in range(len(TENSORS)))


def test_writer_leaves_no_temp_file_and_replaces_atomically(tmp_path):
  path = tmp_path / "t.pth"
  write_pth(path, {"a": np.ones(3, np.float32)})
  write_pth(path, {"b": np.zeros(2, np.float16)})
  assert list(read_pth(path)) == ["b"]
  assert [p.name for p in tmp_path.iterdir()] == ["t.pth"]


def test_writer_rejects_unsupported_dtypes(tmp_path):
  with pytest.raises(ValueError, match=r"tensor 'c' has dtype complex64"):
    write_pth(tmp_path / "t.pth", {"c": np.zeros(2, np.complex64)})
  assert not list(tmp_path.iterdir())


def test_reads_a_file_written_by_torch_save():
  """torch_written.pth: a module state dict (keep_vars: nn.Parameters, OrderedDict with
  _metadata) plus a transposed view, a slice with a storage offset, shared storages and
  bf16 / fp16 / fp64 / int64 / 0-d / empty tensors; saved by torch 2.13 itself."""
  expected = _generator().torch_written_expected()
  loaded = read_pth(FIXTURES / "official_x070" / "torch_written.pth")
  assert set(loaded) == set(expected)
  assert loaded["lin.weight"].dtype == ml_dtypes.bfloat16
  assert loaded["half"].dtype == np.float16 and loaded["double"].dtype == np.float64
  assert loaded["count"].dtype == np.int64
  for name, value in expected.items():
    assert loaded[name].shape == value.shape, name
    np.testing.assert_array_equal(loaded[name].astype(np.float64), value.astype(np.float64), name)


def test_big_endian_files_are_byte_swapped(tmp_path):
  little = tmp_path / "little.pth"
  tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(3, dtype=np.float16)}
  write_pth(little, tensors)
  entries = records(little)
  entries["archive/byteorder"] = b"big"
  for index, value in enumerate(tensors.values()):
    entries[f"archive/data/{index}"] = value.astype(value.dtype.newbyteorder(">")).tobytes()
  loaded = read_pth(write_zip(tmp_path / "big.pth", entries))
  for name, value in tensors.items():
    np.testing.assert_array_equal(loaded[name], value)
    assert loaded[name].dtype.isnative


# ----------------------------------------------------------------------------- safety


@pytest.mark.parametrize("label, pickled, callable_name", [
    ("GLOBAL", lambda cmd: b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(cmd)) + cmd + b"\x85R.",
     "os.system"),
    ("STACK_GLOBAL", lambda cmd: b"\x80\x04\x8c\x08builtins\x8c\x04exec\x93X"
     + struct.pack("<I", len(b"import os; os.system('" + cmd + b"')"))
     + b"import os; os.system('" + cmd + b"')\x85R.", "builtins.exec"),
    ("INST", lambda cmd: b"(X" + struct.pack("<I", len(cmd)) + cmd + b"ios\nsystem\n.", "os.system"),
    ("attribute path", lambda cmd: b"\x80\x02ccollections\nOrderedDict.fromkeys\n)R.",
     "collections.OrderedDict.fromkeys"),
    ("torch.load as a storage type", lambda cmd: b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n"
     b"((X\x07\x00\x00\x00storagectorch\nload\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQ"
     b"K\x00K\x01\x85K\x01\x85\x89)tR.", "torch.load"),
])
def test_pickles_naming_other_callables_are_refused_without_running_them(
    tmp_path, label, pickled, callable_name):
  marker = tmp_path / "pwned"
  path = write_pickle(tmp_path / "evil.pth", pickled(f"touch {marker}".encode()))
  with pytest.raises(UnsafePickleError) as info:
    read_pth(path)
  message = str(info.value)
  assert callable_name in message and "not one of the tensor-rebuild callables" in message
  assert str(path) in message and "nothing from the file was executed" in message
  assert not marker.exists(), f"{label}: the payload ran"


def test_unsafe_pickle_error_is_a_checkpoint_format_error():
  assert issubclass(UnsafePickleError, CheckpointFormatError)
  assert issubclass(CheckpointFormatError, ValueError)


def test_allowed_stand_ins_cannot_be_abused_as_callables(tmp_path):
  """A storage-type stand-in used as a function: clear error, nothing called."""
  path = write_pickle(tmp_path / "odd.pth", b"\x80\x02ctorch\nFloatStorage\n)R.")
  with pytest.raises(CheckpointFormatError, match="not a valid pickle of tensors"):
    read_pth(path)


# ----------------------------------------------------------------------------- malformed files


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    read_pth(tmp_path / "nope.pth")


def test_not_a_zip(tmp_path):
  path = tmp_path / "model.pth"
  path.write_text("hello, I am text")
  with pytest.raises(CheckpointFormatError, match=r"not a PyTorch \.pth file .* starts with b'hello, I"):
    read_pth(path)


def test_legacy_torch_format(tmp_path):
  path = tmp_path / "old.pth"
  path.write_bytes(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.")
  with pytest.raises(CheckpointFormatError, match=r"legacy \(pre-1\.6, non-zip\) torch serialization"):
    read_pth(path)


def test_truncated_zip(tmp_path):
  path = tmp_path / "t.pth"
  write_pth(path, TENSORS)
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  with pytest.raises(CheckpointFormatError, match="truncated or corrupted zip archive"):
    read_pth(path)


def test_corrupted_storage_bytes_fail_the_crc(tmp_path):
  path = tmp_path / "t.pth"
  write_pth(path, {"a": np.ones(64, np.float32)})
  raw = bytearray(path.read_bytes())
  with zipfile.ZipFile(path) as archive:
    info = archive.getinfo("archive/data/0")
  name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
  raw[info.header_offset + 30 + name_len + extra_len + 5] ^= 0xFF
  path.write_bytes(bytes(raw))
  with pytest.raises(CheckpointFormatError, match=r"cannot read record 'archive/data/0'.*CRC"):
    read_pth(path)


def test_missing_storage_record(tmp_path):
  path = tmp_path / "t.pth"
  write_pth(path, {"a": np.ones(2, np.float32), "b": np.ones(3, np.float32)})
  entries = records(path)
  del entries["archive/data/1"]
  with pytest.raises(CheckpointFormatError,
                     match=r"references storage '1' but the archive has no record 'archive/data/1'"):
    read_pth(write_zip(tmp_path / "cut.pth", entries))


def test_storage_with_the_wrong_byte_count(tmp_path):
  path = tmp_path / "t.pth"
  write_pth(path, {"a": np.ones(4, np.float32)})
  entries = records(path)
  entries["archive/data/0"] = entries["archive/data/0"][:10]
  with pytest.raises(CheckpointFormatError, match=r"holds 10 bytes, but its storage id says 4 x float32 = 16"):
    read_pth(write_zip(tmp_path / "short.pth", entries))


def _single_tensor_pickle(size, stride, offset=0, numel=4) -> bytes:
  w = pth._PickleWriter()
  w.empty_ordered_dict()
  w.op(b"(")
  w.string("x")
  w.global_("torch._utils", "_rebuild_tensor_v2")
  w.op(b"((")
  w.string("storage")
  w.global_("torch", "FloatStorage")
  w.string("0")
  w.string("cpu")
  w.int_(numel)
  w.op(b"tQ")
  w.int_(offset)
  w.int_tuple(size)
  w.int_tuple(stride)
  w.op(b"\x89")
  w.empty_ordered_dict()
  w.op(b"tRu")
  return w.getvalue()


def test_strided_views_and_offsets_are_honoured(tmp_path):
  data = {"archive/data/0": np.arange(12, dtype=np.float32).tobytes()}
  path = write_pickle(tmp_path / "v.pth", _single_tensor_pickle((3, 2), (1, 4), offset=1, numel=12), data)
  expected = np.array([[1 + i + 4 * j for j in range(2)] for i in range(3)], np.float32)
  np.testing.assert_array_equal(read_pth(path)["x"], expected)


def test_view_reaching_past_its_storage(tmp_path):
  data = {"archive/data/0": np.zeros(4, np.float32).tobytes()}
  path = write_pickle(tmp_path / "oob.pth", _single_tensor_pickle((3, 3), (3, 1)), data)
  with pytest.raises(CheckpointFormatError,
                     match=r"tensor 'x' \(size \(3, 3\), stride \(3, 1\), offset 0\) reaches element 8 "
                           r"of storage '0', which has only 4 elements"):
    read_pth(path)


@pytest.mark.parametrize("pickled, message", [
    (b"\x80\x02]q\x00.", "data.pkl holds a list; expected a dict of tensors"),
    (b"\x80\x02}X\x0a\x00\x00\x00state_dict}s.", "key 'state_dict' holds a nested dict"),
    (b"\x80\x02}X\x04\x00\x00\x00stepK\x05s.", "key 'step' holds a value of type int, expected a tensor"),
    (b"\x80\x02}K\x01K\x02s.", "state dict key 1 is not a string"),
    (b"\x80\x02X\x03\x00\x00\x00abcQ.", "unsupported persistent id 'abc'"),
    (b"\x80\x02}X\x01", "data.pkl is not a valid pickle of tensors"),
])
def test_malformed_pickles(tmp_path, pickled, message):
  with pytest.raises(CheckpointFormatError, match=message):
    read_pth(write_pickle(tmp_path / "bad.pth", pickled))


def test_archive_without_exactly_one_data_pkl(tmp_path):
  none = write_zip(tmp_path / "none.pth", {"archive/other": b"x"})
  with pytest.raises(CheckpointFormatError, match=r"exactly one '<folder>/data.pkl' record.*found none"):
    read_pth(none)
  two = write_zip(tmp_path / "two.pth", {"a/data.pkl": b".", "b/data.pkl": b"."})
  with pytest.raises(CheckpointFormatError, match=r"found \['a/data.pkl', 'b/data.pkl'\]"):
    read_pth(two)


def test_bad_byteorder_record(tmp_path):
  path = tmp_path / "t.pth"
  write_pth(path, {"a": np.ones(2, np.float32)})
  entries = records(path)
  entries["archive/byteorder"] = b"middle"
  with pytest.raises(CheckpointFormatError, match=r"says b'middle'; expected little or big"):
    read_pth(write_zip(tmp_path / "bo.pth", entries))


def test_reader_never_imports_torch(tmp_path):
  """Checked in a child process: read a file, then look at sys.modules."""
  import subprocess
  path = tmp_path / "t.pth"
  write_pth(path, TENSORS)
  code = ("import sys; from goosejax.convert.pth import read_pth; "
          f"read_pth({str(path)!r}); print('torch' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"
