"""Local diffusers / transformers folders -> Flax parameter trees (safetensors only)."""

from lfs_jax.weights.convert import WeightsMismatchError
from lfs_jax.weights.files import PickleRefusedError, WeightsNotFoundError
from lfs_jax.weights.loaders import (Pipeline, load_clip, load_dino, load_pipeline,
                                     load_scheduler_config, load_text_encoder,
                                     load_tokenizer, load_unet, load_vae)
from lfs_jax.weights.safetensors_io import SafetensorsError

__all__ = [
    "Pipeline", "PickleRefusedError", "SafetensorsError", "WeightsMismatchError",
    "WeightsNotFoundError", "load_clip", "load_dino", "load_pipeline", "load_scheduler_config",
    "load_text_encoder", "load_tokenizer", "load_unet", "load_vae",
]
