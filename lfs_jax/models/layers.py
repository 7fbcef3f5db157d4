"""Flax's Dense, Conv, GroupNorm, LayerNorm and Embed, cheaper to trace when applied.

Tracing the SD-1.5 train step is per-primitive work repeated for every UNet call (the
teacher's, the student's under `linearize`): docs/benchmarks.md, "Restart time".
These subclasses keep Flax's `init` (parameter names, shapes, initial values) and
its formulas, and cut what tracing pays for:

- `param` returns a stored parameter as it is. In `apply`, Flax's re-runs each
  parameter's initializer under `jax.eval_shape` to check the stored shape (~900
  small traces per UNet call). Shapes are still checked where weights enter: the
  loaders compare every key and shape with `init`'s tree, and a wrong shape fails
  inside the matmul or convolution that reads it.
- GroupNorm and LayerNorm compute Flax's statistics and normalization (float32
  statistics, two-pass or fast variance, x - mean times rsqrt(var + eps) * scale,
  plus bias) in about half the primitives: lax reductions instead of `jnp.mean`'s
  nested jit, the group mean broadcast instead of `jnp.repeat`ed per channel, the
  centred input computed once. Same operations on the same values.
- Dense adds its bias without Flax's reshape; Conv casts and adds its bias in lax ops.
- GroupNorm and LayerNorm run as jitted functions, so that the norms repeated in a
  block (and across blocks of one width) are traced and differentiated once.
- `Module` (the base of the UNet's and CLIP's modules, and of these layers) stores a
  field value that holds no module without Flax's walk for submodules to adopt.
- `block` runs a repeated block (a UNet resnet or transformer, a CLIP layer) as a
  jitted function of its parameters, so that identical blocks are traced once.

Only the settings lfs_jax uses are implemented (no masks, no named axes, no custom
dot_general); any other raises, naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta
from flax.linen import dtypes as flax_dtypes
from jax import lax


# Values that cannot hold a Flax module (see `_PlainFields`).
_PLAIN = (bool, int, float, str, type(None), type, np.dtype, jax.Array, types.FunctionType,
          functools.partial)


def _plain(value) -> bool:
  """Whether `value` holds no module: a `_PLAIN` value, or a tuple or (config)
  dataclass of such values."""
  if isinstance(value, _PLAIN):
    return True
  if type(value) is tuple:  # pylint: disable=unidiomatic-typecheck  # not namedtuples
    return all(_plain(v) for v in value)
  if dataclasses.is_dataclass(value) and not isinstance(value, (type, nn.Module)):
    return all(_plain(getattr(value, f.name)) for f in dataclasses.fields(value))
  return False


class _PlainFields:
  """Mixin: a field value that holds no module is set without Flax's walk.

  Flax registers every field of every module it builds (twice: when the module is
  made and when it is set up) by walking the value for submodules to adopt; tracing
  the SD-1.5 train step made ~10,000 such walks over ints, dtypes, initializers and
  block options (docs/benchmarks.md, "Restart time"). A value that holds no module
  is stored as it is, as Flax's walk would leave it; anything else (lists, dicts,
  modules) still takes Flax's way.
  """

  @nn.nowrap
  def _register_submodules(self, name, val):
    if _plain(val):
      object.__setattr__(self, name, val)
    else:
      super()._register_submodules(name, val)


class Module(_PlainFields, nn.Module):
  """nn.Module with `_PlainFields`: the base of lfs_jax's models' modules."""


class _StoredParams(_PlainFields):
  """Mixin: `param` returns an existing parameter without re-tracing its initializer."""

  @nn.nowrap
  def param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):
    if self.is_initializing() or not self.has_variable("params", name):
      return super().param(name, init_fn, *init_args, unbox=unbox, **init_kwargs)
    value = self.get_variable("params", name)
    return meta.unbox(value) if unbox else value


@functools.lru_cache(maxsize=None)  # one jitted apply per (block class, fields)
def _block_apply(module_cls, fields: tuple):
  def apply(params, *args):
    return module_cls(*fields).apply({"params": params}, *args)
  return jax.jit(apply)


def block(parent: nn.Module, module_cls, fields: tuple, name: str, *args):
  """`module_cls(*fields, name=name)(*args)` inside `parent`, traced once per shape.

  When applying, the block runs as a jitted function of its parameters, cached per
  (class, fields): JAX then traces a block once for every distinct shape of its
  inputs and reuses that trace, and its linearization and lowering, for every other
  block with the same shapes (SD-1.5's 16 UNet transformers have 4 distinct shapes,
  CLIP's 12 layers one). This is what keeps tracing the train step cheap
  (docs/benchmarks.md, "Restart time"); XLA inlines the calls, so the compiled
  program computes the same thing.
  `init` builds the block in place, so the parameter tree is unchanged. `fields`
  (the class's positional fields) are the cache key: blocks meant to share a trace
  must spell them alike (the same defaults written out).
  """
  if parent.is_initializing():
    return module_cls(*fields, name=name)(*args)
  return _block_apply(module_cls, tuple(fields))(parent.variables["params"][name], *args)


def _refuse(module, **unsupported) -> None:
  """Raises for a Flax setting these layers do not implement (value differs from default)."""
  for field, default in unsupported.items():
    if getattr(module, field) is not default and getattr(module, field) != default:
      raise NotImplementedError(
          f"lfs_jax.models.layers.{type(module).__name__}: {field}="
          f"{getattr(module, field)!r} is not implemented; use flax.linen's layer")


def cast(x: jax.Array, dtype) -> jax.Array:
  """x in dtype (a convert only where the dtype differs; lax, no nested jit)."""
  return x if x.dtype == dtype else lax.convert_element_type(x, dtype)


def silu(x: jax.Array) -> jax.Array:
  """x * sigmoid(x), as `jax.nn.silu` computes it, without its nested jit."""
  return lax.mul(x, lax.logistic(x))


def gelu_exact(x: jax.Array) -> jax.Array:
  """torch's erf GELU, as `jax.nn.gelu(approximate=False)` computes it, without its copy."""
  half, root = np.array(0.5, x.dtype), np.array(np.sqrt(0.5), x.dtype)
  return lax.mul(lax.mul(half, x), lax.erfc(lax.mul(lax.neg(x), root)))


def _mean(x: jax.Array, axes: Sequence[int]) -> jax.Array:
  """`jnp.mean` over axes (sum, then divide by the count), as one reduction."""
  n = math.prod(x.shape[a] for a in axes)
  return lax.div(lax.reduce_sum(x, tuple(axes)), np.array(n, x.dtype))


def _normalize(x: jax.Array, axes: Sequence[int], kept: Sequence[int], fast: bool,
               epsilon: float, scale, bias, feature_dims: Sequence[int], out_dtype):
  """Flax's normalization of float32 `x` over `axes`: (x - mean) * (rsqrt(var + eps) *
  scale) + bias, cast to out_dtype. `kept`: the dims of x that the statistics keep;
  `feature_dims`: the dims of x that scale and bias (reshaped to match) span."""
  mean = _mean(x, axes)
  centred = lax.sub(x, lax.broadcast_in_dim(mean, x.shape, tuple(kept)))
  if fast:  # E[x^2] - E[x]^2, clipped at 0 (Flax's use_fast_variance)
    var = jnp.maximum(0.0, _mean(lax.square(x), axes) - lax.square(mean))
  else:
    var = _mean(lax.square(centred), axes)
  eps = np.array(epsilon, var.dtype)
  mul = lax.broadcast_in_dim(lax.rsqrt(lax.add(var, eps)), x.shape, tuple(kept))
  if scale is not None:
    mul = lax.mul(mul, lax.broadcast_in_dim(cast(scale, x.dtype), x.shape,
                                            tuple(feature_dims)))
  y = lax.mul(centred, mul)
  if bias is not None:
    y = lax.add(y, lax.broadcast_in_dim(cast(bias, x.dtype), x.shape, tuple(feature_dims)))
  return cast(y, out_dtype)


def _norm_params(norm, x: jax.Array, mask):
  """(scale, bias, statistics dtype, output dtype) of a GroupNorm or LayerNorm on x,
  as Flax's: per-channel parameters, float32 or wider statistics."""
  if mask is not None:
    raise NotImplementedError(f"lfs_jax.models.layers.{type(norm).__name__}: mask is not "
                              "implemented")
  feature = (x.shape[-1],)
  scale = (norm.param("scale", norm.scale_init, feature, norm.param_dtype)
           if norm.use_scale else None)
  bias = (norm.param("bias", norm.bias_init, feature, norm.param_dtype)
          if norm.use_bias else None)
  stats = jnp.promote_types(x.dtype if norm.dtype is None else norm.dtype, jnp.float32)
  return scale, bias, stats, flax_dtypes.canonicalize_dtype(x, scale, bias, dtype=norm.dtype)


# The norms run as jitted functions of (x, scale, bias): a block's three LayerNorms, or
# the GroupNorms of resnets whose widths agree, are then traced, linearized and lowered
# once per input shape (XLA inlines the calls).
@functools.partial(jax.jit, static_argnames=("groups", "fast", "epsilon", "stats", "out"))
def _group_norm(x, scale, bias, *, groups, fast, epsilon, stats, out):
  """GroupNorm of x [B, ..., C] over all but B, `groups` groups of channels."""
  c = x.shape[-1]
  grouped = x.shape[:-1] + (groups, c // groups)
  n = len(grouped)
  per_group = lambda p: None if p is None else p.reshape(grouped[-2:])
  y = _normalize(cast(x.reshape(grouped), stats), tuple(range(1, n - 2)) + (n - 1,),
                 (0, n - 2), fast, epsilon, per_group(scale), per_group(bias),
                 (n - 2, n - 1), out)
  return y.reshape(x.shape)


@functools.partial(jax.jit, static_argnames=("fast", "epsilon", "stats", "out"))
def _layer_norm(x, scale, bias, *, fast, epsilon, stats, out):
  """LayerNorm of x [..., C] over C."""
  n = x.ndim
  return _normalize(cast(x, stats), (n - 1,), tuple(range(n - 1)), fast, epsilon, scale, bias,
                    (n - 1,), out)


# Same class names as Flax's: an unnamed instance gets the same automatic name.
class Dense(_StoredParams, nn.Dense):
  """Flax's Dense (`x @ kernel + bias` in `dtype`)."""

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    _refuse(self, precision=None, dot_general=None, dot_general_cls=None,
            promote_dtype=flax_dtypes.promote_dtype)
    kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    dtype = flax_dtypes.canonicalize_dtype(inputs, kernel, bias, dtype=self.dtype)
    y = lax.dot_general(cast(jnp.asarray(inputs), dtype), cast(kernel, dtype),
                        (((inputs.ndim - 1,), (0,)), ((), ())))
    if bias is not None:
      y = lax.add(y, lax.broadcast_in_dim(cast(bias, dtype), y.shape, (y.ndim - 1,)))
    return y


class Conv(_StoredParams, nn.Conv):
  """Flax's Conv over one batch axis ([B, spatial..., C]), zero or explicit padding."""

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    _refuse(self, input_dilation=1, kernel_dilation=1, feature_group_count=1, mask=None,
            precision=None, conv_general_dilated=None, conv_general_dilated_cls=None,
            promote_dtype=flax_dtypes.promote_dtype)
    size = ((self.kernel_size,) if isinstance(self.kernel_size, int)
            else tuple(self.kernel_size))
    n = len(size)
    if inputs.ndim != n + 2:
      raise NotImplementedError(f"lfs_jax.models.layers.Conv: input of rank {inputs.ndim} "
                                f"for a {n}-d kernel (one batch axis only); use flax.linen's")
    padding = nn.linear.canonicalize_padding(self.padding, n)
    if padding in ("CIRCULAR", "REFLECT", "CAUSAL"):
      raise NotImplementedError(f"lfs_jax.models.layers.Conv: padding={padding!r} is not "
                                "implemented; use flax.linen's layer")
    strides = (self.strides or 1,) * n if isinstance(self.strides or 1, int) else tuple(
        self.strides)
    kernel = self.param("kernel", self.kernel_init, size + (inputs.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    dtype = flax_dtypes.canonicalize_dtype(inputs, kernel, bias, dtype=self.dtype)
    inputs, kernel = cast(jnp.asarray(inputs), dtype), cast(kernel, dtype)
    bias = None if bias is None else cast(bias, dtype)
    y = lax.conv_general_dilated(inputs, kernel, strides, padding, lhs_dilation=(1,) * n,
                                 rhs_dilation=(1,) * n,
                                 dimension_numbers=nn.linear._conv_dimension_numbers(
                                     inputs.shape))
    if bias is not None:  # Flax's bias add: [C] as [1, ..., 1, C], broadcast by the add
      y = lax.add(y, lax.reshape(bias, (1,) * (y.ndim - 1) + bias.shape))
    return y


class GroupNorm(_StoredParams, nn.GroupNorm):
  """Flax's GroupNorm over all but the batch axis, `num_groups` groups of channels."""

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: Optional[jax.Array] = None) -> jax.Array:
    _refuse(self, group_size=None, reduction_axes=None, axis_name=None,
            axis_index_groups=None, force_float32_reductions=True)
    c, groups = x.shape[-1], self.num_groups
    if not groups or groups <= 0 or c % groups:
      raise ValueError(f"GroupNorm: {groups} groups do not divide {c} channels")
    scale, bias, stats, out = _norm_params(self, x, mask)
    return _group_norm(x, scale, bias, groups=groups, fast=self.use_fast_variance,
                       epsilon=self.epsilon, stats=stats, out=out)


class LayerNorm(_StoredParams, nn.LayerNorm):
  """Flax's LayerNorm over the last axis."""

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: Optional[jax.Array] = None) -> jax.Array:
    _refuse(self, reduction_axes=-1, feature_axes=-1, axis_name=None,
            axis_index_groups=None, force_float32_reductions=True)
    scale, bias, stats, out = _norm_params(self, x, mask)
    return _layer_norm(x, scale, bias, fast=self.use_fast_variance, epsilon=self.epsilon,
                       stats=stats, out=out)


class Embed(_StoredParams, nn.Embed):
  pass
