"""The shared attention function: math, causal mask, upcast, implementation choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lfs_jax.models import attention


def _naive(q, k, v, causal):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if causal:
    lq, lk = logits.shape[-2:]
    logits = np.where(np.tril(np.ones((lq, lk), bool)), logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", w, v)


@pytest.mark.parametrize("causal", [False, True])
def test_matches_naive_softmax_attention(causal):
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (2, 7, 3, 8))
  k = jax.random.normal(kk, (2, 7, 3, 8))
  v = jax.random.normal(kv, (2, 7, 3, 8))
  out = attention.dot_product_attention(q, k, v, is_causal=causal)
  np.testing.assert_allclose(np.asarray(out), _naive(q, k, v, causal), rtol=1e-5, atol=1e-6)


def test_upcast_keeps_the_input_dtype_and_is_closer_to_float32():
  kq, kk, kv = jax.random.split(jax.random.key(1), 3)
  q, k, v = (jax.random.normal(x, (1, 64, 2, 16)) * 4 for x in (kq, kk, kv))
  ref = _naive(q, k, v, False)
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  up = attention.dot_product_attention(*bf, upcast=True)
  assert up.dtype == jnp.bfloat16
  err_up = np.abs(np.asarray(up, np.float64) - ref).mean()
  err_plain = np.abs(np.asarray(attention.dot_product_attention(*bf), np.float64) - ref).mean()
  assert err_up <= err_plain


def test_implementation_choice():
  assert jax.default_backend() == "cpu"
  assert attention.resolve_implementation("auto", jnp.bfloat16, 64) == "xla"
  assert attention.resolve_implementation("xla", jnp.bfloat16, 64) == "xla"
  assert attention.resolve_implementation("cudnn", jnp.float32, 40) == "cudnn"
  with pytest.raises(ValueError, match="flash"):
    attention.resolve_implementation("flash", jnp.float32, 40)
