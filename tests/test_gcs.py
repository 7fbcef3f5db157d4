"""Bucket URLs (gs://) everywhere, on a local GCS emulator started by the test.

`gcp-storage-emulator` serves the GCS JSON API in this process on 127.0.0.1 (a free
port); STORAGE_EMULATOR_HOST points gcsfs and google-cloud-storage at it,
TENSORSTORE_GCS_HTTP_URL points Orbax's TensorStore there. Nothing reaches the
internet. The emulator ignores generation preconditions by itself; the `preconditions`
fixture makes it honour `ifGenerationMatch` as GCS does, so the bucket lock's races
(two creates, two takeovers, a stalled holder) run through the real client.
"""

import http
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from lfs_jax import checkpoint
from lfs_jax import datasets
from lfs_jax import interop
from lfs_jax import lock
from lfs_jax import paths
from lfs_jax import sample
from lfs_jax import tiny
from lfs_jax.evaluate import run_eval
from lfs_jax.train import loop
from lfs_jax.train import prepare as prepare_lib
from lfs_jax.train import session
from lfs_jax.weights import safetensors_io
from conftest import BUCKET, TINY_RUN, free_port, upload
from test_evaluate import clip_dir  # noqa: F401  pylint: disable=unused-import  (a fixture)

pytestmark = pytest.mark.xdist_group("gcs")  # one emulator and one model upload a module

@pytest.fixture(scope="module")
def bucket(emulator, tmp_path_factory, clip_dir):  # noqa: F811
  """gs://bkt with the tiny model (model/), the bundled photos (photos/) and CLIP (clip/)."""
  model = str(tmp_path_factory.mktemp("model"))
  tiny.save_folder(tiny.random_params(0), model)
  upload(model, f"gs://{BUCKET}/model")
  for name in ("dog", "cat"):
    upload(os.path.join(datasets.bundled_root(), name), f"gs://{BUCKET}/photos/{name}")
  upload(clip_dir, f"gs://{BUCKET}/clip")
  return f"gs://{BUCKET}"


def test_safetensors_through_a_url_equal_the_local_file(emulator, tmp_path):
  rng = np.random.default_rng(0)
  tensors = {f"w{i}": rng.normal(size=(i + 1, 3)).astype(np.float32) for i in range(5)}
  tensors["b"] = np.arange(7, dtype=np.int64)
  url, local = f"gs://{BUCKET}/st/w.safetensors", str(tmp_path / "w.safetensors")
  safetensors_io.save_file(tensors, url, metadata={"format": "pt"})
  safetensors_io.save_file(tensors, local, metadata={"format": "pt"})
  data = paths.read_bytes(url)
  assert data == open(local, "rb").read()
  got = safetensors_io.load_file(url)
  assert sorted(got) == sorted(tensors)
  for k, v in tensors.items():
    np.testing.assert_array_equal(got[k], v)
  assert safetensors_io.read_metadata(url) == {"format": "pt"}
  # A truncated object is named, as a truncated file is.
  paths.write_bytes(f"gs://{BUCKET}/st/cut.safetensors", data[:len(data) - 8])
  with pytest.raises(safetensors_io.SafetensorsError, match="cut.safetensors: truncated"):
    safetensors_io.load_file(f"gs://{BUCKET}/st/cut.safetensors")


def test_orbax_follows_a_changed_endpoint(emulator, monkeypatch):
  """etils.epath (Orbax's paths) keeps the first gs:// filesystem it makes for the
  process's life; after the endpoint changes (here: a closed port, then the emulator)
  Orbax must talk to the new one, as lfs_jax's own reads do. (The suite's CI failure
  of 2026-12-02: a module's emulator had gone, the next module's Orbax still called
  it.)"""
  from etils.epath import backend

  url = f"gs://{BUCKET}/endpoint_run"
  paths.write_bytes(f"{url}/{checkpoint.SESSIONS}/README", b"x")
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")  # closed
  paths.filesystem(url)
  backend.fsspec_backend.fs(url)  # what Orbax's first call in this process makes
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator)
  start = time.perf_counter()
  assert checkpoint.finished_sessions(url) == []  # Orbax lists the folder: no sessions
  assert time.perf_counter() - start < 10  # not gcsfs's retries against the closed port


def _config(tiny_config, bucket, **overrides):
  return tiny_config(**{**TINY_RUN, "model__source": "local", "model__path": f"{bucket}/model",
                        "data__root": f"{bucket}/photos", "data__classes": "dog=dog,cat=cat",
                        "train__steps": 4, "validation__every_session": False,
                        **overrides})


@pytest.mark.slow
def test_a_run_in_a_bucket_trains_is_preempted_resumes_samples_evaluates_exports(
    bucket, tiny_config, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)  # a URL mistaken for a local path would land here
  cfg = _config(tiny_config, bucket)
  workdir = f"{bucket}/run"

  # SIGTERM in session 2 (the real handler): progress of step 2 saved, Preempted.
  # (Validation grids are off: they are written like samples, and cost a sampler.)
  real_log = loop.log

  def log(pending, done, k, writer):
    if (k, done) == (2, 2):
      signal.raise_signal(signal.SIGTERM)
    return real_log(pending, done, k, writer)
  with monkeypatch.context() as m:
    m.setattr(loop, "log", log)
    with pytest.raises(loop.Preempted, match="session 2 stopped at step 2"):
      session.run(cfg, workdir)
  assert checkpoint.finished_sessions(workdir) == [1]
  assert paths.isdir(f"{workdir}/progress/2")
  # A second job on the same run while this one holds it is refused, naming the holder.
  with lock.acquire(workdir, "training run"):
    with pytest.raises(lock.WorkdirLocked, match=f"pid {os.getpid()} on host"):
      session.run(cfg, workdir, resume=True)
  capsys.readouterr()

  session.run(cfg, workdir, resume=True)
  assert "session 2: resumed at step 2" in capsys.readouterr().out
  assert checkpoint.finished_sessions(workdir) == [1, 2]
  assert not paths.exists(f"{workdir}/progress") and not paths.exists(f"{workdir}/lock")
  stored = json.loads(paths.read_text(f"{workdir}/config.json"))
  assert stored["model"]["path"] == f"{bucket}/model"
  registry = json.loads(paths.read_text(f"{workdir}/concepts.json"))
  assert [r["path"] for r in registry[0]["images"]] == [
      f"{bucket}/photos/dog/0{i}.jpg" for i in range(3)]

  # TensorBoard reads the scalars of both sessions from the uploaded events file.
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top

  tags = set()
  for name in paths.listdir(f"{workdir}/logs"):  # a file per session and restart
    local = tmp_path.parent / f"{tmp_path.name}_{name}"
    local.write_bytes(paths.read_bytes(f"{workdir}/logs/{name}"))
    tags |= {v.tag for e in event_file_loader.EventFileLoader(str(local)).Load()
             for v in e.summary.value}
  assert {"session_1/loss", "session_2/loss"} <= tags

  run, written = sample.sample_run(workdir, ["a <c1> dog"], progress=False)
  assert run.session == 2 and written and all(w.startswith(f"{workdir}/samples/") for w in written)
  png = Image.open(io.BytesIO(paths.read_bytes(written[0])))
  png.load()  # a whole PNG, decoded
  assert (png.format, png.mode) == ("PNG", "RGB")

  got = run_eval.evaluate(workdir, clip=f"{bucket}/clip", progress=False,
                          overrides={"eval.variants": "icgen", "eval.grid": 0})
  assert got["computed"] == 3  # two concepts after session 2, one after session 1
  for name in ("metrics.json", "report.md", "cells.json"):
    assert paths.isfile(f"{workdir}/metrics/{name}"), name
  assert not paths.exists(f"{workdir}/metrics/lock")

  out = f"{bucket}/export"
  exported = interop.export_session(workdir, out)
  assert sorted(paths.listdir(out)) == sorted(
      exported["files"] + ["README.md", "concepts.json"])
  imported = interop.import_delta(out, f"{bucket}/imported", cfg)
  assert imported["tokens"] == ["<c1>", "<c2>"]
  assert checkpoint.finished_sessions(f"{bucket}/imported") == [1]
  assert os.listdir(tmp_path) == []  # nothing was written to the local disk


_CACHE_SCRIPT = """
import sys, jax, jax.numpy as jnp
from lfs_jax import paths
paths.check(sys.argv[1], "compile_cache", must_exist=False)  # as a run does first
jax.config.update("jax_compilation_cache_dir", sys.argv[1])  # as session.run does
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event.endswith("/cache_hits") else None)
f = lambda x: jnp.sin(x) * 2
jax.jit(f)(jnp.ones(3)).block_until_ready()
print("first", len(hits))
jax.clear_caches()  # what a new process starts with: only the persistent cache
jax.jit(f)(jnp.ones(3)).block_until_ready()
print("again", len(hits))
"""


def test_the_compilation_cache_in_a_bucket_is_written_and_read_back(emulator):
  """compile_cache=gs://...: jax writes executables through etils.epath and gcsfs,
  and a start without them in memory reads them back (a restart on a fresh VM)."""
  url = f"gs://{BUCKET}/xla_cache"
  got = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, url], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert got.returncode == 0, got.stderr[-3000:]
  hits = dict(line.split() for line in got.stdout.splitlines() if line.strip())
  assert int(hits["first"]) == 0 and int(hits["again"]) >= 1, got.stdout  # read back
  assert any(n.endswith("-cache") for n in paths.listdir(url))


# ------------------------------------------- the lease under races (GCS preconditions)

@pytest.fixture()
def preconditions(emulator, monkeypatch):
  """The emulator honours `ifGenerationMatch` on object inserts and deletes, as GCS
  does (it ignores it by itself): a mismatch answers 412, generation 0 = "absent".

  Its server handles one request at a time, so check-then-write here is atomic, as
  GCS's own conditional write is. Returns the list of (method, object) refused.
  """
  from gcp_storage_emulator import server
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects

  refused = []

  def guarded(handler, method):
    def run(request, response, storage, *args, **kwargs):
      want = request.query.get("ifGenerationMatch")
      if want:
        if method == "DELETE":
          name = request.params["object_id"]
        elif "name" in request.query:
          name = request.query["name"][0]
        else:  # a multipart upload names its object in the metadata part
          name = request.data["meta"]["name"]
        try:
          have = storage.get_file_obj(request.params["bucket_name"], name)["generation"]
        except NotFound:
          have = "0"
        if str(have) != want[0]:
          refused.append((method, name))
          response.status = http.HTTPStatus.PRECONDITION_FAILED
          response.json({"error": {"code": 412, "message": "Precondition Failed"}})
          return None
      return handler(request, response, storage, *args, **kwargs)
    return run

  for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler is objects.insert or handler is objects.delete:
        monkeypatch.setitem(handlers, method, guarded(handler, method))
  monkeypatch.setattr(objects, "insert", guarded(objects.insert, "POST"))
  return refused


def _race(monkeypatch, n, contend):
  """Runs `contend()` in n threads that each first read the lock object, then wait
  for all others to have read it too: every one of them sees the same state, so only
  the conditional write can tell them apart. Returns what each returned or raised."""
  gate = threading.Barrier(n, timeout=60)
  real_get = lock._GcsObject.get  # pylint: disable=protected-access

  def get(self):
    got = real_get(self)
    gate.wait()
    return got
  monkeypatch.setattr(lock._GcsObject, "get", get)  # pylint: disable=protected-access
  results = [None] * n

  def one(i):
    try:
      results[i] = contend()
    except lock.WorkdirLocked as e:
      results[i] = e
  threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  monkeypatch.setattr(lock._GcsObject, "get", real_get)  # pylint: disable=protected-access
  return results


def _generation(url: str) -> int:
  from google.cloud import storage

  bucket, name = url.split("://", 1)[1].split("/", 1)
  return storage.Client().bucket(bucket).get_blob(name).generation


def test_of_jobs_racing_for_a_bucket_lock_exactly_one_wins(preconditions, monkeypatch):
  folder = f"gs://{BUCKET}/race"
  got = _race(monkeypatch, 3, lambda: lock.acquire(folder, "training run"))
  won = [g for g in got if isinstance(g, lock.Lease)]
  lost = [g for g in got if isinstance(g, lock.WorkdirLocked)]
  assert len(won) == 1 and len(lost) == 2, got
  assert all("took the lock" in str(e) and "at the same moment" in str(e) for e in lost)
  assert preconditions == [("POST", "race/lock")] * 2  # the creates that came second
  # The object is the winner's, and it keeps renewing it under its generation.
  assert _generation(f"{folder}/lock") == won[0]._generation  # pylint: disable=protected-access
  won[0].release()
  assert not paths.exists(f"{folder}/lock")


def test_of_jobs_racing_to_take_over_an_expired_lease_exactly_one_wins(preconditions,
                                                                       monkeypatch, capsys):
  folder = f"gs://{BUCKET}/expired"
  dead = lock.acquire(folder, "training run")
  dead._stop.set()  # killed hard: no renewal, no release  # pylint: disable=protected-access
  dead._thread.join()  # pylint: disable=protected-access
  monkeypatch.setattr(lock, "LEASE_S", 0.0)
  got = _race(monkeypatch, 2, lambda: lock.acquire(folder, "training run"))
  won = [g for g in got if isinstance(g, lock.Lease)]
  assert len(won) == 1 and isinstance([g for g in got if g not in won][0],
                                      lock.WorkdirLocked), got
  assert capsys.readouterr().err.count("not renewed for") == 2  # both saw it expired
  assert _generation(f"{folder}/lock") == won[0]._generation  # pylint: disable=protected-access
  won[0].release()


def test_a_stalled_holder_loses_its_lease_and_leaves_the_new_holders_lock(
    preconditions, monkeypatch, capsys):
  """A job not heard from for LEASE_S is taken over; when it wakes up, its renewal
  and its release are refused by the generation precondition: the new holder's lock
  stays (without preconditions the old job's release would delete it)."""
  folder, url = f"gs://{BUCKET}/stalled", f"gs://{BUCKET}/stalled/lock"
  monkeypatch.setattr(lock, "LEASE_RENEW_S", 0.05)
  taken = threading.Event()
  stalled = lock.acquire(folder, "training run")
  real_put = stalled._store.put  # pylint: disable=protected-access

  def put(record, generation):  # the holder stalls before its first renewal
    taken.wait(timeout=60)
    return real_put(record, generation)
  stalled._store.put = put  # pylint: disable=protected-access
  monkeypatch.setattr(lock, "LEASE_S", 0.0)
  new = lock.acquire(folder, "training run")
  taken.set()
  stalled._thread.join(timeout=60)  # its renewal was refused: it stops renewing
  assert not stalled._thread.is_alive()  # pylint: disable=protected-access
  assert "another job took over this run's lock" in capsys.readouterr().err
  stalled.release()
  assert ("DELETE", "stalled/lock") in preconditions
  # The object is the new holder's. Its renewals are slowed first, but one may be in
  # flight (the thread between its 0.05 s wait and its write): the pair is read until
  # the object and the holder agree, and compared as read. (Re-reading both for the
  # assert raced that renewal under load: the object one renewal older than the lease.)
  monkeypatch.setattr(lock, "LEASE_RENEW_S", 60.0)
  deadline = time.monotonic() + 30
  while True:
    held = (_generation(url), new._generation)  # pylint: disable=protected-access
    if held[0] == held[1] or time.monotonic() > deadline:
      break
    time.sleep(0.05)
  assert held[0] == held[1], held
  new.release()
  assert not paths.exists(url)


def test_a_renewed_lease_is_kept_and_a_dead_jobs_lease_expires(preconditions, monkeypatch,
                                                               capsys):
  """Renewal keeps the lease alive well past LEASE_S; once renewals stop (the job was
  killed hard: no release) it expires and is taken over. The lease is 2 s, renewed
  every 50 ms: a renewal thread starved for a second by a loaded machine still holds."""
  folder = f"gs://{BUCKET}/kept"
  monkeypatch.setattr(lock, "LEASE_RENEW_S", 0.05)
  monkeypatch.setattr(lock, "LEASE_S", 2.0)
  held = lock.acquire(folder, "training run")
  time.sleep(5.0)
  with pytest.raises(lock.WorkdirLocked,
                     match=rf"pid {os.getpid()} on host .* last heard from [01] s ago.*lease"):
    lock.acquire(folder, "training run")
  held._stop.set()  # killed hard  # pylint: disable=protected-access
  held._thread.join()  # pylint: disable=protected-access
  time.sleep(2.2)
  second = lock.acquire(folder, "training run")
  assert "not renewed for 2 s; taking it over" in capsys.readouterr().err
  second.release()
  assert not paths.exists(f"{folder}/lock")


# ---------------------------------------------------------------- bad input, before training

@pytest.fixture()
def no_training(monkeypatch):
  """Fails the test if a run gets as far as loading its base model."""
  def load_base(*a, **kw):
    raise AssertionError("the run started loading the base model")
  monkeypatch.setattr(prepare_lib.base_lib, "load_base", load_base)


def test_a_missing_bucket_is_named_with_its_setting(emulator, tiny_config, no_training):
  bucket = f"gs://{BUCKET}"
  cfg = _config(tiny_config, bucket)
  with pytest.raises(paths.StorageError,
                     match=r"--workdir=gs://no-such-bucket/run: bucket 'no-such-bucket' "
                           "does not exist"):
    session.run(cfg, "gs://no-such-bucket/run")
  cfg = _config(tiny_config, bucket, model__path=paths.join(datasets.bundled_root(), "dog"),
                data__root="", data__classes="dog=dog,cat=cat")
  cfg.compile_cache = "gs://no-such-bucket/xla"
  with pytest.raises(paths.StorageError,
                     match=r"compile_cache=gs://no-such-bucket/xla: bucket 'no-such-bucket'"):
    session.run(cfg, f"{bucket}/never")
  cfg = _config(tiny_config, bucket, model__path=f"{bucket}/no_model")
  with pytest.raises(paths.StorageError, match=f"model.path={bucket}/no_model: no file"):
    session.run(cfg, f"{bucket}/never")
  cfg = _config(tiny_config, bucket, model__path=paths.join(datasets.bundled_root(), "dog"),
                data__root=f"{bucket}/no_photos")
  with pytest.raises(paths.StorageError, match=f"data.root={bucket}/no_photos: no file"):
    session.run(cfg, f"{bucket}/never")
  assert not paths.exists(f"{bucket}/never")


def test_missing_credentials_are_named_with_the_setting(emulator, tiny_config, tmp_path,
                                                        monkeypatch, no_training):
  bucket = f"gs://{BUCKET}"
  monkeypatch.delenv("STORAGE_EMULATOR_HOST")  # a real bucket: credentials from ADC
  monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
  cfg = tiny_config(data__root=f"{bucket}/photos")
  with pytest.raises(paths.StorageError,
                     match="--workdir=gs://bkt/run2: access refused or no credentials.*"
                           "missing.json was not found.*GOOGLE_APPLICATION_CREDENTIALS"):
    session.run(cfg, f"{bucket}/run2")


def test_an_unreachable_storage_fails_at_once_naming_the_setting(tiny_config, monkeypatch,
                                                                no_training):
  """A refused connection (a wrong endpoint, the network down) is one error in
  seconds, not after gcsfs's six retries with backoff (~35 s)."""
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")  # closed
  cfg = tiny_config()
  start = time.perf_counter()
  with pytest.raises(paths.StorageError,
                     match=r"--workdir=gs://bkt/run3: the storage does not answer \(cannot "
                           r"connect to http://127.0.0.1:\d+ \(STORAGE_EMULATOR_HOST\): "
                           "Connection refused"):
    session.run(cfg, f"gs://{BUCKET}/run3")
  assert time.perf_counter() - start < 4


def test_a_scheme_without_a_backend_is_named_with_the_setting(tiny_config, tmp_path,
                                                              no_training):
  cfg = tiny_config(data__root="nosuch://bucket/photos")
  with pytest.raises(paths.StorageError, match="data.root=nosuch://bucket/photos: no storage "
                                               "backend for nosuch://"):
    session.run(cfg, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def _cli(*argv: str) -> int:
  """`python -m lfs_jax.main ARGV` in this process (its checks come before any model
  is loaded, so a subprocess would only add its imports); the exit code."""
  from absl import flags
  from lfs_jax import main as cli

  flags.FLAGS.unparse_flags()
  try:
    flags.FLAGS(["lfs_jax.main", *argv])
    return cli.main(["lfs_jax.main"])
  finally:
    flags.FLAGS.unparse_flags()


def test_sample_evaluate_export_import_check_their_urls_before_any_work(
    emulator, tmp_path, monkeypatch, capsys):
  """Each command's bad URL is one line naming the flag, before it loads anything."""
  def no_work(*a, **kw):
    raise AssertionError("the command started its work")
  for module, name in ((sample, "sample_run"), (run_eval, "evaluate"),
                       (interop, "export_session"), (interop, "import_delta")):
    monkeypatch.setattr(module, name, no_work)
  local = str(tmp_path)

  def refused(*argv):
    assert _cli(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]

  assert "error: --workdir=gs://no-such-bucket/run: bucket 'no-such-bucket' does not exist" \
      in refused("--mode=sample", "--workdir=gs://no-such-bucket/run", "--prompt=a <c1> dog")
  assert refused("--mode=export", f"--workdir={local}", "--out=nosuch://b/out").startswith(
      "error: --out=nosuch://b/out: no storage backend for nosuch://")
  assert refused("--mode=import", f"--workdir=gs://{BUCKET}/imp",
                 f"--from=gs://{BUCKET}/no_delta").startswith(
      f"error: --from=gs://{BUCKET}/no_delta: no file or folder")
  assert not paths.exists(f"gs://{BUCKET}/imp")
  monkeypatch.delenv("STORAGE_EMULATOR_HOST")  # a real bucket: credentials from ADC
  monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
  got = refused("--mode=evaluate", f"--workdir={local}", f"--clip=gs://{BUCKET}/clip")
  assert got.startswith(f"error: --clip=gs://{BUCKET}/clip: access refused or no credentials")
  assert "missing.json was not found" in got and "GOOGLE_APPLICATION_CREDENTIALS" in got


def test_processes_that_do_not_see_process_0s_config_are_refused(monkeypatch, tmp_path):
  """Two processes must name one shared workdir (faked: process 1 sees no config.json)."""
  monkeypatch.setattr(prepare_lib.jax, "process_count", lambda: 2)
  monkeypatch.setattr(prepare_lib.jax, "process_index", lambda: 1)
  monkeypatch.setattr(prepare_lib.parallel, "barrier", lambda name: None)
  monkeypatch.setattr(prepare_lib.parallel, "agree_any", bool)
  with pytest.raises(prepare_lib.ConfigError, match="process 1 does not see the config.json"):
    prepare_lib._check_shared(str(tmp_path))  # pylint: disable=protected-access
  (tmp_path / "config.json").write_text("{}")
  prepare_lib._check_shared(str(tmp_path))  # pylint: disable=protected-access


def test_a_retried_renewal_that_meets_its_own_write_keeps_the_lease(preconditions):
  """The storage client retries a conditional write whose answer was lost; the retry
  is refused against the write that went through. That write is this job's own (the
  same record), so the lease keeps it; another job's record is still a takeover."""
  folder, url = f"gs://{BUCKET}/retried", f"gs://{BUCKET}/retried/lock"
  held = lock.acquire(folder, "training run")
  try:
    store, generation = held._store, held._generation  # pylint: disable=protected-access
    record = json.dumps({"host": "h", "pid": 1, "renewed": 1.5})
    first = store.put(record, generation)  # went through; its answer "lost"
    assert first is not None and first != generation
    assert store.put(record, generation) == first == _generation(url)  # the retry
    assert ("POST", "retried/lock") in preconditions  # it was refused, and recognised
    assert store.put(json.dumps({"host": "other", "pid": 2, "renewed": 2.5}),
                     generation) is None  # another job's write: taken over
  finally:
    held._stop.set()  # pylint: disable=protected-access
    held._thread.join()  # pylint: disable=protected-access
