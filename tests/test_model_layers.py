"""lfs_jax.models.layers and the XLA attention: Flax's and JAX's numbers, fewer traces.

The layers are rewritten for tracing speed (docs/benchmarks.md, "Restart time"); these
tests hold them to the originals: the same parameter trees and initial values, the
same outputs, the same gradients to rounding, and identical UNet blocks traced once.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lfs_jax.models import attention, layers, unet, unet_blocks

_TOL = {jnp.float32: dict(rtol=1e-4, atol=1e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _close(got, want, dtype):
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             **_TOL[dtype])


def _value_and_grads(fn, *args):
  """fn(*args) and the gradients of sum(fn^2) for every argument, in one compile."""
  loss = lambda *a: jnp.sum(jnp.square(fn(*a).astype(jnp.float32)))
  return fn(*args), jax.grad(loss, argnums=tuple(range(len(args))))(*args)


def _check_layer(ours, flax_layer, x, dtype):
  """Same init tree and values, same output, same gradients (input and parameters)."""
  params = flax_layer.init(jax.random.key(0), x)
  ours_init = ours.init(jax.random.key(0), x)
  assert jax.tree.structure(ours_init) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, ours_init, params)
  # Stored values away from the initial ones, so scale and bias matter.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [a + 0.3 * jax.random.normal(k, a.shape, a.dtype)
                                     for a, k in zip(leaves, keys)])
  got, want = jax.jit(lambda p, x: (_value_and_grads(ours.apply, p, x),
                                    _value_and_grads(flax_layer.apply, p, x)))(params, x)
  assert got[0].dtype == want[0].dtype
  jax.tree.map(lambda g, w: _close(g, w, dtype), got, want)


@pytest.mark.parametrize("dtype,fast,compute", [
    (jnp.bfloat16, False, jnp.bfloat16),  # the UNet's and VAE's norms in bf16
    (jnp.bfloat16, True, jnp.bfloat16),  # CLIP's LayerNorm (Flax's fast variance)
    (jnp.float32, False, None),          # float32, the dtype from the input and parameters
])
def test_norms_match_flax(dtype, fast, compute):
  x = (3 * jax.random.normal(jax.random.key(2), (2, 4, 4, 64)) + 1).astype(dtype)
  _check_layer(layers.GroupNorm(num_groups=32, epsilon=1e-5, use_fast_variance=fast,
                                dtype=compute),
               nn.GroupNorm(num_groups=32, epsilon=1e-5, use_fast_variance=fast,
                            dtype=compute), x, dtype)
  _check_layer(layers.LayerNorm(epsilon=1e-5, use_fast_variance=fast, dtype=compute),
               nn.LayerNorm(epsilon=1e-5, use_fast_variance=fast, dtype=compute), x, dtype)


@pytest.mark.parametrize("dtype,bias", [(jnp.float32, True), (jnp.bfloat16, False)])
def test_dense_matches_flax(dtype, bias):
  x = jax.random.normal(jax.random.key(3), (2, 5, 48)).astype(dtype)
  _check_layer(layers.Dense(16, use_bias=bias, dtype=dtype),
               nn.Dense(16, use_bias=bias, dtype=dtype), x, dtype)


@pytest.mark.parametrize("dtype,stride,padding,bias", [
    (jnp.bfloat16, 2, 1, True),  # a downsampler, padding as an int, bias
    (jnp.float32, 1, "VALID", False),
])
def test_conv_matches_flax(dtype, stride, padding, bias):
  x = jax.random.normal(jax.random.key(5), (2, 6, 6, 8)).astype(dtype)
  kw = dict(strides=(stride, stride), padding=padding, use_bias=bias, dtype=dtype)
  _check_layer(layers.Conv(4, (3, 3), **kw), nn.Conv(4, (3, 3), **kw), x, dtype)


def test_unsupported_flax_setting_is_refused():
  x = jnp.ones((1, 4, 4, 8))
  with pytest.raises(NotImplementedError, match="group_size"):
    layers.GroupNorm(num_groups=None, group_size=4).init(jax.random.key(0), x)
  with pytest.raises(NotImplementedError, match="kernel_dilation"):
    layers.Conv(2, (3, 3), kernel_dilation=2).init(jax.random.key(0), x)


@pytest.mark.parametrize("dtype,causal", [(jnp.float32, True), (jnp.bfloat16, False)])
def test_xla_attention_matches_jax(dtype, causal):
  kq, kk, kv = jax.random.split(jax.random.key(4), 3)
  q, k, v = (2 * jax.random.normal(key, (2, 9, 3, 16)).astype(dtype) for key in (kq, kk, kv))
  ours = lambda q, k, v: attention.xla_attention(q, k, v, is_causal=causal)
  want = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                      implementation="xla")
  got, ref = jax.jit(lambda *a: (_value_and_grads(ours, *a), _value_and_grads(want, *a)))(
      q, k, v)
  assert got[0].dtype == ref[0].dtype == dtype
  jax.tree.map(lambda g, w: _close(g, w, dtype), got, ref)


def _sub_jaxprs(params):
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      inner = getattr(v, "jaxpr", v)
      if hasattr(inner, "eqns"):
        yield inner


def _block_calls(jaxpr):
  """The `layers.block` calls in a jaxpr: (input avals, the callee's jaxpr)."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "jit" and eqn.params["name"] == "apply":
      out.append((tuple(v.aval for v in eqn.invars), eqn.params["jaxpr"]))
    else:
      for sub in _sub_jaxprs(eqn.params):
        out += _block_calls(sub)
  return out


def test_identical_unet_blocks_are_traced_once():
  """Blocks with the same input shapes share one traced jaxpr (so one linearization and
  one lowering); every resnet and transformer goes through it."""
  config = unet.UNetConfig(block_out_channels=(32, 32), layers_per_block=2,
                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                           attention_head_dim=2, norm_num_groups=8, cross_attention_dim=16)
  model = unet.UNet2DConditionModel(config)
  inputs = unet.init_inputs(config, batch=2, seq_len=5)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))
  jaxpr = jax.make_jaxpr(lambda p, *a: model.apply(p, *a))(params, *inputs).jaxpr
  calls = _block_calls(jaxpr)
  # down: 2 resnets + 2 transformers, 2 resnets; mid: 2 resnets, 1 transformer;
  # up: 3 resnets, 3 resnets + 3 transformers.
  assert len(calls) == 4 + 2 + 3 + 3 + 6
  by_shape = {}
  for avals, callee in calls:
    by_shape.setdefault(avals, set()).add(id(callee))
  assert all(len(ids) == 1 for ids in by_shape.values())
  assert len(by_shape) < len(calls) // 2


def test_a_blocks_norms_of_one_shape_are_traced_once():
  """A transformer block's three LayerNorms run as one traced jaxpr (one linearization,
  one lowering), and so do the GroupNorms of a resnet whose width does not change."""
  opts = unet_blocks.BlockOptions(norm_num_groups=4)
  x, ctx, temb = jnp.ones((2, 6, 8)), jnp.ones((2, 5, 16)), jnp.ones((2, 12))
  for module, args in ((unet_blocks.BasicTransformerBlock(2, 4, opts), (x, ctx)),
                       (unet_blocks.ResnetBlock2D(8, opts), (x.reshape(2, 2, 3, 8), temb))):
    params = jax.eval_shape(module.init, jax.random.key(0), *args)
    jaxpr = jax.make_jaxpr(module.apply)(params, *args).jaxpr
    norms = [e.params["jaxpr"] for e in jaxpr.eqns if e.primitive.name == "jit"
             and e.params["name"] in ("_layer_norm", "_group_norm")]
    assert len(norms) == (3 if "Transformer" in type(module).__name__ else 2)
    assert len({id(n) for n in norms}) == 1


def test_a_field_holding_a_module_is_still_adopted_by_flax():
  """layers.Module stores plain field values itself (cheaper tracing); a value that
  holds a module still goes Flax's way: adopted as a named child with its parameters."""

  class Outer(layers.Module):
    inner: nn.Module
    parts: tuple

    @nn.compact
    def __call__(self, x):
      return self.parts[0](self.inner(x))

  x = jnp.ones((2, 3))
  outer = Outer(layers.Dense(4), (layers.Dense(5),))
  params = jax.eval_shape(outer.init, jax.random.key(0), x)["params"]
  assert set(params) == {"inner", "parts_0"}
  assert params["inner"]["kernel"].shape == (3, 4) and params["parts_0"]["kernel"].shape == (4, 5)
  opts = unet_blocks.BlockOptions()
  assert layers._plain((1, (2, 3), opts, jnp.float32, None, jax.nn.initializers.zeros))
  assert not layers._plain([1]) and not layers._plain((1, layers.Dense(2)))
