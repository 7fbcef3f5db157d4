"""Reading and writing safetensors files without torch, bfloat16 included.

The format is tiny (an 8-byte little-endian header length, a JSON header, raw
little-endian data), so we parse it here: the `safetensors` package's numpy backend
cannot represent bfloat16, and parsing ourselves lets a truncated download be named
precisely instead of failing deep inside a memory map. A URL (`gs://...`) is read
through `lfs_jax.paths` by ranges, tensor by tensor, without a local copy.
"""

from __future__ import annotations

import json
import mmap
from typing import Dict, Iterable, Mapping

import ml_dtypes
import numpy as np

from lfs_jax import paths

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
  """A safetensors file that cannot be read as such (names the file)."""


def _read_raw_header(path: str) -> Dict[str, dict]:
  """The header of a safetensors file as stored (with "__metadata__" if any)."""
  size = paths.size(path)
  prefix = paths.read_range(path, 0, 8)
  if len(prefix) < 8:
    raise SafetensorsError(f"{path}: not a safetensors file (only {size} bytes)")
  n = int.from_bytes(prefix, "little")
  if n <= 0 or 8 + n > size:
    raise SafetensorsError(
        f"{path}: truncated or not a safetensors file (header of {n} bytes, "
        f"file of {size} bytes)")
  try:
    header = json.loads(paths.read_range(path, 8, 8 + n))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise SafetensorsError(f"{path}: unreadable safetensors header ({e})") from None
  header["__header_bytes__"] = n
  return header


def read_metadata(path: str) -> Dict[str, str]:
  """The free-form string metadata of a safetensors file ({} when it has none)."""
  return dict(_read_raw_header(path).get("__metadata__") or {})


def read_header(path: str) -> Dict[str, dict]:
  """Returns the header {name: {dtype, shape, data_offsets}} of a safetensors file."""
  return _checked_header(path)[0]


def _checked_header(path: str):
  """(the header without metadata, its length in bytes), checked against the file size."""
  size = paths.size(path)
  header = _read_raw_header(path)
  n = header.pop("__header_bytes__")
  header.pop("__metadata__", None)
  end = max((h["data_offsets"][1] for h in header.values()), default=0)
  if 8 + n + end > size:
    raise SafetensorsError(
        f"{path}: truncated: the header promises {8 + n + end} bytes, the file has "
        f"{size}; download it again")
  for name, h in header.items():
    if h["dtype"] not in _DTYPES:
      raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {h['dtype']}")
  return header, n


def load_file(path: str, names: Iterable[str] | None = None) -> Dict[str, np.ndarray]:
  """Reads tensors of a safetensors file into read-only numpy arrays (copies; file closed).

  Args:
    path: the .safetensors file.
    names: the tensors to read; all when None.
  """
  header, n = _checked_header(path)
  wanted = header.keys() if names is None else names
  out = {}
  if paths.is_url(path):
    # One ranged read of the data (one request, not one per tensor); the arrays are
    # views of it, so it is held once, never written to a local file.
    end = max((header[k]["data_offsets"][1] for k in wanted), default=0)
    data = memoryview(paths.read_range(path, 8 + n, 8 + n + end))
    for name in wanted:
      start, stop = header[name]["data_offsets"]
      out[name] = _array(path, name, header[name], data[start:stop])
    return out
  with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
    for name in wanted:
      start, stop = header[name]["data_offsets"]
      out[name] = _array(path, name, header[name], mm[8 + n + start: 8 + n + stop])
  return out


def _array(path: str, name: str, h: dict, buf: bytes) -> np.ndarray:
  arr = np.frombuffer(buf, dtype=_DTYPES[h["dtype"]])
  expected = int(np.prod(h["shape"], dtype=np.int64))
  if arr.size != expected:
    raise SafetensorsError(
        f"{path}: tensor {name!r} holds {arr.size} values, its shape "
        f"{h['shape']} needs {expected}")
  return arr.reshape(h["shape"])


def save_file(tensors: Mapping[str, np.ndarray], path: str,
              metadata: Mapping[str, str] | None = None) -> None:
  """Writes numpy arrays as a safetensors file, atomically (`paths.write_bytes`)."""
  header = {}
  offset = 0
  arrays = {}
  for name in sorted(tensors):
    arr = np.asarray(tensors[name])
    arr = np.ascontiguousarray(arr).reshape(arr.shape)  # keeps 0-d tensors 0-d
    if arr.dtype.byteorder == ">":
      arr = arr.astype(arr.dtype.newbyteorder("<"))
    key = _NAMES.get(np.dtype(arr.dtype.str if arr.dtype != ml_dtypes.bfloat16 else arr.dtype))
    if key is None:
      raise SafetensorsError(f"cannot store tensor {name!r} of dtype {arr.dtype}")
    header[name] = {"dtype": key, "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
    arrays[name] = arr
  if metadata:
    header["__metadata__"] = dict(metadata)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
  paths.write_bytes(path, b"".join(
      [len(blob).to_bytes(8, "little"), blob] + [arrays[name].tobytes() for name in sorted(arrays)]))
