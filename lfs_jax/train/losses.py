"""The session loss: denoising on the concept photos plus data-free distillation.

Everything here is a pure function of arrays; the modules (UNet, text encoder) and
the static `LossSpec` come in as arguments, never closed-over weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from lfs_jax.diffusion import schedule as schedule_lib
from lfs_jax.diffusion import steps as steps_lib
from lfs_jax.train import params as params_lib
from lfs_jax.weights.convert import flatten


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """Static (hashable) description of the loss; built once from the config."""
  batch_size: int
  kd_batch_size: int
  kd_weight: float
  use_kd: bool               # False for method=custom_diffusion (no teacher at all)
  kd_points: int             # points per teacher trajectory (1 = kd.mode "noise")
  kd_cached: bool            # targets from a per-session cache instead of fresh teacher calls
  flip: bool
  rescale: bool
  rescale_min: float
  rescale_max: float
  scaling_factor: float      # VAE latent scale
  scheduler: Any             # diffusion.schedule.SchedulerConfig (frozen dataclass)
  batch_sharding: Any = None  # NamedSharding splitting the UNet batch over data x fsdp
  kd_from_base: bool = False  # some conditions are distilled from the base (kd.from_base)
  kv_weight: float = 0.0     # weight of kv_anchor (kd.kv_weight; 0 = off)
  loss_reduction: str = "mean"  # train.loss_reduction: mean | cd (see denoise_loss)
  rescale_cues: bool = False  # data.rescale_cues: prompt_ids hold len(RESCALE_CUES) per template


class SessionData(NamedTuple):
  """Device arrays of one session, built once at its start.

  Arrays are padded to the run's largest session so that every session of a run
  has the same shapes and the step compiles once; the counts say what is real.
  """
  latent_mean: jax.Array     # [N, h, w, c] VAE posterior means of the photos (unscaled)
  latent_logvar: jax.Array   # [N, h, w, c]
  prompt_ids: jax.Array      # [N, n_templates, L] int32: each photo's concept prompts
  n_images: jax.Array        # int32: photos [0, n_images) are real
  token_offset: jax.Array    # int32: row of this session's first token in the run's table
  kd_context: jax.Array      # [NC, L, D] text embeddings of the DFKD conditions
  n_kd: jax.Array            # int32: conditions [0, n_kd) are real
  kd_cache: Optional[Dict[str, jax.Array]] = None  # x, t, cond, target (see kd_cache)
  kd_base: Optional[jax.Array] = None  # [NC] bool: condition distilled from the base (kd.from_base)
  kv_gram: Optional[jax.Array] = None  # [D, D] float32: kv_gram of the DFKD conditions (kd.kv_weight)


class Models(NamedTuple):
  """The Flax modules (structure only; hashable, so static under jit)."""
  unet: Any
  text: Any


def trajectory_timesteps(num_train_timesteps: int, points: int) -> jax.Array:
  """[choice] DFKD points: T-1 (pure noise) then evenly spaced down, e.g. 999,749,499,249."""
  stride = num_train_timesteps // points
  return jnp.asarray([num_train_timesteps - 1 - i * stride for i in range(points)], jnp.int32)


def teacher_trajectory(models: Models, unet_params, schedule, spec: LossSpec,
                       z: jax.Array, context: jax.Array):
  """Runs the teacher from pure noise z along `spec.kd_points` DDIM (eta=0) steps.

  Args:
    unet_params: the full teacher UNet tree.
    z: [K, h, w, c] Gaussian noise (the input at t = T-1).
    context: [K, L, D] text conditions.

  Returns:
    (xs [P, K, h, w, c], ts [P], outputs [P, K, h, w, c]): the points of the path and
    the teacher's predictions there; no gradient flows through them.
  """
  ts = trajectory_timesteps(spec.scheduler.num_train_timesteps, spec.kd_points)
  prev = jnp.concatenate([ts[1:], jnp.asarray([-1], jnp.int32)])

  def body(x, tt):
    t, t_prev = tt
    out = models.unet.apply({"params": unet_params}, x,
                            jnp.full((x.shape[0],), t, jnp.int32), context)
    x_next = steps_lib.ddim_step(schedule, spec.scheduler, out, t, t_prev, x, 0.0,
                                 jnp.zeros_like(x))
    return x_next, (x, out)

  _, (xs, outs) = jax.lax.scan(body, z, (ts, prev))
  return jax.lax.stop_gradient(xs), ts, jax.lax.stop_gradient(outs)


# Custom Diffusion's caption cues for a rescaled photo (data.rescale_cues): prefixes
# of the prompt, "" when the photo keeps its size. cue_index picks one per image.
RESCALE_CUES = ("", "a far away ", "very small ", "zoomed in ", "close up ")
CUE_SHRUNK = 0.6    # a rescale factor below this is "far away" / "very small"
CUE_ENLARGED = 1.2  # above this "zoomed in" / "close up"


def cue_index(scale: jax.Array, u: jax.Array) -> jax.Array:
  """[B] int32 index into RESCALE_CUES for rescale factors [B] and uniforms u [B] in [0, 1).

  As Custom Diffusion's data loader: shrunk below CUE_SHRUNK of the frame, one of
  the two "small" cues at random; enlarged above CUE_ENLARGED, one of the two
  "close" cues; otherwise none.
  """
  second = (u >= 0.5).astype(jnp.int32)
  return jnp.where(scale < CUE_SHRUNK, 1 + second,
                   jnp.where(scale > CUE_ENLARGED, 3 + second, 0)).astype(jnp.int32)


def denoise_loss(sq: jax.Array, mask: jax.Array, reduction: str) -> jax.Array:
  """Masked squared error [B, h, w, c] (mask [B, h, w, 1]) -> the scalar denoising loss.

  "mean": per image, the mean over the masked elements (every channel), then over
  the batch. "cd": Custom Diffusion's, per image the masked sum over all channels
  divided by the mask's pixel count (c times "mean"), then the mean over the batch.
  """
  masked = (sq * mask).sum(axis=(1, 2, 3))
  if reduction == "cd":
    return (masked / mask.sum(axis=(1, 2, 3))).mean()
  if reduction == "mean":
    return (masked / (mask.sum(axis=(1, 2, 3)) * sq.shape[-1])).mean()
  raise ValueError(f"train.loss_reduction must be 'mean' or 'cd', got {reduction!r}")


def _augment(z: jax.Array, rng: jax.Array, spec: LossSpec
             ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Random flip and Custom Diffusion's random rescale, on latents [B, h, w, c].

  [choice] The rescale happens in latent space (latents are encoded once per
  session): a factor s in [min, max] shrinks the latent into a random spot of a
  zero canvas (s < 1) or zooms into a random crop (s > 1); the returned mask
  [B, h, w, 1] keeps the loss to where the photo is. Returns (z, mask, s [B]; ones
  without the rescale).
  """
  b, h, w, _ = z.shape
  k_flip, k_scale, k_pos = jax.random.split(rng, 3)
  if spec.flip:
    flip = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
    z = jnp.where(flip, z[:, :, ::-1, :], z)
  mask = jnp.ones((b, h, w, 1), z.dtype)
  s = jnp.ones((b,), z.dtype)
  if spec.rescale:
    s = jax.random.uniform(k_scale, (b,), minval=spec.rescale_min, maxval=spec.rescale_max)
    # translation puts the scaled image at a random offset inside (or over) the canvas
    u = jax.random.uniform(k_pos, (b, 2))
    size = jnp.asarray([h, w], z.dtype)
    trans = u * (size[None] - s[:, None] * size[None])

    def one(img, m, scale, tr):
      sc = jnp.stack([scale, scale])
      img = jax.image.scale_and_translate(img, img.shape, (0, 1), sc, tr, "linear")
      m = jax.image.scale_and_translate(m, m.shape, (0, 1), sc, tr, "linear")
      return img, m

    z, mask = jax.vmap(one)(z, mask, s, trans)
    mask = (mask > 0.5).astype(z.dtype)
  return z, mask, s


def _text(models: Models, text_params, rows, ids):
  return models.text.apply({"params": text_params}, ids, extra_embeddings=rows)


def loss_fn(trainable, frozen, teacher, batch: SessionData, schedule, rng, *,
            models: Models, spec: LossSpec):
  """Total loss and metrics for one step.

  Args:
    trainable: {"unet": selected UNet leaves, "tokens": [M, D] this session's token rows}.
    frozen: {"unet": the other UNet leaves, "text": text encoder, "tokens": [R, D] the
      run's token rows (earlier concepts' learned values; the rest unused)}.
    teacher: {"unet": the previous session's selected leaves} or None (neither DFKD nor
      the K/V anchor); with spec.kd_from_base also "base": the base model's leaves.
    batch: the session's SessionData.
    schedule: diffusion.schedule.NoiseSchedule.
    rng: this step's key.

  Returns:
    (loss, {"denoise": ..., "kd": ...}).
  """
  k_idx, k_lat, k_aug, k_noise, k_t, k_tpl, k_kd = jax.random.split(rng, 7)
  idx = jax.random.randint(k_idx, (spec.batch_size,), 0, batch.n_images)
  mean, logvar = batch.latent_mean[idx], batch.latent_logvar[idx]
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_lat, mean.shape, mean.dtype)
  z, mask, scale = _augment(z * spec.scaling_factor, k_aug, spec)
  noise = jax.random.normal(k_noise, z.shape, z.dtype)
  t = jax.random.randint(k_t, (spec.batch_size,), 0, spec.scheduler.num_train_timesteps)
  x_t = schedule_lib.add_noise(schedule, z, noise, t)
  target = schedule_lib.training_target(schedule, spec.scheduler.prediction_type, z, noise, t)
  n_cues = len(RESCALE_CUES) if spec.rescale_cues else 1
  tpl = jax.random.randint(k_tpl, (spec.batch_size,), 0, batch.prompt_ids.shape[1] // n_cues)
  if spec.rescale_cues:  # each template's prompts are its RESCALE_CUES variants, in order
    k_cue = jax.random.fold_in(k_tpl, 1)  # a new key; the others stay as they were
    tpl = tpl * n_cues + cue_index(scale, jax.random.uniform(k_cue, (spec.batch_size,)))
  ids = batch.prompt_ids[idx, tpl]
  rows = jax.lax.dynamic_update_slice(
      frozen["tokens"], trainable["tokens"].astype(frozen["tokens"].dtype),
      (batch.token_offset, 0))
  context = _text(models, frozen["text"], rows, ids)
  unet_params = params_lib.merge(trainable["unet"], frozen["unet"])

  x_in, t_in, c_in = x_t, t, context
  if spec.use_kd:
    x_kd, t_kd, c_kd, target_kd = _kd_inputs(teacher, frozen, batch, schedule, k_kd,
                                             models=models, spec=spec)
    x_in = jnp.concatenate([x_t, x_kd.astype(x_t.dtype)])
    t_in = jnp.concatenate([t, t_kd])
    c_in = jnp.concatenate([context, c_kd.astype(context.dtype)])
  if spec.batch_sharding is not None:
    x_in, t_in, c_in = (jax.lax.with_sharding_constraint(a, spec.batch_sharding)
                        for a in (x_in, t_in, c_in))
  out = models.unet.apply({"params": unet_params}, x_in, t_in, c_in).astype(jnp.float32)
  out_data = out[:spec.batch_size]

  denoise = denoise_loss(jnp.square(out_data - target.astype(jnp.float32)), mask,
                         spec.loss_reduction)
  metrics = {"denoise": denoise}
  loss = denoise
  if spec.use_kd:
    kd = jnp.mean(jnp.square(out[spec.batch_size:] - target_kd.astype(jnp.float32)))
    loss = loss + spec.kd_weight * kd
    metrics["kd"] = kd
  if spec.kv_weight:
    kv = kv_anchor(trainable["unet"], teacher["unet"], batch.kv_gram)
    loss = loss + spec.kv_weight * kv
    metrics["kv"] = kv
  return loss, metrics


def kv_gram(contexts: jax.Array, n: int) -> jax.Array:
  """[D, D] float32 second moment E[c c^T] over every token of contexts[:n] ([NC, L, D])."""
  x = jnp.asarray(contexts[:n], jnp.float32).reshape(-1, contexts.shape[-1])
  return x.T @ x / x.shape[0]


def kv_anchor(student, teacher, gram: jax.Array) -> jax.Array:
  """[choice] How far the trained keys and values have moved on the anchor contexts.

  Only the cross-attention keys and values (attn2 to_k / to_v, c -> c @ W) read the
  text, and they are all a class prompt's condition reaches: a class prompt's
  samples change only as far as c @ W does on its context tokens c. For each trained
  attn2 to_k / to_v kernel W against the teacher's W0 (D = W - W0), the mean over the
  anchor tokens of |c @ D|^2 per output channel is tr(D^T G D) / width with G =
  E[c c^T] (`kv_gram`); the result is the mean over those kernels. Exact and
  data-free (no UNet call): a distillation of the keys and values on the DFKD
  conditions, where DFKD proper matches the UNet's output on noise.
  """
  is_kv = params_lib.selection_predicate("crossattn_kv")
  s_flat, t_flat = flatten(student), flatten(teacher)
  terms = []
  for path, w in s_flat.items():
    if path[-1] == "kernel" and is_kv("/".join(path)):
      d = w.astype(jnp.float32) - t_flat[path].astype(jnp.float32)
      terms.append(jnp.sum(d * (gram @ d)) / d.shape[1])
  if not terms:
    raise ValueError("kv_anchor: the trained UNet leaves hold no attn2 to_k/to_v kernel")
  return jnp.mean(jnp.stack(terms))


def _kd_inputs(teacher, frozen, batch: SessionData, schedule, rng, *, models, spec):
  """(x, t, context, teacher output) for `spec.kd_batch_size` distillation points."""
  k = spec.kd_batch_size
  k_pick, k_z, k_c, k_p = jax.random.split(rng, 4)
  if spec.kd_cached:
    cache = batch.kd_cache
    j = jax.random.randint(k_pick, (k,), 0, cache["x"].shape[0])
    return cache["x"][j], cache["t"][j], batch.kd_context[cache["cond"][j]], cache["target"][j]
  shape = (k,) + batch.latent_mean.shape[1:]
  z = jax.random.normal(k_z, shape, jnp.float32)
  cond = jax.random.randint(k_c, (k,), 0, batch.n_kd)
  context = batch.kd_context[cond]
  xs, ts, outs = _teachers(teacher, frozen, batch.kd_base, cond, schedule, spec, models,
                           z, context)
  p = jax.random.randint(k_p, (k,), 0, spec.kd_points)
  rows = jnp.arange(k)
  return xs[p, rows], ts[p], context, outs[p, rows]


def _teachers(teacher, frozen, kd_base, cond, schedule, spec: LossSpec, models: Models,
              z: jax.Array, context: jax.Array):
  """teacher_trajectory for conditions `cond`: each from the teacher its condition names.

  Without spec.kd_from_base every condition is the previous session's. With it, the
  conditions flagged in `kd_base` [NC] take the base model's path and predictions
  instead; both teachers run on every row (a second teacher forward per point) and
  each row keeps its own teacher's.
  """
  prev = params_lib.merge(teacher["unet"], frozen["unet"])
  xs, ts, outs = teacher_trajectory(models, prev, schedule, spec, z, context)
  if not spec.kd_from_base:
    return xs, ts, outs
  base = params_lib.merge(teacher["base"], frozen["unet"])
  xs_b, _, outs_b = teacher_trajectory(models, base, schedule, spec, z, context)
  pick = kd_base[cond].reshape((1, -1) + (1,) * (z.ndim - 1))
  return jnp.where(pick, xs_b, xs), ts, jnp.where(pick, outs_b, outs)


def kd_cache(teacher, frozen, kd_context, n_kd, schedule, rng, *, size: int,
             latent_shape: Tuple[int, int, int], models: Models,
             spec: LossSpec, kd_base=None) -> Dict[str, jax.Array]:
  """Teacher targets for `size` noises, all trajectory points: computed once a session.

  The teacher is frozen for the whole session, so its prediction at a given
  (x, t, condition) never changes; caching trades memory (size x points latents)
  for the teacher forwards of every step.

  Returns:
    {"x": [size*P, h, w, c], "t": [size*P], "cond": [size*P], "target": [size*P, h, w, c]}.
  """
  k_z, k_c = jax.random.split(rng)
  chunk = spec.kd_batch_size
  n_chunks = -(-size // chunk)
  shape = (n_chunks, chunk) + tuple(latent_shape)
  z = jax.random.normal(k_z, shape, jnp.float32)
  cond = jax.random.randint(k_c, (n_chunks, chunk), 0, n_kd)

  def one(args):
    zc, cc = args
    xs, ts, outs = _teachers(teacher, frozen, kd_base, cc, schedule, spec, models, zc,
                             kd_context[cc])
    return xs, jnp.broadcast_to(ts[:, None], (ts.shape[0], chunk)), outs, jnp.broadcast_to(
        cc[None], (ts.shape[0], chunk))

  xs, ts, outs, conds = jax.lax.map(one, (z, cond))
  flat = lambda a: a.reshape((-1,) + a.shape[3:])[: size * spec.kd_points]
  return {"x": flat(xs), "t": flat(ts), "cond": flat(conds), "target": flat(outs)}

