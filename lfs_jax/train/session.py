"""The lifelong loop: sessions in order, each trained, checkpointed and resumable.

This is the only training code that touches the disk. Per session k:
  1. registry += session k's concepts (new tokens, rows initialised from the class word);
  2. photos -> VAE latent distributions, once;
  3. DFKD conditions -> text embeddings, once (the text encoder and the old token
     rows are frozen, so teacher and student see the same conditions);
  4. teacher = the delta of session k-1 (the base's own leaves for k = 1);
  5. `train.steps` jitted steps, progress checkpoints, TensorBoard scalars;
  6. sessions/<k>/ written; progress/ dropped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from lfs_jax import base as base_lib
from lfs_jax import checkpoint
from lfs_jax import concepts as concepts_lib
from lfs_jax import data as data_lib
from lfs_jax.diffusion import schedule as schedule_lib
from lfs_jax.errors import ConfigError
from lfs_jax.train import losses
from lfs_jax.train import params as params_lib
from lfs_jax.train import step as step_lib
from lfs_jax.train.tensorboard import SummaryWriter

# Purposes folded into the run key (DESIGN section 3).
_TRAIN, _KD_CACHE, _TINY = 1, 2, 3
# Config fields that may change between a run's start and its resumption.
_FREE_FIELDS = ("train.log_every", "train.progress_every", "checkpoint.keep_progress",
                "model.attention", "mesh.data", "mesh.fsdp")
_KD_PROMPTS = ("class", "previous", "empty")


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


def check_compatible(stored: Dict[str, Any], current: Dict[str, Any]) -> None:
  """Refuses to continue a run under a config that would change its results.

  data.sessions may grow (new sessions appended: that is lifelong learning).
  """
  a, b = _flat(stored), _flat(current)
  for key in sorted(set(a) | set(b)):
    if key in _FREE_FIELDS or a.get(key) == b.get(key):
      continue
    if key == "data.sessions":
      old, new = str(a[key]).split(";"), str(b[key]).split(";")
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
  schedule: Any
  predicate: Any
  sessions: List[list]
  images: Dict[str, np.ndarray]   # concept name -> uint8 [n, R, R, 3]
  records: Dict[str, list]


def _kd_prompts(cfg, registry, session: int) -> List[str]:
  kinds = [s.strip() for s in cfg.kd.prompts.split(",") if s.strip()]
  bad = [k for k in kinds if k not in _KD_PROMPTS]
  if bad:
    raise ConfigError(f"kd.prompts: unknown kind(s) {bad}; use any of {list(_KD_PROMPTS)}")
  template = cfg.concepts.templates[0]
  prompts = []
  if "class" in kinds:
    prompts += [template.format(c.class_word) for c in registry.in_session(session)]
  if "previous" in kinds:
    prompts += [template.format(c.phrase()) for c in registry.before(session)]
  if "empty" in kinds:
    prompts.append("")
  return list(dict.fromkeys(prompts))


def _encode_latents(ctx: _Context, images: np.ndarray):
  """uint8 photos [N, R, R, 3] -> (mean, logvar) [N, h, w, c], float32."""
  enc = jax.jit(lambda p, x: ctx.pipe.vae.apply({"params": p}, x, method="encode"))
  means, logvars = [], []
  x = data_lib.to_model_range(images)
  for i in range(0, len(x), 8):
    m, lv = enc(ctx.pipe.vae_params, jnp.asarray(x[i:i + 8]))
    means.append(np.asarray(m, np.float32))
    logvars.append(np.asarray(lv, np.float32))
  return np.concatenate(means), np.concatenate(logvars)


def _loss_spec(ctx: _Context, use_kd: bool, latent_shape) -> losses.LossSpec:
  cfg = ctx.cfg
  if cfg.kd.mode not in ("noise", "trajectory"):
    raise ConfigError(f"kd.mode must be 'noise' or 'trajectory', got {cfg.kd.mode!r}")
  if cfg.kd.steps < 1:
    raise ConfigError(f"kd.steps must be >= 1, got {cfg.kd.steps}")
  n_data = ctx.mesh.shape["data"]
  for name, b in (("train.batch_size", cfg.train.batch_size),
                  ("kd.batch_size", cfg.kd.batch_size)):
    if b < 1 or b % n_data:
      raise ConfigError(f"{name}={b} must be a positive multiple of the {n_data} data devices")
  sharding = (jax.sharding.NamedSharding(ctx.mesh, jax.sharding.PartitionSpec("data"))
              if n_data > 1 else None)
  return losses.LossSpec(
      batch_size=cfg.train.batch_size, kd_batch_size=cfg.kd.batch_size,
      kd_weight=float(cfg.kd.weight), use_kd=use_kd,
      kd_points=1 if cfg.kd.mode == "noise" else cfg.kd.steps,
      kd_cached=use_kd and cfg.kd.cache_size > 0, flip=cfg.data.flip,
      rescale=cfg.data.rescale, rescale_min=cfg.data.rescale_min,
      rescale_max=cfg.data.rescale_max,
      scaling_factor=ctx.pipe.vae.config.scaling_factor, scheduler=ctx.pipe.scheduler,
      batch_sharding=sharding)


def _train_session(ctx: _Context, registry, session: int, prev_delta, *, resume: bool,
                   stop) -> Dict[str, Any]:
  cfg, pipe = ctx.cfg, ctx.pipe
  new = registry.in_session(session)
  tokenizer = pipe.tokenizer
  concepts_lib.add_tokens(tokenizer, registry, pipe.text_encoder.config.vocab_size)
  table = np.asarray(pipe.text_encoder_params["text_model"]["embeddings"]
                     ["token_embedding"]["embedding"], np.float32)
  old_rows = np.asarray(prev_delta["tokens"], np.float32)
  new_rows = concepts_lib.initial_rows(tokenizer, new, table)

  # Photos -> latents, prompt ids per photo.
  imgs = np.concatenate([ctx.images[c.name] for c in new])
  owner = sum(([c] * len(ctx.images[c.name]) for c in new), [])
  mean, logvar = _encode_latents(ctx, imgs)
  max_len = pipe.text_encoder.config.max_position_embeddings
  prompt_ids = np.stack([
      concepts_lib.tokenize(tokenizer, [t.format(c.phrase()) for t in cfg.concepts.templates],
                            max_len) for c in owner])

  # DFKD conditions, encoded once.
  use_kd = cfg.method == "lfs" and cfg.kd.weight > 0
  kd_prompts = _kd_prompts(cfg, registry, session) if use_kd else [""]
  use_kd = use_kd and bool(kd_prompts)
  text_fn = jax.jit(lambda p, ids, rows: pipe.text_encoder.apply(
      {"params": p}, ids, extra_embeddings=rows))
  kd_context = text_fn(pipe.text_encoder_params,
                       jnp.asarray(concepts_lib.tokenize(tokenizer, kd_prompts, max_len)),
                       jnp.asarray(old_rows, pipe.text_encoder.dtype))

  spec = _loss_spec(ctx, use_kd, mean.shape[1:])
  models = losses.Models(unet=pipe.unet, text=pipe.text_encoder)
  _, rest = params_lib.split(pipe.unet_params, ctx.predicate)
  frozen = base_lib.replicate({"unet": rest, "text": pipe.text_encoder_params,
                               "old_tokens": jnp.asarray(old_rows)}, ctx.mesh)
  start_unet = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), prev_delta["unet"])
  teacher = base_lib.replicate({"unet": start_unet}, ctx.mesh) if use_kd else None
  trainable = base_lib.replicate({"unet": jax.tree.map(jnp.copy, start_unet),
                                  "tokens": jnp.asarray(new_rows)}, ctx.mesh)
  schedule = base_lib.replicate(ctx.schedule, ctx.mesh)
  root = jax.random.key(cfg.seed)
  kd_cache = None
  if spec.kd_cached:
    cache_fn = jax.jit(lambda t, f, c, s, r: losses.kd_cache(
        t, f, c, s, r, size=cfg.kd.cache_size, latent_shape=mean.shape[1:],
        models=models, spec=spec))
    key = jax.random.fold_in(jax.random.fold_in(root, _KD_CACHE), session)
    kd_cache = cache_fn(teacher, frozen, kd_context, schedule, key)
  batch = base_lib.replicate(losses.SessionData(
      jnp.asarray(mean), jnp.asarray(logvar), jnp.asarray(prompt_ids), kd_context,
      kd_cache), ctx.mesh)

  optimizer = step_lib.make_optimizer(cfg.train)
  state = base_lib.replicate(step_lib.init_state(trainable, optimizer), ctx.mesh)
  if resume:
    got = checkpoint.latest_progress(ctx.workdir, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
    if got is not None and got["meta"]["session"] == session:
      state = got["state"]
      print(f"session {session}: resumed at step {int(state.step)}")
  step_fn = step_lib.jit_train_step(ctx.mesh, models=models, spec=spec,
                                    optimizer=optimizer, train_tokens=cfg.train.train_tokens)
  train_key = jax.random.fold_in(jax.random.fold_in(root, _TRAIN), session)

  writer = SummaryWriter(os.path.join(ctx.workdir, "logs")) if jax.process_index() == 0 else None
  first = int(state.step)
  total = cfg.train.steps
  bar = tqdm.tqdm(total=total, initial=first, desc=f"session {session}/{len(ctx.sessions)}",
                  unit="step", disable=jax.process_index() != 0, dynamic_ncols=True)
  last: Dict[str, float] = {}
  pending = []
  t0 = time.time()
  for s in range(first, total):
    state, metrics = step_fn(state, frozen, teacher, batch, schedule, train_key)
    pending.append(metrics)
    done = s + 1
    if done % cfg.train.log_every == 0 or done == total:
      host = jax.device_get(pending)
      for i, m in enumerate(host):
        bad = [k for k, v in m.items() if not math.isfinite(float(v))]
        if bad:
          raise FloatingPointError(
              f"session {session}: non-finite {bad} between steps {done - len(host) + 1} "
              f"and {done}")
        if writer:
          for k, v in m.items():
            writer.scalar(f"session_{session}/{k}", float(v), done - len(host) + i + 1)
      last = {k: float(v) for k, v in host[-1].items()}
      pending = []
      bar.set_postfix({k: f"{v:.4g}" for k, v in last.items() if k != "grad_norm"})
      if writer:
        writer.flush()
    bar.update(1)
    if cfg.train.progress_every and done % cfg.train.progress_every == 0 and done < total:
      checkpoint.save_progress(ctx.workdir, done, state, {"session": session},
                               cfg.checkpoint.keep_progress)
    if stop["flag"] and done < total:
      checkpoint.save_progress(ctx.workdir, done, state, {"session": session},
                               cfg.checkpoint.keep_progress)
      bar.close()
      raise Preempted(f"session {session} stopped at step {done}; progress saved")
  bar.close()
  if writer:
    writer.close()

  trained = jax.device_get(state.trainable)
  delta = {"unet": trained["unet"],
           "tokens": np.concatenate([old_rows, np.asarray(trained["tokens"])])}
  bank = {f"concept{registry.concepts.index(c) + 1}": {
      "mean": mean[[i for i, o in enumerate(owner) if o is c]],
      "logvar": logvar[[i for i, o in enumerate(owner) if o is c]]} for c in new}
  meta = {"session": session, "concepts": json.loads(registry.to_json()),
          "config": ctx.cfg.to_dict(), "steps": total, "metrics": last,
          "seconds": time.time() - t0}
  checkpoint.save_session(ctx.workdir, session, delta=delta, bank=bank,
                          opt_state=jax.device_get(state.opt_state), meta=_jsonable(meta))
  checkpoint.clear_progress(ctx.workdir)
  if jax.process_index() == 0:
    registry.save(os.path.join(ctx.workdir, "concepts.json"))
  return {"session": session, **last}


def _jsonable(obj):
  return json.loads(json.dumps(obj, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


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
  config_path = os.path.join(workdir, "config.json")
  exists = os.path.isfile(config_path)
  if exists and not resume:
    raise ConfigError(f"{workdir} already holds a run: pass --resume to continue it, "
                      "or choose a new --workdir")
  if cfg.method not in ("lfs", "custom_diffusion"):
    raise ConfigError(f"method must be 'lfs' or 'custom_diffusion', got {cfg.method!r}")
  predicate = params_lib.selection_predicate(cfg.train.selection)

  # Everything that can fail on bad input happens before anything is written.
  sessions = base_lib.session_specs(cfg.data)
  images, records = {}, {}
  for spec in sum(sessions, []):
    images[spec.name], records[spec.name] = data_lib.load_images(spec.images,
                                                                 cfg.data.resolution)
  if exists:
    with open(config_path) as f:
      check_compatible(json.load(f), cfg.to_dict())
  pipe = base_lib.load_base(cfg.model, cfg.seed)
  mesh = step_lib.make_mesh(cfg.mesh, devices)
  registry = concepts_lib.Registry()
  vocab = pipe.tokenizer.get_vocab()
  for k, specs in enumerate(sessions, start=1):
    registry = registry.add_session(specs, k, token_format=cfg.concepts.token_format,
                                    vocab=vocab)

  os.makedirs(workdir, exist_ok=True)
  if not exists:
    checkpoint.write_json_atomic(config_path, _jsonable(cfg.to_dict()))
  ctx = _Context(cfg, workdir, pipe, mesh, schedule_lib.make_schedule(pipe.scheduler),
                 predicate, sessions, images, records)

  stop = {"flag": False}
  previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
  try:
    done = checkpoint.finished_sessions(workdir)
    selected, _ = params_lib.split(pipe.unet_params, predicate)
    d = pipe.text_encoder.config.hidden_size
    prev_delta = {"unet": selected, "tokens": np.zeros((0, d), np.float32)}
    results = []
    for k in range(1, len(sessions) + 1):
      if k in done:
        got = checkpoint.restore_session(workdir, k)
        prev_delta = got["delta"]
        continue
      results.append(_train_session(ctx, registry.up_to(k), k, prev_delta,
                                    resume=resume, stop=stop))
      prev_delta = checkpoint.restore_session(workdir, k)["delta"]
    return results
  finally:
    signal.signal(signal.SIGTERM, previous)
