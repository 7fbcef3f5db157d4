"""The jitted sampler: classifier-free guided DDIM / DDPM, one loop over a step grid.

An In-Context Generation start (DESIGN 1.2) is only a different initial latent and
start index. For the descending grid t_0 > t_1 > ... > t_{N-1}, image i with a
context latent z_i and strength s < 1 starts at the first index whose timestep is
<= s*T, from add_noise(z_i, eps_i, t_start); the steps before its start leave it
unchanged (`jnp.where`), so shapes stay static and a new s never recompiles. Every
other image (no concept named, or s >= 1) starts from eps_i at index 0, exactly as
plain text-to-image sampling: s = 1 gives the same bits as no ICGen at all.

Each image draws its randomness from its own key `jax.random.key(seed_i)` (folded
by purpose and step), so an image never depends on the rest of its batch.
Prompts, seeds, guidance, strength and eta are traced arrays; only the modules,
the sampler kind and the array shapes (batch, steps, latent size) are static.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lfs_jax import parallel
from lfs_jax.diffusion import schedule as schedule_lib
from lfs_jax.diffusion import steps as steps_lib

KINDS = ("ddim", "ddpm")
# Timesteps are integers: float32 rounding of s*T stays far below this.
_T_S_SLACK = 1e-3
# Purposes folded into each image's key.
_INIT, _STEP = 0, 1
# How many times each jitted function below was traced (a retrace is a recompile).
TRACES: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """Static (hashable) description of a sampler."""
  kind: str                                  # "ddim" | "ddpm"
  scheduler: schedule_lib.SchedulerConfig    # the model's noise schedule config

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"sample.sampler must be one of {list(KINDS)}, got {self.kind!r}")


class SamplingSchedule(NamedTuple):
  """The noise schedule and the step grid of one sampling run (a pytree of arrays)."""
  noise: schedule_lib.NoiseSchedule
  timesteps: jax.Array        # [N] int32, descending
  prev_timesteps: jax.Array   # [N] int32, the timestep each step lands on (< 0: clean)


def make_schedule(spec: SamplerSpec, num_steps: int) -> SamplingSchedule:
  """The grid of `num_steps` steps, paired as diffusers' DDIM / DDPM schedulers pair them."""
  ts = schedule_lib.inference_timesteps(spec.scheduler, num_steps)
  prev = schedule_lib.previous_timesteps(spec.scheduler, ts, spec.kind)
  return SamplingSchedule(schedule_lib.make_schedule(spec.scheduler),
                          jnp.asarray(ts, jnp.int32), jnp.asarray(prev, jnp.int32))


def start_index(timesteps, strength, num_train_timesteps: int):
  """Index of the first grid timestep <= s*T (len(grid) if none), numpy or jnp.

  Args:
    timesteps: the descending grid [N] int.
    strength: s, a scalar.
    num_train_timesteps: T.

  Returns:
    int32 scalar in [0, N].
  """
  xp = jnp if isinstance(timesteps, jax.Array) or isinstance(strength, jax.Array) else np
  t_s = xp.asarray(strength, xp.float32) * xp.float32(num_train_timesteps)
  # s*T in float32 misses the exact product by up to ~3e-5 (s = 0.251: 250.99998):
  # a grid timestep within _T_S_SLACK above it is taken as <= s*T (t_s = 251 there).
  return xp.sum(xp.asarray(timesteps).astype(xp.float32) > t_s + _T_S_SLACK).astype(xp.int32)


def _per_image_normal(keys: jax.Array, shape, fold) -> jax.Array:
  """One N(0, I) draw of `shape` per key, each from fold_in(key, fold): [B, *shape]."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, fold), shape,
                                              jnp.float32))(keys)


def _keys(seeds: jax.Array) -> jax.Array:
  return jax.vmap(jax.random.key)(jnp.asarray(seeds).astype(jnp.uint32))


def initial_noise(seeds: jax.Array, shape) -> jax.Array:
  """The ε each image starts from (or noises its context with): [B, *shape] float32.

  Args:
    seeds: [B] image seeds.
    shape: the latent shape (h, w, c).
  """
  return _per_image_normal(_keys(seeds), tuple(shape), _INIT)


def step_noise(seeds: jax.Array, step, shape) -> jax.Array:
  """The ε that DDPM (or DDIM with η > 0) adds at grid index `step`: [B, *shape] float32."""
  keys = jax.vmap(lambda k: jax.random.fold_in(k, _STEP))(_keys(seeds))
  return _per_image_normal(keys, tuple(shape), step)


def sample(unet_params, schedule: SamplingSchedule, context: jax.Array, uncond: jax.Array,
           seeds: jax.Array, context_latents: jax.Array, has_context: jax.Array,
           guidance: jax.Array, strength: jax.Array, eta: jax.Array,
           guidance_rescale: jax.Array = 0.0, *, unet, spec: SamplerSpec) -> jax.Array:
  """Runs the reverse process for a batch of prompts; pure (same inputs, same bits).

  Args:
    unet_params: the full UNet tree (base merged with a session's delta).
    schedule: the step grid and noise schedule.
    context: [B, L, D] text embeddings of the prompts.
    uncond: [L, D] the empty prompt's embedding (classifier-free guidance).
    seeds: [B] uint32, one per image.
    context_latents: [B, h, w, c] ICGen start latents, already multiplied by the
      VAE scaling factor (any values where has_context is False); also fixes the
      latent shape.
    has_context: [B] bool, the prompt names a concept of the bank.
    guidance: scalar w: eps = eps_u + w (eps_c - eps_u).
    strength: scalar s of ICGen; s >= 1 ignores the context latents.
    eta: scalar DDIM eta (unused by DDPM).
    guidance_rescale: scalar phi in [0, 1] (Lin et al. 2023, diffusers'
      `guidance_rescale`): the guided output is rescaled to the conditional output's
      per-image standard deviation and mixed back, phi * rescaled + (1 - phi) * guided;
      0 leaves it as it is, bit for bit.
    unet: the UNet module (static).
    spec: the sampler (static).

  Returns:
    [B, h, w, c] float32 clean latents (scaled, as the UNet sees them).
  """
  TRACES["sample"] += 1
  n = schedule.timesteps.shape[0]
  shape = context_latents.shape[1:]
  guidance = jnp.asarray(guidance, jnp.float32)
  strength = jnp.asarray(strength, jnp.float32)
  guidance_rescale = jnp.asarray(guidance_rescale, jnp.float32)

  eps = initial_noise(seeds, shape)
  icgen = has_context & (strength < 1.0)
  start = jnp.where(icgen, start_index(schedule.timesteps, strength,
                                       spec.scheduler.num_train_timesteps), 0)
  z = context_latents.astype(jnp.float32)
  t_start = schedule.timesteps[jnp.minimum(start, n - 1)]
  noised = schedule_lib.add_noise(schedule.noise, z, eps, t_start)
  # start == n: no grid timestep is <= s*T; the context comes back as it is.
  x = jnp.where(icgen[:, None, None, None],
                jnp.where((start < n)[:, None, None, None], noised, z), eps)
  cond_uncond = jnp.concatenate(
      [jnp.broadcast_to(uncond.astype(context.dtype), context.shape), context])

  def step(i, carry):
    x, solver = carry
    t, prev = schedule.timesteps[i], schedule.prev_timesteps[i]
    active = i >= start
    x_in = jnp.concatenate([x, x])
    t_in = jnp.full((x_in.shape[0],), t, jnp.int32)
    out = unet.apply({"params": unet_params}, x_in, t_in, cond_uncond).astype(jnp.float32)
    out_u, out_c = jnp.split(out, 2)
    guided = rescale_guided(out_u + guidance * (out_c - out_u), out_c, guidance_rescale)
    noise = step_noise(seeds, i, shape)
    if spec.kind == "ddim":
      x_new = steps_lib.ddim_step(schedule.noise, spec.scheduler, guided, t, prev, x, eta,
                                  noise)
    else:
      x_new = steps_lib.ddpm_step(schedule.noise, spec.scheduler, guided, t, prev, x, noise)
    # DDIM and DDPM need nothing from earlier steps (solver state ()); a multistep
    # solver (DPM-Solver++) would update its per-image history here, kept like x.
    solver_new = solver
    keep = lambda new, old: jnp.where(
        active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    return keep(x_new, x), jax.tree.map(keep, solver_new, solver)

  # Steps before every image's start are skipped outright (no UNet call).
  body = lambda i, c: jax.lax.cond(jnp.any(i >= start), step, lambda _, c: c, i, c)
  x, _ = jax.lax.fori_loop(0, n, body, (x, _solver_state(spec, x)))
  return x


def rescale_guided(guided: jax.Array, cond: jax.Array, phi: jax.Array) -> jax.Array:
  """Classifier-free guidance rescale ("Common Diffusion Noise Schedules and Sample
  Steps are Flawed", Lin et al. 2023, eq. 15-16): guidance w > 1 inflates the output's
  scale, which over-saturates a zero-terminal-SNR v-prediction model's images; the
  guided output [B, ...] is scaled to the standard deviation of the conditional one,
  per image, and mixed with itself by phi. phi == 0 returns `guided` unchanged."""
  axes = tuple(range(1, guided.ndim))
  rescaled = guided * (jnp.std(cond, axis=axes, keepdims=True)
                       / jnp.std(guided, axis=axes, keepdims=True))
  return jnp.where(phi > 0, phi * rescaled + (1 - phi) * guided, guided)


def _solver_state(spec: SamplerSpec, x: jax.Array):
  """The state the loop carries beside the latents: a pytree of [B, ...] arrays.

  Empty for DDIM and DDPM. A multistep solver starts its history here (for
  DPM-Solver++(2M): the previous x0 prediction and its timestep, per image), so
  adding one changes `step` and this function, not the loop.
  """
  del spec, x
  return ()


def encode_text(text_params, rows: jax.Array, ids: jax.Array, *, text) -> jax.Array:
  """Prompt ids [N, L] -> text embeddings [N, L, D]; rows [R, D] are the modifier tokens'."""
  TRACES["encode_text"] += 1
  return text.apply({"params": text_params}, ids, extra_embeddings=rows)


def decode(vae_params, latents: jax.Array, *, vae, scaling_factor: float) -> jax.Array:
  """Scaled latents [B, h, w, c] -> images [B, H, W, 3] float32 in about [-1, 1]."""
  TRACES["decode"] += 1
  images = vae.apply({"params": vae_params}, latents / scaling_factor, method="decode")
  return images.astype(jnp.float32)


# Jitted once per process: the modules and the spec are static (hashable), the
# parameter trees are arguments, never closed-over constants.
sample_jit = jax.jit(sample, static_argnames=("unet", "spec"))
_ON_MESH: dict = {}


def sample_on_mesh(mesh, frozen_mode: str, unet_params, *, unet, spec: SamplerSpec,
                   fsdp_min_size: int):
  """`sample` jitted for a mesh: the batch split over all its devices.

  The UNet tree is laid out as the training's frozen base (`frozen_mode`:
  replicated or the FSDP rule of lfs_jax.parallel, leaves of fewer than
  `fsdp_min_size` elements whole); the prompt batch (context,
  seeds, context latents, flags) and the output are split over ("data", "fsdp");
  the rest is replicated. Each image still draws only from its own seed, so a
  batch split over devices gives the images of `sample_jit` up to float rounding.
  One jitted function per (mesh, mode, tree shape, unet, spec), built once.

  Returns:
    (fn, in_shardings): call `fn(*args)` with the eleven positional arguments of
    `sample` placed by `in_shardings` (parallel.put).
  """
  leaves, treedef = jax.tree.flatten(unet_params)
  key = (mesh, frozen_mode, fsdp_min_size, treedef, tuple(np.shape(x) for x in leaves), unet,
         spec)
  if key not in _ON_MESH:
    rep, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    params = parallel.frozen_shardings(unet_params, mesh, frozen_mode, fsdp_min_size)
    in_shardings = (params, rep, batch, rep, batch, batch, batch, rep, rep, rep, rep)
    # jit takes no static keywords together with in_shardings: bind them instead.
    fn = jax.jit(functools.partial(sample, unet=unet, spec=spec), in_shardings=in_shardings,
                 out_shardings=batch)
    _ON_MESH[key] = (fn, in_shardings)
  return _ON_MESH[key]
encode_text_jit = jax.jit(encode_text, static_argnames=("text",))
decode_jit = jax.jit(decode, static_argnames=("vae", "scaling_factor"))
