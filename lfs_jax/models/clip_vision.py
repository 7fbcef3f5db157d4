"""CLIP's vision transformer and the two-tower CLIPModel (transformers' names) in Flax.

pixel_values [B, H, W, C] (NHWC, already normalised by weights.preprocess) ->
CLIPVisionModel's pooled CLS state, and CLIPModel's projected image / text features
used by the evaluation metrics (text-image and image-image cosine). Module names
mirror transformers' (`vision_model/embeddings/patch_embedding`, `pre_layrnorm`,
`visual_projection`, `logit_scale`) so `weights.convert.torch_to_flax` maps a
CLIPModel checkpoint without a table. The encoder is models.clip's, non-causal.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from lfs_jax.errors import UnsupportedConfigError
from lfs_jax.models import clip
# The keys transformers writes into any CLIP config that leave the forward pass as
# it is; shared with the text tower so both refuse exactly the same unknown keys.
from lfs_jax.models.clip import _INERT_KEYS as INERT_KEYS  # pylint: disable=protected-access

IGNORED_KEYS = clip.IGNORED_KEYS
# transformers 4 writes its generic token ids (null) into vision configs too.
_VISION_INERT_KEYS = INERT_KEYS | {"bos_token_id", "eos_token_id", "pad_token_id"}
_VISION_ARCHITECTURES = ("CLIPVisionModel", "CLIPModel")
# Top-level keys of a CLIPModel config.json besides the two tower configs. The
# initial logit scale is superseded by the logit_scale tensor of the checkpoint.
_CLIP_KEYS = frozenset({"text_config", "vision_config", "text_config_dict",
                        "vision_config_dict", "projection_dim", "logit_scale_init_value"})


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Hashable CLIP vision-transformer architecture; transformers' defaults (ViT-B/32)."""

  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512

  def __post_init__(self):
    if self.hidden_act not in clip.ACTIVATIONS:
      raise UnsupportedConfigError(
          f"CLIP vision config: hidden_act={self.hidden_act!r}; only "
          f"{sorted(clip.ACTIVATIONS)} are implemented")
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_channels", "image_size", "patch_size",
                  "projection_dim"):
      value = getattr(self, field)
      # bool is an int; a [h, w] image_size / patch_size is not implemented (nor is it
      # by transformers' CLIPVisionEmbeddings).
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UnsupportedConfigError(
            f"CLIP vision config: {field}={value!r} must be a positive integer")
    if self.hidden_size % self.num_attention_heads:
      raise UnsupportedConfigError(
          f"CLIP vision config: hidden_size={self.hidden_size} is not divisible by "
          f"num_attention_heads={self.num_attention_heads}")
    if self.patch_size > self.image_size:
      raise UnsupportedConfigError(
          f"CLIP vision config: patch_size={self.patch_size} is larger than "
          f"image_size={self.image_size}")

  @property
  def num_positions(self) -> int:
    """Patches plus the CLS token."""
    return (self.image_size // self.patch_size) ** 2 + 1

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPVisionConfig":
    """Builds the config from a CLIPVisionModel config.json dict or a vision_config.

    A full CLIPModel config (model_type "clip") is accepted too: its vision_config
    (updated by the legacy vision_config_dict, as transformers does) is read, and the
    top-level projection_dim, the one CLIPModel's visual_projection uses, wins.

    Raises:
      UnsupportedConfigError: naming an unknown key or a value we do not implement.
    """
    config = dict(config)
    if config.get("model_type") == "clip":
      _check_architectures(config, _VISION_ARCHITECTURES)
      vision = dict(config.get("vision_config") or {})
      vision.update(config.get("vision_config_dict") or {})
      if "projection_dim" in config:
        vision["projection_dim"] = config["projection_dim"]
      vision.pop("architectures", None)  # the vision part of a CLIPModel
      config = vision
    model_type = config.get("model_type", "clip_vision_model")
    if model_type != "clip_vision_model":
      raise UnsupportedConfigError(
          f"CLIP vision config: model_type={model_type!r}; only 'clip_vision_model' (or "
          "a 'clip' config with a vision_config) is implemented")
    _check_architectures(config, _VISION_ARCHITECTURES)
    pruned = config.get("pruned_heads") or {}
    if pruned:
      raise UnsupportedConfigError(
          f"CLIP vision config: pruned_heads={pruned!r}; pruned attention heads are not "
          "implemented")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in config if not k.startswith("_") and k not in fields
                     and k not in _VISION_INERT_KEYS)
    if unknown:
      raise UnsupportedConfigError(
          f"CLIP vision config: unknown key(s) {unknown}; lfs_jax implements "
          f"{sorted(fields)}")
    return cls(**{k: v for k, v in config.items() if k in fields})


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """A CLIPModel: both towers and the shared projection width."""

  text: clip.CLIPTextConfig
  vision: CLIPVisionConfig
  projection_dim: int = 512

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPConfig":
    """Builds the config from a CLIPModel config.json dict (model_type "clip").

    Raises:
      UnsupportedConfigError: naming the culprit key of either tower or the top level.
    """
    if config.get("model_type") != "clip":
      raise UnsupportedConfigError(
          f"CLIP config: model_type={config.get('model_type')!r}; a CLIPModel folder "
          "(model_type 'clip', with text_config and vision_config) is needed")
    _check_architectures(config, ("CLIPModel",))
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _CLIP_KEYS
                     and k not in INERT_KEYS)
    if unknown:
      raise UnsupportedConfigError(
          f"CLIP config: unknown top-level key(s) {unknown}; lfs_jax implements "
          f"{sorted(_CLIP_KEYS)}")
    text = clip.CLIPTextConfig.from_transformers(config)
    vision = CLIPVisionConfig.from_transformers(config)
    # Both towers carry the top-level projection_dim (or their own, equal, default).
    return cls(text=text, vision=vision, projection_dim=vision.projection_dim)


def _check_architectures(config: Mapping[str, Any], allowed: Tuple[str, ...]) -> None:
  for arch in config.get("architectures") or ():
    if arch not in allowed:
      raise UnsupportedConfigError(
          f"CLIP config: architectures contains {arch!r}; only {list(allowed)} are "
          "implemented")


AnyConfig = Union[CLIPConfig, CLIPVisionConfig]


def init_inputs(config: AnyConfig, batch: int = 1) -> Tuple[jax.Array, ...]:
  """Dummy inputs for init / eval_shape: (input_ids, pixel_values) or (pixel_values,)."""
  v = config.vision if isinstance(config, CLIPConfig) else config
  pixels = jnp.zeros((batch, v.image_size, v.image_size, v.num_channels), jnp.float32)
  if isinstance(config, CLIPConfig):
    return (jnp.zeros((batch, config.text.max_position_embeddings), jnp.int32), pixels)
  return (pixels,)


def build(config: AnyConfig, **kwargs) -> nn.Module:
  """CLIPModel for a CLIPConfig, CLIPVisionModel for a CLIPVisionConfig."""
  if isinstance(config, CLIPConfig):
    return CLIPModel(config, **kwargs)
  return CLIPVisionModel(config, **kwargs)


def abstract_params(config: AnyConfig, dtype=jnp.float32):
  """The parameter tree as ShapeDtypeStructs in `dtype` (nothing is allocated)."""
  module = build(config)
  shapes = jax.eval_shape(
      lambda: module.init(jax.random.key(0), *init_inputs(config))["params"])
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes)


class CLIPVisionEmbeddings(nn.Module):
  """Non-overlapping patches, a learned CLS token in front, learned positions."""

  config: CLIPVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    """pixel_values [B, H, W, C] -> [B, 1 + (H/p)(W/p), D]."""
    c = self.config
    d = c.hidden_size
    patches = nn.Conv(d, (c.patch_size, c.patch_size), strides=(c.patch_size,) * 2,
                      padding="VALID", use_bias=False, dtype=self.dtype,
                      name="patch_embedding")(pixel_values.astype(self.dtype))
    b = patches.shape[0]
    patches = patches.reshape(b, -1, d)  # row-major over the grid, as torch's flatten(2)
    cls = self.param("class_embedding", nn.initializers.normal(d ** -0.5), (d,))
    positions = nn.Embed(c.num_positions, d, embedding_init=nn.initializers.normal(0.02),
                         name="position_embedding").embedding
    cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d))
    x = jnp.concatenate([cls, patches], axis=1)
    return (x + positions[None].astype(self.dtype)).astype(self.dtype)


class CLIPVisionTransformer(nn.Module):
  """transformers' CLIPVisionTransformer (the `vision_model` submodule)."""

  config: CLIPVisionConfig
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """pixel_values [B, S, S, C] -> (last_hidden_state [B, N, D], pooled CLS [B, D])."""
    c = self.config
    want = (c.image_size, c.image_size, c.num_channels)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
      raise ValueError(
          f"pixel_values must be [B, {want[0]}, {want[1]}, {want[2]}] (NHWC, the "
          f"model's image_size), got shape {tuple(pixel_values.shape)}")
    x = CLIPVisionEmbeddings(c, dtype=self.dtype, name="embeddings")(pixel_values)
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="pre_layrnorm")(x)
    x = clip.CLIPEncoder(c, causal=False, dtype=self.dtype, attention=self.attention,
                         name="encoder")(x)
    pooled = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype,
                          name="post_layernorm")(x[:, 0])
    return x, pooled


class CLIPVisionModel(nn.Module):
  """transformers' CLIPVisionModel: pixel_values [B, S, S, C] -> (last hidden, pooled).

  Attributes:
    config: the architecture.
    dtype: computation dtype (parameters keep theirs).
    attention: "xla", "cudnn" or "auto" (see models.attention).
  """

  config: CLIPVisionConfig
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> Tuple[jax.Array, jax.Array]:
    return CLIPVisionTransformer(self.config, dtype=self.dtype, attention=self.attention,
                                 name="vision_model")(pixel_values)


def _unit(x: jax.Array) -> jax.Array:
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPModel(nn.Module):
  """transformers' CLIPModel: both towers, their projections and the logit scale.

  Apply a single tower with `method`:
    module.apply({"params": p}, ids, method="get_text_features")       # [B, P]
    module.apply({"params": p}, pixels, method="get_image_features")   # [B, P]

  Attributes:
    config: both architectures.
    dtype: computation dtype (parameters keep theirs).
    attention: "xla", "cudnn" or "auto" (see models.attention).
  """

  config: CLIPConfig
  dtype: Any = jnp.float32
  attention: str = "xla"

  def setup(self):
    c = self.config
    self.text_model = clip.CLIPTextTransformer(c.text, dtype=self.dtype,
                                               attention=self.attention)
    self.vision_model = CLIPVisionTransformer(c.vision, dtype=self.dtype,
                                              attention=self.attention)
    self.visual_projection = nn.Dense(c.projection_dim, use_bias=False, dtype=self.dtype)
    self.text_projection = nn.Dense(c.projection_dim, use_bias=False, dtype=self.dtype)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(2.6592), ())

  def get_text_features(self, input_ids: jax.Array) -> jax.Array:
    """Projected end-of-text states, transformers' `get_text_features(...).pooler_output`.

    No attention_mask: the tower is causal, so padding after the end-of-text token
    cannot change the pooled state.

    Args:
      input_ids: [B, L] int token ids, L <= max_position_embeddings.

    Returns:
      [B, projection_dim], not normalised.
    """
    hidden = self.text_model(input_ids)
    eos = self.config.text.eos_token_id
    return self.text_projection(clip.pooled(hidden, input_ids, eos))

  def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
    """Projected CLS states, transformers' `get_image_features(...).pooler_output`.

    Args:
      pixel_values: [B, S, S, C] preprocessed images (weights.preprocess), NHWC.

    Returns:
      [B, projection_dim], not normalised.
    """
    return self.visual_projection(self.vision_model(pixel_values)[1])

  def __call__(self, input_ids: jax.Array, pixel_values: jax.Array) -> Dict[str, jax.Array]:
    """transformers' CLIPOutput without the loss: unit embeddings and scaled logits.

    Returns:
      {"text_embeds": [T, P], "image_embeds": [I, P] (unit norm),
       "logits_per_text": [T, I], "logits_per_image": [I, T]}.
    """
    text = _unit(self.get_text_features(input_ids))
    image = _unit(self.get_image_features(pixel_values))
    logits_per_text = jnp.exp(self.logit_scale) * text @ image.T
    return {"text_embeds": text, "image_embeds": image,
            "logits_per_text": logits_per_text, "logits_per_image": logits_per_text.T}
