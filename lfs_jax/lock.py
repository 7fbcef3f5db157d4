"""One job per run directory: `<dir>/lock`, held with flock(2) while a job writes there.

A second job on the same folder (a double submit) is refused, naming the holder's
host and pid. The kernel drops a flock when its process dies, however it dies
(SIGKILL, out of memory, a lost node), so a lock file left by a dead job is not in
the way: the next job takes it over and says whose it was. In a multi-process job
process 0 holds the lock for all of them. Across hosts the folder must be on a
filesystem whose locks every host sees (NFS v4, Lustre and GPFS are).

On a bucket (a URL folder) there is no flock and no process death to notice, so the
lock is a lease (`Lease`): an object created only if absent (on gs://, a generation
precondition: of two jobs racing, one wins) and renewed by the holder every
LEASE_RENEW_S; one not renewed for LEASE_S (its job was killed hard) is taken over.
On other URL schemes the create is check-then-write: best effort, two jobs started
within the same second may both pass.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from typing import Optional, Tuple

import jax

from lfs_jax import parallel
from lfs_jax import paths

LOCK = "lock"
LEASE_S = 300.0        # a bucket lock not renewed for this long is taken over
LEASE_RENEW_S = 60.0   # how often its holder renews it


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


class _GcsObject:
  """The lock object on gs://, written under generation preconditions."""

  def __init__(self, url: str):
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

    bucket, name = url.split("://", 1)[1].split("/", 1)
    self._bucket = storage.Client().bucket(bucket)  # credentials: ADC, as lfs_jax.paths
    self._blob = lambda: self._bucket.blob(name)
    self._name, self._errors = name, exceptions

  def get(self) -> Optional[Tuple[str, float, int]]:
    """(record, seconds since its last write, generation), or None where absent."""
    blob = self._bucket.get_blob(self._name)
    if blob is None:
      return None
    # Read before the download, which resets the blob's properties from its response
    # headers: a server that omits x-goog-generation (the emulator) left None, and a
    # put under `if_generation_match=None` is unconditional. A record newer than this
    # generation only makes our put fail (another job wrote): the safe side.
    generation, updated = blob.generation, blob.updated.timestamp()
    return (blob.download_as_bytes().decode("utf-8", "replace"), time.time() - updated,
            generation)

  def put(self, record: str, generation: int) -> Optional[int]:
    """Writes if the object is still at `generation` (0: absent); its new generation,
    or None where another job changed it first."""
    blob = self._blob()
    try:
      blob.upload_from_string(record, if_generation_match=generation)
    except self._errors.PreconditionFailed:
      # The client retries a conditional write whose answer was lost (a timeout, a
      # reset); when the first try had gone through, the retry is refused against our
      # own write. The record (host, pid, renewal time) is ours alone: then it is ours.
      now = self._bucket.get_blob(self._name)
      if now is not None:
        theirs = now.generation  # read before the download resets it (see get)
        if now.download_as_bytes().decode("utf-8", "replace") == record:
          return theirs
      return None
    return blob.generation

  def delete(self, generation: int) -> None:
    try:
      self._blob().delete(if_generation_match=generation)
    except (self._errors.NotFound, self._errors.PreconditionFailed):
      pass  # taken over by another job after we stopped renewing: theirs now


class _FsObject:
  """The lock object on another URL scheme: check-then-write (no preconditions)."""

  def __init__(self, url: str):
    self._url = url

  def get(self) -> Optional[Tuple[str, float, int]]:
    if not paths.exists(self._url):
      return None
    record = paths.read_text(self._url)
    try:
      renewed = float(json.loads(record)["renewed"])
    except (ValueError, KeyError, TypeError):
      renewed = 0.0
    return record, time.time() - renewed, 1

  def put(self, record: str, generation: int) -> Optional[int]:
    if generation == 0 and paths.exists(self._url):
      return None
    paths.write_text(self._url, record)
    return 1

  def delete(self, generation: int) -> None:
    del generation
    if paths.exists(self._url):
      paths.remove(self._url)


class Lease:
  """A held bucket lock, renewed by a daemon thread until `release()`."""

  def __init__(self, store, record: dict, generation: int):
    self._store, self._record, self._generation = store, record, generation
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._renew, daemon=True, name="lfs_jax-lease")
    self._thread.start()

  def _renew(self) -> None:
    while not self._stop.wait(LEASE_RENEW_S):
      self._record["renewed"] = time.time()
      try:
        got = self._store.put(json.dumps(self._record), self._generation)
      except Exception as e:  # pylint: disable=broad-except  (a network blip: retry)
        print(f"warning: could not renew the lock ({type(e).__name__}: {e}); retrying",
              file=sys.stderr)
        continue
      if got is None:
        print("warning: another job took over this run's lock (this job was not heard "
              f"from for {LEASE_S:.0f} s); two jobs may now write the same folder",
              file=sys.stderr)
        return
      self._generation = got

  def release(self) -> None:
    if self._stop.is_set():
      return
    self._stop.set()
    self._thread.join()
    self._store.delete(self._generation)

  def __enter__(self) -> "Lease":
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _lease(folder: str, what: str) -> Lease:
  """Takes the bucket lock `folder/lock` (see the module doc)."""
  url = paths.join(folder, LOCK)
  store = _GcsObject(url) if paths.scheme(url) in ("gs", "gcs") else _FsObject(url)
  record = {"host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "renewed": time.time()}
  held = store.get()
  generation = 0
  if held is not None:
    previous, age, generation = held
    if age < LEASE_S:
      raise WorkdirLocked(
          f"{folder} is in use by {_holder(previous)}, last heard from {age:.0f} s ago: "
          f"one {what} at a time. On a bucket the lock is a lease that its job renews "
          f"every {LEASE_RENEW_S:.0f} s; if that job was killed, run this again after "
          f"{LEASE_S - age:.0f} s, when the lease has expired, or delete {url} if you are "
          "sure it is gone")
    print(f"note: {url} was left by {_holder(previous)}, not renewed for {age:.0f} s; "
          "taking it over", file=sys.stderr)
  got = store.put(json.dumps(record), generation)
  if got is None:
    raise WorkdirLocked(f"{folder}: another {what} took the lock {url} at the same moment; "
                        "one job at a time")
  return Lease(store, record, got)


def acquire(folder: str, what: str = "job"):
  """Locks `folder` (created if missing) for this job; every process calls it.

  Args:
    folder: the run directory (or another folder one job at a time may write).
    what: the job's kind, for the message ("training run", "evaluation").

  Returns:
    The held lock (`release()`, or a `with` block); a Lease for a URL folder.

  Raises:
    WorkdirLocked: a live job holds it (on every process of a multi-process job).
  """
  lock, error = Lock(folder, None, False), None
  if jax.process_index() == 0:
    try:
      lock = _lease(folder, what) if paths.is_url(folder) else _lock(folder, what)
    except WorkdirLocked as e:
      error = e
  if parallel.agree_any(error is not None):
    lock.release()
    raise error or WorkdirLocked(f"{folder}: process 0 could not lock it (see its log)")
  return lock
