"""Parity of lfs_jax.diffusion's schedule and DDPM/DDIM steps with diffusers (PyTorch)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import diffusers
import pytest
import torch
from diffusers.schedulers import scheduling_ddpm

from lfs_jax.diffusion import schedule as sched_lib
from lfs_jax.diffusion import steps as steps_lib
from lfs_jax.errors import UnsupportedConfigError

_CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sd_configs")
_SD15 = {  # tests/data/sd_configs/sd15/scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
    "skip_prk_steps": True, "prediction_type": "epsilon",
}
_SD21 = dict(_SD15, _class_name="DDIMScheduler", prediction_type="v_prediction")

CONFIGS = {
    "sd15": _SD15,
    "sd21": _SD21,
    "sd21_trailing": dict(_SD21, timestep_spacing="trailing", steps_offset=0),
    "sd21_linspace": dict(_SD21, timestep_spacing="linspace", set_alpha_to_one=True),
    "linear_clip": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                    "clip_sample": True, "clip_sample_range": 1.5, "set_alpha_to_one": True},
    "cosine": {"beta_schedule": "squaredcos_cap_v2", "clip_sample": False,
               "timestep_spacing": "trailing", "prediction_type": "sample"},
    "zero_snr": dict(_SD21, timestep_spacing="trailing", rescale_betas_zero_snr=True),
}
_DDIM_ONLY = ("set_alpha_to_one", "skip_prk_steps")


def _torch_scheduler(kind, config):
  """A diffusers scheduler of `kind` built from the same dict as ours."""
  if kind == "ddim":
    return diffusers.DDIMScheduler.from_config(config)
  config = {k: v for k, v in config.items() if k not in _DDIM_ONLY}
  return diffusers.DDPMScheduler.from_config(config)


def _ours(config):
  cfg = sched_lib.SchedulerConfig.from_diffusers(config)
  return cfg, sched_lib.make_schedule(cfg)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_real_configs_load():
  for name, expected in [("sd15", "epsilon"), ("sd21", "v_prediction")]:
    path = os.path.join(_CONFIGS_DIR, name, "scheduler", "scheduler_config.json")
    cfg = sched_lib.SchedulerConfig.from_json_file(path)
    assert cfg.prediction_type == expected
    assert (cfg.beta_schedule, cfg.steps_offset, cfg.set_alpha_to_one, cfg.clip_sample) == (
        "scaled_linear", 1, False, False)
    with open(path) as f:
      assert cfg == sched_lib.SchedulerConfig.from_diffusers(json.load(f))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_alphas_cumprod(name):
  _, schedule = _ours(CONFIGS[name])
  for kind in ("ddim", "ddpm"):
    ref = _torch_scheduler(kind, CONFIGS[name])
    # Ours is computed in float64 then rounded, diffusers' in float32 throughout:
    # the two differ by float32 rounding only.
    np.testing.assert_allclose(schedule.alphas_cumprod, ref.alphas_cumprod.numpy(),
                               atol=1e-6, rtol=0)
    # Zero-SNR betas come from ratios of float32 cumprods in diffusers (2e-5 noise);
    # the steps read alphas_cumprod only.
    np.testing.assert_allclose(schedule.betas, ref.betas.numpy(), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("n", [1, 7, 10, 50, 999])
def test_inference_timesteps(name, n):
  cfg, _ = _ours(CONFIGS[name])
  ours = sched_lib.inference_timesteps(cfg, n)
  for kind in ("ddim", "ddpm"):
    ref = _torch_scheduler(kind, CONFIGS[name])
    ref.set_timesteps(n)
    np.testing.assert_array_equal(ours, ref.timesteps.numpy())
    if kind == "ddpm":  # previous_timesteps("ddpm") is diffusers' previous_timestep.
      prev = sched_lib.previous_timesteps(cfg, ours, "ddpm")
      np.testing.assert_array_equal(prev, [int(ref.previous_timestep(t)) for t in ref.timesteps])


def test_inference_timesteps_out_of_range():
  cfg, _ = _ours(_SD15)
  with pytest.raises(ValueError, match="outside"):
    sched_lib.inference_timesteps(cfg, 1000)  # leading + steps_offset 1 reaches T
  with pytest.raises(ValueError, match="num_inference_steps"):
    sched_lib.inference_timesteps(cfg, 0)


def test_add_noise_and_velocity():
  rng = np.random.default_rng(0)
  x0 = rng.standard_normal((4, 8, 8, 4)).astype(np.float32)
  noise = rng.standard_normal((4, 8, 8, 4)).astype(np.float32)
  t = np.array([0, 1, 500, 999])
  for name in ("sd15", "zero_snr", "cosine"):
    cfg, schedule = _ours(CONFIGS[name])
    ref = _torch_scheduler("ddpm", CONFIGS[name])
    tx0, tnoise, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
    noisy = sched_lib.add_noise(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    assert _rel(noisy, ref.add_noise(tx0, tnoise, tt).numpy()) < 1e-6
    v = sched_lib.velocity(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    assert _rel(v, ref.get_velocity(tx0, tnoise, tt).numpy()) < 1e-6
    target = sched_lib.training_target(schedule, cfg, x0, noise, jnp.asarray(t))
    expected = {"epsilon": noise, "v_prediction": v, "sample": x0}[cfg.prediction_type]
    np.testing.assert_array_equal(target, expected)


def test_predict_x0_eps_inverts_add_noise():
  rng = np.random.default_rng(1)
  x0 = jnp.asarray(rng.standard_normal((3, 4, 4, 2)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal((3, 4, 4, 2)), jnp.float32)
  t = jnp.array([10, 400, 900])
  cfg, schedule = _ours(_SD21)
  x_t = sched_lib.add_noise(schedule, x0, noise, t)
  for prediction_type in sched_lib.PREDICTION_TYPES:
    out = sched_lib.training_target(schedule, prediction_type, x0, noise, t)
    got_x0, got_eps = steps_lib.predict_x0_eps(schedule, prediction_type, out, x_t, t)
    np.testing.assert_allclose(got_x0, x0, atol=2e-4)
    np.testing.assert_allclose(got_eps, noise, atol=2e-4)


_ddim_jit = jax.jit(steps_lib.ddim_step, static_argnums=1)
_ddpm_jit = jax.jit(steps_lib.ddpm_step, static_argnums=1)
_SHAPE = (2, 4, 4, 3)


def _loop(kind, name, n, eta=0.0, per_step=False):
  """Runs n steps of both samplers on shared random model outputs and noise.

  Returns the largest relative error over the steps. per_step compares single
  steps: our schedule takes diffusers' alphas_cumprod and each step starts from
  diffusers' previous sample, so only the step formulas are compared; otherwise
  each sampler runs its own chain on its own schedule.
  """
  config = CONFIGS[name]
  cfg, schedule = _ours(config)
  ref = _torch_scheduler(kind, config)
  if per_step:
    schedule = schedule._replace(alphas_cumprod=jnp.asarray(ref.alphas_cumprod.numpy()))
  ref.set_timesteps(n)
  timesteps = sched_lib.inference_timesteps(cfg, n)
  prev = sched_lib.previous_timesteps(cfg, timesteps, kind)
  rng = np.random.default_rng(n)
  x = rng.standard_normal(_SHAPE).astype(np.float32)
  ours, theirs = jnp.asarray(x), torch.from_numpy(x)
  worst = 0.0
  for t, prev_t in zip(timesteps, prev):
    out = rng.standard_normal(_SHAPE).astype(np.float32)
    noise = rng.standard_normal(_SHAPE).astype(np.float32)
    if kind == "ddim":
      theirs = ref.step(torch.from_numpy(out), int(t), theirs, eta=eta,
                        variance_noise=torch.from_numpy(noise)).prev_sample
      ours = _ddim_jit(schedule, cfg, jnp.asarray(out), t, prev_t, ours, eta, jnp.asarray(noise))
    else:
      orig = scheduling_ddpm.randn_tensor
      scheduling_ddpm.randn_tensor = lambda *a, **k: torch.from_numpy(noise)
      try:
        theirs = ref.step(torch.from_numpy(out), int(t), theirs).prev_sample
      finally:
        scheduling_ddpm.randn_tensor = orig
      ours = _ddpm_jit(schedule, cfg, jnp.asarray(out), t, prev_t, ours, jnp.asarray(noise))
    assert ours.shape == _SHAPE and ours.dtype == jnp.float32
    worst = max(worst, _rel(ours, theirs.numpy()))
    if per_step:
      ours = jnp.asarray(theirs.numpy())
  return worst


def _chain_tolerance(name):
  # With "sample" prediction and random (inconsistent) model outputs, the chain
  # derives eps = (x - sqrt(ᾱ) x0) / sqrt(1 - ᾱ) and so amplifies the previous
  # step's rounding by up to 1/sqrt(1 - ᾱ_t) (~15 near t = 0); single steps still
  # agree to 1e-6.
  return 1e-4 if CONFIGS[name].get("prediction_type") == "sample" else 1e-5


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_loop(name, eta):
  # One step from the same input and alphas_cumprod: float32 rounding only.
  worst = _loop("ddim", name, 10, eta, per_step=True)
  assert worst < 1e-6, worst
  # Whole chains, each on its own schedule: the < 1e-6 differences of
  # alphas_cumprod and the rounding of every step accumulate over the chain.
  worst = _loop("ddim", name, 50, eta)
  assert worst < _chain_tolerance(name), worst


@pytest.mark.parametrize("name,variance_type", [
    (name, "fixed_small") for name in sorted(CONFIGS)] + [
    ("sd15", "fixed_small_log"), ("sd21_linspace", "fixed_large")])
def test_ddpm_loop(name, variance_type):
  CONFIGS["_tmp"] = dict(CONFIGS[name], variance_type=variance_type)
  try:
    worst = _loop("ddpm", "_tmp", 10, per_step=True)
    assert worst < 1e-6, worst
    worst = _loop("ddpm", "_tmp", 50)
    assert worst < _chain_tolerance(name), worst
  finally:
    del CONFIGS["_tmp"]


def test_batched_t_matches_scalar_t():
  cfg, schedule = _ours(_SD21)
  rng = np.random.default_rng(3)
  out, x, noise = (jnp.asarray(rng.standard_normal(_SHAPE), jnp.float32) for _ in range(3))
  t, prev_t = jnp.array([999, 19]), jnp.array([899, -81])
  for step, extra in ((_ddim_jit, (0.7, noise)), (_ddpm_jit, (noise,))):
    both = step(schedule, cfg, out, t, prev_t, x, *extra)
    for i in range(2):
      one = step(schedule, cfg, out[i:i + 1], t[i], prev_t[i], x[i:i + 1],
                 *[e[i:i + 1] if hasattr(e, "shape") else e for e in extra])
      np.testing.assert_allclose(both[i:i + 1], one, rtol=1e-6, atol=1e-6)


def test_no_retrace_on_new_t_or_eta():
  cfg, schedule = _ours(_SD15)
  traces = []

  def ddim(schedule, out, t, prev_t, x, eta, noise):
    traces.append("ddim")
    return steps_lib.ddim_step(schedule, cfg, out, t, prev_t, x, eta, noise)

  def ddpm(schedule, out, t, prev_t, x, noise):
    traces.append("ddpm")
    return steps_lib.ddpm_step(schedule, cfg, out, t, prev_t, x, noise)

  ddim, ddpm = jax.jit(ddim), jax.jit(ddpm)
  x = jnp.ones(_SHAPE)
  for t, prev_t, eta in ((981, 961, 0.0), (21, 1, 0.5), (1, -19, 1.0)):
    t, prev_t = jnp.int32(t), jnp.int32(prev_t)
    ddim(schedule, x, t, prev_t, x, jnp.float32(eta), x).block_until_ready()
    ddpm(schedule, x, t, prev_t, x, x).block_until_ready()
  assert traces == ["ddim", "ddpm"]


@pytest.mark.parametrize("key,value", [
    ("thresholding", True), ("trained_betas", [0.1] * 1000), ("beta_schedule", "sigmoid"),
    ("variance_type", "learned_range"), ("prediction_type", "flow"),
    ("timestep_spacing", "karras"), ("use_flow_sigmas", True), ("some_new_knob", 3),
    ("steps_offset", 1.5), ("clip_sample", "no"),
])
def test_refuses_unsupported(key, value):
  with pytest.raises(UnsupportedConfigError, match=key):
    sched_lib.SchedulerConfig.from_diffusers(dict(_SD15, **{key: value}))


def test_ignores_other_sampler_keys():
  euler = dict(_SD15, _class_name="EulerDiscreteScheduler", use_karras_sigmas=True,
               interpolation_type="linear", timestep_type="discrete", sigma_min=None,
               thresholding=False, trained_betas=None, dynamic_thresholding_ratio=0.995)
  from_diffusers = sched_lib.SchedulerConfig.from_diffusers
  assert from_diffusers(euler) == from_diffusers(_SD15)
