"""Stable Diffusion 2.1 (768 px, v-prediction) from a local diffusers folder.

  python -m lfs_jax.main --config=configs/sd21.py --workdir=runs/sd21 \
      --config.model.path=/models/stable-diffusion-2-1 --config.data.root=... \
      --config.data.classes=... --config.data.sessions=...
"""

from lfs_jax import config_base


def get_config():
  return config_base.use_local_sd(config_base.get_config(), resolution=768)
