"""A tiny random Stable-Diffusion-shaped model, built in process (no weights needed).

Same component types, configs and parameter paths as SD 1.x, only small: the real
CLIP tokenizer (bundled), a 2-layer text encoder of width 32 over the full 49,408
token vocabulary, a 2-level UNet and a 2-level VAE (32 px images, 16x16 latents).
It can also be written as a diffusers folder, which the standard loaders read.
"""

from __future__ import annotations

import json
import os
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from lfs_jax.diffusion import schedule
from lfs_jax.models import clip, unet, vae
from lfs_jax.weights import convert, loaders, safetensors_io

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
TOKENIZER_DIR = os.path.join(ASSETS, "clip_tokenizer")

UNET = {
    "_class_name": "UNet2DConditionModel",
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "attention_head_dim": 2,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "in_channels": 4,
    "out_channels": 4,
    "sample_size": 16,
}
VAE = {
    "_class_name": "AutoencoderKL",
    "block_out_channels": [16, 32],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 4,
    "in_channels": 3,
    "out_channels": 3,
    "sample_size": 32,
    "scaling_factor": 0.18215,
}
TEXT = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
}
# Stable Diffusion 1.5's scheduler config.
SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}

# What diffusers' StableDiffusionPipeline.from_pretrained reads to find the components.
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", SCHEDULER["_class_name"]],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", UNET["_class_name"]],
    "vae": ["diffusers", VAE["_class_name"]],
}


def _init_leaf(rng: np.random.Generator, path, shape) -> np.ndarray:
  """Flax-like default init by leaf name: lecun-normal kernels, N(0, 0.02) embeddings."""
  name = path[-1]
  if name == "scale":
    return np.ones(shape, np.float32)
  if name == "bias":
    return np.zeros(shape, np.float32)
  if name == "embedding":
    return (0.02 * rng.standard_normal(shape)).astype(np.float32)
  fan_in = int(np.prod(shape[:-1]))
  return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def random_params(seed: int) -> Dict[str, dict]:
  """Random parameter trees {"unet", "vae", "text_encoder"}, deterministic in `seed`.

  Drawn with numpy over the shapes from `jax.eval_shape`: compiling each module's
  `init` would cost about a minute on a CPU for no benefit.
  """
  abstract = {
      "unet": unet.abstract_params(unet.UNetConfig.from_diffusers(UNET)),
      "vae": vae.abstract_params(vae.VAEConfig.from_diffusers(VAE)),
      "text_encoder": clip.abstract_params(clip.CLIPTextConfig.from_transformers(TEXT)),
  }
  return {name: random_tree(tree, [seed, i])
          for i, (name, tree) in enumerate(sorted(abstract.items()))}


def random_tree(abstract_tree, seed) -> dict:
  """Arrays for an abstract parameter tree (ShapeDtypeStructs), deterministic in `seed`."""
  rng = np.random.default_rng(seed)
  flat = convert.flatten(abstract_tree)
  return convert.unflatten(
      {p: jnp.asarray(_init_leaf(rng, p, leaf.shape)) for p, leaf in sorted(flat.items())})


def save_folder(params: Dict[str, dict], folder: str) -> None:
  """Writes the tiny model as a diffusers Stable Diffusion folder (safetensors).

  A complete pipeline folder: diffusers' `StableDiffusionPipeline.from_pretrained`
  loads it too (no safety checker), which the interop tests use as the client.
  """
  write_folder(params, folder, unet_config=UNET, vae_config=VAE, text_config=TEXT,
               scheduler_config=SCHEDULER)


def write_folder(params: Dict[str, dict], folder: str, *, unet_config: dict,
                 vae_config: dict, text_config: dict, scheduler_config: dict) -> None:
  """Any small SD-shaped model (params {"unet", "vae", "text_encoder"}) as a diffusers folder."""
  files = {"unet": ("diffusion_pytorch_model.safetensors", unet_config),
           "vae": ("diffusion_pytorch_model.safetensors", vae_config),
           "text_encoder": ("model.safetensors", text_config)}
  for comp, (name, cfg) in files.items():
    os.makedirs(os.path.join(folder, comp), exist_ok=True)
    with open(os.path.join(folder, comp, "config.json"), "w") as f:
      json.dump(cfg, f, indent=2)
    safetensors_io.save_file(convert.flax_to_torch(params[comp]),
                             os.path.join(folder, comp, name), metadata={"format": "pt"})
  os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
  with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(scheduler_config, f, indent=2)
  tok = os.path.join(folder, "tokenizer")
  os.makedirs(tok, exist_ok=True)
  for name in os.listdir(TOKENIZER_DIR):
    if name.endswith((".json", ".txt")) or name == "NOTICE.md":  # the license travels too
      with open(os.path.join(TOKENIZER_DIR, name), "rb") as src, \
           open(os.path.join(tok, name), "wb") as dst:
        dst.write(src.read())
  index = dict(MODEL_INDEX, scheduler=["diffusers", scheduler_config["_class_name"]])
  with open(os.path.join(folder, "model_index.json"), "w") as f:
    json.dump(index, f, indent=2)


def pipeline(seed: int, *, dtype=jnp.float32, attention: str = "xla"):
  """The tiny model as a `weights.Pipeline` (modules + random params)."""
  p = jax.tree.map(lambda x: x.astype(dtype), random_params(seed))
  return loaders.Pipeline(
      unet=unet.UNet2DConditionModel(unet.UNetConfig.from_diffusers(UNET), dtype=dtype,
                                     attention=attention),
      unet_params=p["unet"],
      vae=vae.AutoencoderKL(vae.VAEConfig.from_diffusers(VAE), dtype=dtype,
                            attention=attention),
      vae_params=p["vae"],
      text_encoder=clip.CLIPTextModel(clip.CLIPTextConfig.from_transformers(TEXT),
                                      dtype=dtype, attention=attention),
      text_encoder_params=p["text_encoder"],
      tokenizer=loaders.load_tokenizer(TOKENIZER_DIR),
      scheduler=schedule.SchedulerConfig.from_diffusers(SCHEDULER))
