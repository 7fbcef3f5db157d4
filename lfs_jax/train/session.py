"""The lifelong loop: sessions in order, each trained, checkpointed and resumable.

The only training code that touches the disk. Its stages, in order:
  prepare        config, dataset, photos, tokens, base model checked; config.json
                 written; prior's class images; the `Run` (train/prepare.py);
  per session k:
    inputs       registry += session k's concepts; photos -> latents; DFKD
                 conditions -> text contexts (train/inputs.py, train/kd.py);
    state        frozen base, teacher (session k-1's delta, merged by the selection
                 into the same frozen base) and the fresh train state, on the mesh;
    compile      the step, once a run, at its first session (a `Trainer`);
    loop         `train.steps` steps, progress checkpoints, SIGTERM (train/loop.py);
    save         sessions/<k>/ written; progress/ dropped;
    validate     the grid of what session k's model draws (train/validation.py), also
                 every validation.every_steps steps inside the loop.

A run made by `--mode=import` (lfs_jax.interop) starts with a finished session 1 never
trained here; data.sessions lists the sessions after it (numbered from 2).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from typing import Any, Dict, List, NamedTuple, Optional

import jax
import numpy as np
import tqdm

from lfs_jax import checkpoint
from lfs_jax import concepts as concepts_lib
from lfs_jax import console
from lfs_jax import lock as lock_lib
from lfs_jax import parallel
from lfs_jax import runs
from lfs_jax.train import inputs as inputs_lib
from lfs_jax.train import kd as kd_lib
from lfs_jax.train import loop
from lfs_jax.train import losses
from lfs_jax.train import programs
from lfs_jax.train.prepare import Run, base_delta, check_storage, prepare  # the loop's entry
from lfs_jax.train import step as step_lib
from lfs_jax.train import validation as validation_lib
from lfs_jax.train.tensorboard import SummaryWriter
from lfs_jax.train.loop import Preempted  # pylint: disable=unused-import  (main catches it here)

_TRAIN, _KD_CACHE = 1, 2  # purposes folded into the run key
# Config fields that never reach the train step's program (programs.py's key omits
# them, so changing them on --resume still finds the stored program).
_NOT_IN_STEP = ("compile_cache", "train.log_every", "train.progress_every", "checkpoint.",
                "distributed.", "sample.", "icgen.", "eval.", "validation.")


class Trainer(NamedTuple):
  """The compiled step and the layout of its arguments: built once a run."""
  step_fn: Any                     # jax.stages.Compiled
  shardings: parallel.TrainShardings
  frozen_base: Any                 # {"unet": selection.frozen(base), "text": ...} on the mesh


class SessionSetup(NamedTuple):
  """Everything one session's steps read, on the mesh."""
  registry: concepts_lib.Registry
  models: losses.Models
  spec: losses.LossSpec
  frozen: Any
  teacher: Any
  data: losses.SessionData
  state: step_lib.TrainState
  train_key: jax.Array
  token_table: np.ndarray
  new_rows: np.ndarray
  bank: Dict[str, Any]
  trainer: Trainer

  step_fn = property(lambda self: self.trainer.step_fn)


def _jit(run: Run, frozen, teacher, trainable) -> Trainer:
  """Jits the step for these trees' layout and places the frozen base (once a run).

  The base goes from host memory leaf by leaf straight into its sharding; it never
  sits whole on one device.
  """
  optimizer = step_lib.make_optimizer(run.cfg.train, regularised=run.spec.regularised)
  step_fn, sh = step_lib.jit_train_step(
      run.mesh, frozen, frozen_mode=run.cfg.mesh.frozen, models=run.models, spec=run.spec,
      optimizer=optimizer, state=jax.eval_shape(
          functools.partial(step_lib.init_state, optimizer=optimizer), trainable),
      teacher=teacher, trainable_mode=run.cfg.mesh.trainable,
      fsdp_min_size=run.cfg.mesh.fsdp_min_size)
  base = parallel.put({"unet": frozen["unet"], "text": frozen["text"]},
                      {"unet": sh.frozen["unet"], "text": sh.frozen["text"]})
  return Trainer(step_fn, sh, base)


def program_store(cfg, models, spec) -> Optional[programs.Store]:
  """Where the traced step is kept (beside the compile cache; None without one), and
  what it closes over: the modules, the loss spec and the config fields it may read."""
  folder = programs.folder_for(cfg.compile_cache)
  if folder is None:
    return None
  flat = {}
  stack = [("", cfg.to_dict())]
  while stack:
    prefix, d = stack.pop()
    for k, v in d.items():
      if isinstance(v, dict):
        stack.append((f"{prefix}{k}.", v))
      elif not f"{prefix}{k}".startswith(_NOT_IN_STEP):
        flat[f"{prefix}{k}"] = v
  static = json.dumps({"models": repr(models), "spec": repr(spec),
                       "config": flat}, sort_keys=True, default=repr)
  return programs.Store(folder, static)


def setup_session(run: Run, session: int, prev_delta,
                  trainer: Optional[Trainer] = None,
                  clock: Optional[console.Clock] = None) -> SessionSetup:
  """Session `session`'s inputs and fresh train state on the mesh.

  Args:
    run: the run (`prepare`).
    session: the run session number.
    prev_delta: session k-1's delta (`base_delta` for session 1).
    trainer: the run's compiled step; None at the first session of a run, which
      jits and compiles it ahead of the first step with the real shapes and
      shardings (SessionSetup.trainer carries it to the next sessions).
    clock: the start's phases; inputs, tracing and compile are marked on it.
  """
  cfg, spec = run.cfg, run.spec
  inp = inputs_lib.session_inputs(run, session, prev_delta)
  frozen, teacher, trainable = inputs_lib.host_trees(run, prev_delta, inp)
  first = trainer is None
  if first:
    trainer = _jit(run, frozen, teacher, trainable)
  sh = trainer.shardings
  # Host values -> global arrays on the mesh (the same on every process).
  frozen = {**trainer.frozen_base, "tokens": parallel.put(frozen["tokens"], sh.frozen["tokens"])}
  # The teacher gets buffers of its own: the student's are donated at every step.
  teacher = parallel.put(teacher, sh.teacher) if teacher is not None else None
  root = jax.random.key(cfg.seed)
  data = parallel.put(inp.data, sh.data)
  if spec.kd_cached:
    cache_fn = jax.jit(functools.partial(
        kd_lib.kd_cache, size=cfg.kd.cache_size, latent_shape=data.latent_mean.shape[1:],
        models=run.models, spec=spec), out_shardings=sh.data)
    key = jax.random.fold_in(jax.random.fold_in(root, _KD_CACHE), session)
    with jax.set_mesh(run.mesh):  # traced under the mesh, as the step (compile_step)
      data = data._replace(kd_cache=cache_fn(teacher, frozen, data.kd_context, data.n_kd,
                                             run.schedule, parallel.put(key, sh.rng),
                                             kd_base=data.kd_base))
  optimizer = step_lib.make_optimizer(cfg.train, regularised=spec.regularised)
  state = parallel.put(step_lib.init_state(trainable, optimizer), sh.state)
  train_key = parallel.put(jax.random.fold_in(jax.random.fold_in(root, _TRAIN), session),
                           sh.rng)
  if first:
    if clock is not None:
      clock.mark("inputs")
    compiled, seconds, cached, *info = step_lib.compile_step(
        trainer.step_fn, run.mesh, state, frozen, teacher, data, run.schedule, train_key,
        store=program_store(run.cfg, run.models, run.spec))
    trainer = trainer._replace(step_fn=compiled)
    info = info[0] if info else None
    if clock is not None and info is not None:
      clock.mark("tracing", info.trace_s, "read back" if info.program == "stored" else "")
    if clock is not None:
      clock.mark("compile", note="persistent cache" if cached else "")
    if jax.process_index() == 0:
      how = []
      if info is not None:
        how.append({"stored": "program read back"}.get(info.program, info.program)
                   + f" in {info.trace_s:.1f} s")
      if cached:
        how.append("from the persistent compilation cache")
      print(f"train step compiled in {seconds:.1f} s" + (f" ({'; '.join(how)})" if how else ""))
  return SessionSetup(inp.registry, run.models, spec, frozen, teacher, data, state,
                      train_key, inp.token_table, inp.new_rows, inp.bank, trainer)


def _train_session(run: Run, session: int, prev_delta, trainer: Optional[Trainer], *,
                   resume: bool, stop, writer=None, validator=None, banks=None,
                   clock: Optional[console.Clock] = None):
  """Trains and saves one session; returns (its final metrics, the run's Trainer).

  `validator` (None: off) renders the grids inside the session, `banks` holds the
  context banks of the sessions before it, `writer` the run's TensorBoard events.
  `clock`: the process's start, given to its first session, which prints the phases
  from the start to its first step.
  """
  # SIGTERM while loading the base or saving the last session: stop before any work.
  loop.stop_if_asked(stop, f"session {session} not started")
  su = setup_session(run, session, prev_delta, trainer, clock)
  state = su.state
  if resume:
    got = loop.latest_progress(run, su, state)
    if got is not None and got["meta"]["session"] == session:
      state = got["state"]
      print(f"session {session}: resumed at step {int(state.step)}")
  loop.stop_if_asked(stop, f"session {session} stopped before step {int(state.step) + 1}")
  if clock is not None and resume:
    clock.mark("resume")

  def first_step():  # the start's phases, one line above the progress bar (not into it)
    clock.mark("first step")
    if jax.process_index() == 0:
      tqdm.tqdm.write(clock.line(("restart" if resume else "start") + " to the first step"))
  t0 = time.time()
  hook = validation_lib.make_step_hook(validator, su, session, banks or {}, stop)
  state, last = loop.steps(run, su, state, session, stop, writer=writer, validate=hook,
                           first_step=first_step if clock is not None else None)
  _save(run, su, state, session, last, time.time() - t0)
  return {"session": session, **last}, su.trainer


def _save(run: Run, su: SessionSetup, state, session: int, last, seconds: float) -> None:
  """Writes sessions/<k>/ (delta, every token row so far, bank, meta); drops progress/."""
  trained = parallel.to_host(state.trainable)
  n_new = sum(c.vectors for c in su.registry.in_session(session))
  offset = int(su.data.token_offset)
  tokens = np.array(su.token_table[:offset + n_new])
  tokens[offset:] = np.asarray(trained.get("tokens", su.new_rows))[:n_new]
  meta = runs.session_meta(session, su.registry, run.cfg.to_dict(), steps=run.cfg.train.steps,
                           metrics=last, seconds=seconds)
  checkpoint.save_session(run.workdir, session, delta={"unet": trained["unet"], "tokens": tokens},
                          bank=su.bank, opt_state=parallel.to_host(state.opt_state), meta=meta)
  checkpoint.clear_progress(run.workdir)
  if jax.process_index() == 0:
    su.registry.save(os.path.join(run.workdir, runs.CONCEPTS))


def run(cfg, workdir: str, *, resume: bool = False, devices: Optional[list] = None,
        clock: Optional[console.Clock] = None) -> List[Dict[str, Any]]:
  """Trains every session of `cfg` not yet finished in `workdir`.

  Args:
    cfg: the resolved (locked) ConfigDict.
    workdir: the run directory (created).
    resume: continue a run directory that already has a config.json.
    devices: the devices of the mesh (all by default).
    clock: the command's start (main.py marks its imports); default: now. The phases
      from it to the first step trained are printed in one line.

  Returns:
    The final metrics of each session trained now.

  Raises:
    Preempted: SIGTERM arrived; progress was saved (main exits 0).
  """
  check_storage(cfg, workdir)  # a bad bucket URL stops here, before anything is read
  lock = lock_lib.acquire(workdir, "training run")  # a double submit stops here
  stop = {"flag": False}  # set by SIGTERM from the start: loading the base can take minutes
  previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
  writer = None
  try:
    clock = clock or console.Clock()
    the_run = prepare(cfg, workdir, resume=resume, devices=devices)
    clock.mark("base load")
    if jax.process_index() == 0:  # one events file a run: TensorBoard follows the newest
      writer = SummaryWriter(os.path.join(workdir, "logs"))
    validator = (validation_lib.Validator(the_run, writer)
                 if validation_lib.check_config(cfg) else None)
    done = checkpoint.finished_sessions(workdir)
    checkpoint.drop_finished_progress(workdir, done)
    prev_delta = base_delta(the_run)
    results, trainer, banks = [], None, {}
    for k in range(1, the_run.first + len(the_run.sessions)):
      if k not in done:  # an imported session (k < the_run.first) is always done
        got, trainer = _train_session(the_run, k, prev_delta, trainer, resume=resume, stop=stop,
                                      writer=writer, validator=validator, banks=banks,
                                      clock=clock if trainer is None else None)
        results.append(got)
      stored = checkpoint.restore_session(workdir, k)
      prev_delta = stored["delta"]
      banks.update(stored["bank"])
      _validate_session(validator, stored, k, banks, trainer, stop)
    return results
  finally:
    signal.signal(signal.SIGTERM, previous)
    if writer is not None:
      writer.close()
    lock.release()


def _validate_session(validator, stored, session: int, banks, trainer, stop) -> None:
  """The grid after session k from its checkpoint, unless it exists (a resumed run
  renders the ones a SIGTERM stopped); a SIGTERM stops it and the run (Preempted)."""
  if validator is None or not validator.settings.every_session:
    return
  if not validator.missing(session):
    return
  moment = validation_lib.end_of_session(stored, session, banks)
  frozen = trainer.frozen_base["unet"] if trainer is not None else None
  if validator.render(moment, frozen, stop) is None:
    raise Preempted(f"session {session} saved, its validation grid stopped before it was "
                    "written; --resume renders it")
