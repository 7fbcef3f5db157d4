"""Stable Diffusion's KL autoencoder (diffusers' `AutoencoderKL`) in Flax, NHWC.

Images [B, H, W, 3] in [-1, 1] <-> unscaled latents [B, H/f, W/f, latent_channels]
with f = 2 ** (len(block_out_channels) - 1). Module names mirror diffusers'
(`encoder/down_blocks_0/resnets_1/conv1`) so `weights.convert.torch_to_flax` maps a
diffusers checkpoint onto the tree without a table. Multiplying by
`scaling_factor` is the caller's job, as in diffusers' pipelines.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from lfs_jax.errors import UnsupportedConfigError
from lfs_jax.models import layers
from lfs_jax.models.attention import dot_product_attention

_EPS = 1e-6  # every GroupNorm in diffusers' VAE encoder/decoder
_LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution's clamp


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Hashable AutoencoderKL architecture; defaults are diffusers' constructor defaults."""

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: Tuple[int, ...] = (64,)
  down_block_types: Tuple[str, ...] = ("DownEncoderBlock2D",)
  up_block_types: Tuple[str, ...] = ("UpDecoderBlock2D",)
  layers_per_block: int = 1
  norm_num_groups: int = 32
  act_fn: str = "silu"
  sample_size: Union[int, Tuple[int, ...]] = 32
  scaling_factor: float = 0.18215
  shift_factor: Optional[float] = None
  latents_mean: Optional[Tuple[float, ...]] = None
  latents_std: Optional[Tuple[float, ...]] = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    n = len(self.block_out_channels)
    if n == 0:
      raise UnsupportedConfigError("VAE config: block_out_channels is empty")
    for field, types, want in (("down_block_types", self.down_block_types, "DownEncoderBlock2D"),
                               ("up_block_types", self.up_block_types, "UpDecoderBlock2D")):
      if len(types) != n:
        raise UnsupportedConfigError(
            f"VAE config: {field} has {len(types)} entries, block_out_channels has {n}")
      bad = [t for t in types if t != want]
      if bad:
        raise UnsupportedConfigError(
            f"VAE config: {field} contains {bad[0]!r}; only {want!r} is implemented")
    if self.act_fn != "silu":
      raise UnsupportedConfigError(
          f"VAE config: act_fn={self.act_fn!r}; only 'silu' is implemented")
    for field in ("shift_factor", "latents_mean", "latents_std"):
      if getattr(self, field) is not None:
        raise UnsupportedConfigError(
            f"VAE config: {field}={getattr(self, field)!r}; only null is implemented "
            "(SD 1.x/2.x latents)")
    if self.layers_per_block < 1:
      raise UnsupportedConfigError(
          f"VAE config: layers_per_block={self.layers_per_block} must be >= 1")
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise UnsupportedConfigError(
          f"VAE config: block_out_channels entry {bad[0]} is not divisible by "
          f"norm_num_groups={self.norm_num_groups}")

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> "VAEConfig":
    """Builds the config from diffusers' `vae/config.json` contents.

    Raises:
      UnsupportedConfigError: naming an unknown key or a value we do not implement.
    """
    name = config.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
      raise UnsupportedConfigError(
          f"VAE config: _class_name={name!r}; only 'AutoencoderKL' is implemented")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in config if not k.startswith("_") and k not in fields)
    if unknown:
      raise UnsupportedConfigError(
          f"VAE config: unknown key(s) {unknown}; lfs_jax implements {sorted(fields)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v
              for k, v in config.items() if k in fields}
    return cls(**kwargs)


def init_inputs(config: VAEConfig, batch: int = 1) -> Tuple[jax.Array]:
  """Dummy images [batch, S, S, in_channels] for init / eval_shape (S: 2 latent pixels)."""
  s = 2 * config.downsample_factor
  return (jnp.zeros((batch, s, s, config.in_channels), jnp.float32),)


def abstract_params(config: VAEConfig, dtype=jnp.float32):
  """The parameter tree as ShapeDtypeStructs in `dtype` (nothing is allocated)."""
  module = AutoencoderKL(config)
  shapes = jax.eval_shape(
      lambda: module.init(jax.random.key(0), *init_inputs(config))["params"])
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes)


def legacy_rename(torch_key: str) -> str:
  """Maps old VAE attention names (query/key/value/proj_attn) to diffusers' current ones.

  Used as `torch_to_flax(..., rename=legacy_rename)`; current names pass unchanged.
  """
  return re.sub(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.",
                lambda m: m.group(1) + _LEGACY[m.group(2)] + ".", torch_key)


_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _conv(features: int, kernel: int, dtype, name: str, stride: int = 1,
          padding: Any = None) -> layers.Conv:
  pad = kernel // 2 if padding is None else padding
  if isinstance(pad, int):
    pad = ((pad, pad), (pad, pad))
  return layers.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad,
                 dtype=dtype, name=name)


def _group_norm(groups: int, dtype, name: str) -> layers.GroupNorm:
  # Two-pass variance: the one-pass E[x^2] - E[x]^2 loses digits against torch.
  return layers.GroupNorm(num_groups=groups, epsilon=_EPS, use_fast_variance=False,
                      dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
  """diffusers' ResnetBlock2D without a time embedding: [B, H, W, Cin] -> [B, H, W, Cout]."""

  out_channels: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = layers.silu(_group_norm(self.groups, self.dtype, "norm1")(x))
    h = _conv(self.out_channels, 3, self.dtype, "conv1")(h)
    h = layers.silu(_group_norm(self.groups, self.dtype, "norm2")(h))
    h = _conv(self.out_channels, 3, self.dtype, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
    return x + h


class AttentionBlock(nn.Module):
  """Single-head spatial self-attention with a residual: [B, H, W, C] -> same."""

  groups: int
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x):
    b, hh, ww, c = x.shape
    h = _group_norm(self.groups, self.dtype, "group_norm")(x).reshape(b, hh * ww, c)
    q, k, v = (layers.Dense(c, dtype=self.dtype, name=n)(h).reshape(b, hh * ww, 1, c)
               for n in ("to_q", "to_k", "to_v"))
    # upcast: diffusers builds this attention with upcast_softmax=True.
    o = dot_product_attention(q, k, v, implementation=self.attention, upcast=True)
    o = layers.Dense(c, dtype=self.dtype, name="to_out_0")(o.reshape(b, hh * ww, c))
    return x + o.reshape(b, hh, ww, c)


class MidBlock(nn.Module):
  """resnet, [attention], resnet at the lowest resolution (UNetMidBlock2D)."""

  groups: int
  add_attention: bool
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = ResnetBlock2D(c, self.groups, self.dtype, name="resnets_0")(x)
    if self.add_attention:
      x = AttentionBlock(self.groups, self.dtype, self.attention, name="attentions_0")(x)
    return ResnetBlock2D(c, self.groups, self.dtype, name="resnets_1")(x)


class Downsample2D(nn.Module):
  """Stride-2 3x3 conv after padding one row/column at the bottom/right."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(x.shape[-1], 3, self.dtype, "conv", stride=2, padding=0)(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour x2 then a 3x3 conv."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(x.shape[-1], 3, self.dtype, "conv")(x)


class DownEncoderBlock2D(nn.Module):
  """`layers` resnets to `out_channels`, then an optional stride-2 downsample."""

  out_channels: int
  layers: int
  groups: int
  add_downsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j in range(self.layers):
      x = ResnetBlock2D(self.out_channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
    if self.add_downsample:
      x = Downsample2D(self.dtype, name="downsamplers_0")(x)
    return x


class UpDecoderBlock2D(nn.Module):
  """`layers` resnets to `out_channels`, then an optional x2 upsample."""

  out_channels: int
  layers: int
  groups: int
  add_upsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j in range(self.layers):
      x = ResnetBlock2D(self.out_channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
    if self.add_upsample:
      x = Upsample2D(self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """[B, H, W, in_channels] -> moments [B, H/f, W/f, 2 * latent_channels]."""

  config: VAEConfig
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x):
    cfg, dt = self.config, self.dtype
    chans = cfg.block_out_channels
    x = _conv(chans[0], 3, dt, "conv_in")(x.astype(dt))
    for i, c in enumerate(chans):
      x = DownEncoderBlock2D(c, cfg.layers_per_block, cfg.norm_num_groups,
                             i < len(chans) - 1, dt, name=f"down_blocks_{i}")(x)
    x = MidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, dt, self.attention,
                 name="mid_block")(x)
    x = layers.silu(_group_norm(cfg.norm_num_groups, dt, "conv_norm_out")(x))
    return _conv(2 * cfg.latent_channels, 3, dt, "conv_out")(x)


class Decoder(nn.Module):
  """[B, h, w, latent_channels] -> [B, h*f, w*f, out_channels]."""

  config: VAEConfig
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, z):
    cfg, dt = self.config, self.dtype
    chans = tuple(reversed(cfg.block_out_channels))
    x = _conv(chans[0], 3, dt, "conv_in")(z.astype(dt))
    x = MidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, dt, self.attention,
                 name="mid_block")(x)
    for i, c in enumerate(chans):
      # One resnet more than the encoder's blocks, as in diffusers.
      x = UpDecoderBlock2D(c, cfg.layers_per_block + 1, cfg.norm_num_groups,
                           i < len(chans) - 1, dt, name=f"up_blocks_{i}")(x)
    x = layers.silu(_group_norm(cfg.norm_num_groups, dt, "conv_norm_out")(x))
    return _conv(cfg.out_channels, 3, dt, "conv_out")(x)


class AutoencoderKL(nn.Module):
  """The SD VAE. `encode` / `decode` are usable as `apply(..., method="encode")`.

  Attributes:
    config: the architecture.
    dtype: compute dtype (parameters keep their own dtype).
    attention: "xla", "cudnn" or "auto" for the mid-block attention.
  """

  config: VAEConfig
  dtype: Any = jnp.float32
  attention: str = "xla"

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype, self.attention)
    self.decoder = Decoder(cfg, self.dtype, self.attention)
    if cfg.use_quant_conv:
      self.quant_conv = _conv(2 * cfg.latent_channels, 1, self.dtype, "quant_conv")
    if cfg.use_post_quant_conv:
      self.post_quant_conv = _conv(cfg.latent_channels, 1, self.dtype, "post_quant_conv")

  def encode(self, images):
    """Images [B, H, W, C] in [-1, 1] -> (mean, logvar), each [B, h, w, latent_channels].

    The latents are unscaled (not multiplied by `scaling_factor`); logvar is
    clipped to [-30, 20] as diffusers' DiagonalGaussianDistribution does.
    """
    moments = self.encoder(images)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

  def decode(self, latents):
    """Unscaled latents [B, h, w, latent_channels] -> images [B, H, W, C], unclipped."""
    z = latents.astype(self.dtype)
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, images):
    """encode then decode the mean (so `init` creates every parameter)."""
    mean, _ = self.encode(images)
    return self.decode(mean)
