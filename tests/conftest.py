"""Test set-up: 8 fake CPU devices (sharding tests), float32 matmuls, CPU only."""

import os

os.environ.setdefault(
    "XLA_FLAGS",
    # 8 fake devices for sharding tests; a lighter LLVM pipeline: tiny models compile
    # several times faster and run about as fast. XLA:CPU's older elementwise emitter
    # instead of its fusion emitters halves the compile again (docs/benchmarks.md).
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    " --xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402

# Small data shipped with the tests (see tests/data/README.md); nothing outside the clone.
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def _run_root(factory):
  """This pytest run's temporary root, shared by all its xdist workers.

  A worker's basetemp is `<root>/popen-gw<N>`; without xdist the basetemp is the root.
  """
  base = factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
  """One persistent XLA cache for every process of the run, set before anything compiles.

  JAX decides once per process, at its first compilation, whether the cache is on;
  setting the directory later (as a session does from its config) is too late.
  The same HLO then compiles once per run, not once per worker and module. A size
  limit turns on JAX's file lock, so two workers never read a half-written entry.
  """
  path = _run_root(config._tmp_path_factory) / "xla_cache"  # pylint: disable=protected-access
  path.mkdir(exist_ok=True)
  config.lfs_jax_compile_cache = str(path)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_compilation_cache_max_size", 16 * 2 ** 30)


@pytest.fixture(scope="session")
def compile_cache(pytestconfig):
  """The run's persistent XLA cache (see pytest_configure), for configs to name."""
  return pytestconfig.lfs_jax_compile_cache


def _tiny_config(compile_cache, **overrides):
  """The tiny default config, small and fast; overrides as a__b=value for cfg.a.b."""
  from lfs_jax import config_base

  c = config_base.get_config()
  c.compile_cache = compile_cache
  c.train.steps = 4
  c.train.log_every = 2
  c.train.progress_every = 0
  c.data.sessions = "dog;dog2"
  c.mesh.data = 1  # one device unless a test asks for the mesh
  c.validation.every_session = False  # grids cost sampling; tests/test_validation.py turns them on
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  c.lock()
  return c


@pytest.fixture(scope="session")
def tiny_config(compile_cache):
  """Factory: `tiny_config(train__steps=2, ...)` -> a locked tiny config."""
  return lambda **overrides: _tiny_config(compile_cache, **overrides)


@pytest.fixture
def mini_config(compile_cache):
  """Factory: `mini_config("smoke", **{"mini.variants": "lfs"})` -> configs/mini.py:<arg>
  on one device, the run's XLA cache, dotted overrides applied."""
  def make(arg, **overrides):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "mini.py")
    spec = importlib.util.spec_from_file_location("mini_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(arg)
    c.compile_cache = compile_cache
    c.mesh.data = 1
    c.update_from_flattened_dict(overrides)
    return c
  return make


# The settings of the shared two-session run (tiny_run): sampling and evaluation
# small enough for test_sample and test_evaluate alike.
TINY_RUN = {"train__steps": 2, "data__sessions": "dog;cat", "sample__steps": 4,
            "sample__batch_size": 4, "sample__num_images": 2, "eval__num_images": 1,
            "eval__num_prompts": 2, "eval__batch_size": 4, "eval__grid": 4}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, compile_cache):
  """Factory: a private copy of one two-session tiny run (dog; cat, 2 steps).

  The run is trained once per pytest run, whichever worker asks first (the others
  wait on a file lock), and every caller gets its own copy to write samples and
  metrics into.
  """
  import shutil

  import filelock

  from lfs_jax.train import session

  root = _run_root(tmp_path_factory)
  trained = root / "tiny_run" / "run"
  with filelock.FileLock(str(root / "tiny_run.lock")):
    if not (root / "tiny_run" / "DONE").exists():
      shutil.rmtree(root / "tiny_run", ignore_errors=True)
      session.run(_tiny_config(compile_cache, **TINY_RUN), str(trained))
      (root / "tiny_run" / "DONE").touch()

  def copy(name):
    dest = tmp_path_factory.mktemp(name) / "run"
    shutil.copytree(trained, dest)
    return str(dest)

  return copy


@pytest.fixture(scope="session")
def make_tiny_run(tmp_path_factory, compile_cache):
  """Factory: trains a two-session tiny run (dog; cat, 2 steps) into a fresh folder."""
  from lfs_jax.train import session

  def make(name, **overrides):
    cfg = _tiny_config(compile_cache, **{"train__steps": 2, "data__sessions": "dog;cat",
                                         **overrides})
    workdir = str(tmp_path_factory.mktemp(name) / "run")
    session.run(cfg, workdir)
    return workdir

  return make


@pytest.fixture(scope="session")
def dreambooth_root(tmp_path_factory):
  """A dataset folder in the DreamBooth layout: the real prompts_and_classes.txt, the
  bundled photos for dog/cat/dog2 and two generated 8x8 JPEGs for every other subject."""
  import shutil

  import numpy as np
  from PIL import Image

  from lfs_jax import datasets

  root = tmp_path_factory.mktemp("dreambooth") / "dataset"
  root.mkdir()
  text = os.path.join(DATA, "dreambooth", "prompts_and_classes.txt")
  shutil.copy(text, root / "prompts_and_classes.txt")
  with open(text) as f:
    lines = [l.strip() for l in f]
  table = lines[lines.index("subject_name,class") + 1:]
  subjects = [l.split(",")[0] for l in table[:table.index("")]]
  bundled = datasets.bundled_root()
  for i, name in enumerate(subjects):
    if name in datasets.bundled_classes:
      shutil.copytree(os.path.join(bundled, name), root / name)
      continue
    (root / name).mkdir()
    for k in range(2):
      Image.fromarray(np.full((8, 8, 3), (i * 8 + k) % 256, np.uint8)).save(
          root / name / f"0{k}.jpg")
  return str(root)


# ------------------------------------------------------------ a local GCS emulator

BUCKET = "bkt"  # the emulator's bucket


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on (now)."""
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator():
  """A GCS emulator serving gs://bkt on 127.0.0.1 in this process (a thread; nothing
  reaches the internet), and the environment that points every client at it (also
  subprocesses): gcsfs and google-cloud-storage by STORAGE_EMULATOR_HOST, Orbax's
  TensorStore by TENSORSTORE_GCS_HTTP_URL. Its base URL."""
  import logging

  from gcp_storage_emulator.server import create_server

  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # 404s are normal
  from gcp_storage_emulator import server as routes
  from gcp_storage_emulator.handlers import objects

  def download(request, response, storage, *args, **kwargs):
    """GCS names an object's generation in a download's headers; without them
    TensorStore's OCDBT (Orbax) cannot update a manifest that another process or an
    earlier run wrote ("Malformed StorageGeneration")."""
    try:
      got = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(got["generation"])
      response["x-goog-metageneration"] = str(got.get("metageneration", "1"))
    except Exception:  # pylint: disable=broad-except  (a missing object: download says so)
      pass
    return real_download(request, response, storage, *args, **kwargs)

  real_download = objects.download
  port = free_port()
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  server.start()
  url = f"http://127.0.0.1:{port}"
  with pytest.MonkeyPatch.context() as m:
    m.setattr(objects, "download", download)  # objects.get(alt=media) calls it too
    for _, handlers in routes.HANDLERS:
      for method, handler in list(handlers.items()):
        if handler is real_download:
          m.setitem(handlers, method, download)
    m.setenv("STORAGE_EMULATOR_HOST", url)
    m.setenv("TENSORSTORE_GCS_HTTP_URL", url)
    # gcsfs would ask the emulator for the bucket's type over gRPC, which it does not
    # serve (two minutes of retries); read when gcsfs is imported.
    m.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    m.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    yield url
  server.stop()


def upload(local: str, url: str) -> None:
  """Copies a local folder into the bucket (resumable uploads: the emulator parses a
  multipart upload's body with the email parser, several times slower)."""
  from lfs_jax import paths

  fs, _ = paths.filesystem(url)
  for root, _, names in os.walk(local):
    for n in names:
      rel = os.path.relpath(os.path.join(root, n), local)
      with open(os.path.join(root, n), "rb") as f:
        fs.pipe_file(paths.filesystem(paths.join(url, *rel.split(os.sep)))[1], f.read(),
                     chunksize=2 ** 18)
