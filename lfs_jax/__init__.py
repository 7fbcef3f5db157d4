"""lfs_jax: lifelong few-shot customization of Stable Diffusion in JAX/Flax."""

__version__ = "0.1.0"
