"""Validation grids while training: rows, files, TensorBoard images, no recompiles,
the session's own weights, unchanged training, SIGTERM inside a grid and resume."""

import collections
import dataclasses
import io
import json
import os
import signal
import types

import jax
import numpy as np
import pytest
from PIL import Image

from lfs_jax import checkpoint, concepts, data, runs, sample
from lfs_jax.diffusion import sampler
from lfs_jax.errors import ConfigError
from lfs_jax.train import loop, session, validation
from lfs_jax.train import step as step_lib
from lfs_jax.train.tensorboard import SummaryWriter
from conftest import TINY_RUN

# The two runs below share this worker's compiled sampler.
pytestmark = pytest.mark.xdist_group("validation")

# Validation of the shared tiny run's settings: one seed, so a grid is two sampler
# batches (the ICGen rows, then the plain and class rows).
_ON = {**TINY_RUN, "validation__every_session": True, "validation__seeds": 1}


def _events(logdir):
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(
      logdir, size_guidance={event_accumulator.IMAGES: 0, event_accumulator.SCALARS: 0})
  acc.Reload()
  return acc


def test_image_events_read_back_by_tensorboard(tmp_path):
  """An image summary (PNG in Summary.Image) beside scalars, read by TensorBoard itself."""
  rng = np.random.default_rng(0)
  pictures = {3: rng.integers(0, 256, (5, 7, 3), np.uint8),
              9: rng.integers(0, 256, (6, 4, 3), np.uint8)}
  w = SummaryWriter(str(tmp_path))
  w.scalar("s/loss", 0.5, 1)
  pngs = {}
  for step, im in pictures.items():
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format="PNG")
    pngs[step] = buf.getvalue()
    w.image("validation/sessions", pngs[step], im.shape[0], im.shape[1], step)
  w.scalar("s/loss", 0.25, 2)
  w.close()
  acc = _events(str(tmp_path))
  assert acc.Tags()["images"] == ["validation/sessions"]
  got = acc.Images("validation/sessions")
  assert [e.step for e in got] == [3, 9]
  for e in got:
    assert (e.height, e.width) == pictures[e.step].shape[:2]
    assert e.encoded_image_string == pngs[e.step]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(e.encoded_image_string))),
                                  pictures[e.step])
  assert [(e.step, e.value) for e in acc.Scalars("s/loss")] == [(1, 0.5), (2, 0.25)]


def _concept(name, token, word, session, prompts=()):
  return concepts.Concept(name=name, token=token, class_word=word, initializer=word,
                          session=session, images=(data.ImageRecord("x.png", "0"),),
                          prompts=prompts)


def test_rows_follow_the_concepts_classes_and_variants(tiny_config):
  cfg = tiny_config()
  reg = concepts.Registry((
      _concept("dog", "<c1>", "dog", 1, ("a {} on the moon", "a {} in a box")),
      _concept("dog2", "<c2>", "dog", 2), _concept("cup", "<c3>", "cup", 2)))
  bank = {"concept1": {}, "concept2": {}}  # <c3> has no photos (an imported concept)
  s = validation.Settings(every_session=True, every_steps=0, prompts_per_concept=2,
                          prompts_per_class=1, seeds=1, variants=("icgen", "plain"))
  got = [tuple(r) for r in validation.rows(cfg, reg, bank, s)]
  assert got == [
      ("photo of a <c1> dog", "icgen", "<c1>"), ("photo of a <c1> dog", "plain", "<c1>"),
      ("a <c1> dog on the moon", "icgen", "<c1>"), ("a <c1> dog on the moon", "plain", "<c1>"),
      # no evaluation prompts of its own: the generic ones ("photo of a {}" is the first)
      ("photo of a <c2> dog", "icgen", "<c2>"), ("photo of a <c2> dog", "plain", "<c2>"),
      ("a <c2> dog on the beach", "icgen", "<c2>"), ("a <c2> dog on the beach", "plain", "<c2>"),
      ("photo of a <c3> cup", "plain", "<c3>"), ("a <c3> cup on the beach", "plain", "<c3>"),
      ("photo of a dog", "class", None), ("photo of a cup", "class", None)]
  s = dataclasses.replace(s, prompts_per_concept=1, prompts_per_class=0, variants=("plain",))
  assert [r.prompt for r in validation.rows(cfg, reg, bank, s)] == [
      "photo of a <c1> dog", "photo of a <c2> dog", "photo of a <c3> cup"]
  assert validation.name(2) == "session_002"
  assert validation.name(2, 50) == "session_002_step_000050"


@pytest.mark.parametrize("field,value", [("every_steps", -1), ("prompts_per_concept", 0),
                                         ("prompts_per_class", -2), ("seeds", 0),
                                         ("variants", "icgen,sdedit")])
def test_bad_settings_are_named_before_anything_is_written(tmp_path, tiny_config, field, value):
  work = tmp_path / "run"
  with pytest.raises(ConfigError, match=f"validation.{field}="):
    session.run(tiny_config(**{f"validation__{field}": value}), str(work))
  assert not work.exists()


def test_labelled_grid_places_every_tile_and_a_label():
  rng = np.random.default_rng(1)
  tiles = rng.integers(0, 256, (6, 16, 12, 3), np.uint8)
  grid = validation.labelled_grid(tiles, ["[icgen] a <c1> dog", "[plain] a <c1> dog", "x"])
  left = grid.shape[1] - 2 * 12
  assert grid.shape == (48, left + 24, 3) and left > 40
  for i, tile in enumerate(tiles):
    r, c = divmod(i, 2)
    np.testing.assert_array_equal(grid[r * 16:(r + 1) * 16, left + c * 12:left + (c + 1) * 12],
                                  tile)
  # Dark label pixels in each row's label column, more for a longer label.
  ink = [(grid[r * 16:(r + 1) * 16, :left] < 128).sum() for r in range(3)]
  assert ink[0] > ink[2] > 0 and ink[1] > ink[2]


def _tiles(workdir, stem):
  """The grid's tiles [rows, cols, H, W, 3] and its index."""
  index = json.loads(open(os.path.join(workdir, validation.FOLDER, stem + ".json")).read())
  grid = np.asarray(Image.open(os.path.join(workdir, validation.FOLDER, stem + ".png")))
  (h, w), left = index["tile"], index["label_width"]
  cols = len(index["columns"]["seeds"])
  return np.stack([np.stack([grid[r * h:(r + 1) * h, left + c * w:left + (c + 1) * w]
                             for c in range(cols)]) for r in range(len(index["rows"]))]), index


def _traces_after_renders(monkeypatch):
  """Snapshots of the sampler's trace counters after every grid rendered."""
  snaps, real = [], validation.Validator.render

  def render(self, *a, **kw):
    out = real(self, *a, **kw)
    snaps.append(collections.Counter(sampler.TRACES))
    return out
  monkeypatch.setattr(validation.Validator, "render", render)
  return snaps


@pytest.mark.slow  # a run resumed (CI runs it)
def test_resume_renders_the_missing_grids_with_each_sessions_weights(tiny_run, tiny_config,
                                                                     monkeypatch, capsys):
  """A finished run without grids (trained with validation off; a kill left session 1's
  half written) gets one per session on --resume, from the checkpoints, without
  training; the tiles are what `--mode=sample` draws with that session; prompts and
  seeds change between grids, nothing recompiles."""
  workdir = tiny_run("validation_resume")
  folder = os.path.join(workdir, validation.FOLDER)
  # What a hard kill inside session 1's grid can leave: its index, half a PNG.
  os.makedirs(folder)
  open(os.path.join(folder, "session_001.json"), "w").write("{}")
  open(os.path.join(folder, "session_001.png.tmp"), "wb").write(b"\x89PNG half")
  snaps = _traces_after_renders(monkeypatch)
  assert session.run(tiny_config(**_ON), workdir, resume=True) == []  # nothing trained
  assert sorted(os.listdir(folder)) == ["session_001.json", "session_001.png",
                                        "session_002.json", "session_002.png"]
  # Session 2's grid has other prompts (a second concept and class) than session 1's.
  assert len(snaps) == 2 and snaps[1] == snaps[0]
  out = capsys.readouterr().out
  for k, n in ((1, 3), (2, 6)):
    assert f"validation session {k}: {n} images in " in out
    index = json.loads(open(os.path.join(folder, f"session_{k:03d}.json")).read())
    assert (index["session"], index["images"]) == (k, n)

  tiles, index = _tiles(workdir, "session_002")
  assert [(r["prompt"], r["variant"]) for r in index["rows"]] == [
      ("photo of a <c1> dog", "icgen"), ("photo of a <c1> dog", "plain"),
      ("photo of a <c2> cat", "icgen"), ("photo of a <c2> cat", "plain"),
      ("photo of a dog", "class"), ("photo of a cat", "class")]
  assert index["session"] == 2 and index["step"] is None and index["seconds"] > 0
  run = runs.load_run(workdir, 2)
  st = sample.SampleSettings.from_config(run.cfg)
  for variants, strength in ((("icgen",), st.strength), (("plain", "class"), 1.0)):
    rows = [i for i, r in enumerate(index["rows"]) if r["variant"] in variants]
    want, _ = sample.generate(run, [index["rows"][i]["prompt"] for i in rows],
                              [st.seed] * len(rows), dataclasses.replace(st, strength=strength))
    np.testing.assert_array_equal(tiles[rows, 0], want, err_msg=str(variants))

  # TensorBoard: one image per session, the PNG on disk (tiles under 256 px: unscaled).
  got = _events(os.path.join(workdir, "logs")).Images("validation/sessions")
  assert [e.step for e in got] == [1, 2]
  assert got[1].encoded_image_string == open(os.path.join(folder, "session_002.png"),
                                             "rb").read()



def _sigterm_in_generate(monkeypatch, calls):
  """SIGTERM arrives inside the given (1-based) calls of sample.generate."""
  real, count = sample.generate, {"n": 0}

  def generate(*a, **kw):
    count["n"] += 1
    if count["n"] in calls:
      signal.raise_signal(signal.SIGTERM)
    return real(*a, **kw)
  monkeypatch.setattr(sample, "generate", generate)
  return count


@pytest.mark.slow  # a training run (CI runs it)
def test_grids_inside_and_after_a_session_leave_training_bit_identical(
    tiny_run, tiny_config, tmp_path, monkeypatch, capsys):
  """validation.every_steps=1: a grid after step 1 (from the live train state, which
  the next step then takes as its donated input) and one after the session, stopped
  by a SIGTERM inside it: the run stops with the session saved and nothing of that
  grid written. Session 1 equals the shared run's (trained without validation) bit
  for bit, optimizer state included; the train step is traced once (or read back from
  the program store, train/programs.py: the shared run stored it)."""
  cfg = tiny_config(**_ON, validation__every_steps=1)
  workdir = str(tmp_path / "run")
  traces, real_step = [], step_lib.train_step
  monkeypatch.setattr(step_lib, "train_step",
                      lambda *a, **k: (traces.append(1), real_step(*a, **k))[1])
  folder = os.path.join(workdir, validation.FOLDER)
  # Step 1's grid is calls 1-2; the grid after session 1 starts with call 3.
  calls = _sigterm_in_generate(monkeypatch, {3})
  with pytest.raises(session.Preempted, match="session 1 saved, its validation grid stopped"):
    session.run(cfg, workdir)
  assert calls["n"] == 3
  assert len(traces) + capsys.readouterr().out.count("program read back") == 1
  assert sorted(os.listdir(folder)) == ["session_001_step_000001.json",
                                        "session_001_step_000001.png"]
  assert checkpoint.finished_sessions(workdir) == [1]
  index = json.loads(open(os.path.join(folder, "session_001_step_000001.json")).read())
  assert (index["session"], index["step"], index["images"]) == (1, 1, 3)
  got = _events(os.path.join(workdir, "logs")).Images("validation/session_1")
  assert [e.step for e in got] == [1]

  want = checkpoint.restore_session(tiny_run("validation_ref"), 1, with_opt_state=True)
  have = checkpoint.restore_session(workdir, 1, with_opt_state=True)
  for key in ("delta", "bank", "opt_state"):
    w, h = jax.tree.leaves_with_path(want[key]), jax.tree.leaves_with_path(have[key])
    assert w and [p for p, _ in w] == [p for p, _ in h], key
    for (p, a), (_, b) in zip(w, h):
      np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=f"{key} {p}")


class _State(collections.namedtuple("_State", "step")):
  pass


def _fake_loop(monkeypatch, tiny_config, tmp_path, steps=4):
  """loop.steps' arguments with a Python step function; progress saves recorded."""
  cfg = tiny_config(train__steps=steps, train__log_every=1)
  run = types.SimpleNamespace(cfg=cfg, workdir=str(tmp_path), first=1, sessions=[[]],
                              schedule=None)
  su = types.SimpleNamespace(
      step_fn=lambda st, *a: (_State(st.step + 1), {"loss": np.float32(0.5)}),
      frozen=None, teacher=None, data=None, train_key=None)
  saved = []
  monkeypatch.setattr(loop.checkpoint, "save_progress",
                      lambda workdir, step, state, meta, keep: saved.append(step))
  return run, su, saved


def test_loop_validates_between_steps_and_saves_progress_where_a_sigterm_stopped_a_grid(
    monkeypatch, tiny_config, tmp_path):
  run, su, saved = _fake_loop(monkeypatch, tiny_config, tmp_path)
  seen = []
  hook = lambda st, step: (seen.append((st.step, step)), step == 2)[1]  # stopped at step 2
  with pytest.raises(loop.Preempted, match="session 1 stopped at step 2; progress saved"):
    loop.steps(run, su, _State(0), 1, {"flag": False}, validate=hook)
  assert seen == [(1, 1), (2, 2)] and saved == [2]  # the state of the step it validates
  # Resumed from that progress: the grid of the start step first, then every step
  # but the session's last (the grid after the session is the session loop's).
  seen.clear()
  state, _ = loop.steps(run, su, _State(2), 1, {"flag": False},
                        validate=lambda st, step: (seen.append((st.step, step)), False)[1])
  assert state.step == 4 and seen == [(2, 2), (3, 3)] and saved == [2]
  # Stopped again at the resumed start: nothing trained, the progress there is kept.
  with pytest.raises(loop.Preempted, match="session 1 stopped at step 2"):
    loop.steps(run, su, _State(2), 1, {"flag": False}, validate=lambda st, step: True)
  assert saved == [2]


def test_step_hook_renders_only_missing_grids_of_its_steps(monkeypatch):
  rendered, have = [], {(1, 2)}
  settings = validation.Settings(every_session=True, every_steps=2, prompts_per_concept=1,
                                 prompts_per_class=1, seeds=1, variants=("plain",))
  validator = types.SimpleNamespace(
      settings=settings, run=types.SimpleNamespace(cfg=types.SimpleNamespace(
          train=types.SimpleNamespace(steps=6))),
      missing=lambda k, step: (k, step) not in have,
      render=lambda moment, frozen, stop: rendered.append(moment) or "x.png")
  monkeypatch.setattr(validation, "in_session", lambda su, state, k, step, banks: (k, step))
  su = types.SimpleNamespace(trainer=types.SimpleNamespace(frozen_base={"unet": None}))
  hook = validation.make_step_hook(validator, su, 1, {}, {"flag": False})
  assert [hook(None, s) for s in range(1, 7)] == [False] * 6
  assert rendered == [(1, 4)]  # 2 exists, 6 is the session's end (its own grid)
  off = dataclasses.replace(settings, every_steps=0)
  assert validation.make_step_hook(types.SimpleNamespace(settings=off), su, 1, {}, {}) is None


def test_a_grid_goes_whole_to_a_bucket_url(tiny_config, capsys):
  """The workdir may be a URL (lfs_jax.paths): the grid and its index land there (an
  in-memory fsspec store here), and `missing` reads them back."""
  from lfs_jax import paths
  validator = object.__new__(validation.Validator)  # no run needed to write
  validator.folder, validator.writer = "memory://bucket/run/samples/validation", None
  validator.sample = sample.SampleSettings.from_config(tiny_config())
  rows = [validation.Row("photo of a dog", "class", None)]
  images = np.random.default_rng(2).integers(0, 256, (2, 8, 8, 3), np.uint8)
  record = {"icgen": False, "context_photo": None, "start_step": 0}
  moment = validation.Moment(3, None, None, np.zeros((0, 4), np.float32),
                             concepts.Registry(), {})
  assert validator.missing(3)
  path = validator._write(moment, rows, [0, 1], images, [record] * 2, 0.5)  # pylint: disable=protected-access
  assert path == "memory://bucket/run/samples/validation/session_003.png"
  assert not validator.missing(3)
  grid = np.asarray(Image.open(io.BytesIO(paths.read_bytes(path))))
  index = json.loads(paths.read_text(path[:-4] + ".json"))
  left = index["label_width"]
  np.testing.assert_array_equal(grid[:, left:left + 8], images[0])
  np.testing.assert_array_equal(grid[:, left + 8:], images[1])
  assert "validation session 3: 2 images in 0.5 s" in capsys.readouterr().out
  paths.rmtree("memory://bucket/run")
