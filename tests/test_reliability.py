"""Faults a preemptible lifelong run must survive (docs/reliability.md).

The tiny run is interrupted at named points of every phase, by SIGTERM (the run
saves and stops: main exits 0) and by a hard kill (simulated in process: an
exception nothing in lfs_jax catches, raised where a SIGKILL could land), then
resumed; the sessions it finishes are bit-identical to one uninterrupted run.

Cheap by design: one reference run per test session; the interruptions of a kind
form a chain on one run directory (each link resumes where the last one stopped), so
the steps are mostly trained once; the train step is compiled once and the tiny base
drawn once for the whole module; one subprocess resumes inside session 2 in a fresh
process.
"""

import functools
import os
import shutil
import signal

import numpy as np
import pytest
from orbax.checkpoint._src.path import atomicity

from lfs_jax import checkpoint
from lfs_jax.models import tiny
from lfs_jax.train import session
from lfs_jax.train import step as step_lib
from lfs_jax.weights.convert import flatten

# Three sessions of 4 steps, progress at step 2 of each, the DFKD teacher cache on:
# session k resumes with session k-1's teacher, earlier token rows and its cache.
_RUN = dict(data__sessions="dog;cat;dog2", train__steps=4, train__progress_every=2,
            train__log_every=1, kd__cache_size=2)
_SESSIONS = (1, 2, 3)


class _Killed(BaseException):
  """A hard kill simulated in process: nothing in lfs_jax catches a BaseException."""


class _Faults:
  """Named points of a training run where one armed fault fires (once).

  Points: startup (loading the base), compile (the train step), step (before the
  session's step n runs), progress_save / session_save (inside Orbax's save, before
  its commit rename), cleanup (session saved, progress not yet dropped), between
  (session k finished, read back as the next session's teacher).
  """

  def __init__(self, monkeypatch, compiled):
    self.armed = None
    self.fired = False
    self.session = None
    m = monkeypatch
    m.setattr(tiny, "random_params", _random_params)  # drawn once a module
    self._wrap(m, session.base_lib, "load_base", "startup")
    self._wrap(m, checkpoint, "clear_progress", "cleanup")
    self._wrap(m, checkpoint, "restore_session", "between", lambda a: {"session": a[1]})
    real_setup = session.setup_session

    def setup(ctx, k, prev):
      self.session = k
      return real_setup(ctx, k, prev)
    m.setattr(session, "setup_session", setup)

    def jit_train_step(*a, **kw):  # the step of this module's runs, jitted once
      if "jit" not in compiled:
        compiled["jit"] = real_jit(*a, **kw)
      return compiled["jit"]
    real_jit = step_lib.jit_train_step
    m.setattr(step_lib, "jit_train_step", jit_train_step)

    def compile_step(fn, *a):
      self._hit("compile")
      if "exe" not in compiled:
        compiled["exe"] = real_compile(fn, *a)[0]
      exe = compiled["exe"]

      def step(state, *rest):
        self._hit("step", step=int(state.step) + 1)
        return exe(state, *rest)
      return step, 0.0, True
    real_compile = step_lib.compile_step
    m.setattr(step_lib, "compile_step", compile_step)

    real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(tmp):  # also called for each item inside a checkpoint
      parent, name = os.path.split(str(tmp._final_path))
      kind = {"progress": "progress_save", "sessions": "session_save"}.get(
          os.path.basename(parent))
      if kind and name.isdigit():
        self._hit(kind, step=int(name))
      return await real_finalize(tmp)
    m.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)

  def _wrap(self, m, module, name, point, info=lambda a: {}):
    real = getattr(module, name)

    def wrapped(*a, **kw):
      self._hit(point, **info(a))
      return real(*a, **kw)
    m.setattr(module, name, wrapped)

  def arm(self, point, action, session=None, step=None):
    self.armed = (point, session, step, action)
    self.fired = False

  def _hit(self, point, step=None, session=None):
    if self.armed is None or self.fired:
      return
    want, want_session, want_step, action = self.armed
    session = self.session if session is None else session
    if (point == want and want_session in (None, session)
        and want_step in (None, step)):
      self.fired = True
      action()


@functools.lru_cache(maxsize=None)
def _random_params_cached(seed):
  return _REAL_RANDOM_PARAMS(seed)


_REAL_RANDOM_PARAMS = tiny.random_params


def _random_params(seed):
  return _random_params_cached(seed)


@pytest.fixture(scope="module")
def compiled():
  return {}


@pytest.fixture
def faults(monkeypatch, compiled):
  return _Faults(monkeypatch, compiled)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, compile_cache, compiled):
  """One uninterrupted run: (config, {session: its stored delta and bank})."""
  from conftest import _tiny_config  # pylint: disable=import-outside-toplevel

  cfg = _tiny_config(compile_cache, **_RUN)
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  with pytest.MonkeyPatch.context() as m:
    _Faults(m, compiled)
    session.run(cfg, workdir)
  return cfg, {k: _stored(workdir, k) for k in _SESSIONS}


def _stored(workdir, k):
  got = checkpoint.restore_session(workdir, k)
  return flatten({"delta": got["delta"], "bank": got["bank"]})


def _assert_same_sessions(workdir, want, sessions):
  assert checkpoint.finished_sessions(workdir) == list(sessions)
  for k in sessions:
    got = _stored(workdir, k)
    assert got.keys() == want[k].keys()
    for name in want[k]:
      np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[k][name]),
                                    err_msg=f"session {k}: {'/'.join(name)}")


def _progress(workdir):
  path = os.path.join(workdir, "progress")
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def _sigterm():
  signal.raise_signal(signal.SIGTERM)


def _kill():
  raise _Killed()


def _link(cfg, workdir, faults, link):
  """Runs (resumes) `workdir` with one fault armed; checks where it stopped."""
  (point, k, step), action, (message, finished, progress) = link
  faults.arm(point, action, session=k, step=step)
  try:
    session.run(cfg, workdir, resume=True)
    stopped = None
  except session.Preempted as e:
    stopped = str(e)
  except _Killed:
    stopped = "killed"
  assert faults.fired, link
  assert (stopped or "").startswith(message or ""), (link, stopped)
  assert (stopped is None) == (message is None), (link, stopped)
  return finished, progress


def _chain(cfg, workdir, faults, want, chain):
  """Each link resumes where the previous one stopped; a fork runs on a copy."""
  for link in chain:
    fork = link[0] == "fork"
    where = workdir
    if fork:
      link = link[1]
      where = f"{workdir}-fork-{link[0][0]}"
      shutil.copytree(workdir, where)
    finished, progress = _link(cfg, where, faults, link)
    _assert_same_sessions(where, want, finished)
    assert _progress(where) == progress, link


# ((point, session, step), fault, (Preempted message, None = the run finished;
#  finished sessions; progress steps left)), in run order.
_SIGTERM_CHAIN = [
    (("startup", None, None), _sigterm, ("session 1 not started", [], [])),
    (("compile", 1, None), _sigterm, ("session 1 stopped before step 1", [], [])),
    (("step", 1, 1), _sigterm, ("session 1 stopped at step 1", [], ["1"])),  # off cadence
    (("step", 1, 2), _sigterm, ("session 1 stopped at step 2", [], ["2"])),  # on: one save
    (("session_save", 1, 1), _sigterm, ("session 2 not started", [1], [])),
    (("progress_save", 2, 2), _sigterm, ("session 2 stopped at step 3", [1], ["3"])),
    ("fork", (("cleanup", 2, None), _sigterm, ("session 3 not started", [1, 2], []))),
    ("fork", (("between", 2, None), _sigterm, ("session 3 not started", [1, 2], []))),
    (("step", 2, 4), _sigterm, ("session 3 not started", [1, 2], [])),       # a last step
    (("step", 3, 4), _sigterm, (None, [1, 2, 3], [])),                       # the run's last
]


def test_sigterm_anywhere_stops_cleanly_and_resumes_bit_identical(tmp_path, faults,
                                                                   reference):
  cfg, want = reference
  _chain(cfg, str(tmp_path / "run"), faults, want, _SIGTERM_CHAIN)
