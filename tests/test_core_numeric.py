"""The core math pinned by numbers: each checked against its own numpy computation.

Tiny shapes and stand-in modules (a few matrix products instead of a UNet or a CLIP
tower) keep every compile to a second; the stand-ins record what the code under test
feeds them, so the reference can recompute the loss from those inputs alone:

- the session loss: the denoising term, DFKD (`trajectory`: the teacher's DDIM path,
  its timesteps, which point each row distils at), the K/V anchor and prior
  preservation's class-image rows, and the total
  denoise + prior.weight * prior + kd.weight * kd + kd.kv_weight * kv;
- the flip / random-rescale augmentation and the loss mask it returns;
- the ICGen start (first grid timestep <= s*T, the context noised there) for several
  strengths, step counts and spacings, through the jitted sampler.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lfs_jax import delta as delta_lib
from lfs_jax.diffusion import sampler
from lfs_jax.diffusion import schedule as schedule_lib
from lfs_jax.train import kd, losses
from lfs_jax.train import step as step_lib

T = 1000
# Stable Diffusion's schedule, written out (not lfs_jax's): scaled_linear betas.
SD_ALPHAS_CUMPROD = np.cumprod(
    1.0 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=np.float64) ** 2)
SD_SCHEDULER = schedule_lib.SchedulerConfig(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=1)

VOCAB, WIDTH, LEN, CH = 20, 8, 5, 3   # text: vocab, width, tokens; latent channels
KV = (("blk", "attn2", "to_k", "kernel"), ("blk", "attn2", "to_v", "kernel"))
CALLS = []  # (x, t, context) of every stand-in UNet call, recorded on the host


def _record(x, t, c):
  CALLS.append((np.asarray(x), np.asarray(t), np.asarray(c)))


def _unet_np(p, x, t, c):
  """The stand-in UNet in numpy: out [B, h, w, C] from x [B, h, w, C], t [B], c [B, L, D]."""
  k = (c @ p["blk"]["attn2"]["to_k"]["kernel"]).mean(1)[:, None, None, :]
  v = (c @ p["blk"]["attn2"]["to_v"]["kernel"]).mean(1)[:, None, None, :]
  return np.tanh(x @ p["conv"]["kernel"]) + 0.5 * k + 1e-3 * t[:, None, None, None] * v


@dataclasses.dataclass(frozen=True)
class FakeUNet:
  """_unet_np in jax; hashable (a static module) and records its inputs."""
  dtype: str = "float32"

  def apply(self, variables, x, t, context):
    p = variables["params"]
    jax.debug.callback(_record, x, t, context)
    k = (context @ p["blk"]["attn2"]["to_k"]["kernel"]).mean(1)[:, None, None, :]
    v = (context @ p["blk"]["attn2"]["to_v"]["kernel"]).mean(1)[:, None, None, :]
    return (jnp.tanh(x @ p["conv"]["kernel"]) + 0.5 * k
            + 1e-3 * t[:, None, None, None].astype(x.dtype) * v)


@dataclasses.dataclass(frozen=True)
class FakeText:
  """Token lookup in the table extended by the modifier-token rows: [N, L] -> [N, L, D]."""

  def apply(self, variables, ids, extra_embeddings):
    table = jnp.concatenate([variables["params"]["table"], extra_embeddings])
    return table[ids]


def _kernels(rs, scale=0.3):
  return {"blk": {"attn2": {"to_k": {"kernel": scale * rs.standard_normal((WIDTH, CH))},
                            "to_v": {"kernel": scale * rs.standard_normal((WIDTH, CH))}}}}


def _problem(seed=0, n_images=1, hw=4, **spec_overrides):
  """(trainable, frozen, teacher, data, spec) of a small session-2 problem, float32."""
  rs = np.random.default_rng(seed)
  f32 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float32), tree)
  teacher = f32(_kernels(rs))
  student = f32(jax.tree.map(lambda a: a + 0.2 * rs.standard_normal(a.shape), teacher))
  table = rs.standard_normal((VOCAB, WIDTH)).astype(np.float32)
  earlier = rs.standard_normal((1, WIDTH)).astype(np.float32)  # <c1>'s learned row
  frozen = {"unet": {"conv": {"kernel": (0.7 * rs.standard_normal((CH, CH))).astype(np.float32)}},
            "text": {"table": table},
            "tokens": np.concatenate([earlier, np.zeros((2, WIDTH), np.float32)])}
  trainable = {"unet": student, "tokens": rs.standard_normal((1, WIDTH)).astype(np.float32)}
  n = 3  # padded like a session: rows past n_images / n_kd hold huge values
  mean = rs.standard_normal((n, hw, hw, CH)).astype(np.float32)
  mean[n_images:] = 1e4
  # Two templates per photo, reading the session's token (id VOCAB + 1) and <c1>'s (VOCAB).
  ids = np.array([[[1, 2, VOCAB + 1, 3, 0], [4, VOCAB, VOCAB + 1, 0, 0]]] * n, np.int32)
  kd_context = rs.standard_normal((3, LEN, WIDTH)).astype(np.float32)
  kd_context[2] = 1e4
  data = losses.SessionData(
      latent_mean=jnp.asarray(mean),
      latent_logvar=jnp.full(mean.shape, -80.0),  # sigma 4e-18: the draw is the mean
      prompt_ids=jnp.asarray(ids), n_images=jnp.int32(n_images), token_offset=jnp.int32(1),
      kd_context=jnp.asarray(kd_context), n_kd=jnp.int32(2),
      kv_gram=kd.kv_gram(jnp.asarray(kd_context), 2))
  spec = dict(batch_size=2, kd_batch_size=4, kd_weight=3.0, use_kd=True, kd_points=4,
              kd_cached=False, flip=False, rescale=False, rescale_min=0.4, rescale_max=1.4,
              scaling_factor=0.5, scheduler=SD_SCHEDULER, kv_weight=5.0,
              delta=delta_lib.Leaves("crossattn_kv"))
  spec.update(spec_overrides)
  return trainable, frozen, {"unet": teacher}, data, losses.LossSpec(**spec)


MODELS = losses.Models(unet=FakeUNet(), text=FakeText())


# XLA:CPU's default fusion emitters, which tests/conftest.py turns off for the suite's
# compile time: for the tests that assert two different programs agree bit for bit.
DEFAULT_EMITTERS = {"xla_cpu_use_fusion_emitters": True}


@functools.lru_cache(maxsize=None)
def _loss_jit(spec, default_emitters=False):
  return jax.jit(functools.partial(losses.loss_fn, models=MODELS, spec=spec),
                 compiler_options=DEFAULT_EMITTERS if default_emitters else None)


def _run_loss(trainable, frozen, teacher, data, spec, seed, scheduler_cfg=SD_SCHEDULER,
              default_emitters=False):
  CALLS.clear()
  fn = _loss_jit(spec, default_emitters)
  loss, metrics = fn(trainable, frozen, teacher, data, schedule_lib.make_schedule(scheduler_cfg),
                     jax.random.key(seed))
  jax.effects_barrier()
  return float(loss), jax.tree.map(float, metrics), list(CALLS)


def _kv_np(student, teacher, kd_context, n):
  tokens = kd_context[:n].reshape(-1, WIDTH).astype(np.float64)
  gram = tokens.T @ tokens / len(tokens)
  terms = []
  for path in KV:
    d = _get(student, path).astype(np.float64) - _get(teacher, path)
    terms.append(np.sum(d * (gram @ d)) / d.shape[1])
  return np.mean(terms), gram


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _ddim_np(x, eps, t, t_prev):
  a, a_prev = SD_ALPHAS_CUMPROD[t], SD_ALPHAS_CUMPROD[t_prev]
  x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
  return np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_total_terms_and_trajectory_dfkd_match_numpy(seed):
  trainable, frozen, teacher, data, spec = _problem()
  loss, m, calls = _run_loss(trainable, frozen, teacher, data, spec, seed)
  b, k, p = spec.batch_size, spec.kd_batch_size, spec.kd_points
  p_student = {**trainable["unet"], **frozen["unet"]}
  p_teacher = {**teacher["unet"], **frozen["unet"]}
  kd_context = np.asarray(data.kd_context)

  # The teacher: kd.steps DDIM calls from pure noise at 999, 749, 499, 249, one
  # condition per row (never the padding condition), each call on the previous
  # call's DDIM (eta 0) result.
  teacher_calls, (x_in, t_in, c_in) = calls[:-1], calls[-1]
  assert len(teacher_calls) == p and x_in.shape[0] == b + k
  np.testing.assert_array_equal([c[1] for c in teacher_calls],
                                [[t] * k for t in (999, 749, 499, 249)])
  c_rows = teacher_calls[0][2]
  cond = [next(j for j in range(2) if np.array_equal(c_rows[r], kd_context[j]))
          for r in range(k)]
  for x, t, c in teacher_calls:
    np.testing.assert_array_equal(c, c_rows)
  z = teacher_calls[0][0]
  assert z.shape == (k, 4, 4, CH) and 0.6 < z.std() < 1.4 and abs(z.mean()) < 0.3
  for (x, t, c), (x_next, t_next, _) in zip(teacher_calls, teacher_calls[1:]):
    eps = _unet_np(p_teacher, x.astype(np.float64), t, c)
    np.testing.assert_allclose(x_next, _ddim_np(x.astype(np.float64), eps, t[0], t_next[0]),
                               rtol=1e-5, atol=1e-5)

  # The student's DFKD rows: row r at one point of its own trajectory, with that
  # point's timestep and its condition; the target is the teacher's output there.
  for r in range(k):
    hits = [i for i, call in enumerate(teacher_calls) if np.array_equal(x_in[b + r], call[0][r])]
    assert len(hits) == 1, r
    assert t_in[b + r] == teacher_calls[hits[0]][1][r]
    np.testing.assert_array_equal(c_in[b + r], kd_context[cond[r]])
  xk, tk, ck = (a[b:].astype(np.float64) for a in (x_in, t_in, c_in))
  kd = np.mean((_unet_np(p_student, xk, tk, ck) - _unet_np(p_teacher, xk, tk, ck)) ** 2)

  # The denoising rows: photo 0 (the only real one) scaled by the VAE factor, noised
  # at t; the prompt is one of its two templates with <c1>'s frozen row at id VOCAB
  # and the trained row at VOCAB + 1.
  table = np.concatenate([frozen["text"]["table"], frozen["tokens"][:1], trainable["tokens"]])
  z0 = np.asarray(data.latent_mean[0], np.float64) * spec.scaling_factor
  templates = table[np.asarray(data.prompt_ids[0])]
  for i in range(b):
    assert any(np.array_equal(c_in[i], tpl) for tpl in templates), i
  a = SD_ALPHAS_CUMPROD[t_in[:b]][:, None, None, None]
  noise = (x_in[:b] - np.sqrt(a) * z0) / np.sqrt(1 - a)  # what add_noise must have used
  assert 0.5 < noise.std() < 1.5
  denoise = np.mean((_unet_np(p_student, x_in[:b].astype(np.float64), t_in[:b],
                              c_in[:b].astype(np.float64)) - noise) ** 2)

  kv, _ = _kv_np(trainable["unet"], teacher["unet"], kd_context, 2)
  np.testing.assert_allclose(m["denoise"], denoise, rtol=2e-4)
  np.testing.assert_allclose(m["kd"], kd, rtol=1e-4)
  np.testing.assert_allclose(m["kv"], kv, rtol=1e-5)
  np.testing.assert_allclose(loss, denoise + 3.0 * kd + 5.0 * kv, rtol=1e-4)
  assert kd > 0.01 and kv > 0.01 and denoise > 0.01  # every term weighs in


def test_dfkd_rows_distil_at_every_point_of_the_trajectory():
  """Over 4 steps of 4 rows, the distillation points are drawn from all four."""
  trainable, frozen, teacher, data, spec = _problem()
  points = []
  for seed in range(4):
    _, _, calls = _run_loss(trainable, frozen, teacher, data, spec, seed)
    x_in = calls[-1][0]
    points += [next(i for i, c in enumerate(calls[:-1]) if np.array_equal(x_in[2 + r], c[0][r]))
               for r in range(4)]
  assert set(points) == {0, 1, 2, 3}, points


def test_noise_mode_distils_pure_noise_at_the_last_timestep():
  trainable, frozen, teacher, data, spec = _problem(kd_points=1)
  loss, m, calls = _run_loss(trainable, frozen, teacher, data, spec, 3)
  (x_t, t_t, c_t), (x_in, t_in, c_in) = calls
  np.testing.assert_array_equal(t_t, [T - 1] * 4)
  np.testing.assert_array_equal(x_in[2:], x_t)
  np.testing.assert_array_equal(t_in[2:], [T - 1] * 4)
  p_student = {**trainable["unet"], **frozen["unet"]}
  p_teacher = {**teacher["unet"], **frozen["unet"]}
  xk, tk, ck = (a.astype(np.float64) for a in (x_t, t_t, c_t))
  kd = np.mean((_unet_np(p_student, xk, tk, ck) - _unet_np(p_teacher, xk, tk, ck)) ** 2)
  np.testing.assert_allclose(m["kd"], kd, rtol=1e-4)
  np.testing.assert_allclose(loss, m["denoise"] + 3.0 * kd + 5.0 * m["kv"], rtol=1e-5)


def test_kd_weight_zero_keeps_the_anchor_its_weight_and_its_gradient():
  """kd.weight = 0, kd.kv_weight = 5: no teacher UNet call, no kd term, the anchor on.

  Its gradient, (loss with the anchor) - (loss without), is 5 * 2 G D / (width * 2
  kernels) on each trained key/value kernel, and one optimiser step runs on it.
  """
  trainable, frozen, teacher, data, spec = _problem(use_kd=False, kd_weight=0.0)
  loss, m, calls = _run_loss(trainable, frozen, teacher, data, spec, 4)
  assert len(calls) == 1 and calls[0][0].shape[0] == 2  # the student on the photos only
  assert "kd" not in m
  kv, gram = _kv_np(trainable["unet"], teacher["unet"], np.asarray(data.kd_context), 2)
  np.testing.assert_allclose(m["kv"], kv, rtol=1e-5)
  np.testing.assert_allclose(loss, m["denoise"] + 5.0 * kv, rtol=1e-6)

  schedule = schedule_lib.make_schedule(SD_SCHEDULER)
  grad = lambda s: jax.jit(jax.grad(lambda tr: losses.loss_fn(
      tr, frozen, teacher, data, schedule, jax.random.key(4), models=MODELS, spec=s)[0]))(
          trainable)["unet"]
  with_kv, without = grad(spec), grad(dataclasses.replace(spec, kv_weight=0.0))
  for path in KV:
    d = _get(trainable["unet"], path).astype(np.float64) - _get(teacher["unet"], path)
    want = 5.0 * 2 * gram @ d / (CH * len(KV))
    np.testing.assert_allclose(_get(with_kv, path) - _get(without, path), want,
                               rtol=1e-4, atol=1e-6)

  class Train:  # the few train-config fields make_optimizer reads
    learning_rate, batch_size, scale_lr, grad_clip = 1e-2, 2, False, 1e9
    adam_b1, adam_b2, adam_eps, weight_decay = 0.9, 0.999, 1e-8, 0.0
    token_lr_scale, lr_schedule, steps = 1.0, "constant", 1
  optimizer = step_lib.make_optimizer(Train)
  state = step_lib.init_state(trainable, optimizer)
  new, metrics = jax.jit(lambda st: step_lib.train_step(
      st, frozen, teacher, data, schedule, jax.random.key(9), models=MODELS, spec=spec,
      optimizer=optimizer))(state)
  assert int(new.step) == 1 and "kd" not in metrics
  assert jax.tree.all(jax.tree.map(lambda a: a.dtype == jnp.float32, new.trainable))
  # Adam's first step moves every weight by -lr * sign(gradient).
  g = jax.jit(jax.grad(lambda tr: losses.loss_fn(
      tr, frozen, teacher, data, schedule, jax.random.fold_in(jax.random.key(9), 0),
      models=MODELS, spec=spec)[0]))(trainable)
  for path in KV:
    np.testing.assert_allclose(_get(new.trainable["unet"], path) - _get(trainable["unet"], path),
                               -1e-2 * np.sign(_get(g["unet"], path)), atol=1e-6)


def _with_prior(data, seed=5, n_real=2):
  """`data` plus three class images, the last padding; image j's prompt reads ids
  [j + 5, 6, 0, 0, 0] (no modifier token), so its context says which image it was."""
  rs = np.random.default_rng(seed)
  mean = rs.standard_normal((3, 4, 4, CH)).astype(np.float32)
  mean[n_real:] = 1e4
  ids = np.array([[j + 5, 6, 0, 0, 0] for j in range(3)], np.int32)
  return data._replace(prior_mean=jnp.asarray(mean),
                       prior_logvar=jnp.full(mean.shape, -80.0),
                       prior_ids=jnp.asarray(ids), n_prior=jnp.int32(n_real))


@pytest.mark.parametrize("seed", [0, 1])
def test_prior_preservation_rows_and_term_match_numpy(seed):
  """prior.weight = 2 on top of DFKD and the anchor: batch_size class-image rows sit
  between the photo rows and the DFKD rows; each is a real class image (never the
  padding), scaled and noised at its timestep, with its class prompt; the term is the
  per-element mean squared error against the noise (Custom Diffusion's prior loss), and
  the total denoise + 2 prior + 3 kd + 5 kv."""
  trainable, frozen, teacher, data, spec = _problem(prior_weight=2.0)
  data = _with_prior(data)
  loss, m, calls = _run_loss(trainable, frozen, teacher, data, spec, seed,
                             default_emitters=True)
  b, k = spec.batch_size, spec.kd_batch_size
  x_in, t_in, c_in = calls[-1]
  assert x_in.shape[0] == b + b + k
  p_student = {**trainable["unet"], **frozen["unet"]}
  table = np.concatenate([frozen["text"]["table"], frozen["tokens"][:1], trainable["tokens"]])
  prompts = table[np.asarray(data.prior_ids)]
  rows = slice(b, 2 * b)
  which = [next(j for j in range(2) if np.array_equal(c_in[i], prompts[j]))
           for i in range(b, 2 * b)]  # StopIteration: a padding or foreign prompt
  z0 = np.asarray(data.prior_mean, np.float64)[which] * spec.scaling_factor
  a = SD_ALPHAS_CUMPROD[t_in[rows]][:, None, None, None]
  noise = (x_in[rows] - np.sqrt(a) * z0) / np.sqrt(1 - a)  # what add_noise must have used
  assert 0.4 < noise.std() < 1.6 and np.all(np.abs(noise) < 8)
  prior = np.mean((_unet_np(p_student, x_in[rows].astype(np.float64), t_in[rows],
                            c_in[rows].astype(np.float64)) - noise) ** 2)
  np.testing.assert_allclose(m["prior"], prior, rtol=2e-4)
  np.testing.assert_allclose(loss, m["denoise"] + 2.0 * prior + 3.0 * m["kd"] + 5.0 * m["kv"],
                             rtol=1e-4)
  assert prior > 0.01
  # The photo rows are as without prior preservation: the same draws, the same term.
  _, m_off, calls_off = _run_loss(trainable, frozen, teacher, data,
                                  dataclasses.replace(spec, prior_weight=0.0), seed,
                                  default_emitters=True)
  np.testing.assert_array_equal(calls_off[-1][0][:b], x_in[:b])
  np.testing.assert_allclose(m_off["denoise"], m["denoise"], rtol=1e-6)
  assert "prior" not in m_off and spec.regularised


def test_prior_rows_draw_every_real_class_image_and_only_those():
  trainable, frozen, teacher, data, spec = _problem(prior_weight=1.0, use_kd=False,
                                                    kd_weight=0.0, kv_weight=0.0)
  data = _with_prior(data)
  assert spec.regularised and not spec.use_kd  # prior alone also doubles the rate (x scale)
  table = np.concatenate([frozen["text"]["table"], frozen["tokens"][:1], trainable["tokens"]])
  prompts = table[np.asarray(data.prior_ids)]
  seen = set()
  for seed in range(6):
    _, m, calls = _run_loss(trainable, frozen, None, data, spec, seed)
    (x_in, _, c_in), = calls
    assert x_in.shape[0] == 4 and set(m) == {"denoise", "prior"}
    seen |= {next(j for j in range(3) if np.array_equal(c, prompts[j])) for c in c_in[2:]}
  assert seen == {0, 1}, seen


def test_high_noise_moves_the_concept_rows_timesteps_to_the_top():
  """train.high_noise=1: every concept row reaches the UNet at t >= 0.6 T; at 0 the
  uniform draw (some rows below)."""
  low = []
  for share in (0.0, 1.0):
    trainable, frozen, _, data, spec = _problem(use_kd=False, kd_weight=0.0, kv_weight=0.0,
                                                high_noise=share)
    ts = np.concatenate([_run_loss(trainable, frozen, None, data, spec, seed)[2][0][1]
                         for seed in range(10)])
    assert ts.shape == (20,) and ts.max() < 1000
    low.append(int((ts < 600).sum()))
  assert low[0] > 0 and low[1] == 0, low


@pytest.mark.parametrize("seed", [0, 1])
def test_snr_gamma_weights_each_concept_row_by_its_timestep(seed):
  """train.snr_gamma: the denoising term is the batch mean of each concept row's loss times
  its Min-SNR weight min(SNR(t), gamma) / SNR(t) (epsilon); the total is that term; at
  gamma 0 the plain mean."""
  out = {}
  for gamma in (0.0, 2.0):
    trainable, frozen, _, data, spec = _problem(use_kd=False, kv_weight=0.0, batch_size=4,
                                                snr_gamma=gamma)
    loss, m, ((x, t, c),) = _run_loss(trainable, frozen, None, data, spec, seed)
    z0 = np.asarray(data.latent_mean[0], np.float64) * spec.scaling_factor
    a = SD_ALPHAS_CUMPROD[t][:, None, None, None]
    noise = (x - np.sqrt(a) * z0) / np.sqrt(1 - a)
    per_row = np.mean((_unet_np({**trainable["unet"], **frozen["unet"]}, x.astype(np.float64),
                                t, c.astype(np.float64)) - noise) ** 2, axis=(1, 2, 3))
    snr = SD_ALPHAS_CUMPROD[t] / (1 - SD_ALPHAS_CUMPROD[t])
    w = np.minimum(snr, gamma) / snr if gamma else np.ones_like(snr)
    np.testing.assert_allclose(m["denoise"], np.mean(w * per_row), rtol=2e-4)
    np.testing.assert_allclose(loss, m["denoise"], rtol=1e-6)
    out[gamma] = (m["denoise"], np.mean(per_row), t)
  np.testing.assert_array_equal(out[0.0][2], out[2.0][2])  # same draw, weighted differently
  assert abs(out[2.0][0] - out[2.0][1]) > 0.05 * out[2.0][1]


# ---------------------------------------------------------------------------
# Augmentation and the loss mask

def _aug(z, seed, **kw):
  spec = dict(batch_size=len(z), kd_batch_size=1, kd_weight=0.0, use_kd=False, kd_points=1,
              kd_cached=False, flip=False, rescale=False, rescale_min=1.0, rescale_max=1.0,
              scaling_factor=1.0, scheduler=SD_SCHEDULER, delta=delta_lib.Leaves("crossattn_kv"))
  spec.update(kw)
  out, mask, scale = jax.jit(lambda z, k: losses._augment(z, k, losses.LossSpec(**spec)))(  # pylint: disable=protected-access
      jnp.asarray(z), jax.random.key(seed))
  # The factor drawn per image (for the rescale cues): in [min, max], 1 without rescale.
  lo, hi = (spec["rescale_min"], spec["rescale_max"]) if spec["rescale"] else (1.0, 1.0)
  assert scale.shape == (len(z),) and np.all((scale >= lo) & (scale <= hi)), scale
  return np.asarray(out, np.float64), np.asarray(mask)


def test_flip_mirrors_the_width_axis_of_about_half_the_images():
  z = np.random.default_rng(0).standard_normal((32, 4, 6, 3)).astype(np.float32)
  out, mask = _aug(z, 1, flip=True)
  same = [np.array_equal(o, a) for o, a in zip(out, z)]
  mirrored = [np.array_equal(o, a[:, ::-1, :]) for o, a in zip(out, z)]
  assert all(s != m for s, m in zip(same, mirrored))  # each image one or the other
  assert 8 <= sum(mirrored) <= 24, sum(mirrored)
  np.testing.assert_array_equal(mask, 1.0)


def _ramp(n, size, a=0.3, b=-0.2, c=1.0):
  y, x = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  return np.broadcast_to((a * x + b * y + c)[None, :, :, None], (n, size, size, 2)).astype(
      np.float32)


@pytest.mark.parametrize("scale", [0.5, 0.75])
def test_rescale_down_shrinks_the_photo_into_a_masked_rectangle(scale):
  size, a, b = 32, 0.3, -0.2
  out, mask = _aug(_ramp(6, size, a, b), 2, rescale=True, rescale_min=scale,
                   rescale_max=scale)
  offsets = set()
  for o, m in zip(out, mask[..., 0]):
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    # One solid rectangle of about scale x size pixels a side, zero canvas elsewhere.
    assert abs(len(rows) - scale * size) <= 1 and abs(len(cols) - scale * size) <= 1
    np.testing.assert_array_equal(m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], 1)
    assert m.sum() == len(rows) * len(cols)
    far = np.ones_like(m, bool)
    far[max(rows[0] - 2, 0):rows[-1] + 3, max(cols[0] - 2, 0):cols[-1] + 3] = False
    np.testing.assert_array_equal(o[far], 0.0)
    # Inside (away from its border) the photo's ramp, its slopes divided by the scale.
    # At a ratio of 2 the antialiasing kernel's taps sit symmetrically and the ramp
    # comes through exactly; at 4/3 they do not: the local slope wobbles with the
    # sub-pixel phase (up to 8% seen) around the right mean.
    inner = o[rows[0] + 3:rows[-1] - 2, cols[0] + 3:cols[-1] - 2, 0]
    tol = 1e-4
    for axis, slope in ((1, a / scale), (0, b / scale)):
      diffs = np.diff(inner, axis=axis)
      np.testing.assert_allclose(diffs, slope, atol=tol if scale == 0.5 else 0.1 * abs(slope))
      np.testing.assert_allclose(diffs.mean(), slope, rtol=1e-5 if scale == 0.5 else 1e-2)
    offsets.add((rows[0], cols[0]))
  assert len(offsets) > 1  # a random place on the canvas


def test_rescale_up_crops_and_masks_nothing():
  out, mask = _aug(_ramp(4, 16), 3, rescale=True, rescale_min=2.0, rescale_max=2.0)
  np.testing.assert_array_equal(mask, 1.0)
  # A linear ramp zoomed by 2: slopes halved (the outermost pixel may sample the
  # photo's own border, where the kernel is cut off).
  inner = out[:, 1:-1, 1:-1, 0]
  np.testing.assert_allclose(np.diff(inner, axis=2), 0.3 / 2, atol=1e-5)
  np.testing.assert_allclose(np.diff(inner, axis=1), -0.2 / 2, atol=1e-5)
  assert len({float(o[0, 0, 0]) for o in out}) > 1  # a random crop


def test_denoising_loss_counts_only_the_masked_pixels():
  # Betas of 1e-12: alpha_bar is 1 in float32, so x_t is the augmented latent itself
  # and, predicting the sample, so is the target: both visible to the stand-in UNet.
  sched = schedule_lib.SchedulerConfig(beta_start=1e-12, beta_end=1e-12,
                                       prediction_type="sample", clip_sample=False)
  trainable, frozen, teacher, data, spec = _problem(
      use_kd=False, kv_weight=0.0, rescale=True, rescale_min=0.4, rescale_max=0.6,
      flip=True, scaling_factor=1.0, scheduler=sched, hw=16, batch_size=4)
  data = data._replace(latent_mean=jnp.ones_like(data.latent_mean))
  loss, m, calls = _run_loss(trainable, frozen, None, data, spec, 5, scheduler_cfg=sched)
  ((x, t, c),) = calls
  mask = x[..., :1] > 0.5  # the shrunk photo of ones, on a zero canvas
  fractions = mask.mean(axis=(1, 2, 3))
  assert np.all((fractions > 0.1) & (fractions < 0.45)), fractions
  sq = (_unet_np({**trainable["unet"], **frozen["unet"]}, x.astype(np.float64), t, c) - x) ** 2
  want = np.mean((sq * mask).sum(axis=(1, 2, 3)) / (mask.sum(axis=(1, 2, 3)) * CH))
  unmasked = sq.mean()
  np.testing.assert_allclose(m["denoise"], want, rtol=1e-5)
  assert abs(want - unmasked) > 0.1 * want  # the mask matters for this number
  np.testing.assert_allclose(loss, want, rtol=1e-5)


# ---------------------------------------------------------------------------
# ICGen start

def _grid_np(spacing, n, offset):
  """diffusers' grid for each timestep_spacing, in numpy."""
  if spacing == "leading":
    return np.arange(0, n)[::-1] * (T // n) + offset
  if spacing == "trailing":
    return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
  return np.round(np.linspace(0, T - 1, n))[::-1].astype(np.int64)


class _Echo:
  """A parameter-free UNet predicting eps = x / 2 (any fixed map would do)."""

  def apply(self, variables, x, t, context):
    return 0.5 * x


ECHO = _Echo()


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("n", [4, 10, 25])
def test_icgen_start_timestep_and_path_match_numpy(spacing, offset, n):
  cfg = dataclasses.replace(SD_SCHEDULER, timestep_spacing=spacing, steps_offset=offset)
  spec = sampler.SamplerSpec("ddim", cfg)
  grid = _grid_np(spacing, n, offset)
  np.testing.assert_array_equal(schedule_lib.inference_timesteps(cfg, n), grid)
  # 0.249 and 0.251 land exactly on a grid timestep of some grids (249, 251): "<=".
  strengths = [0.02, 0.249, 0.251, 0.3, 0.6, 0.95, 1.0]
  b, shape = len(strengths), (2, 2, 1)
  z = np.random.default_rng(n).standard_normal((b,) + shape).astype(np.float32)
  seeds = np.arange(b, dtype=np.uint32) + 7
  eps = np.asarray(sampler.initial_noise(jnp.asarray(seeds), shape), np.float64)
  sched = sampler.make_schedule(spec, n)
  for i, s in enumerate(strengths):
    below = np.flatnonzero(grid <= s * T)
    start = 0 if s >= 1 else (below[0] if len(below) else n)
    got = np.asarray(sampler.sample_jit(
        {}, sched, jnp.zeros((1, 1, 1)), jnp.zeros((1, 1)), jnp.asarray(seeds[i:i + 1]),
        jnp.asarray(z[i:i + 1]), jnp.ones(1, bool), jnp.float32(1.0), jnp.float32(s),
        jnp.float32(0.0), unet=ECHO, spec=spec))[0]
    if s >= 1:
      x = eps[i]
    elif start == n:
      x = z[i].astype(np.float64)
    else:
      a = SD_ALPHAS_CUMPROD[grid[start]]
      x = np.sqrt(a) * z[i] + np.sqrt(1 - a) * eps[i]
    for j in range(start, n):  # DDIM, eta 0, prev = t - T // n as diffusers pairs them
      t, prev = grid[j], grid[j] - T // n
      a = SD_ALPHAS_CUMPROD[t]
      a_prev = SD_ALPHAS_CUMPROD[prev] if prev >= 0 else SD_ALPHAS_CUMPROD[0]
      e = 0.5 * x
      x = np.sqrt(a_prev) * (x - np.sqrt(1 - a) * e) / np.sqrt(a) + np.sqrt(1 - a_prev) * e
    np.testing.assert_allclose(got, x, rtol=1e-5, atol=1e-6, err_msg=f"s={s}")
    if s < 1:
      assert int(sampler.start_index(grid, s, T)) == start
