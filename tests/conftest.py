"""Test set-up: 8 fake CPU devices (sharding tests), float32 matmuls, CPU only."""

import os

os.environ.setdefault(
    "XLA_FLAGS",
    # 8 fake devices for sharding tests; a lighter LLVM pipeline: tiny models compile
    # several times faster and run about as fast.
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402

# Small data shipped with the tests (see tests/data/README.md); nothing outside the clone.
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
  """One persistent XLA cache for the whole test session (same HLO compiles once)."""
  return str(tmp_path_factory.mktemp("xla_cache"))


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
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  c.lock()
  return c


@pytest.fixture
def tiny_config(compile_cache):
  """Factory: `tiny_config(train__steps=2, ...)` -> a locked tiny config."""
  return lambda **overrides: _tiny_config(compile_cache, **overrides)


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
