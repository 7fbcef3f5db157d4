"""TensorBoard scalar and image events without TensorFlow.

An event file is a TFRecord stream of `Event` protos; scalars and images need a few
small messages (Event, Summary, Summary.Value, Summary.Image), so we encode them by
hand instead of depending on TensorFlow.

A URL log folder (`gs://...`) cannot be appended to: the writer keeps the file's
records and uploads the whole file at each flush (`lfs_jax.paths.write_bytes`, one
object write), which a reading TensorBoard sees as a file that grew.
"""

from __future__ import annotations

import os
import socket
import struct
import time

from lfs_jax import paths

_CRC_TABLE = []
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
  _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    out.append(b | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, wire: int) -> bytes:
  return _varint((number << 3) | wire)


def _bytes_field(number: int, payload: bytes) -> bytes:
  return _field(number, 2) + _varint(len(payload)) + payload


def _event(step: int, *, file_version: str = "", value: bytes = b"") -> bytes:
  """An Event: the file version record, or one Summary holding one Summary.Value."""
  msg = _field(1, 1) + struct.pack("<d", time.time()) + _field(2, 0) + _varint(step)
  if file_version:
    return msg + _bytes_field(3, file_version.encode())
  return msg + _bytes_field(5, _bytes_field(1, value))


def _scalar_value(tag: str, value: float) -> bytes:
  """Summary.Value{tag = 1, simple_value = 2}."""
  return _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", value)


def _image_value(tag: str, png: bytes, height: int, width: int) -> bytes:
  """Summary.Value{tag = 1, image = 4: Summary.Image{height = 1, width = 2,
  colorspace = 3 (3: RGB), encoded_image_string = 4}}."""
  image = (_field(1, 0) + _varint(height) + _field(2, 0) + _varint(width)
           + _field(3, 0) + _varint(3) + _bytes_field(4, png))
  return _bytes_field(1, tag.encode()) + _bytes_field(4, image)


class SummaryWriter:
  """Appends scalar and image summaries to one events file in `logdir`."""

  def __init__(self, logdir: str):
    paths.makedirs(logdir)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self._path = paths.join(logdir, name)
    self._url = paths.is_url(logdir)
    n = 0
    while self._url and paths.exists(self._path):  # never replace an earlier writer's file
      n += 1
      self._path = paths.join(logdir, f"{name}.{n}")
    self._records = bytearray()  # a URL's whole file, uploaded at each flush
    self._f = None if self._url else open(self._path, "ab")
    self._write(_event(0, file_version="brain.Event:2"))

  def _write(self, record: bytes) -> None:
    header = struct.pack("<Q", len(record))
    data = (header + struct.pack("<I", _masked_crc(header))
            + record + struct.pack("<I", _masked_crc(record)))
    if self._url:
      self._records += data
    else:
      self._f.write(data)

  def scalar(self, tag: str, value: float, step: int) -> None:
    self._write(_event(step, value=_scalar_value(tag, float(value))))

  def image(self, tag: str, png: bytes, height: int, width: int, step: int) -> None:
    """An RGB image summary: `png` is the encoded PNG of a [height, width, 3] image."""
    self._write(_event(step, value=_image_value(tag, png, int(height), int(width))))

  def flush(self) -> None:
    if self._url:
      paths.write_bytes(self._path, bytes(self._records))
    else:
      self._f.flush()

  def close(self) -> None:
    if self._url:
      self.flush()
    else:
      self._f.close()
