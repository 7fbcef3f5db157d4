"""The benchmark presets: their protocol settings, and CustomConcept101's run end to end.

The whole-protocol test trains the preset's tiny variant (sizes scaled down, every
other setting the preset's) on a fixture laid out like CustomConcept101, with tiny
random CLIP and DINO folders, and evaluates it as the preset says.
"""

import json
import os

import pytest

from lfs_jax import config_base
from lfs_jax.evaluate import run_eval

from test_configs import _load
from test_customconcept101 import make_customconcept101
from test_evaluate import clip_dir  # noqa: F401  (module fixture: a tiny CLIP folder)
from test_evaluate_protocol import dino_dir  # noqa: F401  (module fixture: a tiny DINO folder)

# What config_base.scale_down may change, and what :sd15 takes from use_local_sd for
# Stable Diffusion (image size, Custom Diffusion's training recipe); every sampling,
# evaluation and dataset setting of :tiny is the preset's.
SCALED = {"model.source", "train.steps", "sample.steps", "sample.batch_size",
          "eval.num_images", "eval.num_prompts", "eval.batch_size", "eval.grid",
          "data.resolution", "data.rescale_cues"}


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


@pytest.mark.parametrize("name", ["eval_customconcept101", "eval_dreambooth"])
def test_tiny_variant_changes_only_sizes(name):
  full, tiny = _flat(_load(name).to_dict()), _flat(_load(name, "tiny").to_dict())
  base = _flat(config_base.get_config().to_dict())
  for key in full:
    if key.startswith(("sample.", "eval.", "data.")) and key not in SCALED:
      assert tiny[key] == full[key], key
  # The tiny variant differs from the plain tiny config only where the preset does.
  assert {k for k in tiny if tiny[k] != base[k]} <= {k for k in full if full[k] != base[k]} | SCALED
  with pytest.raises(ValueError, match=":sd15 or :tiny"):
    _load(name, "sd21")


def test_published_protocol_settings():
  cc = _load("eval_customconcept101")
  assert (cc.sample.sampler, cc.sample.eta, cc.sample.steps, cc.sample.guidance) == (
      "ddim", 1.0, 200, 6.0)
  assert (cc.eval.num_images, cc.eval.num_prompts, cc.eval.image_encoders,
          cc.eval.references, cc.eval.protocol) == (5, 0, "both", "train", "customconcept101")
  assert cc.data.format == "customconcept101"
  db = _load("eval_dreambooth")
  assert (db.eval.num_images, db.eval.num_prompts, db.eval.image_encoders,
          db.eval.protocol, db.data.format) == (4, 0, "both", "dreambooth", "dreambooth")


@pytest.mark.slow
def test_customconcept101_preset_whole_protocol(make_tiny_run, clip_dir, dino_dir,  # noqa: F811
                                                tmp_path_factory):
  root = make_customconcept101(str(tmp_path_factory.mktemp("cc101")))
  preset = _flat(_load("eval_customconcept101", "tiny").to_dict())
  base = _flat(config_base.get_config().to_dict())
  overrides = {k.replace(".", "__"): v for k, v in preset.items()
               if v != base[k] and k != "compile_cache"}
  overrides.update(data__root=root, data__sessions="plushie_dice;wearable_sunglasses1")
  run_dir = make_tiny_run("cc101", **overrides)
  got = run_eval.evaluate(run_dir, clip=clip_dir, overrides={"eval.dino": dino_dir},
                          progress=False)
  m = got["metrics"]
  st = m["settings"]
  assert (st["sample.sampler"], st["sample.eta"], st["sample.guidance"], st["sample.seed"],
          st["image_encoders"], st["references"]) == ("ddim", 1.0, 6.0, 42, "both", "train")
  assert got["computed"] == 6 and m["metrics"] == ["ta", "clipscore", "ia", "dino"]
  cells = {(c["session"], c["concept"], c["variant"]): c for c in m["cells"]}
  dice, glasses = cells[(2, "plushie_dice", "plain")], cells[(2, "wearable_sunglasses1", "icgen")]
  # The dataset's wording: instance_prompt's phrase in its prompt files' prompts.
  assert dice["prompts"] == ["Photo of a <c1> dice plushie.",
                             "<c1> dice plushie on a wooden shelf."]
  assert dice["ta_texts"] == ["Photo of a dice plushie.", "dice plushie on a wooden shelf."]
  assert glasses["prompts"] == ["<c2> sunglasses on a sandy beach.",
                                "A person wearing <c2> sunglasses."]
  with open(os.path.join(run_dir, "concepts.json")) as f:
    assert [c["train_prompts"] for c in json.load(f)] == [["photo of a {}"], ["photo of {}"]]
  with open(os.path.join(got["out_dir"], "report.md")) as f:
    md = f.read()
  assert md.index("## Published columns: CustomConcept101") < md.index("## Summary")
  assert ("| variant | Textual-alignment (CLIP) | Image-alignment (CLIP) | "
          "Image-alignment (DINO) |") in md
  assert "Textual-alignment (CLIP) = our `CLIPScore`" in md
  f = m["variants"]["plain"]["final"]
  assert (f"| plain (without ICGen) | {f['clipscore']:.4f} | {f['ia']:.4f} | "
          f"{f['dino']:.4f} |") in md
