"""Sampling a finished run: per-image seeds, ICGen starts, no recompiles, files and CLI."""

import collections
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import diffusers
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_ddpm
from PIL import Image

from lfs_jax import config_base, icgen, runs, sample
from lfs_jax import concepts as concepts_lib
from lfs_jax.diffusion import sampler
from lfs_jax.errors import ConfigError

# Module fixtures worth building once: keep this module on one xdist worker.
pytestmark = pytest.mark.xdist_group("sample")

DOG, CAT = "a <c1> dog", "a <c2> cat"


@pytest.fixture(scope="module")
def run_dir(tiny_run):
  """A copy of the shared two-session tiny run (dog; cat; sample.steps 4, batch 4)."""
  return tiny_run("sample")


@pytest.fixture(scope="module")
def run(run_dir):
  return runs.load_run(run_dir)


def _gen(run, prompts, seeds, **settings):
  st = dataclasses.replace(sample.SampleSettings.from_config(run.cfg), **settings)
  images, records = sample.generate(run, prompts, seeds, st)
  return images.astype(np.int32), records


def _mad(a, b):
  return float(np.abs(a.astype(np.float64) - b).mean())


def test_load_run_rebuilds_the_latest_session(run):
  assert run.session == 2 and run.finished == [1, 2]
  assert run.registry.tokens == ["<c1>", "<c2>"]
  assert run.token_rows.shape == (2, 32)
  assert sorted(run.bank) == ["concept1", "concept2"]
  assert run.bank["concept2"]["mean"].shape == (3, 16, 16, 4)
  vocab = run.pipe.text_encoder.config.vocab_size
  assert run.pipe.tokenizer.convert_tokens_to_ids("<c2>") == vocab + 1


def test_same_seed_same_image_other_seed_other_image(run):
  a, _ = _gen(run, [DOG, DOG], [3, 4])
  b, _ = _gen(run, [DOG], [3])
  np.testing.assert_array_equal(a[0], b[0])
  assert _mad(a[0], a[1]) > 5


def test_an_image_does_not_depend_on_its_batch(run):
  alone, _ = _gen(run, [DOG], [3])
  # Five images: two batches of 4, the image of interest in the padded second one.
  batch, records = _gen(run, [CAT, "a dog", CAT, "", DOG], [7, 3, 9, 1, 3])
  np.testing.assert_array_equal(batch[4], alone[0])
  assert [r["concept"] for r in records] == ["<c2>", None, "<c2>", None, "<c1>"]


def test_one_call_draws_each_pair_once_icgen_per_image(run, monkeypatch):
  """icgen_images turns ICGen off per image, so one call draws a variant with and one
  without ICGen; a (prompt, seed) asked twice is drawn once: each image equals the one
  its own call draws, in one sampler call (4 distinct images, batch 4)."""
  calls = []
  real = sampler.sample_jit
  monkeypatch.setattr(sampler, "sample_jit", lambda *a, **k: calls.append(a) or real(*a, **k))
  st = dataclasses.replace(sample.SampleSettings.from_config(run.cfg), strength=0.5)
  got, records = sample.generate(run, [DOG, DOG, CAT, "a dog", DOG], [3, 3, 5, 3, 3], st,
                                 icgen_images=[True, True, True, True, False])
  assert len(calls) == 1
  # A batch of ICGen images alone is padded with ICGen rows, so it skips the early steps.
  sample.generate(run, [DOG], [3], st)
  assert np.asarray(calls[1][6]).tolist() == [True] * 4  # has_context
  monkeypatch.undo()
  np.testing.assert_array_equal(got[0], got[1])
  np.testing.assert_array_equal(got[[0, 2]], _gen(run, [DOG, CAT], [3, 5], strength=0.5)[0])
  np.testing.assert_array_equal(got[[3, 4]], _gen(run, ["a dog", DOG], [3, 3],
                                                   strength=1.0)[0])
  assert [r["icgen"] for r in records] == [True, True, True, False, False]
  assert records[4]["strength"] == 1.0 and records[0]["strength"] == 0.5
  with pytest.raises(ValueError, match="icgen_images"):
    sample.generate(run, [DOG], [3], st, icgen_images=[True, False])


def test_icgen_images_are_batched_apart_where_that_runs_fewer_steps():
  # starts: one ICGen image (start 3 of 4 steps), four plain; batches of 4.
  # Sorted and cut: [3,0,0,0] + [0] = 4 + 4 steps; apart: [3] + [0,0,0,0] = 1 + 4.
  assert sample._batches([0, 3, 0, 0, 0], 4, 4) == [[1], [0, 2, 3, 4]]  # pylint: disable=protected-access
  # Five ICGen, three plain: sorted [3,3,3,3] + [3,0,0,0] = 1 + 4 steps beats apart's
  # [3,3,3,3] + [3] + [0,0,0] = 1 + 1 + 4; a tie keeps the sorted cut.
  assert sample._batches([3] * 5 + [0] * 3, 4, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # pylint: disable=protected-access
  assert sample._batches([3] * 4 + [0] * 4, 4, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # pylint: disable=protected-access


def _direct(run, prompt, latents, has_context, strength, seeds=(1, 2, 3, 4)):
  """The jitted sampler itself on a batch of 4 (one prompt, four seeds)."""
  pipe, st = run.pipe, sample.SampleSettings.from_config(run.cfg)
  spec = sampler.SamplerSpec(st.sampler, pipe.scheduler)
  encode = lambda p: sampler.encode_text_jit(
      pipe.text_encoder_params, jnp.asarray(run.token_rows),
      jnp.asarray(concepts_lib.tokenize(pipe.tokenizer, [p] * 4, 77)), text=pipe.text_encoder)
  return np.asarray(sampler.sample_jit(
      pipe.unet_params, sampler.make_schedule(spec, st.steps), encode(prompt), encode("")[0],
      jnp.asarray(seeds, jnp.uint32), jnp.asarray(latents), jnp.asarray(has_context),
      jnp.float32(7.5), jnp.float32(strength), jnp.float32(0.0), unet=pipe.unet, spec=spec))


def test_strength_one_is_plain_text_to_image_bit_for_bit(run):
  z = run.bank["concept1"]["mean"][[0, 1, 2, 0]] * run.pipe.vae.config.scaling_factor
  plain = _direct(run, DOG, np.zeros_like(z), np.zeros(4, bool), 1.0)
  np.testing.assert_array_equal(_direct(run, DOG, z, np.ones(4, bool), 1.0), plain)
  # Without a context the strength is irrelevant; with one and s < 1 it is not.
  np.testing.assert_array_equal(_direct(run, DOG, z, np.zeros(4, bool), 0.3), plain)
  assert not np.allclose(_direct(run, DOG, z, np.ones(4, bool), 0.3), plain)

  images, records = _gen(run, [DOG], [3], strength=1.0)
  assert records[0]["concept"] == "<c1>" and records[0]["icgen"] is False
  no_bank, _ = _gen(run._replace(bank={}), [DOG], [3], strength=1.0)
  np.testing.assert_array_equal(images, no_bank)


def test_very_small_strength_returns_close_to_the_context(run):
  sf = run.pipe.vae.config.scaling_factor
  context = sample.decode_latents(run, run.bank["concept1"]["mean"][:1] * sf).astype(np.int32)
  plain, _ = _gen(run, [DOG], [3], strength=1.0)
  small, rec = _gen(run, [DOG], [3], strength=0.02, select="first")
  # s=0.02 starts at the grid's last step (t=1): one denoising step of the random
  # tiny UNet away from the context.
  assert rec[0]["icgen"] and rec[0]["start_timestep"] == 1 and rec[0]["context_photo"] == 0
  assert _mad(small, context) < 0.6 * _mad(plain, context), (_mad(small, context),
                                                            _mad(plain, context))
  # Below the grid's last timestep no step runs: the context's own decoding.
  tiny, rec = _gen(run, [DOG], [3], strength=0.0005, select="first")
  np.testing.assert_array_equal(tiny, context)
  assert rec[0]["start_step"] == 4 and rec[0]["start_timestep"] is None


def test_a_prompt_without_a_concept_ignores_the_bank(run):
  a, records = _gen(run, ["a dog on the grass"], [5], strength=0.3)
  b, _ = _gen(run._replace(bank={}), ["a dog on the grass"], [5], strength=1.0)
  np.testing.assert_array_equal(a, b)
  assert records[0]["concept"] is None and records[0]["icgen"] is False


def test_unknown_or_later_tokens_are_errors_listing_the_known_ones(run):
  with pytest.raises(ValueError) as e:
    _gen(run, [DOG, "a <c9> teapot"], [0, 0])
  assert "<c9>" in str(e.value) and "<c1>, <c2>" in str(e.value)
  with pytest.raises(ValueError, match=r"'<c2>'.*session 1.*known modifier tokens: <c1>$"):
    icgen.resolve(CAT, run.registry.up_to(1), "<c{}>", session=1)
  both = icgen.resolve("a <c2> cat next to a <c1> dog <c2>", run.registry, "<c{}>")
  assert both.tokens == ["<c2>", "<c1>"] and both.concept == "<c2>"
  with pytest.raises(ValueError, match="'<c10>'"):  # not "<c1>" followed by "0>"
    icgen.resolve("a <c10> cat", run.registry, "<c{}>")


def test_select_picks_first_mean_or_a_seeded_photo():
  mean = np.arange(3 * 2 * 2 * 1, dtype=np.float32).reshape(3, 2, 2, 1)
  bank = {"concept1": {"mean": mean, "logvar": np.zeros_like(mean)}}
  first, i = icgen.context_latent(bank, "concept1", "first", 5)
  np.testing.assert_array_equal(first, mean[0])
  assert i == 0
  avg, i = icgen.context_latent(bank, "concept1", "mean", 5)
  np.testing.assert_allclose(avg, mean.mean(0))
  assert i == "mean"
  picks = [icgen.context_latent(bank, "concept1", "random", s)[1] for s in range(20)]
  assert picks == [icgen.context_latent(bank, "concept1", "random", s)[1] for s in range(20)]
  assert len(set(picks)) > 1
  with pytest.raises(ValueError, match="icgen.select"):
    icgen.context_latent(bank, "concept1", "last", 0)


def test_new_prompts_seeds_guidance_and_strength_do_not_recompile(run):
  _gen(run, [DOG], [0])
  before = collections.Counter(sampler.TRACES)
  assert before["sample"] >= 1 and before["encode_text"] >= 1 and before["decode"] >= 1
  _gen(run, [CAT + " on a beach", "a dog", "<c1>"], [11, 12, 2 ** 32 - 1], guidance=2.0,
       strength=0.3, eta=0.5, select="mean")
  _gen(run, ["something else entirely"], [99], guidance=12.0, strength=1.0,
       guidance_rescale=0.7)
  assert sampler.TRACES == before


class _FakeUNet(nn.Module):
  """A parameter-free stand-in for the UNet: a smooth function of x, t and the text (which
  scales the output as well as shifting it, so guidance changes its spread)."""

  @nn.compact
  def __call__(self, x, t, context):
    c = context.mean(axis=(1, 2))[:, None, None, None]
    return 0.5 * jnp.tanh(x) + 0.2 * c * x + 1e-4 * t[:, None, None, None] + c


@pytest.mark.parametrize("kind,strength,eta,phi", [
    ("ddim", 1.0, 0.0, 0.0), ("ddim", 0.6, 0.0, 0.0), ("ddim", 0.6, 1.0, 0.0),
    ("ddpm", 1.0, 0.0, 0.0), ("ddpm", 0.6, 0.0, 0.0), ("ddim", 1.0, 0.0, 0.7),
    ("ddpm", 0.6, 0.0, 1.0)])
def test_guided_loop_matches_diffusers(kind, strength, eta, phi, monkeypatch):
  """The whole loop (grid, pairing, CFG and its rescale, ICGen start, per-step noise) vs
  diffusers (its pipelines' `rescale_noise_cfg` for guidance_rescale phi)."""
  from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
  from lfs_jax import tiny  # its scheduler config is SD 1.5's
  config = {k: v for k, v in tiny.SCHEDULER.items() if k != "skip_prk_steps"}
  spec = sampler.SamplerSpec(kind, sampler.schedule_lib.SchedulerConfig.from_diffusers(config))
  steps, shape, g = 10, (4, 4, 2), 3.0
  rng = np.random.default_rng(0)
  context = rng.standard_normal((2, 5, 3)).astype(np.float32)
  uncond = rng.standard_normal((5, 3)).astype(np.float32)
  z = rng.standard_normal((2,) + shape).astype(np.float32)
  seeds = jnp.asarray([5, 6], jnp.uint32)
  ours = sampler.sample_jit({}, sampler.make_schedule(spec, steps), jnp.asarray(context),
                            jnp.asarray(uncond), seeds, jnp.asarray(z), jnp.ones(2, bool),
                            jnp.float32(g), jnp.float32(strength), jnp.float32(eta),
                            jnp.float32(phi), unet=_FakeUNet(), spec=spec)

  if kind == "ddim":
    ref = diffusers.DDIMScheduler.from_config(config)
  else:
    ref = diffusers.DDPMScheduler.from_config(
        {k: v for k, v in config.items() if k != "set_alpha_to_one"})
  ref.set_timesteps(steps)
  ts = ref.timesteps
  # ICGen's rule, computed here on diffusers' grid: start at the first timestep <= s*T.
  start = int(np.flatnonzero(ts.numpy() <= strength * 1000)[0]) if strength < 1 else 0
  assert (start == 0) == (strength == 1.0)
  tensor = lambda a: torch.from_numpy(np.array(a))
  eps = tensor(sampler.initial_noise(seeds, shape))
  x = eps if strength >= 1 else ref.add_noise(tensor(z), eps, ts[start:start + 1])
  mean = lambda c: tensor(c).mean(dim=(1, 2))[:, None, None, None]
  f = lambda x, t, c: 0.5 * torch.tanh(x) + 0.2 * mean(c) * x + 1e-4 * float(t) + mean(c)
  for i in range(start, steps):
    t = ts[i]
    noise = tensor(sampler.step_noise(seeds, i, shape))
    e_u = f(x, t, np.broadcast_to(uncond, context.shape))
    e_c = f(x, t, context)
    e = e_u + g * (e_c - e_u)
    if phi > 0:  # as diffusers' pipelines do
      e = rescale_noise_cfg(e, e_c, guidance_rescale=phi)
    if kind == "ddim":
      x = ref.step(e, t, x, eta=eta, variance_noise=noise).prev_sample
    else:
      monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, n=noise, **k: n)
      x = ref.step(e, t, x).prev_sample
  rel = np.linalg.norm(np.asarray(ours) - x.numpy()) / np.linalg.norm(x.numpy())
  assert rel <= 1e-5, rel


@pytest.mark.slow  # a whole loop (CI runs it)
def test_cli_writes_pngs_grids_and_sidecars(run_dir):
  env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest")
  proc = subprocess.run(
      [sys.executable, "-m", "lfs_jax.main", "--mode=sample", f"--workdir={run_dir}",
       f"--prompt={DOG}", "--prompt=a cat", "--config.icgen.select=first",
       "--config.sample.guidance=3"], capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = os.path.join(run_dir, "samples", "session_2")
  names = sorted(os.listdir(out))
  assert names == sorted(
      [f"{s}_seed{k}.{e}" for s in ("a_c1_dog", "a_cat") for k in (0, 1) for e in ("png", "json")]
      + ["a_c1_dog_grid.png", "a_cat_grid.png"])
  assert np.asarray(Image.open(os.path.join(out, "a_c1_dog_seed1.png"))).shape == (32, 32, 3)
  assert np.asarray(Image.open(os.path.join(out, "a_cat_grid.png"))).shape == (32, 64, 3)
  with open(os.path.join(out, "a_c1_dog_seed1.json")) as f:
    side = json.load(f)
  assert side["prompt"] == DOG and side["seed"] == 1 and side["session"] == 2
  assert side["guidance"] == 3.0 and side["select"] == "first" and side["steps"] == 4
  assert side["icgen"] and side["concept"] == "<c1>" and side["strength"] == 0.6
  assert side["sampler"] == "ddim" and side["config"]["data"]["sessions"] == "dog;cat"
  with open(os.path.join(out, "a_cat_seed0.json")) as f:
    assert json.load(f)["concept"] is None


def test_load_run_and_run_config_errors(run_dir, tmp_path):
  with pytest.raises(runs.RunError, match="not a run directory"):
    runs.load_run(str(tmp_path))
  bare = tmp_path / "bare"
  bare.mkdir()
  shutil.copy(os.path.join(run_dir, "config.json"), bare / "config.json")
  with pytest.raises(runs.RunError, match="no finished session"):
    runs.load_run(str(bare))
  with pytest.raises(runs.RunError, match="session 5 .* finished sessions: 1, 2"):
    runs.load_run(run_dir, 5)
  with pytest.raises(ConfigError, match="train.steps"):
    runs.run_config(run_dir, {"train.steps": 9})
  cfg = runs.run_config(run_dir, {"sample.steps": 7, "icgen.strength": 1.0, "train.steps": 2})
  assert cfg.sample.steps == 7 and cfg.icgen.strength == 1.0 and cfg.data.sessions == "dog;cat"
  with pytest.raises(ConfigError, match="icgen.strength"):
    sample.SampleSettings.from_config(runs.run_config(run_dir, {"icgen.strength": 0.0}))
  with pytest.raises(ConfigError, match=r"sample\.guidance_rescale=1\.5"):
    sample.SampleSettings.from_config(runs.run_config(run_dir, {"sample.guidance_rescale": 1.5}))


def test_resume_ignores_sampling_fields():
  stored = config_base.get_config().to_dict()
  current = config_base.get_config()
  current.sample.steps = 50
  current.icgen.select = "mean"
  runs.check_compatible(stored, current.to_dict())
  # A run written before the sample/icgen groups existed.
  old = {k: v for k, v in stored.items() if k not in ("sample", "icgen")}
  runs.check_compatible(old, current.to_dict())
  current.seed = 3
  with pytest.raises(ConfigError, match="seed"):
    runs.check_compatible(old, current.to_dict())
  # A run written before kd.from_base existed continues at its default, not at another.
  current.seed = stored["seed"]
  older = {**old, "kd": {k: v for k, v in stored["kd"].items() if k != "from_base"}}
  runs.check_compatible(older, current.to_dict())
  current.kd.from_base = "class"
  with pytest.raises(ConfigError, match="kd.from_base"):
    runs.check_compatible(older, current.to_dict())


def test_a_record_without_a_field_added_since_matches_only_at_its_default():
  """The benchmark's stored evaluations name the run config they judged; a field the code
  gained since (absent from the record) matches at its default, and only there."""
  recorded = config_base.get_config().to_dict()
  del recorded["train"]["high_noise"], recorded["kd"]["from_base"]
  recorded = runs.jsonable(recorded)
  current = config_base.get_config()
  assert runs.same_config(recorded, current.to_dict())
  current.train.high_noise = 0.5
  assert not runs.same_config(recorded, current.to_dict())
  current.train.high_noise = 0.0
  current.seed = 4  # a field the record has: a change is a change
  assert not runs.same_config(recorded, current.to_dict())
  current.seed = recorded["seed"]
  assert not runs.same_config({**recorded, "extra": 1}, current.to_dict())


def test_slugs_and_grids():
  assert sample.slug("a <c1> dog, on GRASS!") == "a_c1_dog_on_grass"
  assert sample.slug("") == "empty"
  slugs = sample._slugs(["a <c1> dog", "a c1 dog", "a <c1> dog"])
  assert len(set(slugs.values())) == 2 and slugs["a <c1> dog"] == "a_c1_dog"
  g = sample.grid(np.full((3, 2, 2, 3), 7, np.uint8))
  assert g.shape == (4, 4, 3) and (g[2:, 2:] == 0).all() and (g[:2] == 7).all()
