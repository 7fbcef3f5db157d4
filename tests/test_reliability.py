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
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.path import atomicity

from lfs_jax import checkpoint
from lfs_jax import concepts
from lfs_jax import data
from lfs_jax import icgen
from lfs_jax import lock
from lfs_jax import sample
from lfs_jax.errors import EvalError
from lfs_jax.evaluate import run_eval
from lfs_jax import tiny
from lfs_jax.train import prepare as prepare_lib
from lfs_jax.train import session
from lfs_jax.train import step as step_lib
from lfs_jax.weights.convert import flatten
from test_evaluate import clip_dir  # noqa: F401  pylint: disable=unused-import

# Module fixtures worth building once: keep this module on one xdist worker.
pytestmark = pytest.mark.xdist_group("reliability")

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
    self._wrap(m, prepare_lib.base_lib, "load_base", "startup")
    self._wrap(m, checkpoint, "clear_progress", "cleanup")
    self._wrap(m, checkpoint, "restore_session", "between", lambda a: {"session": a[1]})
    real_prepare = session.prepare

    def prepare(*a, **kw):  # the VAE and text encoders, traced once a module
      ctx = real_prepare(*a, **kw)
      return ctx._replace(encode=compiled.setdefault("encode", ctx.encode),
                          text=compiled.setdefault("text", ctx.text))
    m.setattr(session, "prepare", prepare)
    real_setup = session.setup_session

    def setup(ctx, k, prev, *rest):
      self.session = k
      return real_setup(ctx, k, prev, *rest)
    m.setattr(session, "setup_session", setup)

    def jit_train_step(*a, **kw):  # the step of this module's runs, jitted once
      if "jit" not in compiled:
        compiled["jit"] = real_jit(*a, **kw)
      return compiled["jit"]
    real_jit = step_lib.jit_train_step
    m.setattr(step_lib, "jit_train_step", jit_train_step)

    def compile_step(fn, *a, **kw):
      self._hit("compile")
      if "exe" not in compiled:
        compiled["exe"] = real_compile(fn, *a, **kw)[0]
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
    if self.armed is None or self.armed[0] is None or self.fired:
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
  """One uninterrupted run: (config, {session: its stored delta and bank}, its folder)."""
  from conftest import _tiny_config  # pylint: disable=import-outside-toplevel

  cfg = _tiny_config(compile_cache, **_RUN)
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  with pytest.MonkeyPatch.context() as m:
    _Faults(m, compiled)
    session.run(cfg, workdir)
  return cfg, {k: _stored(workdir, k) for k in _SESSIONS}, workdir


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
  """Finished progress steps (an interrupted save leaves only a temporary folder)."""
  path = os.path.join(workdir, "progress")
  return sorted(n for n in os.listdir(path) if n.isdigit()) if os.path.isdir(path) else []


def _sigterm():
  signal.raise_signal(signal.SIGTERM)


def _kill():
  raise _Killed()


def _link(cfg, workdir, faults, link):
  """Runs (resumes) `workdir` with one fault armed; checks where it stopped."""
  (point, k, step), action, (message, finished, progress) = link
  faults.arm(point, action, session=k, step=step)  # point None: no fault
  try:
    session.run(cfg, workdir, resume=True)
    stopped = None
  except session.Preempted as e:
    stopped = str(e)
  except _Killed:
    stopped = "killed"
  except checkpoint.CheckpointError as e:  # out of disk space
    stopped = str(e)
  assert faults.fired or point is None, link
  assert (stopped or "").startswith(message or ""), (link, stopped)
  assert (stopped is None) == (message is None), (link, stopped)
  return finished, progress


def _chain(cfg, workdir, faults, want, chain, snapshots=None):
  """Each link resumes where the previous one stopped; a fork runs on a copy; a
  snapshot copies the run directory into `snapshots`."""
  for link in chain:
    if link[0] == "snapshot":
      snapshots[link[1]] = f"{workdir}-{link[1]}"
      shutil.copytree(workdir, snapshots[link[1]])
      continue
    fork = link[0] == "fork"
    where = workdir
    if fork:
      link = link[1]
      where = f"{workdir}-fork-{link[0][0]}"
      shutil.copytree(workdir, where)
    finished, progress = _link(cfg, where, faults, link)
    _assert_same_sessions(where, want, finished)
    assert _progress(where) == progress, link
    if link[2][0] is None:  # a finished run keeps no trace of interrupted saves
      assert not [d for d, _, _ in os.walk(where) if "orbax-checkpoint-tmp" in d]


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


@pytest.mark.slow
def test_sigterm_anywhere_stops_cleanly_and_resumes_bit_identical(tmp_path, faults,
                                                                   reference):
  cfg, want, _ = reference
  _chain(cfg, str(tmp_path / "run"), faults, want, _SIGTERM_CHAIN)


_KILL_CHAIN = [
    (("startup", None, None), _kill, ("killed", [], [])),
    (("compile", 1, None), _kill, ("killed", [], [])),
    (("step", 1, 1), _kill, ("killed", [], [])),                  # nothing saved yet
    (("progress_save", 1, 2), _kill, ("killed", [], [])),         # not committed: not there
    (("step", 1, 3), _kill, ("killed", [], ["2"])),               # right after a progress save
    (("step", 1, 4), _kill, ("killed", [], ["2"])),               # a last step
    (("session_save", 1, 1), _kill, ("killed", [], ["2"])),       # not committed: not there
    (("cleanup", 1, None), _kill, ("killed", [1], ["2"])),        # session 1's progress left
    (("step", 2, 1), _kill, ("killed", [1], [])),                 # it was dropped at start
    (("step", 2, 3), _kill, ("killed", [1], ["2"])),
    ("snapshot", "session2_step2"),
    ("fork", (("between", 2, None), _kill, ("killed", [1, 2], []))),
    (("step", 3, 2), _kill, ("killed", [1, 2], [])),
    (("step", 3, 4), _kill, ("killed", [1, 2], ["2"])),           # the run's last step
    ((None, None, None), None, (None, [1, 2, 3], [])),
]


@pytest.fixture(scope="module")
def snapshots():
  return {}


@pytest.mark.slow
def test_hard_kill_anywhere_resumes_bit_identical(tmp_path, faults, reference, snapshots):
  cfg, want, _ = reference
  _chain(cfg, str(tmp_path / "run"), faults, want, _KILL_CHAIN, snapshots)


@pytest.mark.slow
def test_sigterm_inside_session_2_of_a_fresh_main_exits_0_and_resumes(tmp_path, faults,
                                                                       reference, snapshots):
  """A real SIGTERM to `python -m lfs_jax.main --resume`, a fresh process that resumes
  session 2 (teacher = session 1 read back, earlier token rows, DFKD cache rebuilt)."""
  cfg, want, _ = reference
  workdir = str(tmp_path / "run")
  if "session2_step2" in snapshots:  # left by the hard-kill chain
    shutil.copytree(snapshots["session2_step2"], workdir)
  else:
    _chain(cfg, workdir, faults, want, [
        (("step", 2, 3), _kill, ("killed", [1], ["2"]))])
  # The driver sends the signal from inside session 2's step 3, like a scheduler would.
  driver = (
      "import os, runpy, signal, sys\n"
      "from lfs_jax.train import step\n"
      "real = step.compile_step\n"
      "def compile_step(*a, **kw):\n"
      "  fn, *rest = real(*a, **kw)\n"
      "  def at(state, *b):\n"
      "    if int(state.step) == 2:\n"
      "      os.kill(os.getpid(), signal.SIGTERM)\n"
      "    return fn(state, *b)\n"
      "  return (at, *rest)\n"
      "step.compile_step = compile_step\n"
      "runpy.run_module('lfs_jax.main', run_name='__main__')\n")
  flags = [f"--config.{k.replace('__', '.')}={v}" for k, v in _RUN.items()]
  proc = subprocess.run(
      [sys.executable, "-c", driver, f"--workdir={workdir}", "--resume",
       f"--config.compile_cache={cfg.compile_cache}", "--config.mesh.data=1",
       "--config.validation.every_session=False", *flags],
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "session 2: resumed at step 2" in proc.stdout
  assert "preempted: session 2 stopped at step 3" in proc.stderr
  assert not _library_lines(proc.stderr), proc.stderr[-3000:]  # bars and events only
  assert _progress(workdir) == ["3"]
  _assert_same_sessions(workdir, want, [1])
  faults.arm(None, None)
  session.run(cfg, workdir, resume=True)
  _assert_same_sessions(workdir, want, _SESSIONS)


def _killed_on_call(monkeypatch, module, name, call, before=lambda *a: None):
  """`module.name` raises _Killed at its `call`-th call (after `before(*args)`)."""
  real, count = getattr(module, name), {"n": 0}

  def wrapped(*a, **kw):
    count["n"] += 1
    if count["n"] == call:
      before(*a)
      raise _Killed()
    return real(*a, **kw)
  monkeypatch.setattr(module, name, wrapped)


def _half_written(path, _):
  with open(f"{path}.tmp", "wb") as f:
    f.write(b"\x89PNG half")


@pytest.mark.slow
def test_sample_killed_while_writing_reruns_complete(tmp_path, reference, monkeypatch):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[2], workdir)
  prompts = ["a <c1> dog", "a <c3> dog on the beach"]
  out = os.path.join(workdir, "samples", "session_3")
  with monkeypatch.context() as m:
    _killed_on_call(m, sample, "_save_png", 2, before=_half_written)
    with pytest.raises(_Killed):
      sample.sample_run(workdir, prompts, progress=False)
  left = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
  assert sorted(left) == ["a_c1_dog_seed0.json", "a_c1_dog_seed0.png", "a_c1_dog_seed1.png.tmp"]
  _, paths = sample.sample_run(workdir, prompts, progress=False)
  assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in paths)
  for name, data in left.items():  # what the kill left under a final name was complete
    if not name.endswith(".tmp"):
      assert open(os.path.join(out, name), "rb").read() == data, name


@pytest.mark.slow
def test_evaluate_killed_in_a_cell_reruns_to_the_same_metrics(tmp_path, reference, clip_dir,
                                                            monkeypatch):
  over = {"sample.steps": 2, "eval.num_images": 1, "eval.num_prompts": 1,
          "eval.variants": "icgen", "eval.grid": 0}
  whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
  for d in (whole, killed):  # sessions 1 and 2 of the reference: three cells
    shutil.copytree(reference[2], d, ignore=lambda d, n: ["3"] if d.endswith("sessions") else [])
  want = run_eval.evaluate(whole, clip=clip_dir, overrides=over, progress=False)
  assert want["computed"] == 3
  # A second evaluation of the same run (a double submit) is refused naming the first.
  with lock.acquire(os.path.join(killed, "metrics"), "evaluation"):
    with pytest.raises(lock.WorkdirLocked, match=f"pid {os.getpid()} on host"):
      run_eval.evaluate(killed, clip=clip_dir, overrides=over, progress=False)
  assert not os.path.exists(os.path.join(killed, "metrics"))  # nothing written
  with monkeypatch.context() as m:
    _killed_on_call(m, run_eval, "compute_cell", 3)
    with pytest.raises(_Killed):
      run_eval.evaluate(killed, clip=clip_dir, overrides=over, progress=False)
  got = run_eval.evaluate(killed, clip=clip_dir, overrides=over, progress=False)
  assert (got["computed"], got["reused"]) == (1, 2)
  assert got["metrics"]["variants"] == want["metrics"]["variants"]
  assert got["metrics"]["cells"] == want["metrics"]["cells"]
  # A damaged cells.json is named with the command that recovers, and left as it is.
  cells = os.path.join(killed, "metrics", "cells.json")
  _truncate(cells)
  damaged = open(cells, "rb").read()
  with pytest.raises(EvalError, match=f"{cells} is damaged.*mv {cells}"):
    run_eval.evaluate(killed, clip=clip_dir, overrides=over, progress=False)
  assert open(cells, "rb").read() == damaged


# --------------------------------------------------------------------- the workdir lock

def test_a_second_job_on_a_workdir_is_refused_naming_the_holder(tmp_path, tiny_config):
  workdir = str(tmp_path / "run")
  with lock.acquire(workdir, "training run"):
    with pytest.raises(lock.WorkdirLocked) as e:
      session.run(tiny_config(), workdir)
  assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(e.value)
  assert os.path.join(workdir, "lock") in str(e.value)
  assert not os.path.exists(workdir)  # the holder made it, wrote nothing, and left


def test_a_lock_left_by_a_killed_job_is_taken_over(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  holder = ("import os, sys\n"
            "from lfs_jax import lock\n"
            "lock.acquire(sys.argv[1])\n"
            "print(os.getpid(), flush=True)\n"
            "os.kill(os.getpid(), 9)\n")
  proc = subprocess.run([sys.executable, "-c", holder, workdir], capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == -signal.SIGKILL, proc.stderr
  dead = proc.stdout.strip()
  assert f'"pid": {dead}' in open(os.path.join(workdir, "lock")).read()
  with lock.acquire(workdir):
    assert f'"pid": {os.getpid()}' in open(os.path.join(workdir, "lock")).read()
  assert f"left by pid {dead} on host" in capsys.readouterr().err
  assert os.listdir(workdir) == []  # released: the file goes with it


def test_processes_of_one_job_share_process_0s_lock(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  with lock.acquire(workdir):  # process 0 of the job
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with lock.acquire(workdir):  # process 1: does not touch the file
      pass
    assert os.path.exists(os.path.join(workdir, "lock"))



# ------------------------------------------------------- damaged state, a full disk

def _truncate(path):
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])


def _largest_file(folder):
  files = [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names]
  return max(files, key=os.path.getsize)


@pytest.mark.slow
def test_a_damaged_session_is_named_never_overwritten_and_recovers(tmp_path, faults,
                                                                  reference):
  cfg, want, ref = reference
  workdir = str(tmp_path / "run")
  shutil.copytree(ref, workdir)
  victim = _largest_file(os.path.join(workdir, "sessions", "2", "delta"))  # the arrays
  _truncate(victim)
  damaged = open(victim, "rb").read()
  match = (r"session 2 is damaged and cannot be trusted: .*sessions/2 .*"
           rf"mv {workdir}/sessions/2 {workdir}/damaged_session_2.*--resume")
  with pytest.raises(checkpoint.CheckpointError, match=match):
    session.run(cfg, workdir, resume=True)
  with pytest.raises(checkpoint.CheckpointError, match=match):
    sample.sample_run(workdir, ["a <c1> dog"], session=2, progress=False)
  # The command line: the same words, exit 2, no stack trace.
  proc = subprocess.run(
      [sys.executable, "-m", "lfs_jax.main", "--mode=sample", f"--workdir={workdir}",
       "--session=2", "--prompt=a <c1> dog"], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "error: session 2 is damaged" in proc.stderr
  assert open(victim, "rb").read() == damaged
  # Following the advice trains session 2 again, bit-identical; session 3 is kept.
  shutil.move(os.path.join(workdir, "sessions", "2"), os.path.join(workdir, "damaged_session_2"))
  faults.arm(None, None)
  session.run(cfg, workdir, resume=True)
  _assert_same_sessions(workdir, want, _SESSIONS)


@pytest.mark.slow
def test_a_damaged_progress_checkpoint_is_named_and_kept(tmp_path, faults, reference,
                                                         snapshots):
  cfg, want, _ = reference
  workdir = str(tmp_path / "run")
  if "session2_step2" in snapshots:  # left by the hard-kill chain
    shutil.copytree(snapshots["session2_step2"], workdir)
  else:
    _chain(cfg, workdir, faults, want, [(("step", 2, 3), _kill, ("killed", [1], ["2"]))])
  victim = _largest_file(os.path.join(workdir, "progress", "2", "state"))
  _truncate(victim)
  faults.arm(None, None)
  with pytest.raises(checkpoint.CheckpointError,
                     match=rf"progress checkpoint of step 2 is damaged.*mv {workdir}/progress"):
    session.run(cfg, workdir, resume=True)
  assert _progress(workdir) == ["2"] and os.path.getsize(victim) > 0


def _enospc():
  raise OSError(errno.ENOSPC, "No space left on device")


# A full disk while saving progress, then a session: a clear error each time, what
# was saved before is intact, and the next --resume carries on.
_ENOSPC_CHAIN = [
    (("step", 1, 1), _sigterm, ("session 1 stopped at step 1", [], ["1"])),
    (("progress_save", 1, 2), _enospc,
     ("out of disk space while writing the progress of step 2", [], ["1"])),
    (("session_save", 1, 1), _enospc, ("out of disk space while writing session 1", [], ["2"])),
    (("between", 1, None), _sigterm, ("session 2 not started", [1], [])),
]


@pytest.mark.slow
def test_out_of_disk_space_in_a_save_is_clear_and_resumable(tmp_path, faults, reference):
  cfg, want, _ = reference
  _chain(cfg, str(tmp_path / "run"), faults, want, _ENOSPC_CHAIN)


# ------------------------------------------------------------------- bad input

def _registry():
  c = concepts.Concept(name="dog", token="<c1>", class_word="dog", initializer="dog",
                       session=1, images=())
  return concepts.Registry((c,))


@pytest.mark.parametrize("prompt,escape", [("a photo of a <nosuchtoken>", True),
                                           ("a <dgo> dog", True), ("a <c9> dog", False)])
def test_an_unknown_bracketed_word_in_a_prompt_is_an_error_listing_the_tokens(prompt, escape):
  word = prompt.split("<")[1].split(">")[0]
  with pytest.raises(ValueError, match=f"'<{word}>'.*known modifier tokens: <c1>$") as e:
    icgen.resolve(prompt, _registry(), "<c{}>", 1)
  # The escape is offered for other brackets; a word of the token format stays checked.
  assert ("sample.strict_tokens=False" in str(e.value)) == escape


def test_strict_tokens_off_keeps_other_brackets_as_text_but_checks_the_token_format():
  got = icgen.resolve("a <c1> dog next to a <html> sign", _registry(), "<c{}>",
                      strict=False)
  assert got.tokens == ["<c1>"]
  with pytest.raises(ValueError, match="'<c9>'"):
    icgen.resolve("a <c9> dog", _registry(), "<c{}>", strict=False)


def _photo(path, size):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  Image.new("RGB", size, (200, 30, 30)).save(path)
  return str(path)


@pytest.mark.parametrize("size,needle", [((1, 1), "1x1 pixels is smaller than 8"),
                                         ((7, 40), "7x40 pixels is smaller than 8"),
                                         ((20000, 10), "20000x10 pixels has an aspect ratio"),
                                         ((41, 10), "41x10 pixels has an aspect ratio of 4.1:1")])
def test_too_small_or_too_thin_photos_are_refused_naming_the_file(tmp_path, tiny_config,
                                                                  size, needle):
  for name in ("a", "b"):
    (tmp_path / "data" / name).mkdir(parents=True)
    _photo(tmp_path / "data" / name / "0.png", (40, 40))
  bad = _photo(tmp_path / "data" / "b" / "1.png", size)
  cfg = tiny_config(data__root=str(tmp_path / "data"), data__classes="a=dog,b=cat",
                    data__sessions="a;b")  # data.resolution 32: the floor is 8 pixels
  work = tmp_path / "run"
  with pytest.raises(data.DataError, match=f"{bad}: {needle}"):
    session.run(cfg, str(work))
  assert not work.exists()
  # The floor and the ratio are config fields: 0 accepts the photo.
  data.load_images([bad], 32, min_side=0, max_aspect=0)
  data.load_images([_photo(tmp_path / "ok.png", (8, 32))], 32, min_side=0.25, max_aspect=4)


# --------------------------------------------------------------------- the console

_ABSL_COMMAND = """
import sys
import numpy as np
from absl import app
from lfs_jax import checkpoint, console

def main(argv):
  console.setup(console.absl_verbosity())  # what every absl command does first
  checkpoint.save_progress(argv[1], 1, {"x": np.zeros(3)}, {"session": 1}, 1)
  print(checkpoint.progress_meta(argv[1]))

app.run(main)
"""


def _library_lines(stderr):
  return [l for l in stderr.splitlines() if l.startswith(("INFO:", "I1", "I0"))]


@pytest.mark.parametrize("verbosity", [None, 1])
def test_library_info_logs_show_only_with_verbosity_1(tmp_path, verbosity):
  flag = [] if verbosity is None else [f"--verbosity={verbosity}"]
  proc = subprocess.run([sys.executable, "-c", _ABSL_COMMAND, *flag, str(tmp_path / "w")],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip() == "{'session': 1}", proc.stderr
  if verbosity is None:  # absl's own default would print Orbax's INFO lines here
    assert proc.stderr == ""
  else:
    assert any("orbax" in l.lower() or "checkpoint" in l.lower()
               for l in _library_lines(proc.stderr)), proc.stderr
