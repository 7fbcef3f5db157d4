"""The one attention function used by the UNet, the VAE and CLIP.

XLA's generic lowering and cuDNN's fused kernel come through
`jax.nn.dot_product_attention`; on TPU, long self-attention can take the Pallas
splash-attention kernel instead. The choice is a single string that travels in the
model configs (`implementation`, config field model.attention).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax  # lax ops, not jnp's operators: each of those traces a nested jit
from jax.sharding import PartitionSpec as P

from lfs_jax.models import layers

IMPLEMENTATIONS = ("xla", "cudnn", "splash", "auto")

# cuDNN's fused kernel covers half-precision inputs with these head widths.
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_MAX_HEAD_DIM = 128
# Splash attention tiles both sequences in blocks of 128 positions. "auto" takes it
# for self-attention over at least SPLASH_MIN_LEN tokens (a 32x32 latent map: 256 px
# and up), where XLA's [L, L] logits dominate the memory of the step.
_SPLASH_TILE = 128
SPLASH_MIN_LEN = 1024
# Tests set this to run the TPU kernel in Pallas' interpreter on CPU (slow, exact).
splash_interpret = False


def _on_tpu() -> bool:
  return jax.default_backend() == "tpu"


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def splash_available() -> bool:
  """Whether "splash" can run here: a TPU backend (or the interpreter, for tests)."""
  return _on_tpu() or splash_interpret


def _splash_fits(q_len: int, kv_len: int, is_causal: bool) -> bool:
  return (not is_causal and q_len > 0 and kv_len > 0
          and q_len % _SPLASH_TILE == 0 and kv_len % _SPLASH_TILE == 0)


def resolve_implementation(implementation: str, dtype, head_dim: int, *, q_len: int = 0,
                           kv_len: int = 0, is_causal: bool = False) -> str:
  """Returns "xla", "cudnn" or "splash" for a requested implementation.

  "auto" picks splash on a TPU for self-attention (q_len == kv_len) over at least
  SPLASH_MIN_LEN tokens that the kernel tiles; cuDNN on a GPU when the dtype, the
  head width and the lengths allow it; XLA everywhere else (CPU, float32, short or
  cross-attention on a TPU). cuDNN's flash kernel refuses to train on odd lengths
  (JAX 0.11 on an H100: "Unsupported sequence length Q 77, KV 77" for CLIP's causal
  attention), so auto keeps every attention over the 77 text tokens (CLIP's, and
  the UNet's cross-attention) on XLA: they are short, and the long self-attention
  of the UNet, where cuDNN pays, has even lengths.
  "splash" takes the kernel wherever it tiles the lengths (multiples of 128, no
  causal mask) and XLA for the rest (cross-attention to 77 text tokens, CLIP's
  causal mask, small maps); off a TPU it is an error. "cudnn" is taken at its
  word: a request the kernel cannot serve fails loudly in JAX rather than silently
  falling back.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation == "splash":
    if not splash_available():
      raise ValueError(
          "attention implementation 'splash' (config model.attention) is a Pallas TPU "
          f"kernel; this backend is {jax.default_backend()!r}: use 'auto' or 'xla'")
    return "splash" if _splash_fits(q_len, kv_len, is_causal) else "xla"
  if implementation != "auto":
    return implementation
  if _on_tpu():
    long_self = q_len == kv_len and q_len >= SPLASH_MIN_LEN
    return "splash" if long_self and _splash_fits(q_len, kv_len, is_causal) else "xla"
  fits = (jnp.dtype(dtype) in [jnp.dtype(d) for d in _CUDNN_DTYPES]
          and head_dim <= _CUDNN_MAX_HEAD_DIM and head_dim % 8 == 0
          and q_len % 2 == 0 and kv_len % 2 == 0)
  return "cudnn" if _on_gpu() and fits else "xla"


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
    implementation: "xla", "cudnn", "splash" or "auto" (see `resolve_implementation`).
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
  impl = resolve_implementation(implementation, q.dtype, q.shape[-1], q_len=q.shape[1],
                                kv_len=k.shape[1], is_causal=is_causal)
  if impl == "splash":
    out = splash_attention(q, k, v, scale=scale)
  elif impl == "xla":
    out = xla_attention(q, k, v, scale=scale, is_causal=is_causal)
  else:
    out = jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=is_causal, implementation=impl)
  return out.astype(out_dtype)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: Optional[float] = None,
                  is_causal: bool = False) -> jax.Array:
  """`jax.nn.dot_product_attention(implementation="xla")` on [B, L, H, D], in fewer primitives.

  The same computation (logits in float32 at the half-precision dot algorithm, a
  float32 softmax with the max held out of the gradient, probabilities cast to the
  values' dtype, CLIP's causal mask at -0.7 * float32 max), written as two
  `dot_general`s: JAX's own goes through a `vmap` over query groups and `einsum`s,
  which the train step traces for every attention layer of every UNet call.
  """
  d = q.shape[-1]
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
  precision = {jnp.dtype(jnp.bfloat16): lax.DotAlgorithmPreset.BF16_BF16_F32,
               jnp.dtype(jnp.float16): lax.DotAlgorithmPreset.F16_F16_F32
               }.get(jnp.dtype(q.dtype))
  # [B, Lq, H, D] x [B, Lk, H, D] -> [B, H, Lq, Lk]
  logits = lax.dot_general(q, k, (((3,), (3,)), ((0, 2), (0, 2))), precision=precision,
                           preferred_element_type=logits_dtype)
  logits = layers.cast(lax.mul(logits, np.array(scale, logits_dtype)), jnp.float32)
  if is_causal:
    lq, lk = logits.shape[-2:]
    causal = jnp.tril(jnp.ones((lq, lk), bool))
    logits = jnp.where(causal, logits, jnp.asarray(-0.7 * jnp.finfo(jnp.float32).max,
                                                   logits.dtype))
  keep = lambda r: lax.broadcast_in_dim(r, logits.shape, (0, 1, 2))
  unnormalized = lax.exp(lax.sub(logits, lax.stop_gradient(keep(lax.reduce_max(logits, (3,))))))
  probs = layers.cast(lax.div(unnormalized, keep(lax.reduce_sum(unnormalized, (3,)))), k.dtype)
  # [B, H, Lq, Lk] x [B, Lk, H, D] -> [B, H, Lq, D] -> [B, Lq, H, D]
  out = lax.dot_general(probs, v, (((3,), (1,)), ((0, 1), (0, 2))))
  return lax.transpose(out, (0, 2, 1, 3))


def _tile(n: int) -> int:
  # The largest of the usual TPU tiles that divides n (n is a multiple of 128).
  return next(t for t in (512, 256, _SPLASH_TILE) if n % t == 0)


@functools.lru_cache(maxsize=None)
def _splash_kernel(q_len: int, kv_len: int, heads: int, interpret: bool):
  """The splash kernel for a full (unmasked) [heads, q_len, kv_len] attention."""
  # Imported on first use: Pallas' TPU modules add ~0.3 s to every start.
  from jax.experimental.pallas.ops.tpu import (  # pylint: disable=g-import-not-at-top
      splash_attention as sa)
  bq, bkv = _tile(q_len), _tile(kv_len)
  blocks = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                         block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                         block_q_dq=bq, block_kv_dq=bkv)
  mask = sa.MultiHeadMask([sa.FullMask((q_len, kv_len))] * heads)
  # Its block tables become concrete arrays even when built inside a trace, so the
  # cached kernel can serve every later trace.
  with jax.ensure_compile_time_eval():
    return sa.make_splash_mha_single_device(mask, block_sizes=blocks, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                     scale: Optional[float] = None) -> jax.Array:
  """Unmasked attention [B, L, H, D] by the Pallas splash kernel (TPU).

  Both lengths must be multiples of 128. Traced under a mesh (`jax.set_mesh`, as
  the train step and the sampler are) the batch is split over every mesh axis by
  `shard_map`: a Pallas call has no partitioning rule of its own, so XLA would
  otherwise gather the whole batch onto every device.
  """
  b, q_len, heads, d = q.shape
  kernel = _splash_kernel(q_len, k.shape[1], heads, splash_interpret)
  scale = 1.0 / math.sqrt(d) if scale is None else scale

  def attend(q, k, v):  # the kernel wants [H, L, D]; one call per batch element
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)
    out = jax.vmap(kernel)(heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k),
                           heads_first(v))
    return jnp.swapaxes(out, 1, 2)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or b % mesh.size:
    return attend(q, k, v)
  spec = P(mesh.axis_names)
  return jax.shard_map(attend, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)
