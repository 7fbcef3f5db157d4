"""Config files: every one loads and locks; the local-folder and DreamBooth paths work."""

import importlib.util
import os

import pytest

from lfs_jax import base as base_lib
from lfs_jax import checkpoint, config_base
from lfs_jax.errors import ConfigError
from lfs_jax import tiny
from lfs_jax.train import session

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config() if arg is None else mod.get_config(arg)
  cfg.lock()
  return cfg


def _flat(cfg, prefix=""):
  out = {}
  for k, v in cfg.items():
    if hasattr(v, "items"):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


# What sets each config apart from the base defaults (config_base.get_config()).
_LOCAL_SD = {"model.source": "local", "model.path": "", "model.compute_dtype": "bfloat16",
             "model.attention": "auto", "data.root": "", "train.steps": 250,
             "train.batch_size": 8, "train.log_every": 25, "train.progress_every": 100,
             "kd.batch_size": 8, "sample.steps": 50, "sample.batch_size": 8,
             "train.loss_reduction": "cd", "train.regulariser_lr_scale": 2.0,
             "concepts.initializer": "ktn", "data.rescale_cues": True,
             "validation.prompts_per_concept": 2}
EXPECTED = {
    ("tiny", None): {},
    ("sd15", None): {**_LOCAL_SD, "data.resolution": 512},
    ("sd21", None): {**_LOCAL_SD, "data.resolution": 768},
    ("dreambooth", "tiny"): {"data.format": "dreambooth", "data.root": "", "data.classes": "",
                             "data.sessions": "dog;cat;dog2;backpack;teapot"},
    ("dreambooth", "sd15"): {**_LOCAL_SD, "data.resolution": 512, "data.format": "dreambooth",
                             "data.classes": "", "data.sessions": "dog;cat;dog2;backpack;teapot"},
}


@pytest.mark.parametrize("name,arg", sorted(EXPECTED, key=str))
def test_every_config_is_the_base_schema_with_its_own_values(name, arg):
  """Same fields as config_base (a config adds none the code does not read), its
  documented values, and the tiny default is config_base's defaults exactly."""
  got, base = _flat(_load(name, arg)), _flat(config_base.get_config())
  assert got.keys() == base.keys(), got.keys() ^ base.keys()
  assert {k: got[k] for k in EXPECTED[name, arg]} == EXPECTED[name, arg]
  if name == "tiny":
    assert got == base


def test_a_config_file_with_a_bad_argument_names_it():
  with pytest.raises(ValueError, match=r"configs/dreambooth.py takes :tiny or :sd15, got :sd22"):
    _load("dreambooth", "sd22")


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


@pytest.mark.slow  # a whole loop (CI runs it)
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
    cfg.validation.every_session = False  # 50-step grids: tests/test_validation.py's job
  run = str(tmp_path / "run")
  results = session.run(cfg, run)
  assert results[0]["session"] == 1
  assert checkpoint.finished_sessions(run) == [1]
