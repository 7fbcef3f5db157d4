"""Config files: every one loads and locks; the local-folder and DreamBooth paths work."""

import importlib.util
import os

import pytest

from lfs_jax import base as base_lib
from lfs_jax import checkpoint
from lfs_jax.errors import ConfigError
from lfs_jax.models import tiny
from lfs_jax.train import session

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config() if arg is None else mod.get_config(arg)
  cfg.lock()
  return cfg


@pytest.mark.parametrize("name,arg", [("tiny", None), ("sd15", None), ("sd21", None),
                                      ("dreambooth", "tiny"), ("dreambooth", "sd15")])
def test_every_config_loads_and_rejects_unknown_keys(name, arg):
  cfg = _load(name, arg)
  with pytest.raises(AttributeError):
    cfg.train.stepz = 3  # locked: a typo is an error, not a new field
  assert cfg.model.source in ("tiny", "local")


def test_local_config_needs_a_model_path():
  with pytest.raises(ConfigError, match="model.path"):
    base_lib.load_base(_load("sd15").model, 0)


def test_dreambooth_config_orders_sessions(dreambooth_root):
  cfg = _load("dreambooth", "tiny")
  with cfg.unlocked():
    cfg.data.root = dreambooth_root
    cfg.data.sessions = "dog;cat,dog2;teapot"
  sessions = base_lib.session_specs(cfg.data)
  assert [[c.name for c in s] for s in sessions] == [["dog"], ["cat", "dog2"], ["teapot"]]
  assert sessions[1][1].class_word == "dog" and sessions[2][0].class_word == "teapot"
  assert len(sessions[0][0].images) == 3 and len(sessions[2][0].images) == 2


def test_session_on_a_local_diffusers_folder(tmp_path, tiny_config, compile_cache):
  folder = str(tmp_path / "sd")
  tiny.save_folder(tiny.random_params(3), folder)
  cfg = _load("sd15")
  with cfg.unlocked():
    cfg.model.path = folder
    cfg.model.compute_dtype = "float32"
    cfg.model.attention = "xla"
    cfg.data.root = ""
    cfg.data.sessions = "cat"
    cfg.data.resolution = 32
    cfg.train.steps = 2
    cfg.train.batch_size = 2
    cfg.kd.batch_size = 2
    cfg.mesh.data = 1
    cfg.compile_cache = compile_cache
  run = str(tmp_path / "run")
  results = session.run(cfg, run)
  assert results[0]["session"] == 1
  assert checkpoint.finished_sessions(run) == [1]
