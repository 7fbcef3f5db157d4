"""One job per run directory: `<dir>/lock`, held with flock(2) while a job writes there.

A second job on the same folder (a double submit) is refused, naming the holder's
host and pid. The kernel drops a flock when its process dies, however it dies
(SIGKILL, out of memory, a lost node), so a lock file left by a dead job is not in
the way: the next job takes it over and says whose it was. In a multi-process job
process 0 holds the lock for all of them. Across hosts the folder must be on a
filesystem whose locks every host sees (NFS v4, Lustre and GPFS are).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from typing import Optional

import jax

from lfs_jax import parallel

LOCK = "lock"


class WorkdirLocked(RuntimeError):
  """Another live job holds the folder (the message names its host and pid)."""


def _holder(record: str) -> str:
  try:
    got = json.loads(record)
    return f"pid {got['pid']} on host {got['host']} (since {got['since']})"
  except (ValueError, KeyError, TypeError):
    return "another job (its lock file is unreadable)"


def _read(fd: int) -> str:
  os.lseek(fd, 0, os.SEEK_SET)
  return os.read(fd, 4096).decode("utf-8", "replace")


class Lock:
  """A held lock; `release()` (or leaving the `with` block) frees it."""

  def __init__(self, folder: str, fd: Optional[int], created: bool):
    self.folder, self._fd, self._created = folder, fd, created

  def release(self) -> None:
    if self._fd is None:
      return
    os.unlink(os.path.join(self.folder, LOCK))  # while still held: no one locks a ghost
    os.close(self._fd)
    self._fd = None
    if self._created and not os.listdir(self.folder):
      os.rmdir(self.folder)  # a job refused before writing anything leaves nothing

  def __enter__(self) -> "Lock":
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _lock(folder: str, what: str) -> Lock:
  created = not os.path.isdir(folder)
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, LOCK)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _holder(_read(fd))
      os.close(fd)
      raise WorkdirLocked(
          f"{folder} is in use by {holder}: one {what} at a time. Wait for that job "
          f"to end or stop it, then run this again; if it is gone and this persists, "
          f"the filesystem still holds its lock: delete {path}") from None
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)  # the holder released (and removed) the file between open and flock
  previous = _read(fd)
  if previous.strip():
    print(f"note: {path} was left by {_holder(previous)}, which has ended; taking it over",
          file=sys.stderr)
  record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
  os.ftruncate(fd, 0)
  os.lseek(fd, 0, os.SEEK_SET)
  os.write(fd, record.encode())
  os.fsync(fd)
  return Lock(folder, fd, created)


def acquire(folder: str, what: str = "job") -> Lock:
  """Locks `folder` (created if missing) for this job; every process calls it.

  Args:
    folder: the run directory (or another folder one job at a time may write).
    what: the job's kind, for the message ("training run", "evaluation").

  Raises:
    WorkdirLocked: a live job holds it (on every process of a multi-process job).
  """
  lock, error = Lock(folder, None, False), None
  if jax.process_index() == 0:
    try:
      lock = _lock(folder, what)
    except WorkdirLocked as e:
      error = e
  if parallel.agree_any(error is not None):
    lock.release()
    raise error or WorkdirLocked(f"{folder}: process 0 could not lock it (see its log)")
  return lock
