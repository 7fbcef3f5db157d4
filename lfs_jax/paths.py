"""Paths that may be URLs: every file lfs_jax reads or writes goes through here.

A local path goes to `os` and `open` exactly as before. A URL (`gs://bucket/run`,
or any scheme fsspec has a backend for: `s3://` with s3fs, `memory://`, ...) goes
to fsspec; `gs://` is gcsfs. [choice] fsspec directly, not etils.epath: epath picks
TensorFlow's gfile when TF is importable and hides the backend's errors, and this
layer must tell a missing credential from a missing bucket (`check`). Orbax keeps
its own epath + TensorStore access to the same URLs.

Credentials come from the environment only, never from a config: for `gs://`
Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth
application-default login`, or the VM's service account); with STORAGE_EMULATOR_HOST
set (a local emulator) none.

Nothing half-written: a local file is written to `<path>.tmp` and renamed; a
URL is written as one object upload, which object stores (GCS, S3) make visible only
once it completed, so a reader sees the old object or the whole new one.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from typing import Iterator, List, Sequence

from lfs_jax.errors import ConfigError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Object stores: no directories (a "folder" is a name prefix), no rename.
_OBJECT_STORES = ("gs", "gcs", "s3", "s3a")
_ADC = ("credentials come from the environment (Application Default Credentials): "
        "GOOGLE_APPLICATION_CREDENTIALS=/path/key.json, `gcloud auth application-default "
        "login`, or the service account of the VM; none are read from a config")


class StorageError(ConfigError):
  """A path that cannot be reached (names the path, the setting and why)."""


def is_url(path: str) -> bool:
  """True for `scheme://...` (gs://, s3://, memory://, ...), False for a local path."""
  return bool(_SCHEME.match(str(path)))


def scheme(path: str) -> str:
  """"gs" for gs://bucket/x; "" for a local path."""
  m = _SCHEME.match(str(path))
  return m.group(1).lower() if m else ""


def abspath(path: str) -> str:
  """os.path.abspath for a local path; a URL as it is (it is absolute)."""
  return path.rstrip("/") if is_url(path) else os.path.abspath(path)


def normpath(path: str) -> str:
  """os.path.normpath for a local path; a URL with `a/../` and `./` resolved, `//` kept."""
  if not is_url(path):
    return os.path.normpath(path)
  head, rest = path.split("://", 1)
  parts: List[str] = []
  for part in rest.split("/"):
    if part == "..":
      if len(parts) > 1:
        parts.pop()
    elif part not in ("", "."):
      parts.append(part)
  return f"{head}://{'/'.join(parts)}"


def join(path: str, *parts: str) -> str:
  """os.path.join, also for URLs (always `/`)."""
  if is_url(path):
    return "/".join([path.rstrip("/")] + [p.strip("/") for p in parts])
  return os.path.join(path, *parts)


_SET: dict = {}  # what _options last put into fsspec's config


def _options(protocol: str) -> dict:
  """Sets fsspec's defaults for `protocol` (so Orbax's own gs:// access, through
  etils.epath, gets the same credentials and no stale listings) and returns {}."""
  if protocol not in ("gs", "gcs"):
    return {}
  import fsspec  # pylint: disable=g-import-not-at-top

  emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
  if emulator:  # a local emulator takes no credentials; its address keys the instance
    options = {"token": "anon", "endpoint_url": emulator}
  else:
    # Explicit ADC: gcsfs's default falls back to anonymous access, so a missing
    # credential would surface only as a 401 on the first private object.
    options = {"token": "google_default"}
  # Several processes (and Orbax's TensorStore) write the same folders: a cached
  # listing would hide their files.
  options["use_listings_cache"] = False
  conf = fsspec.config.conf.setdefault("gs", {})
  if not emulator and conf.get("endpoint_url") == _SET.get("endpoint_url"):
    conf.pop("endpoint_url", None)  # an emulator of an earlier call is gone
  conf.update(options)
  if _SET != options:  # also the first time: etils may have made one before these options
    _forget_epath_filesystems()
  _SET.clear()
  _SET.update(options)
  return {}


def _forget_epath_filesystems() -> None:
  """etils.epath (Orbax's paths) keeps the first gs:// filesystem it made for the life
  of the process, with the endpoint and credentials of that moment; when they change
  (another emulator, ADC instead of an emulator) Orbax would keep talking to the old
  one. Drops etils' cached filesystem (a private cache: skipped if etils moves it)."""
  try:
    from etils.epath import backend  # pylint: disable=g-import-not-at-top
    backend._FileSystemSpecBackend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    pass


def _describe(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _is_credentials(e: BaseException) -> bool:
  name = type(e).__name__
  code = getattr(e, "code", None) or getattr(e, "status", None)
  return (name in ("DefaultCredentialsError", "RefreshError", "TransportError")
          or code in (401, 403) or "credential" in str(e).lower()
          or "401" in str(e)[:80] or "403" in str(e)[:80])


def _storage_error(path: str, setting: str, e: BaseException) -> StorageError:
  where = f"{setting}={path}" if setting else path
  proto = scheme(path)
  if isinstance(e, ImportError) or (isinstance(e, ValueError)
                                    and "protocol" in str(e).lower()):
    return StorageError(
        f"{where}: no storage backend for {proto}:// ({_describe(e)}). lfs_jax reads URLs "
        "through fsspec: gs:// needs gcsfs (pip install gcsfs), s3:// needs s3fs; or use a "
        "local path")
  if isinstance(e, FileNotFoundError):
    return StorageError(f"{where}: {e}")
  if isinstance(e, ConnectionError):  # from _probe: the endpoint does not answer
    return StorageError(f"{where}: the storage does not answer ({e}); check the URL's "
                        "endpoint and the network")
  if _is_credentials(e):
    return StorageError(f"{where}: access refused or no credentials ({_describe(e)}); "
                        f"{_ADC}")
  return StorageError(f"{where}: cannot reach the storage ({_describe(e)}); check the URL, "
                      f"the network and the credentials ({_ADC})")


CONNECT_S = 5.0  # the storage's endpoint must accept a connection within this long


def _probe(endpoint: str) -> None:
  """Raises ConnectionError unless `endpoint` (http[s]://host[:port]) accepts a TCP
  connection within CONNECT_S (name lookup included).

  gcsfs retries a refused or failed connection 6 times with backoff (~35 s) before it
  raises, right for a blip in the middle of a run, not for a wrong address at start.
  """
  import socket  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  import urllib.parse  # pylint: disable=g-import-not-at-top

  u = urllib.parse.urlsplit(endpoint)
  host, port = u.hostname or "", u.port or (443 if u.scheme == "https" else 80)
  failed: List[BaseException] = []

  def connect():
    try:
      socket.create_connection((host, port), timeout=CONNECT_S).close()
    except OSError as e:
      failed.append(e)
  # A thread: socket timeouts do not bound the name lookup.
  t = threading.Thread(target=connect, daemon=True, name="lfs_jax-probe")
  t.start()
  t.join(CONNECT_S)
  if t.is_alive():
    raise ConnectionError(f"{endpoint} did not answer within {CONNECT_S:.0f} s")
  if failed:
    why = getattr(failed[0], "strerror", None) or str(failed[0]) or type(failed[0]).__name__
    via = " (STORAGE_EMULATOR_HOST)" if os.environ.get("STORAGE_EMULATOR_HOST") else ""
    raise ConnectionError(f"cannot connect to {endpoint}{via}: {why}")


def filesystem(path: str):
  """(fsspec filesystem, the path in its terms) for a URL; raises StorageError."""
  import fsspec  # pylint: disable=g-import-not-at-top

  try:
    return fsspec.core.url_to_fs(path, **_options(scheme(path)))
  except Exception as e:  # pylint: disable=broad-except
    raise _storage_error(path, "", e) from None


def _call(path: str, what, *args, **kwargs):
  """Runs fs.<what>(fs_path, ...) for a URL, turning backend errors into StorageError
  (FileNotFoundError stays: callers name a missing file in their own words)."""
  fs, p = filesystem(path)
  try:
    return getattr(fs, what)(p, *args, **kwargs)
  except FileNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise _storage_error(path, "", e) from None


def check(path: str, setting: str, *, must_exist: bool = True) -> None:
  """Before any work: a URL's backend, credentials and bucket answer (local: nothing).

  Args:
    path: the path or URL.
    setting: the flag or config field that named it, for the message
      ("--workdir", "model.path").
    must_exist: the path itself must exist (a model or photo folder); else only its
      bucket (a run directory or output folder that may be new).

  Raises:
    StorageError: no backend for the scheme, no or refused credentials, a bucket or
      path that does not exist, a storage that does not answer; naming path and setting.
  """
  if not is_url(path):
    return
  try:
    import fsspec  # pylint: disable=g-import-not-at-top

    fs, p = fsspec.core.url_to_fs(path, **_options(scheme(path)))
    if scheme(path) in _OBJECT_STORES:
      endpoint = getattr(fs, "_location", None)  # gcsfs: the JSON API's base URL
      if isinstance(endpoint, str) and endpoint.startswith("http") and not any(
          os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY",
                                      "http_proxy")):  # behind a proxy: no direct way
        _probe(endpoint)
      bucket = p.split("/", 1)[0]
      try:
        # Listing needs only storage.objects.list (reading the bucket's own metadata
        # needs buckets.get, which object-level roles lack). Refused access raises
        # here; a missing bucket is a FileNotFoundError.
        fs.ls(bucket, detail=False)
      except FileNotFoundError:
        raise FileNotFoundError(f"bucket {bucket!r} does not exist, or these credentials "
                                "may not see it") from None
    if must_exist and not fs.exists(p):
      raise FileNotFoundError(f"no file or folder {path}")
  except StorageError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise _storage_error(path, setting, e) from None


def exists(path: str) -> bool:
  return _call(path, "exists") if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _call(path, "isdir") if is_url(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  return _call(path, "isfile") if is_url(path) else os.path.isfile(path)


def listdir(path: str) -> List[str]:
  """The names directly inside a folder (files and sub-folders), sorted."""
  if not is_url(path):
    return sorted(os.listdir(path))
  _, own = filesystem(path)
  own = own.rstrip("/")
  return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in _call(path, "ls", detail=False)
                 if e.rstrip("/") != own} - {""})


def size(path: str) -> int:
  return _call(path, "size") if is_url(path) else os.path.getsize(path)


def makedirs(path: str) -> None:
  """Creates a folder and its parents; on an object store there is nothing to create."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)
  elif scheme(path) not in _OBJECT_STORES:
    _call(path, "makedirs", exist_ok=True)


def read_bytes(path: str) -> bytes:
  if is_url(path):
    return _call(path, "cat_file")
  with open(path, "rb") as f:
    return f.read()


def read_range(path: str, start: int, end: int) -> bytes:
  """Bytes [start, end) of a file (fewer at its end); a URL reads only that range."""
  if is_url(path):
    return _call(path, "cat_file", start=start, end=end)
  with open(path, "rb") as f:
    f.seek(start)
    return f.read(end - start)


def read_text(path: str, encoding: str = "utf-8") -> str:
  return read_bytes(path).decode(encoding)


def write_bytes(path: str, data: bytes) -> None:
  """Writes a whole file atomically: tmp + rename locally, one object upload on a URL."""
  if is_url(path):
    _call(path, "pipe_file", bytes(data))
    return
  tmp = f"{path}.tmp"  # one name: a rerun's write replaces what a killed one left
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def remove(path: str) -> None:
  if is_url(path):
    _call(path, "rm_file")
  else:
    os.remove(path)


def rmtree(path: str) -> None:
  """Deletes a folder and everything in it (a missing one is fine)."""
  if not is_url(path):
    shutil.rmtree(path, ignore_errors=True)
  elif exists(path):
    _call(path, "rm", recursive=True)


def move_command(src: str, dst: str) -> str:
  """The shell command that moves a file or folder, for messages that suggest one."""
  if scheme(src) in ("gs", "gcs"):
    return f"gcloud storage mv {src} {dst}"
  if is_url(src):
    return f"move {src} to {dst} with your storage's tools"
  return f"mv {src} {dst}"


@contextlib.contextmanager
def local_folder(path: str, names: Sequence[str]) -> Iterator[str]:
  """`path` itself when local; else a temporary local copy of its files `names`.

  For a library that insists on a local folder (transformers' tokenizer); the copy
  is deleted when the block ends.
  """
  if not is_url(path):
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="lfs_jax_") as tmp:
    for name in names:
      src = join(path, name)
      if isfile(src):
        with open(os.path.join(tmp, name), "wb") as f:
          f.write(read_bytes(src))
    yield tmp
