"""Evaluation: the metric math against numpy, the whole evaluate flow, resume, compare, errors.

The flow runs on a two-session tiny run (dog; cat) with a tiny random CLIP (32 px,
patch 8, the real CLIP BPE tokenizer) saved as transformers saves a CLIPModel.
"""

import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from lfs_jax import runs, sample
from lfs_jax import concepts as concepts_lib
from lfs_jax import data as data_lib
from lfs_jax.errors import EvalError
from lfs_jax.evaluate import clip_scorer, compare, metrics, run_eval

# Module fixtures worth building once: keep this module on one xdist worker.
pytestmark = pytest.mark.xdist_group("evaluate")

TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "lfs_jax", "assets", "clip_tokenizer")
CELLS = 6  # session 1: dog; session 2: dog, cat; each with and without ICGen
PATTERN = re.compile(r"<c\d+>")


# ---------------------------------------------------------------------------
# The math, on hand-made embeddings

def _cos(a, b):
  return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_ta_clipscore_and_ia_match_a_direct_computation():
  rng = np.random.default_rng(0)
  images, texts, refs = (rng.standard_normal((n, 8)) * rng.uniform(0.5, 3, (n, 1))
                         for n in (5, 5, 3))
  ta, cs = metrics.text_alignment(images, texts)
  cos = [_cos(i, t) for i, t in zip(images, texts)]
  assert ta == pytest.approx(np.mean(cos), abs=1e-12)
  assert cs == pytest.approx(np.mean([2.5 * max(c, 0.0) for c in cos]), abs=1e-12)
  ia = metrics.image_alignment(images, refs)
  assert ia == pytest.approx(np.mean([_cos(i, r) for i in images for r in refs]), abs=1e-12)
  np.testing.assert_allclose(metrics.cosine_matrix(images, refs),
                             [[_cos(i, r) for r in refs] for i in images], atol=1e-12)


def test_clipscore_clips_negative_cosines_at_zero():
  image = np.array([[1.0, 0.0]] * 3)
  text = np.array([[2.0, 0.0], [-1.0, 0.0], [0.6, 0.8]])  # cosines 1, -1, 0.6
  ta, cs = metrics.text_alignment(image, text)
  assert ta == pytest.approx((1 - 1 + 0.6) / 3)
  assert cs == pytest.approx(2.5 * (1 + 0 + 0.6) / 3)
  np.testing.assert_allclose(metrics.clipscore([-0.3, 0.0, 0.4]), [0.0, 0.0, 1.0])
  with pytest.raises(ValueError, match="zero length"):
    metrics.text_alignment(np.zeros((1, 2)), np.ones((1, 2)))


def test_accuracy_matrix_iad_and_means():
  sessions, names, learned = [1, 2, 3], ["a", "b", "c"], [1, 2, 3]
  values = [("a", 1, 0.8), ("a", 2, 0.7), ("a", 3, 0.6), ("b", 2, 0.5), ("b", 3, 0.45),
            ("c", 3, 0.9)]
  m = metrics.accuracy_matrix(values, names, sessions)
  want = np.array([[0.8, 0.7, 0.6], [np.nan, 0.5, 0.45], [np.nan, np.nan, 0.9]])
  np.testing.assert_array_equal(np.isnan(m), np.isnan(want))
  np.testing.assert_allclose(m[~np.isnan(m)], want[~np.isnan(want)])
  drop, rel = metrics.iad(m, learned, sessions)
  np.testing.assert_allclose(drop[:2], [0.8 - 0.6, 0.5 - 0.45])
  np.testing.assert_allclose(rel[:2], [100 * 0.2 / 0.8, 100 * 0.05 / 0.5])
  assert np.isnan(drop[2]) and np.isnan(rel[2])  # learned in the last session
  s = metrics.summary({"ia": m, "ta": m / 2}, learned, sessions)
  np.testing.assert_allclose(s["per_session"]["ia"], [0.8, 0.6, (0.6 + 0.45 + 0.9) / 3])
  assert s["final"]["ta"] == pytest.approx((0.6 + 0.45 + 0.9) / 6)
  assert s["iad_mean"] == pytest.approx((0.2 + 0.05) / 2)
  assert s["iad_rel_mean"] == pytest.approx((25 + 10) / 2)
  # A negative IA[j, s_j] still reads "positive = forgotten" in %.
  _, rel = metrics.iad(np.array([[-0.2, -0.3]]), [1], [1, 2])
  assert rel[0] == pytest.approx(50.0)
  with pytest.raises(ValueError, match="two values"):
    metrics.accuracy_matrix(values + [("a", 1, 0.1)], names, sessions)
  with pytest.raises(ValueError, match="outside"):
    metrics.accuracy_matrix([("z", 1, 0.1)], names, sessions)
  # No IA for a concept without photos: NaN, and no IAD.
  m = metrics.accuracy_matrix([("a", 1, None), ("a", 2, None)], ["a"], [1, 2])
  assert np.isnan(m).all() and np.isnan(metrics.iad(m, [1], [1, 2])[0]).all()


def test_modifier_tokens_are_removed_from_the_ta_text():
  assert metrics.strip_tokens("photo of a <c1> dog", PATTERN) == "photo of a dog"
  assert metrics.strip_tokens("<c12> cat next to a <c3> dog", PATTERN) == "cat next to a dog"
  assert metrics.strip_tokens("a dog", PATTERN) == "a dog"


def test_eval_settings_are_validated(tiny_config):
  cfg = tiny_config(eval__variants="icgen,sketch")
  with pytest.raises(Exception, match="eval.variants"):
    run_eval.EvalSettings.from_config(cfg)
  with pytest.raises(Exception, match="eval.num_images"):
    run_eval.EvalSettings.from_config(tiny_config(eval__num_images=0))
  with pytest.raises(Exception, match="eval.out"):
    run_eval.EvalSettings.from_config(tiny_config(eval__out="../x"))


# ---------------------------------------------------------------------------
# The whole flow

@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  """A tiny random transformers CLIPModel (32 px) with the real CLIP tokenizer."""
  folder = str(tmp_path_factory.mktemp("clip"))
  torch.manual_seed(0)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64,
                       num_attention_heads=4, num_hidden_layers=2,
                       max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                       pad_token_id=49407),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_hidden_layers=2, image_size=32, patch_size=8),
      projection_dim=16)
  transformers.CLIPModel(config).eval().save_pretrained(folder, safe_serialization=True)
  proc = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
  proc(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
  for name in os.listdir(TOKENIZER):
    if name.endswith(".json") or name.endswith(".txt"):
      shutil.copy(os.path.join(TOKENIZER, name), folder)
  return folder


@pytest.fixture(scope="module")
def run_dir(tiny_run):
  """A copy of the shared two-session tiny run (dog; cat) with small eval settings."""
  return tiny_run("evaluate")


@pytest.fixture(scope="module")
def evaluated(run_dir, clip_dir):
  return run_eval.evaluate(run_dir, clip=clip_dir, progress=False)


def _cells(run_dir):
  with open(os.path.join(run_dir, "metrics", "cells.json")) as f:
    return json.load(f)


def test_evaluate_writes_consistent_files(run_dir, evaluated):
  assert evaluated["computed"] == CELLS and evaluated["reused"] == 0
  out = os.path.join(run_dir, "metrics")
  assert sorted(os.path.basename(p) for p in evaluated["files"]) == [
      "forgetting.png", "metrics.csv", "metrics.json", "report.md"]
  with open(os.path.join(out, "metrics.json")) as f:
    m = json.load(f)
  cells = _cells(run_dir)["cells"]
  assert len(cells) == CELLS and m["sessions"] == [1, 2]
  assert [c["name"] for c in m["concepts"]] == ["dog", "cat"]
  for key, c in cells.items():
    assert key == f"{c['session']}/{c['concept']}/{c['variant']}"
    assert c["num_images"] == 2 and c["prompts"] == [p.format(f"{c['token']} {c['class_word']}")
                                                   for p in ("photo of a {}", "a {} on the beach")]
    assert c["ta_texts"] == [f"photo of a {c['class_word']}",
                             f"a {c['class_word']} on the beach"]
    assert c["icgen_images"] == (2 if c["variant"] == "icgen" else 0)
    assert -1 <= c["ta"] <= 1 and -1 <= c["ia"] <= 1
    assert 0 <= c["clipscore"] <= 2.5
    j, k = [x["name"] for x in m["concepts"]].index(c["concept"]), c["session"] - 1
    for name in ("ta", "clipscore", "ia"):
      assert m["variants"][c["variant"]][name][j][k] == c[name]
    grid = np.asarray(Image.open(os.path.join(out, c["grid"])))
    assert grid.shape == (32, 64, 3)
  for v in ("icgen", "plain"):
    r = m["variants"][v]
    assert r["ia"][1][0] is None  # cat is not learned after session 1
    ia = np.array(r["ia"], dtype=float)
    assert r["iad"]["dog"] == pytest.approx(ia[0, 0] - ia[0, 1])
    assert r["iad"]["cat"] is None and r["iad_mean"] == pytest.approx(r["iad"]["dog"])
    assert r["iad_rel"]["dog"] == pytest.approx(100 * r["iad"]["dog"] / abs(ia[0, 0]))
    assert r["final"]["ia"] == pytest.approx(np.mean(ia[:, 1]))
    assert r["per_session"]["ia"][0] == pytest.approx(ia[0, 0])
  with open(os.path.join(out, "metrics.csv")) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == CELLS
  for row in rows:
    c = cells[f"{row['session']}/{row['concept']}/{row['variant']}"]
    for name in ("ta", "clipscore", "ia"):
      assert float(row[name]) == c[name]
  with open(os.path.join(out, "report.md")) as f:
    md = f.read()
  for title in ("IA[j, k]", "TA[j, k]", "CLIPSCORE[j, k]", "## icgen: with ICGen",
                "## plain: without ICGen", "forgetting.png", "grids/session_2/cat_icgen.png"):
    assert title in md, title
  dog_icgen = cells["2/dog/icgen"]
  assert f"{dog_icgen['ia']:.4f}" in md
  with Image.open(os.path.join(out, "forgetting.png")) as im:
    assert im.format == "PNG" and im.size[0] > 100


def test_cell_numbers_equal_numpy_on_the_same_images(run_dir, clip_dir, evaluated):
  cell = _cells(run_dir)["cells"]["2/cat/icgen"]
  run = runs.load_run(run_dir, 2)
  st = sample.SampleSettings.from_config(run.cfg)
  images, _ = sample.generate(run, cell["prompts"], [0, 0], st)
  scorer = clip_scorer.ClipScorer(clip_dir, 4)
  concept = run.registry.concepts[1]
  refs = scorer.image_embeddings([data_lib.load_image(r.path, None) for r in concept.images])
  emb = scorer.image_embeddings(images)
  text = scorer.text_embeddings(cell["ta_texts"])
  cos = [_cos(e, t) for e, t in zip(emb, text)]
  assert cell["ta"] == pytest.approx(np.mean(cos), abs=1e-6)
  assert cell["clipscore"] == pytest.approx(np.mean([2.5 * max(c, 0) for c in cos]), abs=1e-6)
  assert cell["ia"] == pytest.approx(np.mean([_cos(e, r) for e in emb for r in refs]), abs=1e-6)


def test_a_concept_without_photos_or_bank_is_scored_without_ia(run_dir, clip_dir, evaluated,
                                                              tmp_path):
  """A concept imported with --mode=import: no photos, no context bank."""
  run = runs.load_run(run_dir, 1)
  dog = dataclasses.replace(run.registry.concepts[0], images=())
  run = run._replace(bank={}, registry=concepts_lib.Registry((dog,)))
  assert run_eval.reference_photos(dog) == []
  settings = run_eval.EvalSettings.from_config(run.cfg, clip_dir)
  got = run_eval.compute_cell(run, run_eval.Cell(1, dog, "icgen"),
                              run_eval.Scorers(clip_scorer.ClipScorer(clip_dir, 4)),
                              {"ia": None}, settings, str(tmp_path))
  plain = _cells(run_dir)["cells"]["1/dog/plain"]
  assert got["icgen_images"] == 0 and got["ia"] is None
  assert got["ta"] == pytest.approx(plain["ta"], abs=1e-6)  # the plain cell's images


def test_resume_skips_done_cells(run_dir, clip_dir, evaluated, monkeypatch):
  calls = []
  real = sample.generate
  monkeypatch.setattr(sample, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
  again = run_eval.evaluate(run_dir, clip=clip_dir, progress=False)
  assert (again["computed"], again["reused"], calls) == (0, CELLS, [])
  assert again["metrics"]["variants"] == evaluated["metrics"]["variants"]
  # One cell lost (an interrupted evaluation): only it is computed again, the same.
  stored = _cells(run_dir)
  lost = stored["cells"].pop("2/dog/plain")
  with open(os.path.join(run_dir, "metrics", "cells.json"), "w") as f:
    json.dump(stored, f)
  third = run_eval.evaluate(run_dir, clip=clip_dir, progress=False)
  assert (third["computed"], third["reused"], len(calls)) == (1, CELLS - 1, 1)
  assert _cells(run_dir)["cells"]["2/dog/plain"] == lost
  # Other sampling settings would mix incomparable cells: refused, naming the field.
  with pytest.raises(EvalError, match="sample.steps=4"):
    run_eval.evaluate(run_dir, clip=clip_dir, overrides={"sample.steps": 5}, progress=False)


def test_compare_two_runs(run_dir, evaluated, tmp_path):
  """Two runs that differ in numbers, method and one evaluation setting."""
  with open(os.path.join(run_dir, "metrics", "metrics.json")) as f:
    real = json.load(f)
  setting = sorted(real["settings"])[0]
  custom_ia = [0.125, 0.0625]
  dirs = []
  for name, method in (("lfs", "lfs"), ("custom", "custom_diffusion")):
    m = json.loads(json.dumps(real))
    m["method"] = method
    if name == "custom":  # another run: its own numbers, evaluated differently
      m["variants"]["icgen"]["per_session"]["ia"] = custom_ia
      m["settings"][setting] = ["not", "the", "same"]
    d = tmp_path / name / "metrics"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(m))
    dirs.append(str(tmp_path / name))
  got = compare.compare(dirs, out_dir=str(tmp_path / "cmp"))
  assert [(r["run"], r["variant"]) for r in got["rows"]] == [
      ("lfs", "icgen"), ("lfs", "plain"), ("custom", "icgen"), ("custom", "plain")]
  assert got["differences"] == [setting]
  ia = evaluated["metrics"]["variants"]["icgen"]["per_session"]["ia"]
  assert [got["rows"][0]["ia@1"], got["rows"][0]["ia@2"]] == ia
  assert [got["rows"][2]["ia@1"], got["rows"][2]["ia@2"]] == custom_ia
  md = (tmp_path / "cmp" / "compare.md").read_text()
  assert "| lfs | lfs | icgen" in md and "| custom | custom_diffusion | plain" in md
  assert "evaluated under different settings" in md and setting in md
  with Image.open(tmp_path / "cmp" / "compare.png") as im:
    assert im.format == "PNG"
  rows = list(csv.DictReader((tmp_path / "cmp" / "compare.csv").open()))
  assert len(rows) == 4 and rows[0]["method"] == "lfs"
  assert float(rows[2]["ia@1"]) == custom_ia[0]
  with pytest.raises(EvalError, match="evaluate the run first"):
    compare.compare([dirs[0], str(tmp_path)])
  assert compare.run_names(["/a/x/run", "/a/y/run"]) == ["x/run", "y/run"]


# ---------------------------------------------------------------------------
# Errors

def test_missing_clip_folder_and_run_without_sessions(run_dir, clip_dir, tmp_path):
  with pytest.raises(EvalError, match="does not exist"):
    run_eval.evaluate(run_dir, clip=str(tmp_path / "nope"), progress=False)
  with pytest.raises(EvalError, match="no CLIP model"):
    run_eval.evaluate(run_dir, progress=False)
  bare = tmp_path / "bare"
  bare.mkdir()
  shutil.copy(os.path.join(run_dir, "config.json"), bare / "config.json")
  with pytest.raises(EvalError, match="no finished session"):
    run_eval.evaluate(str(bare), clip=clip_dir, progress=False)
  with pytest.raises(runs.RunError, match="not a run directory"):
    run_eval.evaluate(str(tmp_path), clip=clip_dir, progress=False)


def test_moved_or_changed_reference_photos_are_named(tmp_path):
  path = str(tmp_path / "a.png")
  Image.fromarray(np.full((20, 30, 3), 9, np.uint8)).save(path)
  concept = concepts_lib.Concept("teddy", "<c1>", "teddybear", "teddybear", 1,
                                 (data_lib.ImageRecord(path, data_lib.sha256_file(path)),))
  photos = run_eval.reference_photos(concept)
  assert photos[0].shape == (20, 30, 3)  # native size: CLIP resizes and crops itself
  Image.fromarray(np.full((20, 30, 3), 10, np.uint8)).save(path)
  with pytest.raises(EvalError, match=r"a\.png of concept 'teddy' \(<c1>\) changed"):
    run_eval.reference_photos(concept)
  os.remove(path)
  with pytest.raises(EvalError, match=r"a\.png .* is missing"):
    run_eval.reference_photos(concept)


# ---------------------------------------------------------------------------
# Command line

def _cli(*args):
  env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest")
  return subprocess.run([sys.executable, "-m", "lfs_jax.main", *args], capture_output=True,
                        text=True, timeout=300, env=env)


@pytest.mark.slow  # a whole loop (CI runs it)
def test_cli_evaluate_resumes_and_compare_writes(run_dir, clip_dir, evaluated, tmp_path):
  proc = _cli("--mode=evaluate", f"--workdir={run_dir}", f"--clip={clip_dir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "0 cells computed, 6 reused" in proc.stdout, proc.stdout
  out = str(tmp_path / "cmp")
  proc = _cli("--mode=compare", f"--workdir={run_dir}", f"--workdir={run_dir}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(out)) == ["compare.csv", "compare.json", "compare.md", "compare.png"]
  proc = _cli("--mode=evaluate", f"--workdir={run_dir}", f"--clip={tmp_path / 'none'}")
  assert proc.returncode == 2 and "does not exist" in proc.stderr
  proc = _cli("--mode=compare", f"--workdir={run_dir}")
  assert proc.returncode != 0 and "two" in proc.stderr
