"""Prior preservation's class images: generated once by the base, cached, refused when stale;
bad prior.* fields fail before anything is written."""

import json
import os

import numpy as np
import pytest

from lfs_jax import concepts
from lfs_jax import sample as sample_lib
from lfs_jax.errors import ConfigError
from lfs_jax.train import inputs, losses, prior, session

SMALL = {"prior__weight": 1.0, "prior__count": 3, "sample__steps": 4, "sample__batch_size": 4,
         "data__sessions": "dog;cat"}


def test_class_images_generated_once_then_read_back_and_stale_ones_refused(
    tmp_path, tiny_config, monkeypatch):
  """A run with prior preservation (sessions dog; cat) generates the class images of its
  classes when it is prepared, and a session's inputs hold them with their class prompt;
  later calls read them back or refuse them. (The loss on them: test_core_numeric.)"""
  cfg = tiny_config(**SMALL)
  work = str(tmp_path / "run")
  calls = []
  real = sample_lib.generate

  def counting(model, prompts, seeds, settings, **kw):
    calls.append((list(prompts), list(seeds), settings.strength, model.session))
    return real(model, prompts, seeds, settings, **kw)

  monkeypatch.setattr(sample_lib, "generate", counting)
  run = session.prepare(cfg, work)
  assert [c[0] for c in calls] == [["photo of a dog"] * 3, ["photo of a cat"] * 3]
  # plain text-to-image by the base (session 0), seeds fixed by the run's seed
  assert all(c[2] == 1.0 and c[3] == 0 for c in calls)
  assert calls[0][1] == prior.seeds(cfg.seed, 3) == calls[1][1]
  assert prior.seeds(cfg.seed + 1, 3) != calls[0][1]
  assert run.max_prior == 3 and run.spec.prior_weight == 1.0 and run.spec.regularised
  got = run.prior_images
  inp = inputs.session_inputs(run, 2, session.base_delta(run))  # session 2: cat
  assert int(inp.data.n_prior) == 3 and inp.data.prior_mean.shape[0] == 3
  want_ids = concepts.tokenize(run.pipe.tokenizer, ["photo of a cat"] * 3,
                               inp.data.prior_ids.shape[1])
  np.testing.assert_array_equal(inp.data.prior_ids, want_ids)
  mean, _ = inputs.encode_latents(run, got["cat"])
  np.testing.assert_allclose(inp.data.prior_mean, mean, rtol=1e-5, atol=1e-6)
  pipe = run.pipe
  for word in ("dog", "cat"):
    d = prior.folder(work, word)
    assert sorted(os.listdir(d)) == ["0.png", "1.png", "2.png", "class.json"]
    assert got[word].shape == (3, cfg.data.resolution, cfg.data.resolution, 3)
    assert got[word].dtype == np.uint8 and got[word].std() > 0
    with open(os.path.join(d, "class.json")) as f:
      assert json.load(f)["prompt"] == f"photo of a {word}"

  # A rerun reads them back, byte for byte, without sampling.
  calls.clear()
  again = prior.class_images(cfg, work, pipe, ["dog", "cat"])
  assert not calls
  for word in ("dog", "cat"):
    np.testing.assert_array_equal(again[word], got[word])

  # Resuming the run with other sampling settings (free on a resume: they choose how it
  # samples and evaluates) reads them back too: they stay the run's training data, made
  # with the sampler settings it began with.
  resumed = session.prepare(tiny_config(**{**SMALL, "sample__steps": 3, "sample__guidance": 2.0,
                                           "sample__guidance_rescale": 0.5}), work, resume=True)
  assert not calls
  np.testing.assert_array_equal(resumed.prior_images["cat"], got["cat"])

  # A changed count, prompt or sampler setting is refused, naming the field.
  for overrides, field in (({"prior__count": 4}, "prior.count"),
                           ({"prior__template": "a {}"}, "prior.template"),
                           ({"sample__steps": 3}, "sample.steps"),
                           ({"sample__guidance_rescale": 0.7}, "sample.guidance_rescale"),
                           ({"seed": 1}, "seed")):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as e:
      prior.class_images(tiny_config(**{**SMALL, **overrides}), work, pipe, ["dog"])
    assert "delete" in str(e.value) and not calls

  # A class.json written before sample.guidance_rescale existed holds images made without
  # it: read back at the default, refused at another value.
  path = os.path.join(prior.folder(work, "dog"), "class.json")
  with open(path) as f:
    rec = json.load(f)
  del rec["sample"]["guidance_rescale"]
  with open(path, "w") as f:
    json.dump(rec, f)
  np.testing.assert_array_equal(prior.class_images(cfg, work, pipe, ["dog"])["dog"], got["dog"])
  with pytest.raises(ConfigError, match=r"sample\.guidance_rescale"):
    prior.class_images(tiny_config(**{**SMALL, "sample__guidance_rescale": 0.5}), work, pipe,
                       ["dog"])
  assert not calls

  # Deleted on purpose: generated again. A half-written attempt (.tmp) is redone.
  import shutil
  shutil.rmtree(prior.folder(work, "cat"))
  os.makedirs(prior.folder(work, "cat") + ".tmp")
  prior.class_images(cfg, work, pipe, ["cat"])
  assert len(calls) == 1 and not os.path.exists(prior.folder(work, "cat") + ".tmp")


def test_bad_prior_fields_fail_before_anything_is_written(tmp_path, tiny_config):
  work = tmp_path / "run"
  with pytest.raises(ConfigError, match=r"prior\.count must be >= 1 .*prior\.weight=1\.0"):
    session.run(tiny_config(**{**SMALL, "prior__count": 0}), str(work))
  assert not (work / "config.json").exists() and not (work / "prior").exists()
  for overrides, field in (({"prior__weight": -1.0}, "prior.weight"),
                           ({"prior__template": "photo of a dog"}, "prior.template")):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
      losses.check_prior(tiny_config(**{**SMALL, **overrides}))
  losses.check_prior(tiny_config(prior__count=0))  # off (weight 0): the count is not read
