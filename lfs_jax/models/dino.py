"""The DINO image encoders of the evaluation (transformers' `ViTModel`, `Dinov2Model`) in Flax.

pixel_values [B, H, W, C] (NHWC, already normalised by weights.preprocess) ->
(last_hidden_state [B, N, D], CLS embedding [B, D]). The CLS embedding (the first
token after the final LayerNorm, what DINO's own `forward` returns) is what
DreamBooth's DINO image-alignment metric compares; ViTModel's tanh pooler is not
part of that metric and its weights, when a checkpoint has them, are skipped.

Module names mirror the names transformers writes with save_pretrained (the
checkpoint names of facebook/dino-vit* and facebook/dinov2-*:
`encoder/layer_3/attention/attention/query`, `layer_scale1/lambda1`, ...), so
`weights.convert.torch_to_flax` maps a folder without a table.

ViT (`kind="vit"`): pre-LN blocks, LayerNorm before attention and MLP, GELU MLP.
DINOv2 (`kind="dinov2"`): the same blocks with a learned per-channel scale
(LayerScale) on each branch, an MLP or a SwiGLU feed-forward, and position
embeddings resized bicubically to the input's patch grid as transformers does
(torch's bicubic, A = -0.75, align_corners=False), since DINOv2 checkpoints store
a 37x37 grid (518 px) and are fed 224 px crops.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lfs_jax.errors import UnsupportedConfigError
from lfs_jax.models import clip
from lfs_jax.models.attention import dot_product_attention

KINDS = {"vit": "ViTModel", "dinov2": "Dinov2Model"}
# Checkpoint tensors that the CLS embedding does not use: ViTModel's pooler and
# DINOv2's mask token (masked-image pretraining only).
IGNORED_KEYS = (r"pooler\..*", r"embeddings\.mask_token")
# Config keys that leave the CLS embedding as it is: bookkeeping, training-only
# values (dropout, drop path, initialisation), the pooler, masked-image modelling
# and backbone (feature-map) settings.
_INERT_KEYS = clip._INERT_KEYS | {  # pylint: disable=protected-access
    "hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate",
    "layerscale_value", "encoder_stride", "pooler_act", "pooler_output_size",
    "use_mask_token", "out_features", "out_indices", "stage_names", "apply_layernorm",
    "reshape_hidden_states", "bos_token_id", "eos_token_id", "pad_token_id",
}
_FIELDS = {
    "vit": ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "hidden_act", "layer_norm_eps", "image_size", "patch_size", "num_channels",
            "qkv_bias"),
    "dinov2": ("hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio",
               "hidden_act", "layer_norm_eps", "image_size", "patch_size", "num_channels",
               "qkv_bias", "use_swiglu_ffn"),
}


@dataclasses.dataclass(frozen=True)
class DinoConfig:
  """Hashable ViT / DINOv2 architecture; defaults are facebook/dino-vits16's.

  Attributes:
    kind: "vit" (ViTModel: DINO v1) or "dinov2" (Dinov2Model).
    mlp_dim: the feed-forward width (ViT: intermediate_size; DINOv2:
      hidden_size * mlp_ratio, or for SwiGLU two thirds of it rounded up to 8).
    swiglu: DINOv2's SwiGLU feed-forward (the giant model) instead of the GELU MLP.
  """

  kind: str = "vit"
  hidden_size: int = 384
  num_hidden_layers: int = 12
  num_attention_heads: int = 6
  mlp_dim: int = 1536
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  qkv_bias: bool = True
  swiglu: bool = False

  def __post_init__(self):
    if self.kind not in KINDS:
      raise UnsupportedConfigError(f"DINO config: kind={self.kind!r}; use one of {list(KINDS)}")
    if self.hidden_act not in clip.ACTIVATIONS:
      raise UnsupportedConfigError(
          f"DINO config: hidden_act={self.hidden_act!r}; only {sorted(clip.ACTIVATIONS)} "
          "are implemented")
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_dim",
                  "image_size", "patch_size", "num_channels"):
      value = getattr(self, field)
      # A [h, w] image_size / patch_size is valid in transformers but no DINO
      # checkpoint uses one; it is refused rather than half supported.
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UnsupportedConfigError(
            f"DINO config: {field}={value!r} must be a positive integer")
    if self.hidden_size % self.num_attention_heads:
      raise UnsupportedConfigError(
          f"DINO config: hidden_size={self.hidden_size} is not divisible by "
          f"num_attention_heads={self.num_attention_heads}")
    if self.patch_size > self.image_size:
      raise UnsupportedConfigError(
          f"DINO config: patch_size={self.patch_size} is larger than "
          f"image_size={self.image_size}")

  @property
  def grid(self) -> int:
    """Patches per side of the stored position embeddings."""
    return self.image_size // self.patch_size

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any]) -> "DinoConfig":
    """Builds the config from a ViTModel or Dinov2Model config.json dict.

    Raises:
      UnsupportedConfigError: another model type or architecture, an unknown key, or
        a value we do not implement (each named).
    """
    kind = config.get("model_type")
    if kind not in KINDS:
      raise UnsupportedConfigError(
          f"DINO config: model_type={kind!r}; a ViTModel ('vit', e.g. facebook/dino-vits16) "
          "or Dinov2Model ('dinov2', e.g. facebook/dinov2-small) folder is needed")
    for arch in config.get("architectures") or ():
      if arch != KINDS[kind]:
        raise UnsupportedConfigError(
            f"DINO config: architectures contains {arch!r}; only {KINDS[kind]!r} is "
            "implemented for model_type {kind!r} (save the base model with save_pretrained)")
    if config.get("pruned_heads"):
      raise UnsupportedConfigError(
          f"DINO config: pruned_heads={config['pruned_heads']!r} is not implemented")
    fields = _FIELDS[kind]
    unknown = sorted(k for k in config if not k.startswith("_") and k not in fields
                     and k not in _INERT_KEYS)
    if unknown:
      raise UnsupportedConfigError(
          f"DINO config: unknown key(s) {unknown}; lfs_jax implements {sorted(fields)}")
    get = lambda k, default: config[k] if config.get(k) is not None else default
    hidden = get("hidden_size", 768)
    swiglu = bool(get("use_swiglu_ffn", False))
    if kind == "vit":
      mlp = get("intermediate_size", 3072)
    else:
      mlp = int(hidden * get("mlp_ratio", 4))
      if swiglu:  # transformers' Dinov2SwiGLUFFN width
        mlp = (int(mlp * 2 / 3) + 7) // 8 * 8
    return cls(
        kind=kind, hidden_size=hidden, num_hidden_layers=get("num_hidden_layers", 12),
        num_attention_heads=get("num_attention_heads", 12), mlp_dim=mlp,
        hidden_act=get("hidden_act", "gelu"),
        layer_norm_eps=float(get("layer_norm_eps", 1e-12 if kind == "vit" else 1e-6)),
        image_size=get("image_size", 224 if kind == "vit" else 518),
        patch_size=get("patch_size", 16 if kind == "vit" else 14),
        num_channels=get("num_channels", 3), qkv_bias=bool(get("qkv_bias", True)),
        swiglu=swiglu)


def torch_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of torch's 1-D bicubic resize (A = -0.75, align_corners=False).

  Output i reads the source at (i + 0.5) * n_in / n_out - 0.5 with Keys' cubic
  kernel over the four nearest samples, indices clamped at the border.
  """
  a = -0.75
  scale = n_in / n_out
  w = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    src = (i + 0.5) * scale - 0.5
    base = math.floor(src)
    t = src - base
    for k, dist in zip(range(-1, 3), (1 + t, t, 1 - t, 2 - t)):
      if dist <= 1:
        coef = ((a + 2) * dist - (a + 3)) * dist * dist + 1
      else:
        coef = ((a * dist - 5 * a) * dist + 8 * a) * dist - 4 * a
      w[i, min(max(base + k, 0), n_in - 1)] += coef
  return w.astype(np.float32)


def init_inputs(config: DinoConfig, batch: int = 1) -> Tuple[jax.Array]:
  return (jnp.zeros((batch, config.image_size, config.image_size, config.num_channels),
                    jnp.float32),)


def abstract_params(config: DinoConfig, dtype=jnp.float32):
  """The parameter tree as ShapeDtypeStructs in `dtype` (nothing is allocated)."""
  module = DinoViT(config)
  shapes = jax.eval_shape(
      lambda: module.init(jax.random.key(0), *init_inputs(config))["params"])
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes)


class _PatchEmbeddings(nn.Module):
  """transformers' `patch_embeddings`: a biased conv `projection`, flattened row-major."""

  config: DinoConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    c = self.config
    p = c.patch_size
    x = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                name="projection")(pixel_values.astype(self.dtype))
    return x.reshape(x.shape[0], -1, c.hidden_size)


class DinoEmbeddings(nn.Module):
  """Patches, a CLS token in front, position embeddings (resized for DINOv2) added."""

  config: DinoConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    """pixel_values [B, H, W, C] -> [B, 1 + (H/p)(W/p), D]."""
    c = self.config
    d, p = c.hidden_size, c.patch_size
    b, h, w, _ = pixel_values.shape
    patches = _PatchEmbeddings(c, dtype=self.dtype, name="patch_embeddings")(pixel_values)
    cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, d))
    pos = self.param("position_embeddings", nn.initializers.normal(0.02),
                     (1, c.grid * c.grid + 1, d))
    gh, gw = h // p, w // p
    if (gh, gw) != (c.grid, c.grid):
      if c.kind == "vit":
        # ViTModel refuses another size unless asked to interpolate; DINO (v1)
        # folders come with a processor that resizes to image_size.
        raise ValueError(
            f"pixel_values of {h}x{w} give a {gh}x{gw} patch grid, but this ViT was "
            f"built for {c.image_size}x{c.image_size} ({c.grid}x{c.grid})")
      # Resized in float32 whatever the dtype, as transformers does.
      grid = pos[0, 1:].astype(jnp.float32).reshape(c.grid, c.grid, d)
      grid = jnp.einsum("oh,hwd->owd", jnp.asarray(torch_bicubic_matrix(c.grid, gh)), grid,
                        precision="highest")
      grid = jnp.einsum("pw,owd->opd", jnp.asarray(torch_bicubic_matrix(c.grid, gw)), grid,
                        precision="highest")
      pos = jnp.concatenate([pos[:, :1], grid.reshape(1, gh * gw, d).astype(pos.dtype)],
                            axis=1)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(self.dtype), patches], axis=1)
    return x + pos.astype(self.dtype)


class _QKV(nn.Module):
  """The `attention/attention` scope: query, key, value projections -> [B, N, H, hd] each."""

  config: DinoConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> Tuple[jax.Array, jax.Array, jax.Array]:
    c = self.config
    b, n, d = x.shape
    return tuple(nn.Dense(d, use_bias=c.qkv_bias, dtype=self.dtype, name=name)(x)
                 .reshape(b, n, c.num_attention_heads, d // c.num_attention_heads)
                 for name in ("query", "key", "value"))


class _Dense(nn.Module):
  """A scope holding one Dense named `dense` (transformers' `output.dense` and the like)."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Dense(self.features, dtype=self.dtype, name="dense")(x)


class DinoAttention(nn.Module):
  """Multi-head self-attention: `attention/{query,key,value}`, then `output/dense`."""

  config: DinoConfig
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    q, k, v = _QKV(self.config, dtype=self.dtype, name="attention")(x)
    out = dot_product_attention(q, k, v, implementation=self.attention, is_causal=False,
                                scale=q.shape[-1] ** -0.5)
    return _Dense(d, dtype=self.dtype, name="output")(out.reshape(b, n, d))


class _MLP(nn.Module):
  """DINOv2's `mlp`: fc1 -> activation -> fc2, or SwiGLU (weights_in = [gate; up])."""

  config: DinoConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    if c.swiglu:
      gate, up = jnp.split(nn.Dense(2 * c.mlp_dim, dtype=self.dtype, name="weights_in")(x),
                           2, axis=-1)
      return nn.Dense(c.hidden_size, dtype=self.dtype, name="weights_out")(
          jax.nn.silu(gate) * up)
    x = clip.ACTIVATIONS[c.hidden_act](nn.Dense(c.mlp_dim, dtype=self.dtype, name="fc1")(x))
    return nn.Dense(c.hidden_size, dtype=self.dtype, name="fc2")(x)


class _LayerScale(nn.Module):
  """DINOv2's LayerScale: x * lambda1 [D]."""

  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.param("lambda1", nn.initializers.ones, (self.features,)).astype(x.dtype)


class DinoLayer(nn.Module):
  """One pre-LN block: x + attn(ln(x)), then x + mlp(ln(x)); DINOv2 scales each branch."""

  config: DinoConfig
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    norm = functools.partial(nn.LayerNorm, epsilon=c.layer_norm_eps, dtype=self.dtype)
    attn = DinoAttention(c, dtype=self.dtype, attention=self.attention, name="attention")
    if c.kind == "vit":
      x = x + attn(norm(name="layernorm_before")(x))
      h = norm(name="layernorm_after")(x)
      h = clip.ACTIVATIONS[c.hidden_act](
          _Dense(c.mlp_dim, dtype=self.dtype, name="intermediate")(h))
      return x + _Dense(c.hidden_size, dtype=self.dtype, name="output")(h)
    x = x + _LayerScale(c.hidden_size, name="layer_scale1")(attn(norm(name="norm1")(x)))
    h = _MLP(c, dtype=self.dtype, name="mlp")(norm(name="norm2")(x))
    return x + _LayerScale(c.hidden_size, name="layer_scale2")(h)


class _Encoder(nn.Module):
  """`encoder/layer_<i>`."""

  config: DinoConfig
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.config.num_hidden_layers):
      x = DinoLayer(self.config, dtype=self.dtype, attention=self.attention,
                    name=f"layer_{i}")(x)
    return x


class DinoViT(nn.Module):
  """ViTModel / Dinov2Model without pooler: pixels -> (last_hidden_state, CLS embedding).

  Attributes:
    config: the architecture.
    dtype: computation dtype (parameters keep theirs).
    attention: "xla", "cudnn" or "auto" (see models.attention).
  """

  config: DinoConfig
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """pixel_values [B, H, W, C] (H, W multiples of the patch) -> ([B, N, D], [B, D])."""
    c = self.config
    if (pixel_values.ndim != 4 or pixel_values.shape[-1] != c.num_channels
        or pixel_values.shape[1] % c.patch_size or pixel_values.shape[2] % c.patch_size):
      raise ValueError(
          f"pixel_values must be [B, H, W, {c.num_channels}] (NHWC) with H and W multiples "
          f"of the patch size {c.patch_size}, got shape {tuple(pixel_values.shape)}")
    x = DinoEmbeddings(c, dtype=self.dtype, name="embeddings")(pixel_values)
    x = _Encoder(c, dtype=self.dtype, attention=self.attention, name="encoder")(x)
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="layernorm")(x)
    return x, x[:, 0]
