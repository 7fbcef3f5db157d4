"""The lifelong loop: sessions in order, each trained, checkpointed and resumable.

The only training code that touches the disk. Its stages, in order:
  prepare        config, dataset, photos, tokens, base model checked; a `Run` (what
                 every session shares, immutable) built once; config.json written.
  per session k:
    inputs       registry += session k's concepts; photos -> latents; DFKD
                 conditions -> text contexts (train/inputs.py, train/kd.py);
    state        frozen base, teacher (session k-1's delta, merged by the selection
                 into the same frozen base) and the fresh train state, on the mesh;
    compile      the step, once a run, at its first session (a `Trainer`);
    loop         `train.steps` steps, progress checkpoints, SIGTERM (train/loop.py);
    save         sessions/<k>/ written; progress/ dropped.

A run made by `--mode=import` (lfs_jax.interop) starts with a finished session 1 never
trained here; data.sessions lists the sessions after it (numbered from 2).
"""

from __future__ import annotations

import functools
import os
import signal
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import jax
import ml_collections
import numpy as np

from lfs_jax import base as base_lib
from lfs_jax import checkpoint
from lfs_jax import concepts as concepts_lib
from lfs_jax import data as data_lib
from lfs_jax import delta as delta_lib
from lfs_jax import lock as lock_lib
from lfs_jax import parallel
from lfs_jax import runs
from lfs_jax.diffusion import schedule as schedule_lib
from lfs_jax.errors import ConfigError
from lfs_jax.train import inputs as inputs_lib
from lfs_jax.train import kd as kd_lib
from lfs_jax.train import loop
from lfs_jax.train import losses
from lfs_jax.train import step as step_lib
from lfs_jax.train.loop import Preempted  # pylint: disable=unused-import  (main catches it here)

_TRAIN, _KD_CACHE = 1, 2  # purposes folded into the run key


class Run(NamedTuple):
  """What every session of a run shares: built once by `prepare`, never changed."""
  cfg: ml_collections.ConfigDict
  workdir: str
  pipe: Any                        # weights.Pipeline, parameters in host memory
  mesh: jax.sharding.Mesh
  schedule: Any                    # diffusion.schedule.NoiseSchedule, replicated
  selection: delta_lib.Selection   # what a session trains (train.selection)
  spec: losses.LossSpec
  models: losses.Models
  sessions: List[list]             # data.sessions' ConceptSpecs, per session
  images: Dict[str, np.ndarray]    # concept name -> uint8 [n, R, R, 3]
  registry: concepts_lib.Registry  # every concept of the run
  max_images: int                  # largest session, in photos
  max_new: int                     # largest session, in concepts
  max_kd: int                      # most DFKD conditions of any session
  first: int                       # run session of sessions[0] (2 after an imported session 1)
  encode: Callable                 # jitted VAE encoder
  text: Callable                   # jitted text encoder


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
  optimizer = step_lib.make_optimizer(run.cfg.train, regularised=run.spec.use_kd)
  step_fn, sh = step_lib.jit_train_step(
      run.mesh, frozen, frozen_mode=run.cfg.mesh.frozen, models=run.models, spec=run.spec,
      optimizer=optimizer, state=jax.eval_shape(
          functools.partial(step_lib.init_state, optimizer=optimizer), trainable),
      teacher=teacher, trainable_mode=run.cfg.mesh.trainable,
      fsdp_min_size=run.cfg.mesh.fsdp_min_size)
  base = parallel.put({"unet": frozen["unet"], "text": frozen["text"]},
                      {"unet": sh.frozen["unet"], "text": sh.frozen["text"]})
  return Trainer(step_fn, sh, base)


def setup_session(run: Run, session: int, prev_delta,
                  trainer: Optional[Trainer] = None) -> SessionSetup:
  """Session `session`'s inputs and fresh train state on the mesh.

  Args:
    run: the run (`prepare`).
    session: the run session number.
    prev_delta: session k-1's delta (`base_delta` for session 1).
    trainer: the run's compiled step; None at the first session of a run, which
      jits and compiles it ahead of the first step with the real shapes and
      shardings (SessionSetup.trainer carries it to the next sessions).
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
  optimizer = step_lib.make_optimizer(cfg.train, regularised=spec.use_kd)
  state = parallel.put(step_lib.init_state(trainable, optimizer), sh.state)
  train_key = parallel.put(jax.random.fold_in(jax.random.fold_in(root, _TRAIN), session),
                           sh.rng)
  if first:
    compiled, seconds, cached = step_lib.compile_step(
        trainer.step_fn, run.mesh, state, frozen, teacher, data, run.schedule, train_key)
    trainer = trainer._replace(step_fn=compiled)
    if jax.process_index() == 0:
      print(f"train step compiled in {seconds:.1f} s" + (
          " (from the persistent compilation cache)" if cached else ""))
  return SessionSetup(inp.registry, run.models, spec, frozen, teacher, data, state,
                      train_key, inp.token_table, inp.new_rows, inp.bank, trainer)


def _train_session(run: Run, session: int, prev_delta, trainer: Optional[Trainer], *,
                   resume: bool, stop):
  """Trains and saves one session; returns (its final metrics, the run's Trainer)."""
  # SIGTERM while loading the base or saving the last session: stop before any work.
  loop.stop_if_asked(stop, f"session {session} not started")
  su = setup_session(run, session, prev_delta, trainer)
  state = su.state
  if resume:
    got = loop.latest_progress(run, su, state)
    if got is not None and got["meta"]["session"] == session:
      state = got["state"]
      print(f"session {session}: resumed at step {int(state.step)}")
  loop.stop_if_asked(stop, f"session {session} stopped before step {int(state.step) + 1}")
  t0 = time.time()
  state, last = loop.steps(run, su, state, session, stop)
  _save(run, su, state, session, last, time.time() - t0)
  return {"session": session, **last}, su.trainer


def _save(run: Run, su: SessionSetup, state, session: int, last, seconds: float) -> None:
  """Writes sessions/<k>/ (delta, every token row so far, bank, meta); drops progress/."""
  trained = parallel.to_host(state.trainable)
  n_new = len(su.registry.in_session(session))
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


def prepare(cfg, workdir: str, *, resume: bool = False,
            devices: Optional[list] = None) -> Run:
  """Validates everything, loads the base and the photos, writes config.json.

  Everything that can fail on bad input (config, dataset, photos, tokens, model
  folder) fails here, before anything is written.
  """
  stored = runs.stored_config(workdir)
  exists = stored is not None
  if exists and not resume:
    raise ConfigError(f"{workdir} already holds a run: pass --resume to continue it, "
                      "or choose a new --workdir")
  if cfg.method not in ("lfs", "custom_diffusion"):
    raise ConfigError(f"method must be 'lfs' or 'custom_diffusion', got {cfg.method!r}")
  if not isinstance(cfg.concepts.initializer, str) or not cfg.concepts.initializer.strip():
    raise ConfigError("concepts.initializer must be 'class' or a word whose embedding starts "
                      f"every new token, got {cfg.concepts.initializer!r}")
  selection = delta_lib.from_config(cfg.train)
  sessions = base_lib.session_specs(cfg.data, cfg.seed)
  images = {}
  for spec in sum(sessions, []):
    images[spec.name], _ = data_lib.load_images(spec.images, cfg.data.resolution,
                                                min_side=cfg.data.min_side,
                                                max_aspect=cfg.data.max_aspect)
  if exists:
    runs.check_compatible(stored, cfg.to_dict())
  if cfg.compile_cache:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cfg.compile_cache))
  parallel.check_frozen_mode(cfg.mesh.frozen)
  parallel.check_frozen_mode(cfg.mesh.trainable, "mesh.trainable")
  # In host memory: the Trainer places the frozen base straight into its shardings.
  pipe = base_lib.load_base(cfg.model, cfg.seed, on_host=True)
  selection.initial(pipe.unet_params, cfg.seed)  # e.g. LoRA targets matching nothing fail here
  mesh = parallel.make_mesh(cfg.mesh, devices)
  registry = runs.imported_registry(workdir) if exists else concepts_lib.Registry()
  first = 1 + (registry.concepts[-1].session if registry.concepts else 0)
  vocab = pipe.tokenizer.get_vocab()
  for k, specs in enumerate(sessions, start=first):
    registry = registry.add_session(specs, k, token_format=cfg.concepts.token_format,
                                    vocab=vocab, initializer=cfg.concepts.initializer)
  kd_counts = [len(kd_lib.prompts(cfg, registry, k) or [""])
               for k in range(first, first + len(sessions))]
  run = Run(
      cfg, workdir, pipe, mesh,
      parallel.put(schedule_lib.make_schedule(pipe.scheduler), parallel.replicated(mesh)),
      selection,
      losses.make_spec(cfg, mesh=mesh, scaling_factor=pipe.vae.config.scaling_factor,
                       scheduler=pipe.scheduler, selection=selection,
                       lfs=cfg.method == "lfs"),
      losses.Models(unet=pipe.unet, text=pipe.text_encoder),
      sessions, images, registry,
      max_images=max(sum(len(images[c.name]) for c in s) for s in sessions),
      max_new=max(len(s) for s in sessions), max_kd=max(kd_counts), first=first,
      encode=jax.jit(lambda p, x: pipe.vae.apply({"params": p}, x, method="encode")),
      text=jax.jit(lambda p, ids, rows: pipe.text_encoder.apply(
          {"params": p}, ids, extra_embeddings=rows)))

  os.makedirs(workdir, exist_ok=True)
  parallel.barrier("lfs_jax: run checked")  # every process looked before process 0 writes
  if not exists:
    runs.write_config(workdir, cfg.to_dict())
  return run


def base_delta(run: Run) -> Dict[str, Any]:
  """The "session 0" delta (`Selection.initial`: for a leaf selection the base's own
  leaves) and no token rows."""
  d = run.pipe.text_encoder.config.hidden_size
  return {"unet": run.selection.initial(run.pipe.unet_params, run.cfg.seed),
          "tokens": np.zeros((0, d), np.float32)}


def run(cfg, workdir: str, *, resume: bool = False,
        devices: Optional[list] = None) -> List[Dict[str, Any]]:
  """Trains every session of `cfg` not yet finished in `workdir`.

  Args:
    cfg: the resolved (locked) ConfigDict.
    workdir: the run directory (created).
    resume: continue a run directory that already has a config.json.
    devices: the devices of the mesh (all by default).

  Returns:
    The final metrics of each session trained now.

  Raises:
    Preempted: SIGTERM arrived; progress was saved (main exits 0).
  """
  lock = lock_lib.acquire(workdir, "training run")  # a double submit stops here
  stop = {"flag": False}  # set by SIGTERM from the start: loading the base can take minutes
  previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
  try:
    the_run = prepare(cfg, workdir, resume=resume, devices=devices)
    done = checkpoint.finished_sessions(workdir)
    checkpoint.drop_finished_progress(workdir, done)
    prev_delta = base_delta(the_run)
    results, trainer = [], None
    for k in range(1, the_run.first + len(the_run.sessions)):
      if k not in done:  # an imported session (k < the_run.first) is always done
        got, trainer = _train_session(the_run, k, prev_delta, trainer, resume=resume, stop=stop)
        results.append(got)
      prev_delta = checkpoint.restore_session(workdir, k)["delta"]
    return results
  finally:
    signal.signal(signal.SIGTERM, previous)
    lock.release()
