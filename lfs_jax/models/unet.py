"""The Stable Diffusion 1.x / 2.x conditional UNet in Flax (NHWC), with its config.

`UNetConfig.from_diffusers` reads a diffusers `unet/config.json` and refuses, naming
the field, every setting this module does not implement (SDXL's added embeddings,
class embeddings, other block types, ...). Parameter names follow diffusers
(`down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k/kernel`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from lfs_jax.errors import UnsupportedConfigError
from lfs_jax.models import layers
from lfs_jax.models.unet_blocks import (BlockOptions, DownBlock, MidBlock, TimestepEmbedding,
                                        UpBlock, timestep_embedding)

_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
IntOrTuple = Union[int, Tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Architecture of a UNet2DConditionModel; defaults are diffusers' defaults.

  `attention_head_dim` keeps diffusers' misnomer: for SD 1.x/2.x it is the NUMBER
  of heads per block (head width = channels / heads). Per-block fields accept an
  int (same for every block) or a tuple in down-block order.
  """
  sample_size: Optional[IntOrTuple] = None
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                       "CrossAttnDownBlock2D", "DownBlock2D")
  mid_block_type: str = "UNetMidBlock2DCrossAttn"
  up_block_types: Tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D",
                                     "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
  only_cross_attention: bool = False
  block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: IntOrTuple = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  dropout: float = 0.0
  act_fn: str = "silu"
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 1280
  transformer_layers_per_block: IntOrTuple = 1
  attention_head_dim: IntOrTuple = 8
  dual_cross_attention: bool = False
  use_linear_projection: bool = False
  upcast_attention: bool = False
  resnet_time_scale_shift: str = "default"
  time_embedding_dim: Optional[int] = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3

  def __post_init__(self):
    for f in dataclasses.fields(self):  # lists (from JSON or by hand) -> hashable tuples
      object.__setattr__(self, f.name, _tuples(getattr(self, f.name)))

    def refuse(field, why):
      raise UnsupportedConfigError(
          f"UNet config field {field}={getattr(self, field)!r}: {why}")
    for field, value in (("mid_block_type", "UNetMidBlock2DCrossAttn"), ("act_fn", "silu"),
                         ("only_cross_attention", False), ("dual_cross_attention", False),
                         ("resnet_time_scale_shift", "default"), ("dropout", 0.0)):
      if getattr(self, field) != value:
        refuse(field, f"only {value!r} is implemented")
    for field in ("norm_num_groups", "cross_attention_dim", "in_channels", "out_channels"):
      if not isinstance(getattr(self, field), int):
        refuse(field, "must be one int")
    n = len(self.block_out_channels)
    if n == 0 or len(self.down_block_types) != n or len(self.up_block_types) != n:
      refuse("down_block_types", f"need one down and one up block per entry of "
             f"block_out_channels={self.block_out_channels!r}, got up_block_types="
             f"{self.up_block_types!r}")
    for field, known in (("down_block_types", _DOWN_TYPES), ("up_block_types", _UP_TYPES)):
      bad = [t for t in getattr(self, field) if t not in known]
      if bad:
        refuse(field, f"block type {bad[0]!r} is not implemented (only {sorted(known)})")
    for field in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
      v = getattr(self, field)
      if not isinstance(v, int) and (len(v) != n or not all(isinstance(x, int) for x in v)):
        refuse(field, f"need an int or {n} ints (one per block)")
    if any(k % 2 == 0 for k in (self.conv_in_kernel, self.conv_out_kernel)):
      refuse("conv_in_kernel", "conv_in_kernel and conv_out_kernel must be odd")
    if self.downsample_padding not in (0, 1):
      refuse("downsample_padding", "only 0 and 1 are implemented")
    for i, (c, h) in enumerate(zip(self.block_out_channels, self.heads)):
      if c % h or c % self.norm_num_groups:
        refuse("block_out_channels", f"block {i}: {c} channels must divide into "
               f"{h} heads and {self.norm_num_groups} norm groups")

  def _per_block(self, v: IntOrTuple) -> Tuple[int, ...]:
    return (v,) * len(self.block_out_channels) if isinstance(v, int) else tuple(v)

  @property
  def heads(self) -> Tuple[int, ...]:
    """Attention heads per down block (diffusers' `attention_head_dim`)."""
    return self._per_block(self.attention_head_dim)

  @property
  def layers(self) -> Tuple[int, ...]:
    return self._per_block(self.layers_per_block)

  @property
  def transformer_layers(self) -> Tuple[int, ...]:
    return self._per_block(self.transformer_layers_per_block)

  @property
  def num_downsamples(self) -> int:
    return len(self.block_out_channels) - 1

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> "UNetConfig":
    """Builds the config from a diffusers `unet/config.json` dict (strict).

    Raises:
      UnsupportedConfigError: naming the first key whose value we do not
        implement, or a key unknown to diffusers' UNet2DConditionModel.
    """
    ours = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in config.items():
      if key.startswith("_"):
        continue
      value = _tuples(value)
      if key in ours:
        if key == "only_cross_attention" and isinstance(value, tuple) and not any(value):
          value = False
        if key == "cross_attention_dim" and isinstance(value, tuple) and len(set(value)) == 1:
          value = value[0]
        if key == "cross_attention_dim" and not isinstance(value, int):
          raise UnsupportedConfigError(
              f"UNet config field cross_attention_dim={value!r}: one int is implemented")
        kwargs[key] = value
      elif key in _MUST_BE:
        if value != _MUST_BE[key]:
          raise UnsupportedConfigError(
              f"UNet config field {key}={value!r} is not supported: lfs_jax implements "
              f"only {key}={_MUST_BE[key]!r} (Stable Diffusion 1.x/2.x)")
      elif key not in _NO_EFFECT:
        raise UnsupportedConfigError(
            f"UNet config has unknown field {key!r} (value {value!r}): not a parameter "
            "of diffusers' UNet2DConditionModel")
    return cls(**kwargs)


def _tuples(v):
  return tuple(_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


# diffusers keys we do not store: the only value we implement.
_MUST_BE = {
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "class_embed_type": None,
    "addition_embed_type": None,
    "num_class_embeds": None,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
}
# diffusers keys that its CrossAttn/plain Down/Up blocks and UNetMidBlock2DCrossAttn
# never read (or that only matter with a refused feature): any value builds the
# same network, so they are accepted and ignored.
_NO_EFFECT = frozenset({
    "resnet_skip_time_act", "resnet_out_scale_factor", "cross_attention_norm",
    "addition_embed_type_num_heads", "addition_time_embed_dim",
    "mid_block_only_cross_attention",
})
# Every key of diffusers' UNet2DConditionModel.__init__ (checked by a test).
DIFFUSERS_KEYS = frozenset(
    {f.name for f in dataclasses.fields(UNetConfig)} | set(_MUST_BE) | _NO_EFFECT)


def init_inputs(config: UNetConfig, batch: int = 1, seq_len: int = 77) -> tuple:
  """Dummy (sample [B,s,s,in], timesteps [B] int32, context [B,77,cross]) for init.

  s = 2**num_downsamples, the smallest size every downsample halves exactly.
  """
  s = 2 ** config.num_downsamples
  return (jnp.zeros((batch, s, s, config.in_channels), jnp.float32),
          jnp.zeros((batch,), jnp.int32),
          jnp.zeros((batch, seq_len, config.cross_attention_dim), jnp.float32))


class UNet2DConditionModel(layers.Module):
  """Predicts noise (or v) [B,H,W,out] from latents [B,H,W,in], timesteps, text states.

  Attributes:
    config: the architecture.
    dtype: compute dtype (parameters keep their own dtype).
    attention: implementation for `dot_product_attention` ("xla", "cudnn", "auto").
    remat: gradient checkpointing of the resnet and transformer blocks, a key of
      `unet_blocks.REMAT_POLICIES` ("none", "blocks", "dots"); it changes what the
      backward pass stores, not the parameters or the numbers.
  """
  config: UNetConfig
  dtype: Any = jnp.float32
  attention: str = "xla"
  remat: str = "none"

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states):
    """Args: sample [B,H,W,C_in]; timesteps [B] or scalar; encoder_hidden_states [B,L,D].

    Returns: [B,H,W,C_out] in `dtype`. H and W need not be multiples of
    2**num_downsamples: upsampling then resizes to each skip's size, as diffusers does.
    """
    cfg = self.config
    opts = BlockOptions(cfg.norm_num_groups, cfg.norm_eps, cfg.use_linear_projection,
                        cfg.upcast_attention, cfg.downsample_padding, self.attention, self.dtype,
                        self.remat)
    x = sample.astype(self.dtype)
    context = encoder_hidden_states.astype(self.dtype)
    if cfg.center_input_sample:
      x = 2 * x - 1.0
    batch = x.shape[0]
    ch0 = cfg.block_out_channels[0]
    t = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    temb = timestep_embedding(t, ch0, flip_sin_to_cos=cfg.flip_sin_to_cos,
                              freq_shift=cfg.freq_shift).astype(self.dtype)
    temb = TimestepEmbedding(cfg.time_embedding_dim or 4 * ch0, self.dtype,
                             name="time_embedding")(temb)

    x = layers.Conv(ch0, (cfg.conv_in_kernel,) * 2, padding=(cfg.conv_in_kernel - 1) // 2,
                dtype=self.dtype, name="conv_in")(x)
    skips = [x]
    n = len(cfg.block_out_channels)
    for i, kind in enumerate(cfg.down_block_types):
      attn = _DOWN_TYPES[kind]
      x, s = DownBlock(cfg.block_out_channels[i], cfg.layers[i], cfg.heads[i] if attn else 0,
                       cfg.transformer_layers[i], i < n - 1, opts,
                       name=f"down_blocks_{i}")(x, temb, context)
      skips += s

    x = MidBlock(cfg.heads[-1], cfg.transformer_layers[-1], cfg.mid_block_scale_factor,
                 opts, name="mid_block")(x, temb, context)

    rev = lambda v: tuple(reversed(v))
    for i, kind in enumerate(cfg.up_block_types):
      attn = _UP_TYPES[kind]
      num = rev(cfg.layers)[i] + 1
      res, skips = skips[-num:], skips[:-num]
      final = i == n - 1
      size = None if final else skips[-1].shape[1:3]
      x = UpBlock(rev(cfg.block_out_channels)[i], num, rev(cfg.heads)[i] if attn else 0,
                  rev(cfg.transformer_layers)[i], not final, opts,
                  name=f"up_blocks_{i}")(x, res, temb, context, size)

    x = layers.GroupNorm(num_groups=cfg.norm_num_groups, epsilon=cfg.norm_eps,
                     use_fast_variance=False, dtype=self.dtype, name="conv_norm_out")(x)
    return layers.Conv(cfg.out_channels, (cfg.conv_out_kernel,) * 2,
                   padding=(cfg.conv_out_kernel - 1) // 2, dtype=self.dtype,
                   name="conv_out")(layers.silu(x))


def abstract_params(config: UNetConfig, dtype=jnp.float32) -> dict:
  """The parameter tree as ShapeDtypeStructs (no allocation), e.g. for loading."""
  model = UNet2DConditionModel(config)
  tree = jax.eval_shape(lambda: model.init(jax.random.key(0), *init_inputs(config))["params"])
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), tree)


def num_params(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))
