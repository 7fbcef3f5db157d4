"""One reverse step of DDIM or DDPM, as pure jnp functions.

Each step matches diffusers' DDIMScheduler.step / DDPMScheduler.step for the same
SchedulerConfig, with the previous timestep passed in (see
`schedule.previous_timesteps`) and the Gaussian noise drawn by the caller, so a
step is deterministic and jit-friendly: `t`, `prev_t` and `eta` may be traced
(scalars or [B]); only the static `cfg` steers Python control flow.

Arithmetic is float32 (the dtype of the schedule) and the result takes the
sample's dtype.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp

from lfs_jax.diffusion.schedule import (NoiseSchedule, SchedulerConfig, gather,
                                        prediction_type_of)


def _prev_alpha_cumprod(schedule: NoiseSchedule, prev_t, like, final) -> jax.Array:
  """ᾱ at prev_t, or `final` where prev_t < 0 (the step that lands on x0)."""
  prev_t = jnp.asarray(prev_t)
  acp = gather(schedule.alphas_cumprod, jnp.maximum(prev_t, 0), like)
  before_start = (prev_t < 0).reshape(prev_t.shape + (1,) * (like.ndim - prev_t.ndim))
  return jnp.where(before_start, jnp.asarray(final, acp.dtype), acp)


def _x0_eps(prediction_type: str, model_output, sample, alpha_prod_t):
  """(x0, ε) from a model output, given ᾱ_t broadcastable against the sample."""
  beta_prod_t = 1.0 - alpha_prod_t
  if prediction_type == "epsilon":
    eps = model_output
    x0 = (sample - beta_prod_t ** 0.5 * eps) / alpha_prod_t ** 0.5
  elif prediction_type == "v_prediction":
    x0 = alpha_prod_t ** 0.5 * sample - beta_prod_t ** 0.5 * model_output
    eps = alpha_prod_t ** 0.5 * model_output + beta_prod_t ** 0.5 * sample
  else:  # sample
    x0 = model_output
    eps = (sample - alpha_prod_t ** 0.5 * x0) / beta_prod_t ** 0.5
  return x0, eps


def predict_x0_eps(schedule: NoiseSchedule,
                   prediction_type: Union[SchedulerConfig, str], model_output, sample,
                   t) -> tuple[jax.Array, jax.Array]:
  """Converts a model output into the predicted clean sample and noise.

  Args:
    schedule: the noise schedule.
    prediction_type: "epsilon", "v_prediction" or "sample" (or a SchedulerConfig).
    model_output: the UNet output [B, H, W, C].
    sample: the noisy input x_t [B, H, W, C].
    t: timestep, scalar or [B] int.

  Returns:
    (x0, eps), each [B, H, W, C] float32.
  """
  prediction_type = prediction_type_of(prediction_type)
  alpha_prod_t = gather(schedule.alphas_cumprod, t, sample)
  return _x0_eps(prediction_type, model_output.astype(jnp.float32),
                 sample.astype(jnp.float32), alpha_prod_t)


def _clip(cfg: SchedulerConfig, x0):
  if cfg.clip_sample:
    return jnp.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)
  return x0


def ddim_step(schedule: NoiseSchedule, cfg: SchedulerConfig, model_output, t, prev_t,
              sample, eta=0.0, noise: Optional[jax.Array] = None) -> jax.Array:
  """x_t -> x_{prev_t} by DDIM (Song et al. 2020, eq. 12), as diffusers' DDIMScheduler.

  Where prev_t < 0 the step lands on ᾱ = 1 (cfg.set_alpha_to_one) or ᾱ_0.
  `use_clipped_model_output` is False: ε is not re-derived from a clipped x0.

  Args:
    schedule: the noise schedule of `cfg`.
    cfg: static config (prediction_type, clip_sample, set_alpha_to_one).
    model_output: the UNet output at (sample, t) [B, H, W, C].
    t: current timestep, scalar or [B] int (may be traced).
    prev_t: timestep to step to, scalar or [B] int; negative means the end.
    sample: x_t [B, H, W, C].
    eta: stochasticity η (0 = deterministic DDIM, 1 = DDPM-like), may be traced.
    noise: N(0, I) draws [B, H, W, C] for η > 0; None adds no noise.

  Returns:
    x_{prev_t} [B, H, W, C] in the sample's dtype.
  """
  out_dtype = sample.dtype
  model_output = model_output.astype(jnp.float32)
  sample = sample.astype(jnp.float32)
  alpha_prod_t = gather(schedule.alphas_cumprod, t, sample)
  final = 1.0 if cfg.set_alpha_to_one else schedule.alphas_cumprod[0]
  alpha_prod_prev = _prev_alpha_cumprod(schedule, prev_t, sample, final)

  x0, eps = _x0_eps(cfg.prediction_type, model_output, sample, alpha_prod_t)
  x0 = _clip(cfg, x0)

  # σ_t(η)² of eq. 16.
  variance = ((1.0 - alpha_prod_prev) / (1.0 - alpha_prod_t)
              * (1.0 - alpha_prod_t / alpha_prod_prev))
  std = jnp.asarray(eta, jnp.float32) * variance ** 0.5
  # The clamp only guards float rounding at η = 1, where the radicand is ~0.
  direction = jnp.maximum(1.0 - alpha_prod_prev - std ** 2, 0.0) ** 0.5 * eps
  prev_sample = alpha_prod_prev ** 0.5 * x0 + direction
  if noise is not None:
    prev_sample = prev_sample + std * noise.astype(jnp.float32)
  return prev_sample.astype(out_dtype)


def ddpm_step(schedule: NoiseSchedule, cfg: SchedulerConfig, model_output, t, prev_t,
              sample, noise: Optional[jax.Array] = None) -> jax.Array:
  """x_t -> x_{prev_t} by the DDPM posterior q(x_prev | x_t, x0), as diffusers' DDPMScheduler.

  Works for strided grids: the posterior is taken between t and prev_t, whose
  ᾱ ratio plays the role of α_t. Where prev_t < 0 the step lands on ᾱ = 1 (DDPM
  ignores set_alpha_to_one). No noise is added where t == 0, as in diffusers.

  Args:
    schedule: the noise schedule of `cfg`.
    cfg: static config (prediction_type, clip_sample, variance_type).
    model_output: the UNet output at (sample, t) [B, H, W, C].
    t: current timestep, scalar or [B] int (may be traced).
    prev_t: timestep to step to, scalar or [B] int; negative means the end.
    sample: x_t [B, H, W, C].
    noise: N(0, I) draws [B, H, W, C]; None gives the posterior mean.

  Returns:
    x_{prev_t} [B, H, W, C] in the sample's dtype.
  """
  out_dtype = sample.dtype
  model_output = model_output.astype(jnp.float32)
  sample = sample.astype(jnp.float32)
  alpha_prod_t = gather(schedule.alphas_cumprod, t, sample)
  alpha_prod_prev = _prev_alpha_cumprod(schedule, prev_t, sample, 1.0)
  beta_prod_t = 1.0 - alpha_prod_t
  beta_prod_prev = 1.0 - alpha_prod_prev
  current_alpha = alpha_prod_t / alpha_prod_prev
  current_beta = 1.0 - current_alpha

  x0, _ = _x0_eps(cfg.prediction_type, model_output, sample, alpha_prod_t)
  x0 = _clip(cfg, x0)

  # Posterior mean, eq. 7 of Ho et al. 2020.
  x0_coeff = alpha_prod_prev ** 0.5 * current_beta / beta_prod_t
  sample_coeff = current_alpha ** 0.5 * beta_prod_prev / beta_prod_t
  prev_sample = x0_coeff * x0 + sample_coeff * sample
  if noise is None:
    return prev_sample.astype(out_dtype)

  posterior_variance = jnp.maximum(beta_prod_prev / beta_prod_t * current_beta, 1e-20)
  if cfg.variance_type == "fixed_small":
    std = posterior_variance ** 0.5
  elif cfg.variance_type == "fixed_small_log":
    std = jnp.exp(0.5 * jnp.log(posterior_variance))
  else:  # fixed_large
    std = current_beta ** 0.5
  t = jnp.asarray(t)
  not_last = (t > 0).reshape(t.shape + (1,) * (sample.ndim - t.ndim))
  std = jnp.where(not_last, std, 0.0)
  return (prev_sample + std * noise.astype(jnp.float32)).astype(out_dtype)
