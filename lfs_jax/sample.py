"""Images from a finished session: prompts -> (ICGen) sampling -> PNGs with JSON sidecars.

    run = runs.load_run(workdir)                        # latest finished session
    settings = SampleSettings.from_config(run.cfg)      # cfg.sample + cfg.icgen
    prompts, seeds = expand(["a <c1> dog on a beach"], settings)
    images, records = generate(run, prompts, seeds, settings)
    write_outputs(run, images, records)                 # <workdir>/samples/session_<k>/

Every image is one (prompt, seed) pair and depends on nothing else: batches are
padded to `sample.batch_size` (with copies of their last image), so every call has
the same shapes and the jitted functions of `diffusion.sampler` compile once per
process and model; a pair asked for twice is drawn once, and ICGen images (which
start late) are batched together where that skips UNet steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from PIL import Image

from lfs_jax import concepts as concepts_lib
from lfs_jax import data as data_lib
from lfs_jax import icgen
from lfs_jax import parallel
from lfs_jax import paths
from lfs_jax import runs
from lfs_jax.diffusion import sampler as sampler_lib
from lfs_jax.errors import ConfigError

_MAX_SEED = 2 ** 32 - 1


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """cfg.sample and cfg.icgen, validated once; built only by `from_config`, so every
  default is the config's (config_base), never a second copy here."""
  sampler: str
  steps: int
  guidance: float
  guidance_rescale: float
  eta: float
  num_images: int
  seed: int
  batch_size: int
  strength: float
  select: str

  def __post_init__(self):
    def need(ok, field, what):
      if not ok:
        raise ConfigError(f"{field}={getattr(self, field.split('.')[-1])!r}: {what}")
    need(self.sampler in sampler_lib.KINDS, "sample.sampler",
         f"use one of {list(sampler_lib.KINDS)}")
    need(self.steps >= 1, "sample.steps", "must be >= 1")
    need(self.num_images >= 1, "sample.num_images", "must be >= 1")
    need(self.batch_size >= 1, "sample.batch_size", "must be >= 1")
    need(0 <= self.seed <= _MAX_SEED, "sample.seed", f"must be in [0, {_MAX_SEED}]")
    need(self.eta >= 0, "sample.eta", "must be >= 0")
    need(0.0 <= self.guidance_rescale <= 1.0, "sample.guidance_rescale",
         "must be in [0, 1] (0 = off)")
    need(0.0 < self.strength <= 1.0, "icgen.strength",
         "must be in (0, 1] (1 = plain text-to-image)")
    need(self.select in icgen.SELECTS, "icgen.select", f"use one of {list(icgen.SELECTS)}")

  @classmethod
  def from_config(cls, cfg) -> "SampleSettings":
    s = cfg.sample
    return cls(sampler=s.sampler, steps=s.steps, guidance=float(s.guidance),
               guidance_rescale=float(s.guidance_rescale), eta=float(s.eta),
               num_images=s.num_images, seed=s.seed, batch_size=s.batch_size,
               strength=float(cfg.icgen.strength), select=cfg.icgen.select)


def expand(prompts: Sequence[str], settings: SampleSettings) -> Tuple[List[str], List[int]]:
  """`num_images` (prompt, seed) pairs per prompt, seeds seed, seed+1, ..."""
  if not prompts:
    raise ValueError("no prompt given")
  pairs = [(p, settings.seed + j) for p in prompts for j in range(settings.num_images)]
  if pairs[-1][1] > _MAX_SEED:
    raise ValueError(f"seeds run past {_MAX_SEED}")
  return [p for p, _ in pairs], [s for _, s in pairs]


def _latent_shape(run: runs.RunModel) -> Tuple[int, int, int]:
  vae = run.pipe.vae.config
  side = run.cfg.data.resolution // vae.downsample_factor
  return side, side, vae.latent_channels


def _plan(run: runs.RunModel, prompts: Sequence[str], seeds: Sequence[int],
          settings: SampleSettings, grid: np.ndarray, icgen_images: Sequence[bool]):
  """Per image: its record and its (scaled) context latent or None. Fails before sampling."""
  token_format = run.cfg.concepts.token_format
  named = {p: icgen.resolve(p, run.registry, token_format, run.session,
                           strict=run.cfg.sample.strict_tokens)
           for p in dict.fromkeys(prompts)}
  scale = run.pipe.vae.config.scaling_factor
  n = len(grid)
  start = int(sampler_lib.start_index(grid, settings.strength,
                                      run.pipe.scheduler.num_train_timesteps))
  records, latents = [], []
  for prompt, seed, may_icgen in zip(prompts, seeds, icgen_images):
    if not 0 <= int(seed) <= _MAX_SEED:
      raise ValueError(f"seed {seed} is not in [0, {_MAX_SEED}]")
    pc = named[prompt]
    rec = {"prompt": prompt, "seed": int(seed), "session": run.session,
           "sampler": settings.sampler, "steps": settings.steps,
           "guidance": settings.guidance, "guidance_rescale": settings.guidance_rescale,
           "eta": settings.eta,
           "strength": settings.strength, "select": settings.select,
           "concept": pc.concept, "concepts_named": pc.tokens, "icgen": False,
           "context_photo": None, "start_step": 0, "start_timestep": int(grid[0])}
    z = None
    if pc.concept is not None and settings.strength < 1.0 and may_icgen:
      key = icgen.bank_key(run.registry, pc.concept)
      latent, photo = icgen.context_latent(run.bank, key, settings.select, seed)
      z = latent * np.float32(scale)
      rec.update(icgen=True, context_photo=photo, start_step=start,
                 start_timestep=int(grid[start]) if start < n else None)
    elif not may_icgen:
      rec["strength"] = 1.0  # plain text-to-image, as asked
    records.append(rec)
    latents.append(z)
  return records, latents


def _batches(starts: Sequence[int], b: int, n_steps: int) -> List[List[int]]:
  """Indices of the images, in batches of at most b, that run the fewest UNet calls.

  A batch runs the sampler's steps from its earliest start (`start_step`) on, so
  ICGen images, which start late, cost less in batches of their own: either all
  images sorted by start (latest first) and cut every b, or each start's images
  batched apart (padding more), whichever runs fewer steps.
  """
  order = sorted(range(len(starts)), key=lambda j: -starts[j])
  mixed = [order[i:i + b] for i in range(0, len(order), b)]
  groups: Dict[int, List[int]] = {}
  for j in order:
    groups.setdefault(starts[j], []).append(j)
  apart = [g[i:i + b] for g in groups.values() for i in range(0, len(g), b)]
  cost = lambda batches: sum(n_steps - min(starts[j] for j in x) for x in batches)
  return apart if cost(apart) < cost(mixed) else mixed


def generate(run: runs.RunModel, prompts: Sequence[str], seeds: Sequence[int],
             settings: Optional[SampleSettings] = None, *,
             icgen_images: Optional[Sequence[bool]] = None,
             progress: bool = False,
             mesh: Optional[jax.sharding.Mesh] = None) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
  """One image per (prompt, seed) pair, with ICGen for prompts that name a concept.

  An image depends only on its prompt, seed and start (test_sample pins it), so a
  pair asked for twice is drawn once, and ICGen images, which start late, are
  batched together where that runs fewer UNet steps (`_batches`).

  Args:
    run: the session's model (runs.load_run).
    prompts: N prompts (repeat a prompt for several seeds; see `expand`).
    seeds: N image seeds (ints in [0, 2**32)).
    settings: sampler and ICGen settings (default: from run.cfg).
    icgen_images: N bools, False = that image plain text-to-image even if its
      prompt names a concept (default: ICGen for every such prompt while
      icgen.strength < 1), so that one call draws a variant with ICGen and one
      without.
    progress: show a progress bar over the batches.
    mesh: the devices to sample on (default: those of run.cfg.mesh; training's
      validation passes the run's own mesh).

  Returns:
    (images uint8 [N, H, W, 3], records): one dict per image (prompt, seed,
    settings, the concept it named and how ICGen started it).

  Raises:
    ValueError: an unknown modifier token (the message lists the known ones), a
      bad seed or setting; raised before any sampling.
  """
  settings = SampleSettings.from_config(run.cfg) if settings is None else settings
  if not prompts:
    raise ValueError("no prompt given")
  if len(prompts) != len(seeds):
    raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
  if icgen_images is not None and len(icgen_images) != len(prompts):
    raise ValueError(f"{len(prompts)} prompts but {len(icgen_images)} icgen_images")
  pipe = run.pipe
  spec = sampler_lib.SamplerSpec(settings.sampler, pipe.scheduler)
  schedule = sampler_lib.make_schedule(spec, settings.steps)
  records, latents = _plan(run, prompts, seeds, settings, np.asarray(schedule.timesteps),
                           [True] * len(prompts) if icgen_images is None else icgen_images)
  # The first image of each distinct (prompt, seed, ICGen or not) is drawn.
  keys = [(p, int(s), r["icgen"]) for p, s, r in zip(prompts, seeds, records)]
  first: Dict[Tuple[str, int, bool], int] = {}
  for j, k in enumerate(keys):
    first.setdefault(k, j)
  reps = list(first.values())

  b, sample_fn = settings.batch_size, _sampler(run, mesh)
  if sample_fn is not sampler_lib.sample_jit:  # one batch row per device at least
    b = -(-b // sample_fn.n_devices) * sample_fn.n_devices
  shape = _latent_shape(run)
  max_len = pipe.text_encoder.config.max_position_embeddings
  rows = jnp.asarray(run.token_rows, pipe.text_encoder.dtype)
  encode = lambda texts: sampler_lib.encode_text_jit(
      pipe.text_encoder_params, rows,
      jnp.asarray(concepts_lib.tokenize(pipe.tokenizer,
                                        [run.registry.expand(t) for t in texts], max_len)),
      text=pipe.text_encoder)
  uncond = encode([""] * b)[0]  # the same shapes as every batch: no extra compile
  scalars = [jnp.asarray(v, jnp.float32)
             for v in (settings.guidance, settings.strength, settings.eta,
                       settings.guidance_rescale)]
  drawn = {}
  batches = _batches([records[j]["start_step"] for j in reps], b, len(schedule.timesteps))
  for batch in tqdm.tqdm(batches, desc=f"sampling session {run.session}", unit="batch",
                         disable=not progress or jax.process_index() != 0,
                         dynamic_ncols=True):
    idx = [reps[t] for t in batch]
    rows_in = idx + idx[-1:] * (b - len(idx))  # padded with its last image: same start
    texts = [prompts[j] for j in rows_in]
    z = [np.zeros(shape, np.float32) if latents[j] is None else latents[j] for j in rows_in]
    out = sample_fn(
        pipe.unet_params, schedule, encode(texts), uncond,
        jnp.asarray([int(seeds[j]) for j in rows_in], jnp.uint32), jnp.asarray(np.stack(z)),
        jnp.asarray([latents[j] is not None for j in rows_in]), *scalars, unet=pipe.unet,
        spec=spec)
    drawn.update(zip((keys[j] for j in idx), decode_latents(run, out)))
  return np.stack([drawn[k] for k in keys]), records


class _MeshSampler:
  """`sampler.sample_on_mesh` with its arguments placed; the UNet tree placed once."""

  def __init__(self, mesh, frozen_mode: str, fsdp_min_size: int):
    self.mesh, self.mode, self.n_devices = mesh, frozen_mode, mesh.size
    self.min_size = fsdp_min_size
    self._placed = (None, None)  # (the host tree, its copy on the mesh)

  def __call__(self, unet_params, *args, unet, spec):
    fn, shardings = sampler_lib.sample_on_mesh(self.mesh, self.mode, unet_params,
                                               unet=unet, spec=spec,
                                               fsdp_min_size=self.min_size)
    if all(isinstance(x, jax.Array) and x.sharding == s for x, s in
           zip(jax.tree.leaves(unet_params), jax.tree.leaves(shardings[0]))):
      placed = unet_params  # laid out already by the caller, who keeps it (no copy held here)
    else:  # placed once for the calls that follow with the same tree
      if self._placed[0] is not unet_params:
        self._placed = (unet_params, parallel.put(unet_params, shardings[0]))
      placed = self._placed[1]
    args = [parallel.put(a, s) for a, s in zip(args, shardings[1:])]
    with jax.set_mesh(self.mesh):  # read by kernels that split the batch themselves (splash)
      out = fn(placed, *args)
    return parallel.to_host(out)


_MESH_SAMPLERS: Dict[Any, _MeshSampler] = {}


def _sampler(run: runs.RunModel, mesh=None):
  """`sampler.sample_jit` on one device (bit for bit as ever), else a mesh sampler.

  The run's (or the command line's) mesh.* settings choose the devices: with more
  than one, each sampler batch is split over them (batches grow to a multiple of
  the device count) and the UNet is laid out by mesh.frozen.
  """
  mesh = parallel.make_mesh(run.cfg.mesh) if mesh is None else mesh
  if mesh.size == 1:
    return sampler_lib.sample_jit
  key = (mesh, run.cfg.mesh.frozen, run.cfg.mesh.fsdp_min_size)
  if key not in _MESH_SAMPLERS:
    _MESH_SAMPLERS[key] = _MeshSampler(mesh, parallel.check_frozen_mode(run.cfg.mesh.frozen),
                                       run.cfg.mesh.fsdp_min_size)
  return _MESH_SAMPLERS[key]


def decode_latents(run: runs.RunModel, latents) -> np.ndarray:
  """Scaled latents [B, h, w, c] -> uint8 images [B, H, W, 3] (the VAE decoder)."""
  pipe = run.pipe
  out = sampler_lib.decode_jit(pipe.vae_params, jnp.asarray(latents, jnp.float32),
                               vae=pipe.vae, scaling_factor=pipe.vae.config.scaling_factor)
  return data_lib.to_uint8(jax.device_get(out))


def slug(prompt: str, max_len: int = 80) -> str:
  """"a <c1> dog, on grass" -> "a_c1_dog_on_grass" (file-name safe; "empty" for "")."""
  s = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:max_len].strip("_")
  return s or "empty"


def _slugs(prompts: Sequence[str]) -> Dict[str, str]:
  """A distinct slug per distinct prompt (a hash suffix where two would collide)."""
  out, taken = {}, set()
  for p in dict.fromkeys(prompts):
    s = slug(p)
    if s in taken:
      s = f"{s}_{hashlib.sha1(p.encode()).hexdigest()[:8]}"
    out[p] = s
    taken.add(s)
  return out


def png_bytes(image: np.ndarray) -> bytes:
  """A uint8 [H, W, 3] image as PNG file content."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def _save_png(path: str, image: np.ndarray) -> None:
  paths.write_bytes(path, png_bytes(image))


def _save_json(path: str, obj: Any) -> None:
  paths.write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def grid(images: np.ndarray) -> np.ndarray:
  """Images [n, H, W, 3] -> one near-square grid [rows*H, cols*W, 3] (black filler)."""
  n, h, w, c = images.shape
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  canvas = np.zeros((rows * h, cols * w, c), images.dtype)
  for i, im in enumerate(images):
    r, q = divmod(i, cols)
    canvas[r * h:(r + 1) * h, q * w:(q + 1) * w] = im
  return canvas


def write_outputs(run: runs.RunModel, images: np.ndarray, records: Sequence[Mapping],
                  out_dir: Optional[str] = None) -> List[str]:
  """Writes each image, its JSON sidecar, and a grid per prompt; atomically (tmp + rename).

  Files, in `<workdir>/samples/session_<k>/` by default:
    <slug>_seed<seed>.png, <slug>_seed<seed>.json (the record + the run's config),
    <slug>_grid.png (this call's images of the prompt, in order).

  Returns:
    The paths written.
  """
  if jax.process_index() != 0:
    return []
  out_dir = out_dir or os.path.join(run.workdir, "samples", f"session_{run.session}")
  paths.makedirs(out_dir)
  slugs = _slugs([r["prompt"] for r in records])
  config = json.loads(json.dumps(run.cfg.to_dict(), default=list))
  written = []
  for image, rec in zip(images, records):
    stem = os.path.join(out_dir, f"{slugs[rec['prompt']]}_seed{rec['seed']}")
    _save_png(stem + ".png", image)
    _save_json(stem + ".json", {**rec, "workdir": paths.abspath(run.workdir),
                                "config": config})
    written += [stem + ".png", stem + ".json"]
  for prompt, s in slugs.items():
    mine = np.stack([im for im, r in zip(images, records) if r["prompt"] == prompt])
    path = os.path.join(out_dir, f"{s}_grid.png")
    _save_png(path, grid(mine))
    written.append(path)
  return written


def sample_run(workdir: str, prompts: Sequence[str], *, session: Optional[int] = None,
               overrides: Optional[Mapping[str, Any]] = None,
               progress: bool = True) -> Tuple[runs.RunModel, List[str]]:
  """What `--mode=sample` does: load the session, sample every prompt, write the files.

  Args:
    workdir: the run directory.
    prompts: the prompts (each gets `sample.num_images` seeds).
    session: the session (None = the latest finished).
    overrides: dotted config fields from the command line (sample.*, icgen.*).
    progress: show a progress bar.

  Returns:
    (the session's RunModel, the paths written).
  """
  cfg = runs.run_config(workdir, overrides)
  settings = SampleSettings.from_config(cfg)
  run = runs.load_run(workdir, session, cfg=cfg)
  all_prompts, seeds = expand(prompts, settings)
  images, records = generate(run, all_prompts, seeds, settings, progress=progress)
  return run, write_outputs(run, images, records)
