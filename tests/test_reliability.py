"""Faults a preemptible lifelong run must survive: each interruption resumes to
sessions bit-identical to one uninterrupted run (docs/reliability.md)."""

import os
import signal

import numpy as np
import pytest

from lfs_jax import checkpoint
from lfs_jax.train import session
from lfs_jax.train import step as step_lib
from lfs_jax.weights.convert import flatten

# Two sessions of 4 steps, progress every 2 steps, the DFKD teacher cache on: session 2
# resumes with session 1's teacher, earlier token rows and a recomputed cache.
_RUN = dict(data__sessions="dog;cat", train__steps=4, train__progress_every=2,
            train__log_every=1, kd__cache_size=2)


class _Killed(BaseException):
  """A hard kill simulated in process: nothing in lfs_jax catches a BaseException."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory, compile_cache):
  """One uninterrupted run: {session: its stored delta and bank}."""
  from conftest import _tiny_config  # pylint: disable=import-outside-toplevel

  cfg = _tiny_config(compile_cache, **_RUN)
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  session.run(cfg, workdir)
  return cfg, {k: _stored(workdir, k) for k in (1, 2)}


def _stored(workdir, k):
  got = checkpoint.restore_session(workdir, k)
  return flatten({"delta": got["delta"], "bank": got["bank"]})


def _assert_same_sessions(workdir, want):
  assert checkpoint.finished_sessions(workdir) == sorted(want)
  for k, tree in want.items():
    got = _stored(workdir, k)
    assert got.keys() == tree.keys()
    for name in tree:
      np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(tree[name]),
                                    err_msg=f"session {k}: {'/'.join(name)}")


def _at_step(monkeypatch, call, action):
  """Does `action` before the run's `call`-th train step (counted over all sessions)."""
  real = step_lib.compile_step
  count = {"n": 0}

  def patched(*args, **kwargs):
    fn, *rest = real(*args, **kwargs)

    def step(*a):
      count["n"] += 1
      if count["n"] == call:
        action()
      return fn(*a)
    return (step, *rest)

  monkeypatch.setattr(step_lib, "compile_step", patched)


def _sigterm():
  signal.raise_signal(signal.SIGTERM)


def test_sigterm_on_a_progress_step_saves_once_and_resumes(tmp_path, monkeypatch, reference):
  cfg, want = reference
  workdir = str(tmp_path / "run")
  with monkeypatch.context() as m:
    _at_step(m, 4 + 2, _sigterm)  # session 2, step 2: also a progress_every step
    with pytest.raises(session.Preempted, match="session 2 stopped at step 2"):
      session.run(cfg, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "progress"))) == ["2"]
  session.run(cfg, workdir, resume=True)
  _assert_same_sessions(workdir, want)


def test_kill_before_the_progress_cleanup_resumes(tmp_path, monkeypatch, reference):
  cfg, want = reference
  workdir = str(tmp_path / "run")

  def kill(*_):
    raise _Killed()

  with monkeypatch.context() as m:
    m.setattr(checkpoint, "clear_progress", kill)  # session 1 saved, its progress left
    with pytest.raises(_Killed):
      session.run(cfg, workdir)
  assert checkpoint.finished_sessions(workdir) == [1]
  assert checkpoint.progress_meta(workdir) == {"session": 1}
  session.run(cfg, workdir, resume=True)  # session 2 saves progress at steps 2 (was 1's)
  _assert_same_sessions(workdir, want)
