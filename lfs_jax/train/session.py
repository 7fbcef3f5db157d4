"""The lifelong loop: sessions in order, each trained, checkpointed and resumable.

This is the only training code that touches the disk. Per session k:
  1. registry += session k's concepts (new tokens, rows initialised from the class word);
  2. photos -> VAE latent distributions, once;
  3. DFKD conditions -> text embeddings, once (the text encoder and the old token
     rows are frozen, so teacher and student see the same conditions);
  4. teacher = the delta of session k-1 (the base's own leaves for k = 1);
  5. `train.steps` jitted steps, progress checkpoints, TensorBoard scalars;
  6. sessions/<k>/ written; progress/ dropped.

A run made by `--mode=import` (lfs_jax.interop) starts with a finished session 1
that was never trained here: its concepts come first in the registry, and
data.sessions lists the sessions after it (numbered from 2).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from lfs_jax import base as base_lib
from lfs_jax import checkpoint
from lfs_jax import concepts as concepts_lib
from lfs_jax import config_base
from lfs_jax import data as data_lib
from lfs_jax import parallel
from lfs_jax.diffusion import schedule as schedule_lib
from lfs_jax.errors import ConfigError
from lfs_jax.train import losses
from lfs_jax.train import params as params_lib
from lfs_jax.train import step as step_lib
from lfs_jax.train.tensorboard import SummaryWriter

# Purposes folded into the run key (DESIGN section 3).
_TRAIN, _KD_CACHE, _TINY = 1, 2, 3
# Config fields that may change between a run's start and its resumption.
_FREE_FIELDS = ("compile_cache", "train.log_every", "train.progress_every", "checkpoint.keep_progress",
                "model.attention", "model.remat", "mesh.data", "mesh.fsdp", "mesh.frozen", "mesh.trainable",
                "distributed.cluster", "distributed.coordinator", "distributed.num_processes",
                "distributed.process_id", "distributed.cpu_collectives")
# Config groups that only steer sampling, never the trained weights.
_FREE_PREFIXES = ("sample.", "icgen.", "eval.")
_KD_PROMPTS = ("class", "past_classes", "previous", "empty")


class Preempted(Exception):
  """SIGTERM arrived; the session's progress was saved."""


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def is_free_field(key: str) -> bool:
  """True for a dotted config field that may differ from the run's config.json."""
  return key in _FREE_FIELDS or key.startswith(_FREE_PREFIXES)


def check_compatible(stored: Dict[str, Any], current: Dict[str, Any]) -> None:
  """Refuses to continue a run under a config that would change its results.

  data.sessions may grow (new sessions appended: that is lifelong learning). A field
  that `stored` lacks (added to the code after the run began) is compatible at its
  default, which is how that run was trained.
  """
  a, b = _flat(stored), _flat(current)
  defaults = _flat(config_base.get_config().to_dict())
  for key in sorted(set(a) | set(b)):
    if is_free_field(key) or a.get(key) == b.get(key):
      continue
    if key not in a and key in defaults and b.get(key) == defaults[key]:
      continue
    if key == "data.sessions":
      # "" = none yet (a run that starts with an imported session, see interop).
      old, new = (str(a[key]).split(";") if a[key] else []), str(b[key]).split(";")
      if new[:len(old)] == old:
        continue
    raise ConfigError(
        f"this run was started with {key}={a.get(key)!r}; the config now says "
        f"{b.get(key)!r}. Continue with the original value or use a new --workdir.")


@dataclasses.dataclass
class _Context:
  """What every session of a run shares (built once)."""
  cfg: Any
  workdir: str
  pipe: Any
  mesh: Any
  schedule: Any                   # NoiseSchedule, replicated
  predicate: Any
  sessions: List[list]
  images: Dict[str, np.ndarray]   # concept name -> uint8 [n, R, R, 3]
  registry: concepts_lib.Registry  # every concept of the run
  max_images: int                 # largest session, in photos
  max_new: int                    # largest session, in concepts
  max_kd: int                     # most DFKD conditions of any session
  first: int = 1                  # run session of sessions[0] (2 after an imported session 1)
  encode: Any = None              # jitted VAE encoder
  text: Any = None                # jitted text encoder
  step_fn: Any = None             # compiled train step (built at the first session)
  shardings: Any = None           # its parallel.TrainShardings
  spec: Any = None
  frozen_base: Any = None         # {"unet": rest, "text": ...} on the mesh (placed once a run)


def _kinds(cfg, field: str) -> List[str]:
  kinds = [s.strip() for s in str(cfg.kd[field]).split(",") if s.strip()]
  bad = [k for k in kinds if k not in _KD_PROMPTS]
  if bad:
    raise ConfigError(f"kd.{field}: unknown kind(s) {bad}; use any of {list(_KD_PROMPTS)}")
  return kinds


def _kd_conditions(cfg, registry, session: int) -> List[Tuple[str, bool]]:
  """Session `session`'s DFKD conditions: (prompt, distilled from the base model?)."""
  kinds = _kinds(cfg, "prompts")
  from_base = _kinds(cfg, "from_base")
  if "previous" in from_base:
    raise ConfigError("kd.from_base cannot hold 'previous': those prompts name earlier "
                      "concepts, which only the previous session's model has learnt")
  if set(from_base) - set(kinds):
    raise ConfigError(f"kd.from_base={cfg.kd.from_base!r} names kinds that "
                      f"kd.prompts={cfg.kd.prompts!r} does not use")
  template = cfg.concepts.templates[0]
  class_templates = tuple(cfg.kd.class_templates) or (template,)
  bad = [t for t in class_templates if not isinstance(t, str) or t.count("{}") != 1]
  if bad:
    raise ConfigError(f"kd.class_templates: each needs exactly one '{{}}' for the class "
                      f"word, got {bad}")
  out = []
  for kind, concepts in (("class", registry.in_session(session)),
                         ("past_classes", registry.before(session))):
    if kind in kinds:  # past_classes: the classes of earlier sessions' concepts, also kept
      words = dict.fromkeys(c.class_word for c in concepts)
      out += [(t.format(w), kind in from_base) for w in words for t in class_templates]
  if "previous" in kinds:
    out += [(template.format(c.phrase()), False) for c in registry.before(session)]
  if "empty" in kinds:
    out.append(("", "empty" in from_base))
  return _first_of_each(out)


def _first_of_each(pairs: List[Tuple[str, bool]]) -> List[Tuple[str, bool]]:
  """Drops repeated prompts, keeping each one's first place and flag."""
  seen = {}
  for prompt, flag in pairs:
    seen.setdefault(prompt, flag)
  return list(seen.items())


def _kd_prompts(cfg, registry, session: int) -> List[str]:
  return [p for p, _ in _kd_conditions(cfg, registry, session)]


def _encode_latents(ctx: _Context, images: np.ndarray):
  """uint8 photos [N, R, R, 3] -> (mean, logvar) [N, h, w, c], float32."""
  means, logvars = [], []
  x = data_lib.to_model_range(images)
  for i in range(0, len(x), 8):
    m, lv = ctx.encode(ctx.pipe.vae_params, jnp.asarray(x[i:i + 8]))
    means.append(np.asarray(m, np.float32))
    logvars.append(np.asarray(lv, np.float32))
  return np.concatenate(means), np.concatenate(logvars)


def _pad(a: np.ndarray, n: int) -> np.ndarray:
  return np.concatenate([a, np.zeros((n - len(a),) + a.shape[1:], a.dtype)])


def _loss_spec(ctx: _Context, lfs: bool) -> losses.LossSpec:
  """The loss of method=lfs (`lfs`) or custom_diffusion: DFKD where kd.weight > 0, the
  K/V anchor where kd.kv_weight > 0 (either can run without the other)."""
  cfg = ctx.cfg
  use_kd = lfs and cfg.kd.weight > 0
  if cfg.kd.mode not in ("noise", "trajectory"):
    raise ConfigError(f"kd.mode must be 'noise' or 'trajectory', got {cfg.kd.mode!r}")
  if cfg.kd.steps < 1:
    raise ConfigError(f"kd.steps must be >= 1, got {cfg.kd.steps}")
  if not cfg.kd.kv_weight >= 0:
    raise ConfigError(f"kd.kv_weight must be >= 0 (0 = off), got {cfg.kd.kv_weight}")
  if cfg.train.loss_reduction not in ("mean", "cd"):
    raise ConfigError(f"train.loss_reduction must be 'mean' or 'cd', got "
                      f"{cfg.train.loss_reduction!r}")
  if not cfg.train.regulariser_lr_scale > 0:
    raise ConfigError(f"train.regulariser_lr_scale must be > 0, got "
                      f"{cfg.train.regulariser_lr_scale}")
  if cfg.data.rescale_cues and not cfg.data.rescale:
    raise ConfigError("data.rescale_cues describes the random rescale in the prompt; it "
                      "needs data.rescale=True")
  n_batch = ctx.mesh.size  # the batch is split over data x fsdp
  for name, b in (("train.batch_size", cfg.train.batch_size),
                  ("kd.batch_size", cfg.kd.batch_size)):
    if b < 1 or b % n_batch:
      raise ConfigError(f"{name}={b} must be a positive multiple of the {n_batch} devices "
                        "of the mesh (data x fsdp)")
  sharding = parallel.batch_sharding(ctx.mesh) if n_batch > 1 else None
  return losses.LossSpec(
      batch_size=cfg.train.batch_size, kd_batch_size=cfg.kd.batch_size,
      kd_weight=float(cfg.kd.weight), use_kd=use_kd,
      kd_points=1 if cfg.kd.mode == "noise" else cfg.kd.steps,
      kd_cached=use_kd and cfg.kd.cache_size > 0, flip=cfg.data.flip,
      rescale=cfg.data.rescale, rescale_min=cfg.data.rescale_min,
      rescale_max=cfg.data.rescale_max,
      scaling_factor=ctx.pipe.vae.config.scaling_factor, scheduler=ctx.pipe.scheduler,
      batch_sharding=sharding, kd_from_base=use_kd and bool(_kinds(cfg, "from_base")),
      kv_weight=float(cfg.kd.kv_weight) if lfs else 0.0,
      loss_reduction=cfg.train.loss_reduction, rescale_cues=bool(cfg.data.rescale_cues))


def _session_inputs(ctx: _Context, session: int, prev_delta):
  """Latents, prompt ids, DFKD conditions and token rows of one session (padded)."""
  cfg, pipe = ctx.cfg, ctx.pipe
  registry = ctx.registry.up_to(session)
  new = registry.in_session(session)
  tokenizer = pipe.tokenizer
  concepts_lib.add_tokens(tokenizer, registry, pipe.text_encoder.config.vocab_size)
  table = np.asarray(pipe.text_encoder_params["text_model"]["embeddings"]
                     ["token_embedding"]["embedding"], np.float32)
  old_rows = np.asarray(prev_delta["tokens"], np.float32)
  n_rows = len(ctx.registry.concepts) + ctx.max_new
  token_table = _pad(old_rows, n_rows)
  new_rows = _pad(concepts_lib.initial_rows(tokenizer, new, table), ctx.max_new)

  imgs = np.concatenate([ctx.images[c.name] for c in new])
  owner = sum(([c] * len(ctx.images[c.name]) for c in new), [])
  mean, logvar = _encode_latents(ctx, imgs)
  max_len = pipe.text_encoder.config.max_position_embeddings
  cues = losses.RESCALE_CUES if cfg.data.rescale_cues else ("",)  # the order losses expects
  prompt_ids = np.stack([
      concepts_lib.tokenize(tokenizer, [cue + t for t in c.training_prompts(
          cfg.concepts.templates) for cue in cues], max_len)
      for c in owner])

  kd_conds = _kd_conditions(cfg, registry, session) or [("", False)]
  kd_prompts = [p for p, _ in kd_conds]
  kd_ids = _pad(concepts_lib.tokenize(tokenizer, kd_prompts, max_len), ctx.max_kd)
  kd_context = ctx.text(pipe.text_encoder_params, jnp.asarray(kd_ids),
                        jnp.asarray(token_table, pipe.text_encoder.dtype))
  data = losses.SessionData(
      latent_mean=jnp.asarray(_pad(mean, ctx.max_images)),
      latent_logvar=jnp.asarray(_pad(logvar, ctx.max_images)),
      prompt_ids=jnp.asarray(_pad(prompt_ids, ctx.max_images)),
      n_images=jnp.asarray(len(imgs), jnp.int32),
      token_offset=jnp.asarray(len(old_rows), jnp.int32),
      kd_context=kd_context, n_kd=jnp.asarray(len(kd_prompts), jnp.int32),
      kd_base=(jnp.asarray(_pad(np.asarray([b for _, b in kd_conds]), ctx.max_kd))
               if ctx.spec.kd_from_base else None),
      kv_gram=losses.kv_gram(kd_context, len(kd_prompts)) if ctx.spec.kv_weight else None)
  bank = {f"concept{registry.concepts.index(c) + 1}": {
      "mean": mean[[i for i, o in enumerate(owner) if o is c]],
      "logvar": logvar[[i for i, o in enumerate(owner) if o is c]]} for c in new}
  return registry, data, token_table, new_rows, bank


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
  bank: Dict[str, Any]


def setup_session(ctx: _Context, session: int, prev_delta) -> SessionSetup:
  """Builds session `session`'s inputs and fresh train state (compiles the step once a run)."""
  cfg, pipe = ctx.cfg, ctx.pipe
  registry, data, token_table, new_rows, bank = _session_inputs(ctx, session, prev_delta)
  spec = ctx.spec
  use_teacher = spec.use_kd or spec.kv_weight > 0  # DFKD and the K/V anchor read it
  models = losses.Models(unet=pipe.unet, text=pipe.text_encoder)
  optimizer = step_lib.make_optimizer(cfg.train, regularised=spec.use_kd)
  _, rest = params_lib.split(pipe.unet_params, ctx.predicate)
  frozen = {"unet": rest, "text": pipe.text_encoder_params, "tokens": token_table}
  start_unet = jax.tree.map(lambda x: np.asarray(x, np.float32), prev_delta["unet"])
  teacher = None
  if use_teacher:
    teacher = {"unet": start_unet}
    if spec.kd_from_base:  # the base's own leaves, for the conditions of kd.from_base
      teacher["base"] = jax.tree.map(lambda x: np.asarray(x, np.float32),
                                     base_delta(ctx)["unet"])
  trainable = {"unet": jax.tree.map(np.copy, start_unet), "tokens": np.asarray(new_rows)}
  first = ctx.step_fn is None
  if first:
    ctx.step_fn, ctx.shardings = step_lib.jit_train_step(
        ctx.mesh, frozen, frozen_mode=cfg.mesh.frozen, models=models, spec=spec,
        optimizer=optimizer, train_tokens=cfg.train.train_tokens,
        state=jax.eval_shape(functools.partial(step_lib.init_state, optimizer=optimizer),
                             trainable),
        teacher=teacher, trainable_mode=cfg.mesh.trainable)
  sh = ctx.shardings
  # Host or local values -> global arrays on the mesh (the same on every process).
  # The base goes from host memory leaf by leaf straight into its sharding (it never
  # sits whole on one device), once a run: every session shares it.
  if ctx.frozen_base is None:
    ctx.frozen_base = parallel.put({"unet": rest, "text": pipe.text_encoder_params},
                                   {"unet": sh.frozen["unet"], "text": sh.frozen["text"]})
  frozen = {**ctx.frozen_base, "tokens": parallel.put(token_table, sh.frozen["tokens"])}
  # The teacher gets buffers of its own: the student's are donated at every step.
  teacher = parallel.put(teacher, sh.teacher) if use_teacher else None
  root = jax.random.key(cfg.seed)
  data = parallel.put(data, sh.data)
  if spec.kd_cached:
    cache_fn = jax.jit(functools.partial(
        losses.kd_cache, size=cfg.kd.cache_size, latent_shape=data.latent_mean.shape[1:],
        models=models, spec=spec), out_shardings=sh.data)
    key = jax.random.fold_in(jax.random.fold_in(root, _KD_CACHE), session)
    with jax.set_mesh(ctx.mesh):  # traced under the mesh, as the step (compile_step)
      data = data._replace(kd_cache=cache_fn(teacher, frozen, data.kd_context, data.n_kd,
                                             ctx.schedule, parallel.put(key, sh.rng),
                                             kd_base=data.kd_base))
  state = parallel.put(step_lib.init_state(trainable, optimizer), sh.state)
  train_key = parallel.put(jax.random.fold_in(jax.random.fold_in(root, _TRAIN), session),
                           sh.rng)
  if first:  # ahead of the first step, with the real shapes and shardings
    ctx.step_fn, seconds, cached = step_lib.compile_step(
        ctx.step_fn, ctx.mesh, state, frozen, teacher, data, ctx.schedule, train_key)
    if jax.process_index() == 0:
      print(f"train step compiled in {seconds:.1f} s"
            + (" (from the persistent compilation cache)" if cached else ""))
  return SessionSetup(registry, models, spec, frozen, teacher, data, state, train_key,
                      token_table, bank)


def _train_session(ctx: _Context, session: int, prev_delta, *, resume: bool,
                   stop) -> Dict[str, Any]:
  cfg = ctx.cfg
  # SIGTERM while loading the base or saving the last session: stop before any work.
  _stop_if_asked(stop, f"session {session} not started")
  su = setup_session(ctx, session, prev_delta)
  registry, frozen, teacher, data, state = su.registry, su.frozen, su.teacher, su.data, su.state
  n_new = len(registry.in_session(session))
  if resume:
    got = checkpoint.latest_progress(ctx.workdir, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
    if got is not None and got["meta"]["session"] == session:
      state = got["state"]
      print(f"session {session}: resumed at step {int(state.step)}")
  _stop_if_asked(stop, f"session {session} stopped before step {int(state.step) + 1}")

  writer = SummaryWriter(os.path.join(ctx.workdir, "logs")) if jax.process_index() == 0 else None
  first, total = int(state.step), cfg.train.steps
  bar = tqdm.tqdm(total=total, initial=first,
                  desc=f"session {session}/{ctx.first + len(ctx.sessions) - 1}",
                  unit="step", disable=jax.process_index() != 0, dynamic_ncols=True)
  last: Dict[str, float] = {}
  pending = []
  t0 = time.time()
  for s in range(first, total):
    state, metrics = ctx.step_fn(state, frozen, teacher, data, ctx.schedule, su.train_key)
    pending.append(metrics)
    done = s + 1
    if done % cfg.train.log_every == 0 or done == total:
      last = _log(pending, done, session, writer)
      pending = []
      bar.set_postfix({k: f"{v:.4g}" for k, v in last.items() if k != "grad_norm"})
    bar.update(1)
    if done == total:
      continue  # the session save below keeps this step
    stopping = _should_stop(stop, done, cfg.train.log_every)
    # One save a step, whoever asks: the progress cadence and SIGTERM can name the same step.
    if stopping or (cfg.train.progress_every and done % cfg.train.progress_every == 0):
      checkpoint.save_progress(ctx.workdir, done, state, {"session": session},
                               cfg.checkpoint.keep_progress)
    if stopping:
      bar.close()
      raise Preempted(f"session {session} stopped at step {done}; progress saved")
  bar.close()
  if writer:
    writer.close()

  trained = parallel.to_host(state.trainable)
  offset = int(data.token_offset)
  tokens = np.array(su.token_table[:offset + n_new])
  tokens[offset:] = np.asarray(trained["tokens"])[:n_new]
  meta = {"session": session, "concepts": json.loads(registry.to_json()),
          "config": cfg.to_dict(), "steps": total, "metrics": last,
          "seconds": time.time() - t0}
  checkpoint.save_session(ctx.workdir, session, delta={"unet": trained["unet"], "tokens": tokens},
                          bank=su.bank, opt_state=parallel.to_host(state.opt_state),
                          meta=_jsonable(meta))
  checkpoint.clear_progress(ctx.workdir)
  if jax.process_index() == 0:
    registry.save(os.path.join(ctx.workdir, "concepts.json"))
  return {"session": session, **last}


def _stop_if_asked(stop, where: str) -> None:
  """Raises Preempted if SIGTERM came (to any process) since the last saved state."""
  if parallel.agree_any(stop["flag"]):
    raise Preempted(f"{where}; nothing new to save")


def _should_stop(stop, done: int, every: int) -> bool:
  """Whether SIGTERM asks to stop after step `done`, decided alike on every process.

  One process checks its flag after every step; several agree (any flag set) at
  the metric syncs only (every `train.log_every` steps), so all save together.
  """
  if jax.process_count() == 1:
    return stop["flag"]
  return done % every == 0 and parallel.agree_any(stop["flag"])


def _log(pending, done: int, session: int, writer) -> Dict[str, float]:
  """Brings a window of step metrics to the host; raises on a non-finite value."""
  host = parallel.to_host(pending)
  first = done - len(host) + 1
  for i, m in enumerate(host):
    bad = [k for k, v in m.items() if not math.isfinite(float(v))]
    if bad:
      raise FloatingPointError(
          f"session {session}: non-finite {bad} between steps {first} and {done}")
    if writer:
      for k, v in m.items():
        writer.scalar(f"session_{session}/{k}", float(v), first + i)
  if writer:
    writer.flush()
  return {k: float(v) for k, v in host[-1].items()}


def _jsonable(obj):
  return json.loads(json.dumps(obj, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def prepare(cfg, workdir: str, *, resume: bool = False,
            devices: Optional[list] = None) -> _Context:
  """Validates everything, loads the base and the photos, writes config.json.

  Everything that can fail on bad input (config, dataset, photos, tokens, model
  folder) fails here, before anything is written.
  """
  config_path = os.path.join(workdir, "config.json")
  exists = os.path.isfile(config_path)
  if exists and not resume:
    raise ConfigError(f"{workdir} already holds a run: pass --resume to continue it, "
                      "or choose a new --workdir")
  if cfg.method not in ("lfs", "custom_diffusion"):
    raise ConfigError(f"method must be 'lfs' or 'custom_diffusion', got {cfg.method!r}")
  if not isinstance(cfg.concepts.initializer, str) or not cfg.concepts.initializer.strip():
    raise ConfigError("concepts.initializer must be 'class' or a word whose embedding starts "
                      f"every new token, got {cfg.concepts.initializer!r}")
  predicate = params_lib.selection_predicate(cfg.train.selection)
  sessions = base_lib.session_specs(cfg.data, cfg.seed)
  images = {}
  for spec in sum(sessions, []):
    images[spec.name], _ = data_lib.load_images(spec.images, cfg.data.resolution)
  if exists:
    with open(config_path) as f:
      check_compatible(json.load(f), cfg.to_dict())
  if cfg.compile_cache:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cfg.compile_cache))
  parallel.check_frozen_mode(cfg.mesh.frozen)
  parallel.check_frozen_mode(cfg.mesh.trainable, "mesh.trainable")
  # In host memory: setup_session places the frozen base straight into its shardings.
  pipe = base_lib.load_base(cfg.model, cfg.seed, on_host=True)
  mesh = parallel.make_mesh(cfg.mesh, devices)
  registry = _imported_registry(workdir) if exists else concepts_lib.Registry()
  first = 1 + (registry.concepts[-1].session if registry.concepts else 0)
  vocab = pipe.tokenizer.get_vocab()
  for k, specs in enumerate(sessions, start=first):
    registry = registry.add_session(specs, k, token_format=cfg.concepts.token_format,
                                    vocab=vocab, initializer=cfg.concepts.initializer)
  kd_counts = [len(_kd_prompts(cfg, registry, k) or [""])
               for k in range(first, first + len(sessions))]

  ctx = _Context(
      cfg, workdir, pipe, mesh,
      parallel.put(schedule_lib.make_schedule(pipe.scheduler), parallel.replicated(mesh)),
      predicate,
      sessions, images, registry,
      max_images=max(sum(len(images[c.name]) for c in s) for s in sessions),
      max_new=max(len(s) for s in sessions), max_kd=max(kd_counts), first=first)
  ctx.spec = _loss_spec(ctx, cfg.method == "lfs")
  ctx.encode = jax.jit(lambda p, x: pipe.vae.apply({"params": p}, x, method="encode"))
  ctx.text = jax.jit(lambda p, ids, rows: pipe.text_encoder.apply(
      {"params": p}, ids, extra_embeddings=rows))

  os.makedirs(workdir, exist_ok=True)
  parallel.barrier("lfs_jax: run checked")  # every process looked before process 0 writes
  if not exists:
    checkpoint.write_json_atomic(config_path, _jsonable(cfg.to_dict()))
  return ctx


def _imported_registry(workdir: str) -> concepts_lib.Registry:
  """The concepts of an imported session 1 (`--mode=import`), else an empty registry."""
  if 1 not in checkpoint.finished_sessions(workdir):
    return concepts_lib.Registry()
  meta = checkpoint.session_meta(workdir, 1)
  if "imported" not in meta:
    return concepts_lib.Registry()
  return concepts_lib.Registry.from_json(json.dumps(meta["concepts"]))


def base_delta(ctx: _Context) -> Dict[str, Any]:
  """The "session 0" delta: the base's own selected leaves and no token rows."""
  selected, _ = params_lib.split(ctx.pipe.unet_params, ctx.predicate)
  d = ctx.pipe.text_encoder.config.hidden_size
  return {"unet": selected, "tokens": np.zeros((0, d), np.float32)}


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
  stop = {"flag": False}  # set by SIGTERM from the start: loading the base can take minutes
  previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
  try:
    ctx = prepare(cfg, workdir, resume=resume, devices=devices)
    done = checkpoint.finished_sessions(workdir)
    checkpoint.drop_finished_progress(workdir, done)
    prev_delta = base_delta(ctx)
    results = []
    for k in range(1, ctx.first + len(ctx.sessions)):
      if k not in done:  # an imported session (k < ctx.first) is always done
        results.append(_train_session(ctx, k, prev_delta, resume=resume, stop=stop))
      prev_delta = checkpoint.restore_session(workdir, k)["delta"]
    return results
  finally:
    signal.signal(signal.SIGTERM, previous)
