"""A run's preparation: everything checked and loaded once, before its first session.

`prepare` validates the config, the dataset, the photos, the tokens and the base
model folder (all of it fails here, before anything is written), writes config.json,
generates prior preservation's class images with the base (or reads them from
<workdir>/prior/) and builds the `Run` every session shares (train/session.py).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import jax
import ml_collections
import numpy as np

from lfs_jax import base as base_lib
from lfs_jax import concepts as concepts_lib
from lfs_jax import data as data_lib
from lfs_jax import delta as delta_lib
from lfs_jax import parallel
from lfs_jax import paths
from lfs_jax import runs
from lfs_jax.diffusion import schedule as schedule_lib
from lfs_jax.errors import ConfigError
from lfs_jax.train import kd as kd_lib
from lfs_jax.train import losses
from lfs_jax.train import prior as prior_lib
from lfs_jax.train import validation as validation_lib


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
  max_new: int                     # largest session, in token rows (concepts x vectors)
  max_kd: int                      # most DFKD conditions of any session
  first: int                       # run session of sessions[0] (2 after an imported session 1)
  encode: Callable                 # jitted VAE encoder
  text: Callable                   # jitted text encoder
  prior_images: Dict[str, np.ndarray]  # class word -> uint8 [prior.count, R, R, 3] ({} = off)
  max_prior: int                   # most class images of any session (0 without prior.weight)


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
  vectors = cfg.concepts.vectors
  concepts_lib.check_vectors(vectors)  # before the base is loaded
  selection = delta_lib.from_config(cfg.train)
  validation_lib.check_config(cfg)
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
                                    vocab=vocab, initializer=cfg.concepts.initializer,
                                    vectors=vectors)
  kd_counts = [len(kd_lib.prompts(cfg, registry, k) or [""])
               for k in range(first, first + len(sessions))]
  spec = losses.make_spec(cfg, mesh=mesh, scaling_factor=pipe.vae.config.scaling_factor,
                          scheduler=pipe.scheduler, selection=selection,
                          lfs=cfg.method == "lfs")
  # Prior preservation: the classes of each session's concepts, class images per session.
  session_classes = [list(dict.fromkeys(c.class_word for c in registry.in_session(k)))
                     for k in range(first, first + len(sessions))]

  paths.makedirs(workdir)
  parallel.barrier("lfs_jax: run checked")  # every process looked before process 0 writes
  if not exists:
    runs.write_config(workdir, cfg.to_dict())
  _check_shared(workdir)
  prior_images = {}
  if spec.prior_weight > 0:  # the base, before any session: generated once, then cached
    prior_images = prior_lib.class_images(prior_lib.run_sampling(cfg, stored), workdir, pipe,
                                          sum(session_classes, []))
    parallel.barrier("lfs_jax: class images written")
  return Run(
      cfg, workdir, pipe, mesh,
      parallel.put(schedule_lib.make_schedule(pipe.scheduler), parallel.replicated(mesh)),
      selection, spec,
      losses.Models(unet=pipe.unet, text=pipe.text_encoder),
      sessions, images, registry,
      max_images=max(sum(len(images[c.name]) for c in s) for s in sessions),
      max_new=max(sum(c.vectors for c in registry.in_session(k))
                  for k in range(first, first + len(sessions))), max_kd=max(kd_counts), first=first,
      encode=jax.jit(lambda p, x: pipe.vae.apply({"params": p}, x, method="encode")),
      text=jax.jit(lambda p, ids, rows: pipe.text_encoder.apply(
          {"params": p}, ids, extra_embeddings=rows)),
      prior_images=prior_images,
      max_prior=max((sum(len(prior_images[w]) for w in ws) for ws in session_classes),
                    default=0) if prior_images else 0)


def check_storage(cfg, workdir: str) -> None:
  """The URLs a training run reads or writes answer, before anything is loaded or written.

  Raises:
    paths.StorageError: naming the path, its setting and why (no backend for the
      scheme, no credentials, no such bucket or folder).
  """
  paths.check(workdir, "--workdir", must_exist=False)
  if cfg.model.source == "local" and cfg.model.path:
    paths.check(cfg.model.path, "model.path")
  if cfg.data.root:
    paths.check(cfg.data.root, "data.root")
  if cfg.compile_cache:  # jax writes it through etils.epath; a bad URL would only warn
    paths.check(cfg.compile_cache, "compile_cache", must_exist=False)


def _check_shared(workdir: str) -> None:
  """Every process sees the config.json that process 0 wrote: one workdir for all."""
  if jax.process_count() == 1:
    return
  parallel.barrier("lfs_jax: config written")
  missing = runs.stored_config(workdir) is None
  if parallel.agree_any(missing):
    raise ConfigError(
        f"--workdir={workdir}: process {jax.process_index()} "
        f"{'does not see' if missing else 'sees, but another process does not see,'} "
        "the config.json that process 0 wrote there. Every process must name the same "
        "folder on storage every host sees (a shared filesystem or a bucket URL)")


def base_delta(run: Run) -> Dict[str, Any]:
  """The "session 0" delta (`Selection.initial`: for a leaf selection the base's own
  leaves) and no token rows."""
  d = run.pipe.text_encoder.config.hidden_size
  return {"unet": run.selection.initial(run.pipe.unet_params, run.cfg.seed),
          "tokens": np.zeros((0, d), np.float32)}
