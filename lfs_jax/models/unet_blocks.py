"""Building blocks of the Stable Diffusion UNet (NHWC), named after diffusers' modules.

Every submodule carries the name of its diffusers counterpart with list indices
folded in (`resnets_0`, `to_out_0`, `net_0/proj`), so `weights.convert` maps a
diffusers state dict onto these trees without a table. Input channel counts are
never stored: Flax infers them from the arrays, which keeps the blocks free of
diffusers' channel bookkeeping for skip connections.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lfs_jax.models import layers
from lfs_jax.models.attention import dot_product_attention

# Gradient checkpointing of the resnet and transformer blocks (config model.remat):
# what the backward pass keeps of each block's forward pass; the rest is recomputed.
REMAT_POLICIES = {
    "none": None,  # keep everything (no remat)
    "blocks": jax.checkpoint_policies.nothing_saveable,  # only the block inputs
    # the outputs of the weight matmuls (projections, feed-forward); norms,
    # activations, convolutions and the attention logits are recomputed.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class BlockOptions:
  """Settings shared by every block of one UNet (hashable, a static module field)."""
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  use_linear_projection: bool = False
  upcast_attention: bool = False
  downsample_padding: int = 1
  attention: str = "xla"
  dtype: Any = jnp.float32
  remat: str = "none"


@functools.lru_cache(maxsize=None)  # one lifted class per (block, policy)
def _remat(module_cls, remat: str):
  """`module_cls` checkpointed by the `remat` policy; parameter paths are unchanged."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat must be one of {list(REMAT_POLICIES)}, got {remat!r}")
  if remat == "none":
    return module_cls
  return nn.remat(module_cls, policy=REMAT_POLICIES[remat])


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of [B] timesteps -> [B, dim] float32, as diffusers'.

  The frequencies are host constants rounded once from float64: computed on the
  device, XLA's reciprocal rewrite of the division and each backend's exp move them
  by an ulp, which t ~ 1000 amplifies to ~1e-4 in sin/cos.
  """
  half = dim // 2
  freqs = np.exp(-math.log(max_period) * np.arange(half) / (half - freq_shift))
  args = timesteps.astype(jnp.float32)[:, None] * jnp.asarray(freqs, jnp.float32)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _group_norm(opts: BlockOptions, name: str, eps: Optional[float] = None) -> layers.GroupNorm:
  # Two-pass variance: E[x^2] - E[x]^2 loses digits against torch's GroupNorm.
  return layers.GroupNorm(num_groups=opts.norm_num_groups,
                      epsilon=opts.norm_eps if eps is None else eps,
                      use_fast_variance=False, dtype=opts.dtype, name=name)


def _conv(features: int, kernel: int, opts: BlockOptions, name: str, stride: int = 1,
          padding: Optional[int] = None) -> layers.Conv:
  p = (kernel - 1) // 2 if padding is None else padding
  return layers.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((p, p), (p, p)), dtype=opts.dtype, name=name)


def _add(a: jax.Array, b: jax.Array) -> jax.Array:
  """a + b (lax's add where jnp's operator would trace a nested jit; as jnp else)."""
  if a.dtype == b.dtype and a.shape == b.shape:
    return jax.lax.add(a, b)
  return a + b


class TimestepEmbedding(layers.Module):
  """linear_1 -> silu -> linear_2: [B, C0] -> [B, time_dim]."""
  time_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = layers.Dense(self.time_dim, dtype=self.dtype, name="linear_1")(x)
    return layers.Dense(self.time_dim, dtype=self.dtype, name="linear_2")(layers.silu(x))


class ResnetBlock2D(layers.Module):
  """Pre-norm residual block with an additive time embedding: [B,H,W,Cin] -> [B,H,W,out]."""
  out_channels: int
  opts: BlockOptions
  output_scale_factor: float = 1.0

  @nn.compact
  def __call__(self, x, temb):
    o = self.opts
    h = _conv(self.out_channels, 3, o, "conv1")(layers.silu(_group_norm(o, "norm1")(x)))
    t = layers.Dense(self.out_channels, dtype=o.dtype, name="time_emb_proj")(layers.silu(temb))
    h = _add(h, jax.lax.broadcast_in_dim(t, h.shape, (0, 3)))  # [B, C] over every pixel
    h = _conv(self.out_channels, 3, o, "conv2")(layers.silu(_group_norm(o, "norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, o, "conv_shortcut")(x)
    out = _add(x, h)
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return out


class Attention(layers.Module):
  """Multi-head attention, self when `context` is None: [B, L, C] -> [B, L, C]."""
  heads: int
  head_dim: int
  opts: BlockOptions

  @nn.compact
  def __call__(self, x, context=None):
    o = self.opts
    context = x if context is None else context
    inner = self.heads * self.head_dim
    dense = lambda n, bias: layers.Dense(inner, use_bias=bias, dtype=o.dtype, name=n)
    b = x.shape[0]
    q = dense("to_q", False)(x).reshape(b, -1, self.heads, self.head_dim)
    k = dense("to_k", False)(context).reshape(b, -1, self.heads, self.head_dim)
    v = dense("to_v", False)(context).reshape(b, -1, self.heads, self.head_dim)
    out = dot_product_attention(q, k, v, implementation=o.attention,
                                upcast=o.upcast_attention)
    out = out.reshape(b, -1, inner)
    return layers.Dense(x.shape[-1], dtype=o.dtype, name="to_out_0")(out)


class GEGLU(layers.Module):
  """proj to 2*inner, split (hidden, gate), hidden * gelu(gate) with exact erf gelu."""
  inner: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = layers.Dense(2 * self.inner, dtype=self.dtype, name="proj")(x)
    h, gate = jax.lax.split(y, (self.inner, self.inner), axis=y.ndim - 1)
    return jax.lax.mul(h, layers.gelu_exact(gate))


class FeedForward(layers.Module):
  """net_0 (GEGLU, width 4*dim) -> net_2 (Dense back to dim)."""
  mult: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    h = GEGLU(dim * self.mult, dtype=self.dtype, name="net_0")(x)
    return layers.Dense(dim, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(layers.Module):
  """LayerNorm -> self-attn, LayerNorm -> cross-attn, LayerNorm -> GEGLU FF, each residual."""
  heads: int
  head_dim: int
  opts: BlockOptions

  @nn.compact
  def __call__(self, x, context):
    o = self.opts
    ln = lambda n: layers.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=o.dtype, name=n)
    x = _add(x, Attention(self.heads, self.head_dim, o, name="attn1")(ln("norm1")(x)))
    x = _add(x, Attention(self.heads, self.head_dim, o, name="attn2")(ln("norm2")(x), context))
    return _add(x, FeedForward(dtype=o.dtype, name="ff")(ln("norm3")(x)))


class Transformer2DModel(layers.Module):
  """GroupNorm -> proj_in -> transformer blocks over H*W tokens -> proj_out, residual."""
  heads: int
  num_layers: int
  opts: BlockOptions

  @nn.compact
  def __call__(self, x, context):
    o = self.opts
    b, hh, ww, c = x.shape
    if c % self.heads:
      raise ValueError(f"{c} channels do not split into {self.heads} attention heads")
    head_dim = c // self.heads
    h = _group_norm(o, "norm", eps=1e-6)(x)
    if o.use_linear_projection:
      h = layers.Dense(c, dtype=o.dtype, name="proj_in")(h.reshape(b, hh * ww, c))
    else:
      h = _conv(c, 1, o, "proj_in")(h).reshape(b, hh * ww, c)
    block = _remat(BasicTransformerBlock, o.remat)
    for k in range(self.num_layers):
      h = block(self.heads, head_dim, o, name=f"transformer_blocks_{k}")(h, context)
    if o.use_linear_projection:
      h = layers.Dense(c, dtype=o.dtype, name="proj_out")(h).reshape(b, hh, ww, c)
    else:
      h = _conv(c, 1, o, "proj_out")(h.reshape(b, hh, ww, c))
    return h + x


class Downsample2D(layers.Module):
  """3x3 conv with stride 2 (padding 1, or diffusers' (0,1) pad when padding is 0)."""
  channels: int
  opts: BlockOptions

  @nn.compact
  def __call__(self, x):
    pad = self.opts.downsample_padding
    if pad == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(self.channels, 3, self.opts, "conv", stride=2, padding=pad)(x)


def upsample_nearest(x: jax.Array, size: Tuple[int, int]) -> jax.Array:
  """Nearest-neighbour resize of [B,H,W,C] to `size` (torch's floor(i * in / out) rule)."""
  for axis, out in ((1, size[0]), (2, size[1])):
    n = x.shape[axis]
    if out == 2 * n:
      x = jnp.repeat(x, 2, axis=axis)
    elif out != n:
      x = jnp.take(x, jnp.array([(i * n) // out for i in range(out)]), axis=axis)
  return x


class Upsample2D(layers.Module):
  """Nearest upsampling (x2, or to the skip connection's size) then a 3x3 conv."""
  channels: int
  opts: BlockOptions

  @nn.compact
  def __call__(self, x, size: Optional[Tuple[int, int]] = None):
    size = size if size is not None else (2 * x.shape[1], 2 * x.shape[2])
    return _conv(self.channels, 3, self.opts, "conv")(upsample_nearest(x, size))


class DownBlock(layers.Module):
  """DownBlock2D (heads == 0) or CrossAttnDownBlock2D; returns (x, skip states)."""
  out_channels: int
  num_layers: int
  heads: int
  transformer_layers: int
  add_downsample: bool
  opts: BlockOptions

  @nn.compact
  def __call__(self, x, temb, context) -> Tuple[jax.Array, List[jax.Array]]:
    skips = []
    resnet = _remat(ResnetBlock2D, self.opts.remat)
    for j in range(self.num_layers):
      x = layers.block(self, resnet, (self.out_channels, self.opts, 1.0), f"resnets_{j}", x, temb)
      if self.heads:
        x = layers.block(self, Transformer2DModel,
                         (self.heads, self.transformer_layers, self.opts), f"attentions_{j}",
                         x, context)
      skips.append(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, self.opts, name="downsamplers_0")(x)
      skips.append(x)
    return x, skips


class UpBlock(layers.Module):
  """UpBlock2D (heads == 0) or CrossAttnUpBlock2D; consumes skips from the last."""
  out_channels: int
  num_layers: int
  heads: int
  transformer_layers: int
  add_upsample: bool
  opts: BlockOptions

  @nn.compact
  def __call__(self, x, skips: Sequence[jax.Array], temb, context,
               upsample_size: Optional[Tuple[int, int]] = None):
    skips = list(skips)
    resnet = _remat(ResnetBlock2D, self.opts.remat)
    for j in range(self.num_layers):
      x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = layers.block(self, resnet, (self.out_channels, self.opts, 1.0), f"resnets_{j}", x, temb)
      if self.heads:
        x = layers.block(self, Transformer2DModel,
                         (self.heads, self.transformer_layers, self.opts), f"attentions_{j}",
                         x, context)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, self.opts, name="upsamplers_0")(x, upsample_size)
    return x


class MidBlock(layers.Module):
  """UNetMidBlock2DCrossAttn: resnet, then (attention, resnet)."""
  heads: int
  transformer_layers: int
  output_scale_factor: float
  opts: BlockOptions

  @nn.compact
  def __call__(self, x, temb, context):
    c = x.shape[-1]
    resnet = _remat(ResnetBlock2D, self.opts.remat)
    fields = (c, self.opts, self.output_scale_factor)
    x = layers.block(self, resnet, fields, "resnets_0", x, temb)
    x = layers.block(self, Transformer2DModel, (self.heads, self.transformer_layers, self.opts),
                     "attentions_0", x, context)
    return layers.block(self, resnet, fields, "resnets_1", x, temb)
