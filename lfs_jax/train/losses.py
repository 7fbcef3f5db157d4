"""The session loss: denoising on the concept photos, plus data-free distillation, the K/V
anchor and prior preservation (class images the base generated) where they are on.

Everything here is a pure function of arrays; the modules (UNet, text encoder) and
the static `LossSpec` come in as arguments, never closed-over weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from lfs_jax.diffusion import schedule as schedule_lib
from lfs_jax.errors import ConfigError
from lfs_jax import delta as delta_lib
from lfs_jax import parallel
from lfs_jax.train import kd as kd_lib


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
  delta: delta_lib.Selection  # what is trained and how it merges into the frozen base
  batch_sharding: Any = None  # NamedSharding splitting the UNet batch over data x fsdp
  kd_from_base: bool = False  # some conditions are distilled from the base (kd.from_base)
  kv_weight: float = 0.0     # weight of kv_anchor (kd.kv_weight; 0 = off)
  loss_reduction: str = "mean"  # train.loss_reduction: mean | cd (see denoise_loss)
  rescale_cues: bool = False  # data.rescale_cues: prompt_ids hold len(RESCALE_CUES) per template
  prior_weight: float = 0.0  # prior.weight: class-image rows (batch_size of them) in every step
  high_noise: float = 0.0    # train.high_noise: share of the concept rows' t in [HIGH_NOISE_FROM T, T)
  snr_gamma: float = 0.0     # train.snr_gamma: Min-SNR-gamma weights on the concept rows (0 = off)

  @property
  def regularised(self) -> bool:
    """A regulariser adds rows to every batch (DFKD or prior preservation): the learning
    rate is then x train.regulariser_lr_scale, as Custom Diffusion's x2."""
    return self.use_kd or self.prior_weight > 0


def make_spec(cfg, *, mesh, scaling_factor: float, scheduler, selection: delta_lib.Selection,
              lfs: bool) -> LossSpec:
  """The loss of method=lfs (`lfs`) or custom_diffusion, from the config (validated).

  DFKD where kd.weight > 0, the K/V anchor where kd.kv_weight > 0 (either can run
  without the other); the batches are split over the mesh's data x fsdp devices.
  """
  use_kd = lfs and cfg.kd.weight > 0
  if cfg.kd.mode not in ("noise", "trajectory"):
    raise ConfigError(f"kd.mode must be 'noise' or 'trajectory', got {cfg.kd.mode!r}")
  if cfg.kd.steps < 1:
    raise ConfigError(f"kd.steps must be >= 1, got {cfg.kd.steps}")
  if not cfg.kd.kv_weight >= 0:
    raise ConfigError(f"kd.kv_weight must be >= 0 (0 = off), got {cfg.kd.kv_weight}")
  if lfs and cfg.kd.kv_weight > 0 and not selection.trains_kv():
    raise ConfigError(f"kd.kv_weight={cfg.kd.kv_weight} anchors the attn2 to_k/to_v kernels, "
                      f"which train.lora_targets={','.join(selection.targets)!r} does not adapt")
  if cfg.train.loss_reduction not in ("mean", "cd"):
    raise ConfigError(f"train.loss_reduction must be 'mean' or 'cd', got "
                      f"{cfg.train.loss_reduction!r}")
  if not cfg.train.regulariser_lr_scale > 0:
    raise ConfigError(f"train.regulariser_lr_scale must be > 0, got "
                      f"{cfg.train.regulariser_lr_scale}")
  check_token_lr(cfg.train)
  if cfg.train.lr_schedule not in ("constant", "cosine"):
    raise ConfigError(f"train.lr_schedule must be 'constant' or 'cosine', got "
                      f"{cfg.train.lr_schedule!r}")
  if not 0.0 <= cfg.train.high_noise <= 1.0:
    raise ConfigError(f"train.high_noise is a share of the timesteps, in [0, 1]; got "
                      f"{cfg.train.high_noise!r}")
  gamma = cfg.train.snr_gamma
  if not (math.isfinite(gamma) and gamma >= 0):
    raise ConfigError(f"train.snr_gamma is Min-SNR's gamma, >= 0 (0 = off); got {gamma!r}")
  if cfg.data.rescale_cues and not cfg.data.rescale:
    raise ConfigError("data.rescale_cues describes the random rescale in the prompt; it "
                      "needs data.rescale=True")
  check_prior(cfg)
  n_batch = mesh.size  # the batch is split over data x fsdp
  for name, b in (("train.batch_size", cfg.train.batch_size),
                  ("kd.batch_size", cfg.kd.batch_size)):
    if b < 1 or b % n_batch:
      raise ConfigError(f"{name}={b} must be a positive multiple of the {n_batch} devices "
                        "of the mesh (data x fsdp)")
  sharding = parallel.batch_sharding(mesh) if n_batch > 1 else None
  return LossSpec(
      batch_size=cfg.train.batch_size, kd_batch_size=cfg.kd.batch_size,
      kd_weight=float(cfg.kd.weight), use_kd=use_kd,
      kd_points=1 if cfg.kd.mode == "noise" else cfg.kd.steps,
      kd_cached=use_kd and cfg.kd.cache_size > 0, flip=cfg.data.flip,
      rescale=cfg.data.rescale, rescale_min=cfg.data.rescale_min,
      rescale_max=cfg.data.rescale_max, scaling_factor=scaling_factor, scheduler=scheduler,
      delta=selection, batch_sharding=sharding,
      kd_from_base=use_kd and bool(kd_lib.kinds(cfg, "from_base")),
      kv_weight=float(cfg.kd.kv_weight) if lfs else 0.0,
      loss_reduction=cfg.train.loss_reduction, rescale_cues=bool(cfg.data.rescale_cues),
      prior_weight=float(cfg.prior.weight), high_noise=float(cfg.train.high_noise),
      snr_gamma=float(gamma))


def check_token_lr(train_cfg) -> None:
  """train.token_lr_scale, validated before anything trains."""
  scale = train_cfg.token_lr_scale
  if not (math.isfinite(scale) and scale > 0):
    raise ConfigError(f"train.token_lr_scale must be a finite number > 0, got {scale!r}")
  if scale != 1.0 and not train_cfg.train_tokens:
    raise ConfigError(f"train.token_lr_scale={scale} scales the modifier tokens' rows, which "
                      "train.train_tokens=False does not learn")


def check_prior(cfg) -> None:
  """prior.* fields, validated before anything is generated or trained."""
  p = cfg.prior
  if not p.weight >= 0:
    raise ConfigError(f"prior.weight must be >= 0 (0 = off), got {p.weight}")
  if p.weight > 0:
    if p.count < 1:
      raise ConfigError(f"prior.count must be >= 1 with prior preservation on "
                        f"(prior.weight={p.weight}), got {p.count}")
    if not isinstance(p.template, str) or p.template.count("{}") != 1:
      raise ConfigError(f"prior.template must hold one '{{}}' for the class word, got "
                        f"{p.template!r}")


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
  # Prior preservation (prior.weight > 0): the session's class images, padded like the photos.
  prior_mean: Optional[jax.Array] = None    # [P, h, w, c] VAE posterior means (unscaled)
  prior_logvar: Optional[jax.Array] = None  # [P, h, w, c]
  prior_ids: Optional[jax.Array] = None     # [P, L] int32: each image's class prompt
  n_prior: Optional[jax.Array] = None       # int32: images [0, n_prior) are real


class Models(NamedTuple):
  """The Flax modules (structure only; hashable, so static under jit)."""
  unet: Any
  text: Any


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


def denoise_loss(sq: jax.Array, mask: jax.Array, reduction: str,
                 weights: Optional[jax.Array] = None) -> jax.Array:
  """Masked squared error [B, h, w, c] (mask [B, h, w, 1]) -> the scalar denoising loss.

  "mean": per image, the mean over the masked elements (every channel), then over
  the batch. "cd": Custom Diffusion's, per image the masked sum over all channels
  divided by the mask's pixel count (c times "mean"), then the mean over the batch.
  `weights` [B] (train.snr_gamma's `snr_weights`) scale each image's loss before the
  batch mean; None is the unweighted loss.
  """
  masked = (sq * mask).sum(axis=(1, 2, 3))
  if reduction == "cd":
    per_image = masked / mask.sum(axis=(1, 2, 3))
  elif reduction == "mean":
    per_image = masked / (mask.sum(axis=(1, 2, 3)) * sq.shape[-1])
  else:
    raise ValueError(f"train.loss_reduction must be 'mean' or 'cd', got {reduction!r}")
  if weights is not None:
    per_image = per_image * weights
  return per_image.mean()


def snr_weights(schedule, t: jax.Array, prediction_type: str, gamma: float) -> jax.Array:
  """[B] float32 Min-SNR-gamma loss weights of timesteps t (Hang et al. 2023, "Efficient
  Diffusion Training via Min-SNR Weighting Strategy"; diffusers' training scripts'
  `--snr_gamma`): each prediction type's squared error rescaled so that the loss is
  the x0 error weighted by min(SNR, gamma), SNR(t) = alpha_bar / (1 - alpha_bar):
  min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v, min(SNR,
  gamma) for x0. At zero terminal SNR the epsilon weight is its limit 1 (where
  diffusers' formula divides by zero) and the v weight 0.
  """
  acp = schedule.alphas_cumprod[t].astype(jnp.float32)
  snr = acp / (1.0 - acp)
  prediction_type = schedule_lib.prediction_type_of(prediction_type)
  if prediction_type == "epsilon":
    return jnp.minimum(1.0, gamma / snr)
  clipped = jnp.minimum(snr, gamma)
  if prediction_type == "v_prediction":
    return clipped / (snr + 1.0)
  return clipped


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


HIGH_NOISE_FROM = 0.6  # train.high_noise draws from [0.6 T, T) (the mini base's recipe, mini/recipe.py)


def draw_timesteps(key, n: int, num_train_timesteps: int, high_noise: float = 0.0) -> jax.Array:
  """[n] int32 training timesteps: uniform on [0, T), each replaced with probability
  `high_noise` by one uniform on [HIGH_NOISE_FROM T, T). With high_noise 0 exactly the
  uniform draw (the same numbers from the same key), so runs without it are unchanged."""
  t = jax.random.randint(key, (n,), 0, num_train_timesteps)
  if not high_noise:
    return t
  k_share, k_high = jax.random.split(jax.random.fold_in(key, 1))
  high = jax.random.randint(k_high, (n,), int(HIGH_NOISE_FROM * num_train_timesteps),
                            num_train_timesteps)
  return jnp.where(jax.random.uniform(k_share, (n,)) < high_noise, high, t)


_PRIOR = 1  # purpose folded into the step key for the class-image rows (the others stay as they were)


def _prior_inputs(batch: SessionData, rows, frozen, schedule, rng, *, models: Models,
                  spec: LossSpec):
  """The class-image rows of one step: (x_t, t, context, target), batch_size of them.

  Each row: a class image drawn from [0, n_prior), a sample of its latent
  distribution, scaled, noised at a uniform timestep; its class prompt as context.
  No flip or rescale (Custom Diffusion augments only the concept photos).
  """
  k_idx, k_lat, k_noise, k_t = jax.random.split(rng, 4)
  b = spec.batch_size
  idx = jax.random.randint(k_idx, (b,), 0, batch.n_prior)
  mean, logvar = batch.prior_mean[idx], batch.prior_logvar[idx]
  z = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_lat, mean.shape, mean.dtype)
       ) * spec.scaling_factor
  noise = jax.random.normal(k_noise, z.shape, z.dtype)
  t = jax.random.randint(k_t, (b,), 0, spec.scheduler.num_train_timesteps)
  x_t = schedule_lib.add_noise(schedule, z, noise, t)
  target = schedule_lib.training_target(schedule, spec.scheduler.prediction_type, z, noise, t)
  context = _text(models, frozen["text"], rows, batch.prior_ids[idx])
  return x_t, t, context, target


def loss_fn(trainable, frozen, teacher, batch: SessionData, schedule, rng, *,
            models: Models, spec: LossSpec):
  """Total loss and metrics for one step.

  Args:
    trainable: {"unet": the delta (spec.delta: selected UNet leaves, or LoRA factors),
      "tokens": [M, D] this session's token rows (absent with train.train_tokens=False,
      when they are written into frozen["tokens"] instead)}.
    frozen: {"unet": spec.delta.frozen(base), "text": text encoder, "tokens": [R, D] the
      run's token rows (earlier concepts' learned values; the rest unused)}.
    teacher: {"unet": the previous session's delta} or None (neither DFKD nor the K/V
      anchor); with spec.kd_from_base also "base": the base model's (`initial`) delta.
    batch: the session's SessionData.
    schedule: diffusion.schedule.NoiseSchedule.
    rng: this step's key.

  Returns:
    (loss, {"denoise": ..., "prior": ..., "kd": ..., "kv": ...}) (the terms that are on).
  """
  k_idx, k_lat, k_aug, k_noise, k_t, k_tpl, k_kd = jax.random.split(rng, 7)
  idx = jax.random.randint(k_idx, (spec.batch_size,), 0, batch.n_images)
  mean, logvar = batch.latent_mean[idx], batch.latent_logvar[idx]
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_lat, mean.shape, mean.dtype)
  z, mask, scale = _augment(z * spec.scaling_factor, k_aug, spec)
  noise = jax.random.normal(k_noise, z.shape, z.dtype)
  t = draw_timesteps(k_t, spec.batch_size, spec.scheduler.num_train_timesteps, spec.high_noise)
  x_t = schedule_lib.add_noise(schedule, z, noise, t)
  target = schedule_lib.training_target(schedule, spec.scheduler.prediction_type, z, noise, t)
  n_cues = len(RESCALE_CUES) if spec.rescale_cues else 1
  tpl = jax.random.randint(k_tpl, (spec.batch_size,), 0, batch.prompt_ids.shape[1] // n_cues)
  if spec.rescale_cues:  # each template's prompts are its RESCALE_CUES variants, in order
    k_cue = jax.random.fold_in(k_tpl, 1)  # a new key; the others stay as they were
    tpl = tpl * n_cues + cue_index(scale, jax.random.uniform(k_cue, (spec.batch_size,)))
  ids = batch.prompt_ids[idx, tpl]
  rows = frozen["tokens"]  # train.train_tokens=False: the new rows are already in it
  if "tokens" in trainable:
    rows = jax.lax.dynamic_update_slice(
        rows, trainable["tokens"].astype(rows.dtype), (batch.token_offset, 0))
  context = _text(models, frozen["text"], rows, ids)
  unet_params = spec.delta.merge(trainable["unet"], frozen["unet"])

  x_in, t_in, c_in = x_t, t, context
  n_prior = spec.batch_size if spec.prior_weight > 0 else 0
  if n_prior:
    x_p, t_p, c_p, target_p = _prior_inputs(batch, rows, frozen, schedule,
                                            jax.random.fold_in(rng, _PRIOR), models=models,
                                            spec=spec)
    x_in = jnp.concatenate([x_in, x_p])
    t_in = jnp.concatenate([t_in, t_p])
    c_in = jnp.concatenate([c_in, c_p])
  if spec.use_kd:
    x_kd, t_kd, c_kd, target_kd = kd_lib.kd_inputs(teacher, frozen, batch, schedule, k_kd,
                                             models=models, spec=spec)
    x_in = jnp.concatenate([x_in, x_kd.astype(x_t.dtype)])
    t_in = jnp.concatenate([t_in, t_kd])
    c_in = jnp.concatenate([c_in, c_kd.astype(context.dtype)])
  if spec.batch_sharding is not None:
    x_in, t_in, c_in = (jax.lax.with_sharding_constraint(a, spec.batch_sharding)
                        for a in (x_in, t_in, c_in))
  out = models.unet.apply({"params": unet_params}, x_in, t_in, c_in).astype(jnp.float32)
  out_data = out[:spec.batch_size]

  weights = (snr_weights(schedule, t, spec.scheduler.prediction_type, spec.snr_gamma)
             if spec.snr_gamma else None)
  denoise = denoise_loss(jnp.square(out_data - target.astype(jnp.float32)), mask,
                         spec.loss_reduction, weights)
  metrics = {"denoise": denoise}
  loss = denoise
  if n_prior:
    # Custom Diffusion's prior loss: the plain per-element mean over the class rows.
    prior = jnp.mean(jnp.square(out[spec.batch_size:spec.batch_size + n_prior]
                                - target_p.astype(jnp.float32)))
    loss = loss + spec.prior_weight * prior
    metrics["prior"] = prior
  if spec.use_kd:
    kd = jnp.mean(jnp.square(out[spec.batch_size + n_prior:] - target_kd.astype(jnp.float32)))
    loss = loss + spec.kd_weight * kd
    metrics["kd"] = kd
  if spec.kv_weight:
    kv = kd_lib.kv_anchor(trainable["unet"], teacher["unet"], batch.kv_gram, spec.delta)
    loss = loss + spec.kv_weight * kv
    metrics["kv"] = kv
  return loss, metrics


