"""The frozen base model and the concept list of a run, both from the config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lfs_jax import datasets
from lfs_jax.errors import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _dtype(name: str, field: str):
  if name not in DTYPES:
    raise ConfigError(f"{field} must be one of {sorted(DTYPES)}, got {name!r}")
  return DTYPES[name]


def load_base(model_cfg, seed: int, *, on_host: bool = False):
  """The base Stable Diffusion as a `weights.Pipeline` (params in model.param_dtype).

  Modules compute in model.compute_dtype; trainable leaves are kept in float32 by
  the session code whatever the storage dtype of the frozen base. With `on_host`
  the parameters stay numpy arrays in host memory, so that the caller places each
  leaf straight into its sharding (the whole base never lands on one device).
  """
  from lfs_jax import tiny  # pylint: disable=g-import-not-at-top
  from lfs_jax.models import attention  # pylint: disable=g-import-not-at-top
  from lfs_jax.models.unet_blocks import REMAT_POLICIES  # pylint: disable=g-import-not-at-top
  from lfs_jax.weights import loaders  # pylint: disable=g-import-not-at-top

  param_dtype = _dtype(model_cfg.param_dtype, "model.param_dtype")
  compute = _dtype(model_cfg.compute_dtype, "model.compute_dtype")
  if model_cfg.attention not in attention.IMPLEMENTATIONS:
    raise ConfigError(f"model.attention must be one of {list(attention.IMPLEMENTATIONS)}, "
                      f"got {model_cfg.attention!r}")
  if model_cfg.attention == "splash" and not attention.splash_available():
    raise ConfigError(
        "model.attention='splash' is a Pallas TPU kernel and this machine's JAX backend "
        f"is {jax.default_backend()!r}: use 'auto' (splash on TPU, cuDNN on GPU, XLA "
        "elsewhere) or 'xla'")
  if model_cfg.remat not in REMAT_POLICIES:
    raise ConfigError(f"model.remat must be one of {list(REMAT_POLICIES)}, "
                      f"got {model_cfg.remat!r}")
  if model_cfg.source == "tiny":
    pipe = tiny.pipeline(seed, dtype=param_dtype, attention=model_cfg.attention)
    if on_host:  # a few MB: a round trip through the device is harmless
      pipe = pipe._replace(**{k: jax.tree.map(np.asarray, getattr(pipe, k))
                              for k in ("unet_params", "vae_params", "text_encoder_params")})
  elif model_cfg.source == "local":
    if not model_cfg.path:
      raise ConfigError(
          "model.source='local' needs --config.model.path=/path/to/a diffusers "
          "Stable Diffusion folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/)")
    pipe = loaders.load_pipeline(model_cfg.path, dtype=param_dtype,
                                 attention=model_cfg.attention,
                                 variant=model_cfg.variant or None, on_host=on_host)
  else:
    raise ConfigError(f"model.source must be 'tiny' or 'local', got {model_cfg.source!r}")
  return pipe._replace(unet=pipe.unet.clone(dtype=compute, remat=model_cfg.remat),
                       vae=pipe.vae.clone(dtype=compute),
                       text_encoder=pipe.text_encoder.clone(dtype=compute))


# The dataset formats' reader table lives with the readers (datasets.FORMATS).
session_specs = datasets.session_specs
