"""TensorBoard scalar events without TensorFlow.

An event file is a TFRecord stream of `Event` protos; scalars need three small
messages, so we encode them by hand instead of depending on TensorFlow.
"""

from __future__ import annotations

import os
import socket
import struct
import time

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


def _event(step: int, *, file_version: str = "", tag: str = "", value: float = 0.0) -> bytes:
  msg = _field(1, 1) + struct.pack("<d", time.time()) + _field(2, 0) + _varint(step)
  if file_version:
    msg += _bytes_field(3, file_version.encode())
  else:
    val = _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", value)
    msg += _bytes_field(5, _bytes_field(1, val))
  return msg


class SummaryWriter:
  """Appends scalar summaries to one events file in `logdir`."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self._f = open(os.path.join(logdir, name), "ab")
    self._write(_event(0, file_version="brain.Event:2"))

  def _write(self, record: bytes) -> None:
    header = struct.pack("<Q", len(record))
    self._f.write(header + struct.pack("<I", _masked_crc(header)))
    self._f.write(record + struct.pack("<I", _masked_crc(record)))

  def scalar(self, tag: str, value: float, step: int) -> None:
    self._write(_event(step, tag=tag, value=float(value)))

  def flush(self) -> None:
    self._f.flush()

  def close(self) -> None:
    self._f.close()
