"""The discrete noise schedule of Stable Diffusion, as a small pytree of arrays.

`SchedulerConfig` is the hashable form of a diffusers `scheduler_config.json`;
`make_schedule` turns it into a `NoiseSchedule` of float32 arrays that jitted code
takes as an argument. The forward process (`add_noise`), the v target and the
inference timestep grids follow diffusers' DDPMScheduler / DDIMScheduler for the
same config, so real Stable Diffusion weights see the inputs they were trained on.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from lfs_jax.errors import UnsupportedConfigError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")

# Keys that only steer samplers other than DDPM / DDIM (PNDM, Euler, Euler
# ancestral, LMS, DPM-Solver++), or thresholding, which is refused anyway. They are
# accepted and ignored so that a pipeline's own scheduler config loads as it is.
IGNORED_KEYS = frozenset({
    "skip_prk_steps",  # PNDM
    "dynamic_thresholding_ratio", "sample_max_value",  # only with thresholding
    "interpolation_type", "use_karras_sigmas", "use_exponential_sigmas",
    "use_beta_sigmas", "sigma_min", "sigma_max", "timestep_type",
    "final_sigmas_type",  # Euler / LMS
    "solver_order", "algorithm_type", "solver_type", "lower_order_final",
    "euler_at_final", "use_lu_lambdas", "lambda_min_clipped", "flow_shift",
    "time_shift_type",  # DPM-Solver
})
# Ignored-sampler keys whose non-default value would change the model's objective.
_REFUSED_IF_TRUE = ("use_flow_sigmas", "use_dynamic_shifting")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  """A DDPM/DDIM noise schedule; hashable, so safe as a static jit argument.

  Defaults are those of diffusers' DDIMScheduler / DDPMScheduler, which is what a
  missing key means when diffusers builds one of them from a saved config.
  """
  num_train_timesteps: int = 1000
  beta_start: float = 0.0001
  beta_end: float = 0.02
  beta_schedule: str = "linear"
  prediction_type: str = "epsilon"
  timestep_spacing: str = "leading"
  steps_offset: int = 0
  # DDIM only: alpha_prod of the step after the last one (1 or alphas_cumprod[0]).
  set_alpha_to_one: bool = True
  clip_sample: bool = True
  clip_sample_range: float = 1.0
  rescale_betas_zero_snr: bool = False
  # DDPM only.
  variance_type: str = "fixed_small"

  def __post_init__(self):
    def refuse(name, allowed):
      value = getattr(self, name)
      if value not in allowed:
        raise UnsupportedConfigError(
            f"scheduler config field {name!r}={value!r} is not supported; "
            f"expected one of {allowed}")
    refuse("beta_schedule", BETA_SCHEDULES)
    refuse("prediction_type", PREDICTION_TYPES)
    refuse("timestep_spacing", TIMESTEP_SPACINGS)
    refuse("variance_type", VARIANCE_TYPES)
    if self.num_train_timesteps < 1:
      raise UnsupportedConfigError(
          "scheduler config field 'num_train_timesteps'="
          f"{self.num_train_timesteps} must be >= 1")
    if self.clip_sample_range <= 0:
      raise UnsupportedConfigError(
          f"scheduler config field 'clip_sample_range'={self.clip_sample_range} must be > 0")

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> "SchedulerConfig":
    """Builds from a diffusers scheduler config dict (PNDM, DDIM, DDPM, Euler, ...).

    Keys starting with "_" and those in `IGNORED_KEYS` are skipped; an unknown key
    or a value lfs_jax does not implement (thresholding, trained_betas, learned
    variances, ...) raises UnsupportedConfigError naming the field.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in config.items():
      if key.startswith("_"):
        continue
      if key in _REFUSED_IF_TRUE:
        if value:
          raise UnsupportedConfigError(
              f"scheduler config field {key!r}={value!r} is not supported (flow-matching schedules)")
        continue
      if key in IGNORED_KEYS:
        continue
      if key == "thresholding":
        if value:
          raise UnsupportedConfigError(
              "scheduler config field 'thresholding'=True is not supported (dynamic thresholding)")
        continue
      if key == "trained_betas":
        if value is not None:
          raise UnsupportedConfigError(
              "scheduler config field 'trained_betas' is not supported (must be null)")
        continue
      if key == "variance_type" and value is None:
        continue  # DPM-Solver writes None: no learned variance, i.e. the default.
      if key not in fields:
        raise UnsupportedConfigError(
            f"unknown scheduler config field {key!r}; if it only matters to another "
            "sampler, add it to lfs_jax.diffusion.schedule.IGNORED_KEYS")
      kwargs[key] = _coerce(key, value, fields[key].type)
    return cls(**kwargs)

  @classmethod
  def from_json_file(cls, path) -> "SchedulerConfig":
    """Reads a diffusers `scheduler/scheduler_config.json`."""
    with open(path) as f:
      return cls.from_diffusers(json.load(f))


def _coerce(key: str, value, type_name: str):
  """Checks a config value's type (bools stay bools, ints may not be floats)."""
  ok = {
      "int": isinstance(value, int) and not isinstance(value, bool),
      "float": isinstance(value, (int, float)) and not isinstance(value, bool),
      "bool": isinstance(value, bool),
      "str": isinstance(value, str),
  }[type_name]
  if not ok:
    raise UnsupportedConfigError(
        f"scheduler config field {key!r}={value!r} should be of type {type_name}")
  return float(value) if type_name == "float" else value


class NoiseSchedule(NamedTuple):
  """Precomputed float32 arrays of a schedule, each [T] (T = num_train_timesteps).

  Square roots are taken at the point of use, in float32, as diffusers does; a
  gathered sqrt costs nothing next to a UNet call.
  """
  betas: jax.Array
  alphas: jax.Array
  alphas_cumprod: jax.Array

  @property
  def num_train_timesteps(self) -> int:
    return self.alphas_cumprod.shape[0]


def _betas(cfg: SchedulerConfig) -> np.ndarray:
  """The betas in float64 ([T])."""
  n = cfg.num_train_timesteps
  if cfg.beta_schedule == "linear":
    betas = np.linspace(cfg.beta_start, cfg.beta_end, n, dtype=np.float64)
  elif cfg.beta_schedule == "scaled_linear":
    betas = np.linspace(math.sqrt(cfg.beta_start), math.sqrt(cfg.beta_end), n,
                        dtype=np.float64) ** 2
  else:  # squaredcos_cap_v2: the cosine ᾱ of improved DDPM, betas capped at 0.999
    def alpha_bar(s):
      return np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
    steps = np.arange(n, dtype=np.float64)
    betas = np.minimum(1.0 - alpha_bar((steps + 1) / n) / alpha_bar(steps / n), 0.999)
  if cfg.rescale_betas_zero_snr:
    betas = _rescale_zero_terminal_snr(betas)
  return betas


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Shifts and scales sqrt(ᾱ) so that ᾱ_{T-1} = 0 and ᾱ_0 is kept (arXiv 2305.08891)."""
  root = np.sqrt(np.cumprod(1.0 - betas))
  first, last = root[0], root[-1]
  root = (root - last) * (first / (first - last))
  acp = root ** 2
  alphas = np.concatenate([acp[:1], acp[1:] / acp[:-1]])
  return 1.0 - alphas


def make_schedule(cfg: SchedulerConfig) -> NoiseSchedule:
  """Precomputes the schedule of `cfg` on the host; stored as float32.

  The betas are rounded to float32 first, as diffusers stores them (it matters
  only for betas near 1, e.g. the 0.999 cap of the cosine schedule); ᾱ is then
  accumulated in float64, which is closer to the original LDM training code than
  diffusers' float32 cumprod (the two differ by < 1e-6 absolute).
  """
  betas = _betas(cfg).astype(np.float32).astype(np.float64)
  alphas = 1.0 - betas
  f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
  return NoiseSchedule(betas=f32(betas), alphas=f32(alphas),
                       alphas_cumprod=f32(np.cumprod(alphas)))


def gather(values: jax.Array, t, like: jax.Array) -> jax.Array:
  """values[t] shaped to broadcast against `like` ([B, ...]); t is a scalar or [B]."""
  v = jnp.take(values, jnp.asarray(t), mode="clip")
  return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def _signal_noise_scales(schedule: NoiseSchedule, t, like):
  """(sqrt(ᾱ_t), sqrt(1-ᾱ_t)) broadcastable against `like`, in its dtype."""
  acp = gather(schedule.alphas_cumprod, t, like)
  return jnp.sqrt(acp).astype(like.dtype), jnp.sqrt(1.0 - acp).astype(like.dtype)


def add_noise(schedule: NoiseSchedule, x0, noise, t):
  """Forward process x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) noise; x0, noise [B, ...], t [B]."""
  a, s = _signal_noise_scales(schedule, t, x0)
  return a * x0 + s * noise


def velocity(schedule: NoiseSchedule, x0, noise, t):
  """The v target sqrt(ᾱ_t) noise - sqrt(1-ᾱ_t) x0 (diffusers' `get_velocity`)."""
  a, s = _signal_noise_scales(schedule, t, x0)
  return a * noise - s * x0


def training_target(schedule: NoiseSchedule,
                    cfg_or_prediction_type: Union[SchedulerConfig, str], x0, noise, t):
  """What the model should output for x_t = add_noise(x0, noise, t): ε, v or x0."""
  prediction_type = prediction_type_of(cfg_or_prediction_type)
  if prediction_type == "epsilon":
    return noise
  if prediction_type == "v_prediction":
    return velocity(schedule, x0, noise, t)
  return x0


def prediction_type_of(cfg_or_prediction_type) -> str:
  """The prediction type named directly or by a SchedulerConfig (validated)."""
  if isinstance(cfg_or_prediction_type, SchedulerConfig):
    return cfg_or_prediction_type.prediction_type
  if cfg_or_prediction_type not in PREDICTION_TYPES:
    raise UnsupportedConfigError(
        f"prediction_type={cfg_or_prediction_type!r} is not supported; expected one of "
        f"{PREDICTION_TYPES}")
  return cfg_or_prediction_type


def inference_timesteps(cfg: SchedulerConfig, num_inference_steps: int) -> np.ndarray:
  """The descending timesteps of a sampling run, int32 [num_inference_steps].

  The same grid as diffusers' DDIMScheduler.set_timesteps and
  DDPMScheduler.set_timesteps (the two agree for every timestep_spacing).
  """
  n, total = int(num_inference_steps), cfg.num_train_timesteps
  if not 1 <= n <= total:
    raise ValueError(
        f"num_inference_steps={n} must be in [1, num_train_timesteps={total}]")
  if cfg.timestep_spacing == "linspace":
    ts = np.linspace(0, total - 1, n).round()[::-1]
  elif cfg.timestep_spacing == "leading":
    ts = (np.arange(n) * (total // n))[::-1] + cfg.steps_offset
  else:  # trailing
    ts = np.round(np.arange(total, 0, -total / n)) - 1
  ts = ts.astype(np.int64)
  if ts.max() >= total or ts.min() < 0:
    raise ValueError(
        f"timestep_spacing={cfg.timestep_spacing!r} with steps_offset={cfg.steps_offset} "
        f"and {n} steps gives timesteps outside [0, {total}): {ts.min()}..{ts.max()}")
  return ts.astype(np.int32)


def previous_timesteps(cfg: SchedulerConfig, timesteps: np.ndarray, kind: str) -> np.ndarray:
  """The prev_t paired with each timestep by diffusers' samplers, int32.

  kind "ddpm": the next entry of `timesteps`, -1 after the last.
  kind "ddim": t - num_train_timesteps // len(timesteps), whatever the grid (for
  "linspace" spacing this is not the next entry, and diffusers does the same).
  A negative prev_t means "the clean sample".
  """
  timesteps = np.asarray(timesteps, dtype=np.int64)
  if kind == "ddpm":
    prev = np.concatenate([timesteps[1:], [-1]])
  elif kind == "ddim":
    prev = timesteps - cfg.num_train_timesteps // len(timesteps)
  else:
    raise ValueError(f"kind must be 'ddpm' or 'ddim', got {kind!r}")
  return prev.astype(np.int32)
