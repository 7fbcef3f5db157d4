"""Entry points: a diffusers Stable Diffusion folder -> Flax modules and params.

A folder may be a URL (`gs://...`): files are read through `lfs_jax.paths`.

Each loader takes either the whole model folder (with unet/, vae/, text_encoder/,
tokenizer/, scheduler/) or the one component folder. Loading is all-or-nothing:
the config is validated, every tensor is read and checked against the module built
from that config, and only then are parameters put on the device (or handed back in
host memory, `on_host=True`, for a caller that places them with their shardings).
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple, Optional, Tuple

import jax.numpy as jnp

from lfs_jax import paths
from lfs_jax.models import clip, clip_vision, dino, unet, vae
from lfs_jax.weights import convert, files, preprocess

# What CLIPTokenizer.from_pretrained may read from a tokenizer folder.
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "tokenizer.json")

_EXPECTED_CLASS = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
}


def _check_class(folder: str, config: dict, component: str) -> None:
  name = config.get("_class_name")
  if name is not None and name not in _EXPECTED_CLASS[component]:
    raise ValueError(
        f"{folder}/config.json describes a {name}, expected "
        f"{' or '.join(_EXPECTED_CLASS[component])} for the {component}")


def load_unet(path: str, *, dtype=jnp.float32, attention: str = "xla",
              variant: Optional[str] = None,
              on_host: bool = False) -> Tuple[unet.UNet2DConditionModel, dict]:
  """Loads a diffusers UNet2DConditionModel folder (or a model folder's unet/).

  Args:
    path: the model folder or its unet/ subfolder.
    dtype: parameter dtype (float32 default; bfloat16 halves memory).
    attention: "xla", "cudnn" or "auto" (see models.attention).
    variant: weight-file variant, e.g. "fp16".
    on_host: keep the parameters in host memory as numpy arrays (the caller places
      them, e.g. straight into their shardings) instead of on the default device.

  Returns:
    (module, params) with `module.apply({"params": params}, x, t, ctx)`.
  """
  folder = files.component_folder(path, "unet")
  config = files.read_config(folder)
  _check_class(folder, config, "unet")
  cfg = unet.UNetConfig.from_diffusers(config)
  params = convert.torch_to_flax(
      files.read_state(folder, variant), unet.abstract_params(cfg), dtype=dtype,
      source=folder, on_host=on_host)
  return unet.UNet2DConditionModel(cfg, dtype=dtype, attention=attention), params


def load_vae(path: str, *, dtype=jnp.float32, attention: str = "xla",
             variant: Optional[str] = None,
             on_host: bool = False) -> Tuple[vae.AutoencoderKL, dict]:
  """Loads a diffusers AutoencoderKL folder (or a model folder's vae/); see load_unet."""
  folder = files.component_folder(path, "vae")
  config = files.read_config(folder)
  _check_class(folder, config, "vae")
  cfg = vae.VAEConfig.from_diffusers(config)
  params = convert.torch_to_flax(
      files.read_state(folder, variant), vae.abstract_params(cfg), dtype=dtype,
      rename=vae.legacy_rename, source=folder, on_host=on_host)
  return vae.AutoencoderKL(cfg, dtype=dtype, attention=attention), params


def load_text_encoder(path: str, *, dtype=jnp.float32, attention: str = "xla",
                      variant: Optional[str] = None,
                      on_host: bool = False) -> Tuple[clip.CLIPTextModel, dict]:
  """Loads a transformers CLIPTextModel folder (or a model folder's text_encoder/)."""
  folder = files.component_folder(path, "text_encoder")
  cfg = clip.CLIPTextConfig.from_transformers(files.read_config(folder))
  params = convert.torch_to_flax(
      files.read_state(folder, variant), clip.abstract_params(cfg), dtype=dtype,
      ignore=clip.IGNORED_KEYS, rename=clip.torch_rename, source=folder, on_host=on_host)
  return clip.CLIPTextModel(cfg, dtype=dtype, attention=attention), params


def load_clip(path: str, *, dtype=jnp.float32, attention: str = "xla",
              variant: Optional[str] = None):
  """Loads a local Hugging Face CLIPModel folder (the evaluation model).

  The folder holds config.json (model_type "clip"), model.safetensors (or shards)
  and the preprocessor_config.json of its CLIPImageProcessor; transformers 4 and 5
  save a CLIPModel under the same names (`text_model.`, `vision_model.`, ...).

  Args:
    path: the folder, e.g. a local copy of openai/clip-vit-base-patch32.
    dtype: parameter dtype (float32 default).
    attention: "xla", "cudnn" or "auto" (see models.attention).
    variant: weight-file variant, e.g. "fp16".

  Returns:
    (module, params, preprocess_config): a clip_vision.CLIPModel, its parameters and
    the weights.preprocess.PreprocessConfig that prepares its pixel_values.

  Raises:
    WeightsNotFoundError: the folder, config.json, preprocessor_config.json or the
      weights are missing.
    UnsupportedConfigError: naming a config field we do not implement (or a folder
      that is not a CLIPModel).
    ValueError: the preprocessor crops to another size than the model takes.
    WeightsMismatchError: naming the first tensor that does not fit.
  """

  cfg = clip_vision.CLIPConfig.from_transformers(files.read_config(path))
  processor = preprocess.PreprocessConfig.from_folder(path)
  if processor.output_size != (cfg.vision.image_size,) * 2:
    raise ValueError(
        f"{path}/preprocessor_config.json resizes/crops to {processor.output_size}, but the vision "
        f"model takes {cfg.vision.image_size}x{cfg.vision.image_size} images")
  params = convert.torch_to_flax(
      files.read_state(path, variant), clip_vision.abstract_params(cfg), dtype=dtype,
      ignore=clip_vision.IGNORED_KEYS, source=path)
  return clip_vision.CLIPModel(cfg, dtype=dtype, attention=attention), params, processor


def load_dino(path: str, *, dtype=jnp.float32, attention: str = "xla",
              variant: Optional[str] = None):
  """Loads a local Hugging Face ViTModel or Dinov2Model folder (the DINO image encoder).

  The folder holds config.json (model_type "vit" or "dinov2"), model.safetensors (or
  shards) and the preprocessor_config.json of its image processor (ViTImageProcessor
  for DINO v1, e.g. facebook/dino-vits16; BitImageProcessor for DINOv2).

  Args:
    path: the folder.
    dtype: parameter dtype (float32 default).
    attention: "xla", "cudnn" or "auto" (see models.attention).
    variant: weight-file variant, e.g. "fp16".

  Returns:
    (module, params, preprocess_config): a dino.DinoViT, its parameters and the
    weights.preprocess.PreprocessConfig that prepares its pixel_values.

  Raises:
    WeightsNotFoundError: the folder, config.json, preprocessor_config.json or the
      weights are missing (names the folder).
    PickleRefusedError: the folder has only pickle weights (names it, and the
      one-line conversion).
    UnsupportedConfigError: naming a config field we do not implement.
    ValueError: the preprocessor's output size does not fit the model.
    WeightsMismatchError: naming the first tensor that does not fit.
  """

  if not paths.isdir(path):
    raise files.WeightsNotFoundError(f"DINO folder {path!r} does not exist")
  cfg = dino.DinoConfig.from_transformers(files.read_config(path))
  processor = preprocess.PreprocessConfig.from_folder(
      path, "ViTImageProcessor" if cfg.kind == "vit" else "BitImageProcessor")
  h, w = processor.output_size
  if (cfg.kind == "vit" and (h, w) != (cfg.image_size,) * 2) or h % cfg.patch_size or (
      w % cfg.patch_size):
    want = (f"{cfg.image_size}x{cfg.image_size}" if cfg.kind == "vit"
            else f"a multiple of the patch size {cfg.patch_size} on each side")
    raise ValueError(f"{path}/preprocessor_config.json resizes/crops to {h}x{w}, but the "
                     f"model takes {want}")
  try:
    state = files.read_state(path, variant)
  except files.PickleRefusedError:
    raise files.PickleRefusedError(
        f"DINO folder {path} holds only pickle weights (pytorch_model.bin, as "
        "facebook/dino-vits16 ships); lfs_jax never unpickles. Convert once, in a trusted "
        "environment:\n  python -c \"import sys, transformers; d=sys.argv[1]; "
        "transformers.AutoModel.from_pretrained(d).save_pretrained(d, "
        f"safe_serialization=True)\" {path}") from None
  params = convert.torch_to_flax(state, dino.abstract_params(cfg), dtype=dtype,
                                 ignore=dino.IGNORED_KEYS, source=path)
  return dino.DinoViT(cfg, dtype=dtype, attention=attention), params, processor


def load_tokenizer(path: str):
  """transformers' CLIPTokenizer from local files only (model folder or tokenizer/)."""
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top

  folder = files.component_folder(path, "tokenizer")
  for name in ("vocab.json", "merges.txt"):
    if not paths.isfile(os.path.join(folder, name)):
      raise files.WeightsNotFoundError(
          f"tokenizer file {name} is missing in {folder}")
  # transformers reads a local folder only: a URL's tokenizer files are copied to a
  # temporary one (a few MB) and read from there.
  with paths.local_folder(folder, TOKENIZER_FILES) as local:
    return CLIPTokenizer.from_pretrained(local, local_files_only=True)


def load_scheduler_config(path: str):
  """The scheduler/scheduler_config.json of a model folder, validated."""
  from lfs_jax.diffusion import schedule  # pylint: disable=g-import-not-at-top

  folder = files.component_folder(path, "scheduler")
  cfg_path = os.path.join(folder, "scheduler_config.json")
  if not paths.isfile(cfg_path):
    raise files.WeightsNotFoundError(f"{cfg_path} is missing")
  return schedule.SchedulerConfig.from_diffusers(json.loads(paths.read_text(cfg_path)))


class Pipeline(NamedTuple):
  """Every component of a Stable Diffusion folder, modules and parameter trees."""
  unet: Any
  unet_params: dict
  vae: Any
  vae_params: dict
  text_encoder: Any
  text_encoder_params: dict
  tokenizer: Any
  scheduler: Any  # diffusion.schedule.SchedulerConfig


def load_pipeline(path: str, *, dtype=jnp.float32, attention: str = "xla",
                  variant: Optional[str] = None, on_host: bool = False) -> Pipeline:
  """Loads a whole diffusers Stable Diffusion folder (see the loaders above)."""
  if not paths.isdir(path):
    raise files.WeightsNotFoundError(f"model folder {path!r} does not exist")
  for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
    if not paths.isdir(os.path.join(path, sub)):
      raise files.WeightsNotFoundError(
          f"{path} is not a Stable Diffusion folder: {sub}/ is missing")
  scheduler = load_scheduler_config(path)
  tokenizer = load_tokenizer(path)
  kw = dict(dtype=dtype, attention=attention, variant=variant, on_host=on_host)
  text, text_params = load_text_encoder(path, **kw)
  u, u_params = load_unet(path, **kw)
  v, v_params = load_vae(path, **kw)
  return Pipeline(u, u_params, v, v_params, text, text_params, tokenizer, scheduler)
