"""The embedded default: a tiny random Stable-Diffusion-shaped model, the bundled
photos (dog, cat, dog2 from DreamBooth, 64 px), three sessions; CPU, minutes.

  python -m lfs_jax.main --config=configs/tiny.py --workdir=/tmp/lfs_tiny
"""

from lfs_jax import config_base


def get_config():
  return config_base.get_config()
