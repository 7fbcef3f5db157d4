"""The shared attention function: math, causal mask, upcast, implementation choice."""

import functools

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


def test_upcast_is_float32_attention_rounded_once_to_the_input_dtype():
  kq, kk, kv = jax.random.split(jax.random.key(1), 3)
  q, k, v = (jax.random.normal(x, (1, 64, 2, 16)) * 4 for x in (kq, kk, kv))
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  up = attention.dot_product_attention(*bf, upcast=True)
  assert up.dtype == jnp.bfloat16
  # Upcasting means: the float32 attention of the bf16 inputs, rounded to bf16 once.
  want = _naive(*bf, False)  # float64 math on the bf16 values
  np.testing.assert_array_equal(np.asarray(up),
                                np.asarray(jnp.asarray(want, jnp.float32).astype(jnp.bfloat16)))
  # Without it the products and softmax run in bf16: measurably further off
  # (0.043 against 0.029 max abs error here, on outputs up to 14).
  plain = attention.dot_product_attention(*bf)
  err_up = np.abs(np.asarray(up, np.float64) - want).max()
  err_plain = np.abs(np.asarray(plain, np.float64) - want).max()
  assert err_plain > 1.2 * err_up, (err_plain, err_up)


def test_implementation_choice(monkeypatch):
  assert jax.default_backend() == "cpu"
  long_self = dict(q_len=4096, kv_len=4096)
  assert attention.resolve_implementation("auto", jnp.bfloat16, 64) == "xla"
  assert attention.resolve_implementation("auto", jnp.bfloat16, 64, **long_self) == "xla"
  assert attention.resolve_implementation("xla", jnp.bfloat16, 64) == "xla"
  assert attention.resolve_implementation("cudnn", jnp.float32, 40) == "cudnn"
  with pytest.raises(ValueError, match="flash"):
    attention.resolve_implementation("flash", jnp.float32, 40)
  # splash is a TPU kernel: asked for off a TPU, the error names the setting.
  with pytest.raises(ValueError, match="model.attention"):
    attention.resolve_implementation("splash", jnp.bfloat16, 64, **long_self)
  # On a GPU, auto takes cuDNN where its flash kernel also trains: bf16/fp16, head
  # width a multiple of 8 up to 128, even lengths (never the 77 text tokens).
  with monkeypatch.context() as m:
    m.setattr(attention, "_on_gpu", lambda: True)
    gpu = lambda dtype, d, q, kv, **kw: attention.resolve_implementation(
        "auto", dtype, d, q_len=q, kv_len=kv, **kw)
    assert gpu(jnp.bfloat16, 40, 4096, 4096) == gpu(jnp.float16, 64, 256, 256) == "cudnn"
    assert gpu(jnp.bfloat16, 40, 4096, 77) == "xla"                  # UNet cross-attention
    assert gpu(jnp.bfloat16, 64, 77, 77, is_causal=True) == "xla"    # CLIP
    assert gpu(jnp.float32, 40, 4096, 4096) == "xla"
    assert gpu(jnp.bfloat16, 36, 4096, 4096) == "xla"
    assert gpu(jnp.bfloat16, 160, 4096, 4096) == "xla"
  # On a TPU, auto takes splash for long self-attention only.
  monkeypatch.setattr(attention, "_on_tpu", lambda: True)
  pick = lambda q, kv, **kw: attention.resolve_implementation("auto", jnp.bfloat16, 64,
                                                              q_len=q, kv_len=kv, **kw)
  assert pick(4096, 4096) == pick(1024, 1024) == "splash"
  assert pick(256, 256) == "xla"            # short: XLA's logits are small
  assert pick(4096, 77) == "xla"            # cross-attention to the text tokens
  assert pick(1000, 1000) == "xla"          # not in 128-token tiles
  assert pick(1024, 1024, is_causal=True) == "xla"
  assert attention.resolve_implementation("splash", jnp.float32, 40, q_len=256,
                                          kv_len=256) == "splash"
  assert attention.resolve_implementation("splash", jnp.float32, 40, q_len=256,
                                          kv_len=77) == "xla"


def _qkv(shape, kv_len=None, seed=2):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  kv_shape = shape if kv_len is None else (shape[0], kv_len) + shape[2:]
  return (jax.random.normal(kq, shape), jax.random.normal(kk, kv_shape),
          jax.random.normal(kv, kv_shape))


def _loss(impl):
  return lambda q, k, v: jnp.sum(attention.dot_product_attention(
      q, k, v, implementation=impl) ** 2)


def test_splash_matches_xla_in_interpret_mode(monkeypatch):
  """The TPU kernel, run by Pallas' interpreter on CPU: same outputs and gradients."""
  monkeypatch.setattr(attention, "splash_interpret", True)
  q, k, v = _qkv((2, 256, 2, 40))  # SD-1.5's head width 40 (not a lane multiple)
  want = attention.dot_product_attention(q, k, v)
  got = jax.jit(functools.partial(attention.dot_product_attention,
                                  implementation="splash"))(q, k, v)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  g_want = jax.grad(_loss("xla"), argnums=(0, 1, 2))(q, k, v)
  g_got = jax.jit(jax.grad(_loss("splash"), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
  # Cross-attention to 77 tokens is not tiled: XLA serves it, same numbers.
  q, k, v = _qkv((2, 128, 2, 40), kv_len=77)
  np.testing.assert_array_equal(
      np.asarray(attention.dot_product_attention(q, k, v, implementation="splash")),
      np.asarray(attention.dot_product_attention(q, k, v)))


def test_splash_splits_the_batch_over_the_mesh(monkeypatch):
  """Under a mesh the kernel runs per device on its part of the batch (shard_map)."""
  monkeypatch.setattr(attention, "splash_interpret", True)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "fsdp"))
  q, k, v = _qkv((8, 128, 1, 16))
  fn = jax.jit(functools.partial(attention.dot_product_attention, implementation="splash"))
  with jax.set_mesh(mesh):
    text = fn.lower(q, k, v).as_text()
    got = fn(q, k, v)
  assert "manual_computation" in text  # shard_map's region
  assert "manual_computation" not in fn.lower(q, k, v).as_text()  # no mesh: one call
  np.testing.assert_allclose(np.asarray(got), np.asarray(attention.dot_product_attention(
      q, k, v)), rtol=1e-5, atol=1e-5)
