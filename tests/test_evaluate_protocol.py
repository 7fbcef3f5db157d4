"""Held-out reference photos, DINO image alignment and the published-column report.

A two-session tiny run (dog; cat) trained with data.heldout=1 (each bundled concept
has 3 photos: 2 train, 1 held out), evaluated with tiny random CLIP and DINO folders
against both reference sets, under the DreamBooth protocol's report.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from lfs_jax import base as base_lib
from lfs_jax import concepts as concepts_lib
from lfs_jax import data as data_lib
from lfs_jax import datasets, icgen, runs, sample
from lfs_jax.errors import EvalError
from lfs_jax.evaluate import clip_scorer, encoders, report, run_eval
from lfs_jax.train import session

from test_dino_parity import make_vit
from test_evaluate import clip_dir  # noqa: F401  (a module fixture: the tiny CLIP folder)

# Module fixtures worth building once: keep this module on one xdist worker.
pytestmark = pytest.mark.xdist_group("evaluate_protocol")

IA = ("ia", "ia_heldout", "dino", "dino_heldout")


def _mean_cos(a, b):
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return float((a @ b.T).mean())


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
  return make_vit(str(tmp_path_factory.mktemp("dino")))[0]


@pytest.fixture(scope="module")
def run_dir(make_tiny_run):
  return make_tiny_run("heldout", data__heldout=1, sample__steps=3, sample__batch_size=2,
                       eval__num_images=1, eval__num_prompts=2, eval__batch_size=4,
                       eval__grid=0, eval__image_encoders="both", eval__references="both",
                       eval__protocol="dreambooth")


@pytest.fixture(scope="module")
def evaluated(run_dir, clip_dir, dino_dir):  # noqa: F811
  return run_eval.evaluate(run_dir, clip=clip_dir, overrides={"eval.dino": dino_dir},
                           progress=False)


@pytest.mark.slow
def test_split_is_recorded_and_never_trained_on_or_a_context(run_dir):
  with open(os.path.join(run_dir, "concepts.json")) as f:
    recorded = json.load(f)
  run = runs.load_run(run_dir, 2)
  for c, rec in zip(run.registry.concepts, recorded):
    assert len(c.images) == 2 and len(c.references) == 1 and c.split_seed == 0
    assert not {r.path for r in c.images} & {r.path for r in c.references}
    assert rec["references"][0]["path"] == c.references[0].path
    # The context bank holds a latent per training photo, none for the held-out one.
    assert run.bank[icgen.bank_key(run.registry, c.token)]["mean"].shape[0] == 2
  # Seeded per concept: the same split in any session order, another with another seed.
  spec = datasets.read_folders(datasets.bundled_root(), datasets.bundled_classes)["dog"]
  assert datasets.hold_out(spec, 1, 0) == datasets.hold_out(spec, 1, 0)
  picks = {datasets.hold_out(spec, 1, s).heldout for s in range(8)}
  assert len(picks) > 1 and all(len(p) == 1 for p in picks)


def test_a_split_leaving_no_training_photo_fails_before_training(tiny_config, tmp_path):
  cfg = tiny_config(data__heldout=3, data__sessions="cat;dog")
  workdir = str(tmp_path / "run")
  with pytest.raises(datasets.DatasetError, match="concept 'cat' has 3 photo"):
    session.run(cfg, workdir)
  assert not os.path.exists(os.path.join(workdir, "config.json"))
  with pytest.raises(Exception, match="data.heldout=-1"):
    base_lib.session_specs(tiny_config(data__heldout=-1).data)


@pytest.mark.slow
def test_every_encoder_and_reference_set_is_scored(run_dir, clip_dir, dino_dir,  # noqa: F811
                                                   evaluated):
  m = evaluated["metrics"]
  assert m["metrics"] == ["ta", "clipscore", *IA] and m["ia_metrics"] == list(IA)
  cell = next(c for c in m["cells"] if (c["session"], c["concept"], c["variant"]) ==
              (2, "cat", "icgen"))
  run = runs.load_run(run_dir, 2)
  images, _ = sample.generate(run, cell["prompts"], [0, 0],
                              sample.SampleSettings.from_config(run.cfg))
  cat = run.registry.concepts[1]
  photos = {"train": [data_lib.load_image(r.path, None) for r in cat.images],
            "heldout": [data_lib.load_image(r.path, None) for r in cat.references]}
  for name, enc in (("ia", clip_scorer.ClipScorer(clip_dir, 4)),
                    ("dino", encoders.DinoEncoder(dino_dir, 4))):
    emb = enc.image_embeddings(images)
    assert cell[name] == pytest.approx(
        _mean_cos(emb, enc.image_embeddings(photos["train"])), abs=1e-6)
    assert cell[f"{name}_heldout"] == pytest.approx(
        _mean_cos(emb, enc.image_embeddings(photos["heldout"])), abs=1e-6)
  for v, r in m["variants"].items():
    for name in IA:
      x = np.array(r[name], dtype=float)
      assert r["forgetting"][name]["iad"]["dog"] == pytest.approx(x[0, 0] - x[0, 1])
    assert r["iad_mean"] == r["forgetting"]["ia"]["iad_mean"]  # the headline IA
  out = evaluated["out_dir"]
  for png in ("forgetting.png", "forgetting_ia_heldout.png", "forgetting_dino.png",
              "forgetting_dino_heldout.png"):
    assert os.path.isfile(os.path.join(out, png)), png
  with open(os.path.join(out, "report.md")) as f:
    md = f.read()
  # The protocol's published columns come first, under their names, saying which is which.
  head = md.index("## Published columns: DreamBooth")
  assert head < md.index("## Summary after the last session")
  assert "| variant | DINO | CLIP-I | CLIP-T |" in md
  assert "CLIP-T = our `TA` (TA (raw CLIP cosine))" in md
  icgen_row = [ln for ln in md[head:].splitlines() if ln.startswith("| icgen")][0]
  f = m["variants"]["icgen"]["final"]
  assert icgen_row == f"| icgen (with ICGen) | {f['dino']:.4f} | {f['ia']:.4f} | {f['ta']:.4f} |"
  with open(os.path.join(out, "metrics.csv")) as fh:
    assert fh.readline().strip().endswith("ta,clipscore,ia,ia_heldout,dino,dino_heldout")


def test_heldout_references_asked_of_a_run_without_them(tmp_path):
  path = str(tmp_path / "a.png")
  Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(path)
  concept = concepts_lib.Concept("teddy", "<c1>", "teddybear", "teddybear", 1,
                                 (data_lib.ImageRecord(path, data_lib.sha256_file(path)),))
  with pytest.raises(EvalError, match=r"concept 'teddy' \(<c1>\) has no held-out"):
    run_eval.reference_photos(concept, "heldout")
  # A registry written before held-out references existed reads as having none.
  old = json.loads(concepts_lib.Registry((concept,)).to_json())
  for d in old:
    del d["references"], d["split_seed"]
  assert concepts_lib.Registry.from_json(json.dumps(old)).concepts[0] == concept


def test_eval_settings_refuse_unknown_choices(tiny_config):
  for field, value in (("image_encoders", "siglip"), ("references", "test"),
                       ("protocol", "coco")):
    with pytest.raises(Exception, match=f"eval.{field}={value!r}"):
      run_eval.EvalSettings.from_config(tiny_config(**{f"eval__{field}": value}))


def test_protocol_columns_name_what_was_not_computed():
  """CustomConcept101's columns from CLIP alone: the DINO column says it was not computed."""
  registry = concepts_lib.Registry((
      concepts_lib.Concept("dog", "<c1>", "dog", "dog", 1, ()),
      concepts_lib.Concept("cat", "<c2>", "cat", "cat", 2, ())))
  cells = [{"session": k, "concept": c, "variant": "plain", "ta": ta, "clipscore": 2.5 * ta,
            "ia": ia} for k, c, ta, ia in ((1, "dog", 0.3, 0.8), (2, "dog", 0.28, 0.7),
                                           (2, "cat", 0.32, 0.9))]
  settings = {"num_images": 1, "num_prompts": 0, "sample.sampler": "ddim",
              "sample.steps": 200, "sample.eta": 1.0, "sample.guidance": 6.0,
              "icgen.strength": 0.6, "icgen.select": "random", "clip": "/clip",
              "keep_token": False}
  s = report.summarize(cells, registry, [1, 2], ["plain"], settings=settings, workdir="/w",
                       method="lfs", ia_metrics=["ia"], protocol="customconcept101")
  md = report.markdown(s)
  assert "| plain (without ICGen) | 0.7500 | 0.8000 | not computed |" in md
  assert "Not computed here: Image-alignment (DINO)" in md
  assert s["variants"]["plain"]["iad"]["dog"] == pytest.approx(0.1)
  # Held-out references stand in for the training photos' column when they are all there is.
  assert report.protocol_columns("dreambooth", ["ta", "clipscore", "dino_heldout"]) == [
      ("DINO", "dino_heldout"), ("CLIP-I", "ia"), ("CLIP-T", "ta")]
