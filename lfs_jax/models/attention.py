"""The one attention function used by the UNet, the VAE and CLIP.

Everything goes through `jax.nn.dot_product_attention`, so the choice between XLA's
generic lowering and cuDNN's fused kernel is a single string that travels in the
model configs (`implementation`).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "auto")

# cuDNN's fused kernel covers half-precision inputs with these head widths.
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_MAX_HEAD_DIM = 128


def resolve_implementation(implementation: str, dtype, head_dim: int) -> str:
  """Returns "xla" or "cudnn" for a requested implementation.

  "auto" picks cuDNN on a GPU backend when the dtype and head width allow it, XLA
  everywhere else (CPU, TPU, float32). "cudnn" is taken at its word: a request the
  kernel cannot serve fails loudly in JAX rather than silently falling back.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation != "auto":
    return implementation
  on_gpu = jax.default_backend() == "gpu"
  fits = (jnp.dtype(dtype) in [jnp.dtype(d) for d in _CUDNN_DTYPES]
          and head_dim <= _CUDNN_MAX_HEAD_DIM and head_dim % 8 == 0)
  return "cudnn" if on_gpu and fits else "xla"


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    implementation: str = "xla",
    is_causal: bool = False,
    upcast: bool = False,
    scale: Optional[float] = None,
) -> jax.Array:
  """Multi-head attention on [B, L, H, D] arrays.

  Args:
    q: queries [B, Lq, H, D].
    k: keys [B, Lk, H, D].
    v: values [B, Lk, H, D].
    implementation: "xla", "cudnn" or "auto" (see `resolve_implementation`).
    is_causal: mask future positions (CLIP's text transformer).
    upcast: compute the softmax in float32 (diffusers' `upcast_attention`, needed
      by SD 2.1 in half precision); the output keeps q's dtype.
    scale: logit scale, default 1/sqrt(D).

  Returns:
    [B, Lq, H, D] in q's dtype.
  """
  out_dtype = q.dtype
  if upcast:
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  impl = resolve_implementation(implementation, q.dtype, q.shape[-1])
  out = jax.nn.dot_product_attention(
      q, k, v, scale=scale, is_causal=is_causal, implementation=impl)
  return out.astype(out_dtype)
