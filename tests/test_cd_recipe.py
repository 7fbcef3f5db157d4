"""Custom Diffusion's recipe as config fields: loss reduction, rescale cues, token
initialiser, the learning rate with a regulariser (each against an independent numpy or
hand-written reference)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lfs_jax import config_base
from lfs_jax.diffusion import schedule as schedule_lib
from lfs_jax.train import inputs, losses, session
from lfs_jax.train import step as step_lib


def _masked_case(seed=0):
  rng = np.random.default_rng(seed)
  sq = rng.random((3, 5, 6, 4)).astype(np.float32)
  mask = (rng.random((3, 5, 6, 1)) < 0.6).astype(np.float32)
  mask[:, 0, 0] = 1.0  # every image keeps a pixel
  return sq, mask


def test_cd_reduction_is_the_masked_channel_sum_over_mask_pixels():
  sq, mask = _masked_case()
  want_cd = np.mean([(sq[i] * mask[i]).sum() / mask[i].sum() for i in range(3)])
  # "mean": each image's mean over its masked elements (every channel counted)
  want_mean = np.mean([sq[i][np.broadcast_to(mask[i], sq[i].shape) > 0].mean()
                       for i in range(3)])
  got_cd = float(losses.denoise_loss(jnp.asarray(sq), jnp.asarray(mask), "cd"))
  got_mean = float(losses.denoise_loss(jnp.asarray(sq), jnp.asarray(mask), "mean"))
  np.testing.assert_allclose(got_cd, want_cd, rtol=1e-6)
  np.testing.assert_allclose(got_mean, want_mean, rtol=1e-6)
  np.testing.assert_allclose(got_cd, 4 * got_mean, rtol=1e-6)  # 4 latent channels
  with pytest.raises(ValueError, match="train.loss_reduction"):
    losses.denoise_loss(jnp.asarray(sq), jnp.asarray(mask), "sum")


def _custom_diffusion_prefix(scale, u):
  """Custom Diffusion's data loader, written out: the prefix for a rescale factor."""
  if scale < 0.6:
    return ["a far away ", "very small "][int(u >= 0.5)]
  if scale > 1.2:
    return ["zoomed in ", "close up "][int(u >= 0.5)]
  return ""


def test_rescale_cues_follow_custom_diffusion():
  scale = np.array([0.3, 0.59, 0.6, 0.61, 1.0, 1.2, 1.21, 1.4, 0.45, 1.3], np.float32)
  u = np.array([0.1, 0.9, 0.2, 0.7, 0.5, 0.3, 0.49, 0.51, 0.5, 0.0], np.float32)
  got = np.asarray(losses.cue_index(jnp.asarray(scale), jnp.asarray(u)))
  assert [losses.RESCALE_CUES[i] for i in got] == [
      _custom_diffusion_prefix(s, v) for s, v in zip(scale, u)]


def _first_update(regularised, scale):
  cfg = config_base.get_config().train
  cfg.regulariser_lr_scale = scale
  cfg.weight_decay = 0.0
  opt = step_lib.make_optimizer(cfg, regularised=regularised)
  w = {"w": jnp.zeros((3,))}
  u, _ = opt.update({"w": jnp.array([0.5, -0.2, 0.1])}, opt.init(w), w)
  return np.asarray(optax.apply_updates(w, u)["w"])


def test_learning_rate_scales_only_with_a_regulariser():
  lr = 1e-5 * 2  # config_base: 1e-5 x batch 2
  # Adam's first step moves every weight by lr against its gradient's sign.
  np.testing.assert_allclose(_first_update(False, 2.0), [-lr, lr, -lr], rtol=1e-3)
  np.testing.assert_allclose(_first_update(True, 2.0), [-2 * lr, 2 * lr, -2 * lr], rtol=1e-3)
  np.testing.assert_allclose(_first_update(True, 1.0), [-lr, lr, -lr], rtol=1e-3)


def test_token_rows_learn_at_their_own_rate():
  cfg = config_base.get_config().train
  cfg.weight_decay = 0.0
  tree = {"unet": {"k": jnp.zeros((2,))}, "tokens": jnp.zeros((1, 3))}
  grads = {"unet": {"k": jnp.array([0.3, -0.1])}, "tokens": jnp.array([[0.5, -0.2, 0.1]])}

  def first_step(scale):
    cfg.token_lr_scale = scale
    opt = step_lib.make_optimizer(cfg)
    u, _ = opt.update(grads, opt.init(tree), tree)
    return jax.tree.map(np.asarray, optax.apply_updates(tree, u)), opt.init(tree)

  lr = 1e-5 * 2  # config_base: 1e-5 x batch 2; Adam's first step is lr against the sign
  moved, _ = first_step(10.0)
  np.testing.assert_allclose(moved["tokens"], [[-10 * lr, 10 * lr, -10 * lr]], rtol=1e-3)
  np.testing.assert_allclose(moved["unet"]["k"], [-lr, lr], rtol=1e-3)
  moved, state = first_step(1.0)
  np.testing.assert_allclose(moved["tokens"], [[-lr, lr, -lr]], rtol=1e-3)
  # At 1.0 the optimizer state is today's (clip, AdamW): older checkpoints restore.
  today = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr)).init(tree)
  assert jax.tree.structure(state) == jax.tree.structure(today)


def test_cosine_schedule_is_adamw_at_optax_cosine_rate_over_the_session():
  """train.lr_schedule=cosine: every update of a session is optax's AdamW at optax's own
  cosine-decay rate for that step (to 0 at train.steps), token rows at their scale."""
  cfg = config_base.get_config().train
  cfg.lr_schedule, cfg.steps, cfg.token_lr_scale = "cosine", 6, 2.0
  lr = cfg.learning_rate * cfg.batch_size
  rs = np.random.default_rng(3)
  tree = {"unet": {"k": jnp.asarray(rs.standard_normal((3, 2)), jnp.float32)},
          "tokens": jnp.asarray(rs.standard_normal((1, 4)), jnp.float32)}

  def reference(rate):
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.adamw(
        rate, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay))

  ours = step_lib.make_optimizer(cfg)
  unet_ref = reference(optax.cosine_decay_schedule(lr, cfg.steps))
  token_ref = reference(optax.cosine_decay_schedule(2.0 * lr, cfg.steps))
  p_ours, s_ours = tree, ours.init(tree)
  s_u, s_t = unet_ref.init(tree), token_ref.init(tree)
  sizes = []
  for _ in range(cfg.steps + 1):
    g = jax.tree.map(lambda a: jnp.asarray(rs.standard_normal(a.shape), jnp.float32), tree)
    u, s_ours = ours.update(g, s_ours, p_ours)
    p_next = optax.apply_updates(p_ours, u)
    # Each reference is stepped from our parameters, so errors cannot compound.
    uu, s_u = unet_ref.update(g, s_u, p_ours)
    ut, s_t = token_ref.update(g, s_t, p_ours)
    np.testing.assert_allclose(u["unet"]["k"], uu["unet"]["k"], rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(u["tokens"], ut["tokens"], rtol=1e-5, atol=1e-12)
    sizes.append(float(jnp.abs(u["unet"]["k"]).max()))
    p_ours = p_next
  assert sizes[-1] < 1e-6 * lr < 0.5 * lr < sizes[0]  # the rate ends at 0, starts at lr


@pytest.mark.parametrize("scale,train_tokens", [(-1.0, True), (float("nan"), True),
                                                (10.0, False)])
def test_bad_token_lr_scale_is_named(scale, train_tokens):
  cfg = config_base.get_config().train
  cfg.token_lr_scale, cfg.train_tokens = scale, train_tokens
  with pytest.raises(ValueError, match=r"train\.token_lr_scale"):
    losses.check_token_lr(cfg)


def test_sd_configs_take_custom_diffusions_recipe_and_the_default_keeps_ours():
  sd = config_base.use_local_sd(config_base.get_config(), 512)
  assert (sd.train.loss_reduction, sd.train.regulariser_lr_scale, sd.concepts.initializer,
          sd.data.rescale_cues) == ("cd", 2.0, "ktn", True)
  c = config_base.get_config()
  assert (c.train.loss_reduction, c.train.regulariser_lr_scale, c.concepts.initializer,
          c.data.rescale_cues) == ("mean", 1.0, "class", False)


def test_recipe_fields_reach_the_session(tmp_path, tiny_config):
  cfg = tiny_config(train__loss_reduction="cd", data__rescale_cues=True,
                    concepts__initializer="ktn", train__regulariser_lr_scale=2.0)
  ctx = session.prepare(cfg, str(tmp_path / "run"))
  assert ctx.spec.loss_reduction == "cd" and ctx.spec.rescale_cues
  assert {c.initializer for c in ctx.registry.concepts} == {"ktn"}
  _, data, _, rows, _ = inputs.session_inputs(ctx, 1, session.base_delta(ctx))
  tok = ctx.pipe.tokenizer
  n_cues = len(losses.RESCALE_CUES)
  assert data.prompt_ids.shape[1] == n_cues * len(cfg.concepts.templates)
  first = tok.decode(np.asarray(data.prompt_ids[0, 1]), skip_special_tokens=True)
  assert first.startswith("a far away photo of a")  # template 0, cue 1
  table = np.asarray(ctx.pipe.text_encoder_params["text_model"]["embeddings"]
                     ["token_embedding"]["embedding"])
  ktn = tok("ktn", add_special_tokens=False)["input_ids"]
  np.testing.assert_allclose(np.asarray(rows)[0], table[ktn].mean(0), rtol=1e-6)


@pytest.mark.parametrize("overrides,needle", [
    ({"train__loss_reduction": "sum"}, "train.loss_reduction"),
    ({"data__rescale_cues": True, "data__rescale": False}, "data.rescale_cues"),
    ({"train__regulariser_lr_scale": 0.0}, "train.regulariser_lr_scale"),
    ({"concepts__initializer": " "}, "concepts.initializer"),
    ({"train__token_lr_scale": 0.0}, "train.token_lr_scale"),
    ({"train__high_noise": 1.5}, "train.high_noise"),
    ({"train__high_noise": -0.1}, "train.high_noise"),
    ({"train__snr_gamma": -1.0}, "train.snr_gamma"),
    ({"train__snr_gamma": float("nan")}, "train.snr_gamma"),
    ({"train__lr_schedule": "linear"}, "train.lr_schedule"),
])
def test_bad_recipe_fields_are_named(tmp_path, tiny_config, overrides, needle):
  with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
    session.prepare(tiny_config(**overrides), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_leafwise_adamw_is_optax_adamw_bit_for_bit_and_traced_per_shape():
  """make_optimizer's AdamW runs leaf by leaf (one trace per leaf shape, for the SD-1.5
  step's tracing time): the same updates and state as optax's own, over three steps."""
  cfg = config_base.get_config().train
  cfg.token_lr_scale = 3.0
  rs = np.random.default_rng(0)
  shapes = {"a": (4, 3), "b": (4, 3), "c": (4, 5)}
  tree = {"unet": {k: jnp.asarray(rs.standard_normal(s), jnp.float32)
                   for k, s in shapes.items()},
          "tokens": jnp.asarray(rs.standard_normal((1, 3)), jnp.float32)}
  ours = step_lib.make_optimizer(cfg)
  lr = cfg.learning_rate * cfg.batch_size
  plain = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                      optax.adamw(lr, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay),
                      optax.masked(optax.scale(3.0), step_lib._tokens_only))

  def run(opt):
    def step(params, state, g):
      u, state = opt.update(g, state, params)
      return optax.apply_updates(params, u), state
    params, state, out = tree, opt.init(tree), []
    for i in range(3):
      g = jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1.7)), params)
      params, state = jax.jit(step)(params, state, g)
      out.append((params, state))
    return out

  for (p1, s1), (p2, s2) in zip(run(ours), run(plain)):
    assert jax.tree.structure(s1) == jax.tree.structure(s2)
    jax.tree.map(np.testing.assert_array_equal, (p1, s1), (p2, s2))
  jaxpr = jax.make_jaxpr(ours.update)(tree, ours.init(tree), tree).jaxpr
  calls = [e.params["jaxpr"] for e in jaxpr.eqns if e.primitive.name == "jit"]
  assert len(calls) == 4 and len({id(c) for c in calls}) == 3  # a, b share one trace


def test_high_noise_draws_that_share_of_timesteps_from_the_top_and_is_off_at_zero():
  """train.high_noise: at 0 the very draw of before (runs without it are unchanged); at s
  about s of the timesteps come from [0.6 T, T) on top of the uniform draw's 0.4 share
  there; at 1 all of them."""
  key, n, big_t = jax.random.key(3), 20000, 1000
  uniform = jax.random.randint(key, (n,), 0, big_t)
  np.testing.assert_array_equal(losses.draw_timesteps(key, n, big_t, 0.0), uniform)
  for share in (0.5, 1.0):
    t = np.asarray(losses.draw_timesteps(key, n, big_t, share))
    assert t.min() >= 0 and t.max() < big_t
    high = (t >= 600).mean()
    assert abs(high - (share + (1 - share) * 0.4)) < 0.015, (share, high)
  # the spec carries the config's share to loss_fn
  cfg = config_base.get_config()
  cfg.train.high_noise = 0.25
  spec = losses.make_spec(cfg, mesh=types.SimpleNamespace(size=1), scaling_factor=1.0,
                          scheduler=None, selection=None, lfs=False)
  assert spec.high_noise == 0.25


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_snr_weights_are_diffusers_min_snr_weights(prediction_type, zero_snr):
  """train.snr_gamma: our Min-SNR weights against the formula of diffusers' training
  scripts (compute_snr on its DDPMScheduler, min(SNR, gamma) / SNR for epsilon, / (SNR + 1)
  for v), on SD's schedule and the zero-terminal-SNR one the mini base uses; where that
  formula divides by zero (epsilon at SNR 0) ours is its limit, 1."""
  torch = pytest.importorskip("torch")
  from diffusers import DDPMScheduler
  from diffusers.training_utils import compute_snr
  kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr)
  ref_sched = DDPMScheduler(**kw)
  ours_sched = schedule_lib.make_schedule(schedule_lib.SchedulerConfig(
      beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
      prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr))
  t = np.array([0, 1, 10, 100, 250, 400, 500, 700, 900, 998, 999])
  gamma = 5.0
  snr = compute_snr(ref_sched, torch.tensor(t))
  w = torch.minimum(snr, torch.full_like(snr, gamma))
  w = (w / snr if prediction_type == "epsilon" else w / (snr + 1)).double().numpy()
  ours = np.asarray(losses.snr_weights(ours_sched, jnp.asarray(t), prediction_type, gamma))
  finite = np.isfinite(w)
  assert finite.sum() >= len(t) - 1
  # float32 (both): 1 - alpha_bar near t = 0 keeps ~4 digits
  np.testing.assert_allclose(ours[finite], w[finite], rtol=1e-4, atol=1e-7)
  if zero_snr:
    assert ours[-1] == (1.0 if prediction_type == "epsilon" else 0.0)
  # the weights do something on this range: below 1 somewhere, not constant
  assert ours.min() < 0.5 and np.ptp(ours) > 0.3
