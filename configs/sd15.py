"""Stable Diffusion 1.5 (512 px, epsilon) from a local diffusers folder.

  python -m lfs_jax.main --config=configs/sd15.py --workdir=runs/sd15 \
      --config.model.path=/models/stable-diffusion-v1-5 \
      --config.data.root=/data/my_concepts --config.data.classes=teddy=teddybear,mug=mug \
      --config.data.sessions="teddy;mug"
"""

from lfs_jax import config_base


def get_config():
  return config_base.use_local_sd(config_base.get_config(), resolution=512)
