"""Structural contracts of docs/ARCHITECTURE.md: FSDP's minimum size, tokens frozen by
structure, sampling defaults from the config only, one table of dataset formats."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lfs_jax import base as base_lib
from lfs_jax import checkpoint, concepts, config_base, datasets, parallel, sample
from lfs_jax import delta as delta_lib
from lfs_jax.errors import ConfigError
from lfs_jax.train import session


def test_fsdp_leaves_small_tensors_whole():
  assert config_base.get_config().mesh.fsdp_min_size == 1024
  assert parallel.fsdp_spec((320,), 4, min_size=1024) == P()          # a bias: whole
  assert parallel.fsdp_spec((1024,), 4, min_size=1024) == P("fsdp")   # at the minimum: split
  assert parallel.fsdp_spec((32, 320), 4, min_size=1024) == P(None, "fsdp")
  assert parallel.fsdp_spec((320,), 4) == P("fsdp")  # no minimum: the plain rule
  mesh = parallel.make_mesh(_mesh(2, 4))
  tree = {"kernel": np.zeros((64, 64), np.float32), "bias": np.zeros((64,), np.float32),
          "scale": np.zeros((512,), np.float32)}
  got = parallel.frozen_shardings(tree, mesh, "fsdp", 512)
  assert got["kernel"].spec == P("fsdp") and got["scale"].spec == P("fsdp")
  assert got["bias"].spec == P()
  whole = parallel.frozen_shardings(tree, mesh, "fsdp", 10 ** 6)
  assert all(s.spec == P() for s in whole.values())


def _mesh(data, fsdp):
  c = config_base.get_config().mesh
  c.data, c.fsdp = data, fsdp
  return c


@pytest.mark.slow
def test_tokens_frozen_by_structure(tmp_path, tiny_config):
  """train.train_tokens=False: no token rows in the optimizer state, and the saved
  rows are their class-word start, while the UNet delta trains."""
  cfg = tiny_config(train__train_tokens=False, data__sessions="dog", train__steps=2,
                    kd__mode="noise")
  workdir = str(tmp_path / "run")
  session.run(cfg, workdir)
  stored = checkpoint.restore_session(workdir, 1, with_opt_state=True)
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(stored["opt_state"])]
  assert [p for p in paths if "unet" in p] and not [p for p in paths if "tokens" in p]

  pipe = base_lib.load_base(cfg.model, cfg.seed)
  registry = concepts.Registry.from_json(json.dumps(stored["meta"]["concepts"]))
  concepts.add_tokens(pipe.tokenizer, registry, pipe.text_encoder.config.vocab_size)
  table = np.asarray(pipe.text_encoder_params["text_model"]["embeddings"]
                     ["token_embedding"]["embedding"], np.float32)
  want = concepts.initial_rows(pipe.tokenizer, registry.concepts, table)
  np.testing.assert_array_equal(np.asarray(stored["delta"]["tokens"]), want)
  start = delta_lib.from_config(cfg.train).initial(pipe.unet_params)
  assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
             zip(jax.tree.leaves(start), jax.tree.leaves(stored["delta"]["unet"])))


class _Stop(BaseException):
  """A kill after the last progress save (nothing in lfs_jax catches it)."""


def _with_rows(tree, rows):
  """The pre-seam layout: every {"unet": ...} node of a TrainState also holds "tokens"."""
  if isinstance(tree, dict):
    out = {k: _with_rows(v, rows) for k, v in tree.items()}
    return {**out, "tokens": rows} if "unet" in tree else out
  if isinstance(tree, tuple):
    items = [_with_rows(v, rows) for v in tree]
    return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
  return tree


@pytest.mark.slow
def test_progress_saved_before_tokens_were_frozen_by_structure_resumes(tmp_path, tiny_config,
                                                                       monkeypatch):
  """A train_tokens=False run interrupted before the seam kept its token rows (zero
  gradients) in the TrainState; --resume reads that layout and finishes the session
  bit-identical to an uninterrupted run."""
  cfg = tiny_config(train__train_tokens=False, data__sessions="dog", train__steps=4,
                    train__progress_every=2, kd__mode="noise")
  whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
  session.run(cfg, whole)
  want = checkpoint.restore_session(whole, 1)
  rows = np.full(np.shape(want["delta"]["tokens"][-1:]), 0.5, np.float32)

  real_save = checkpoint.save_progress

  def save_old_layout(workdir, step, state, meta, keep):
    old = state.replace(trainable=_with_rows(state.trainable, rows),
                        opt_state=_with_rows(state.opt_state, rows))
    assert "tokens" in old.trainable and "tokens" not in state.trainable
    real_save(workdir, step, old, meta, keep)

  def killed(*a, **kw):
    raise _Stop()

  with monkeypatch.context() as m:
    m.setattr(checkpoint, "save_progress", save_old_layout)
    m.setattr(checkpoint, "save_session", killed)
    with pytest.raises(_Stop):
      session.run(cfg, cut)
  assert checkpoint.progress_meta(cut) == {"session": 1}
  session.run(cfg, cut, resume=True)
  got = checkpoint.restore_session(cut, 1)
  for a, b in zip(jax.tree.leaves(want["delta"]), jax.tree.leaves(got["delta"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sample_settings_take_every_default_from_the_config():
  for f in dataclasses.fields(sample.SampleSettings):
    assert f.default is dataclasses.MISSING, f.name
  cfg = config_base.get_config()
  st = sample.SampleSettings.from_config(cfg)
  assert (st.steps, st.guidance, st.strength, st.select) == (
      cfg.sample.steps, cfg.sample.guidance, cfg.icgen.strength, cfg.icgen.select)


def test_a_dataset_format_is_one_table_entry(tmp_path, monkeypatch):
  spec = datasets.ConceptSpec(name="toy", class_word="toy", images=("a.png",), prompts=("a {}",))
  monkeypatch.setitem(datasets.FORMATS, "toyset",
                      datasets.Format(lambda root, d: {"toy": spec}))
  cfg = config_base.get_config()
  cfg.data.format, cfg.data.root, cfg.data.sessions = "toyset", str(tmp_path), "toy"
  assert base_lib.session_specs(cfg.data) == [[spec]]
  cfg.data.root = ""
  with pytest.raises(ConfigError, match="data.format='toyset' needs --config.data.root"):
    base_lib.session_specs(cfg.data)
  cfg.data.format = "nope"
  with pytest.raises(ConfigError, match="toyset"):
    base_lib.session_specs(cfg.data)


def test_the_mini_benchmark_has_a_lora_row(tmp_path):
  from lfs_jax.mini import bench, config as mini_config  # pylint: disable=g-import-not-at-top
  cfg = mini_config.get_config("smoke")
  assert bench.VARIANTS["lora"] == ("lfs_lora", True)
  lora = bench.training_config(cfg, "lfs_lora", str(tmp_path))
  assert lora.method == "lfs" and lora.train.selection == "lora"
  assert bench.training_config(cfg, "lfs", str(tmp_path)).train.selection == cfg.train.selection
