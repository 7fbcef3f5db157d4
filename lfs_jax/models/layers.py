"""Flax's Dense, Conv, GroupNorm, LayerNorm and Embed, read faster when applied.

In `apply`, Flax's `param` re-runs each parameter's initializer under
`jax.eval_shape` to check the stored shape: ~900 small traces per UNet call, about
a third of the CPU time of tracing the train step (docs/benchmarks.md, "Restart
time"). These subclasses return a stored parameter as it is; `init` is Flax's own,
so the parameter names, shapes and initial values are unchanged, as is the
computation (the same `__call__`). Shapes are still checked where weights enter:
the loaders compare every key and shape with `init`'s tree, and a wrong shape
fails inside the matmul or convolution that reads it.
"""

from __future__ import annotations

import flax.linen as nn
from flax.core import meta


class _StoredParams:
  """Mixin: `param` returns an existing parameter without re-tracing its initializer."""

  @nn.nowrap
  def param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):
    if self.is_initializing() or not self.has_variable("params", name):
      return super().param(name, init_fn, *init_args, unbox=unbox, **init_kwargs)
    value = self.get_variable("params", name)
    return meta.unbox(value) if unbox else value


# Same class names as Flax's: an unnamed instance gets the same automatic name.
class Dense(_StoredParams, nn.Dense):
  pass


class Conv(_StoredParams, nn.Conv):
  pass


class GroupNorm(_StoredParams, nn.GroupNorm):
  pass


class LayerNorm(_StoredParams, nn.LayerNorm):
  pass


class Embed(_StoredParams, nn.Embed):
  pass
