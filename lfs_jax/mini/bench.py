"""The mini world's lifelong benchmark: sessions on the shipped base, judged by the oracle.

  python -m lfs_jax.mini.bench --config=configs/mini.py:short --workdir=/tmp/lfs_mini

Training runs over the same sessions, photos, steps and seeds give the variants
(`mini.variants`): custom_diffusion (sequential Custom Diffusion, no regulariser:
method=custom_diffusion, no ICGen), dfkd (method=lfs, DFKD and, if kd.kv_weight > 0,
our K/V anchor; no ICGen), icgen (the custom_diffusion run sampled with ICGen), lfs
(the lfs run with ICGen), anchor (the K/V anchor alone, kd.weight 0, no ICGen),
separate (every concept trained alone from the base, one run each, sampled with its
own delta: no forgetting by construction) and lora (the lfs recipe training LoRA
factors, train.selection=lora, sampled with ICGen). After every session each variant draws
every concept learned so far and the class prompts; the oracle reads the samples:
  - IA[j, k]: mean cosine of oracle features between concept j's samples after
    session k and fresh renders of its design that neither training nor ICGen saw
    (`mini.references` of them); IA photos: the same against its training photos
    (the ICGen context), so what ICGen copies shows as the gap; IAD_j = IA[j, j] - IA[j, K];
  - normalised IA = (IA - floor) / (ceiling - floor), floor = the base's samples of the
    class prompt ("a star"), ceiling = other fresh renders, both against the references;
  - concept accuracy[j, k]: share of samples with shape, pattern and both colours
    right, reported right after the concept's own session (plasticity) and at the end;
  - class accuracy[k]: share of class-prompt samples ("a red star on a white
    background", classes of the run's concepts) with shape and colour right, and
    the share the oracle calls patterned (concepts leaking into their class).
Everything lands in --workdir: photos/, runs/<run>/ (ordinary lfs_jax runs:
sample, evaluate and export work on them), eval/ (one JSON per variant and session,
reused when rerun), results.json, report.md, plots and samples_session<k>.png.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from lfs_jax.mini import world

# variant -> (training run, ICGen on). "separate" trains every concept alone from the
# base (runs/separate_<name>, one session each) and samples each with its own delta:
# no forgetting by construction, the reference for how well a concept can be learned.
VARIANTS = {
    "custom_diffusion": ("cd", False),
    "dfkd": ("lfs", False),
    "icgen": ("cd", True),
    "lfs": ("lfs", True),
    "anchor": ("anchor", False),
    "separate": ("separate", False),
    "lora": ("lfs_lora", True),  # lfs trained as LoRA factors (train.selection=lora, train.lora_*)
}
# training run -> (method, DFKD on); "anchor" is the K/V anchor alone (kd.weight 0).
RUN_METHODS = {"cd": ("custom_diffusion", True), "lfs": ("lfs", True),
               "anchor": ("lfs", False), "separate": ("custom_diffusion", True),
               "lfs_lora": ("lfs", True)}
RUN_SELECTIONS = {"lfs_lora": "lora"}  # a run's train.selection, where not the config's
# Fresh renders of each concept's design that IA is scored against ("held-out
# references"): another seed than the photos (cfg.seed) and than the ceiling's renders.
REF_SEED_OFFSET, CEILING_SEED_OFFSET = 1000, 2000


def parse_variants(cfg) -> List[str]:
  """cfg.mini.variants as a list; an unknown or empty one is an error naming the field."""
  variants = [v.strip() for v in cfg.mini.variants.split(",") if v.strip()]
  bad = [v for v in variants if v not in VARIANTS]
  if bad or not variants:
    raise ValueError(f"mini.variants: unknown {bad or 'empty'}; use some of {list(VARIANTS)}")
  if "anchor" in variants and not cfg.kd.kv_weight > 0:
    raise ValueError("mini.variants: 'anchor' is the K/V anchor alone and needs "
                     f"kd.kv_weight > 0, got {cfg.kd.kv_weight}")
  return variants


def _log(msg: str) -> None:
  print(msg, flush=True)


def _atomic_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def concept_names(cfg) -> List[List[str]]:
  return [[n.strip() for n in s.split(",") if n.strip()]
          for s in cfg.data.sessions.split(";") if s.strip()]


def write_photos(root: str, names: Sequence[str], per_concept: int, seed: int) -> None:
  """Renders each concept's photos to root/<name>/<i>.png (and its eval prompts)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  for name in names:
    c = world.concept(name)
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(world.render_all(world.concept_scenes(c, per_concept, seed))):
      path = os.path.join(folder, f"{i}.png")
      if not os.path.exists(path):
        Image.fromarray(img).save(path)
    with open(os.path.join(folder, "prompts.txt"), "w") as f:
      f.write("a {}\n")
    with open(os.path.join(folder, "class.txt"), "w") as f:
      f.write(c.shape + "\n")


def class_prompts(classes: Sequence[str], per_class: int, seed: int
                  ) -> List[Tuple[str, world.Scene]]:
  """(prompt, scene it asks for): held-out and training captions of each class."""
  rng = np.random.default_rng([seed, 31])
  out = []
  for shape in classes:
    triples = [t for t in world.caption_triples("all") if t[0] == shape]
    for i in rng.permutation(len(triples))[:per_class]:
      s = world.Scene(*triples[i])
      out.append((world.caption(s), s))
  return out


def training_config(cfg, run: str, photos: str, sessions: str = ""):
  """The lfs_jax run config of one training run: cfg minus the mini section.

  `sessions` replaces data.sessions (a "separate" run: one concept).
  """
  from lfs_jax import config_base, runs  # pylint: disable=g-import-not-at-top

  d = cfg.to_dict()
  n_templates = d.pop("mini")["kd_class_templates"]
  d["method"], dfkd = RUN_METHODS[run]
  d["train"]["selection"] = RUN_SELECTIONS.get(run, d["train"]["selection"])
  if not dfkd:
    d["kd"]["weight"] = 0.0
  if sessions:
    d["data"]["sessions"] = sessions
  if n_templates and d["method"] == "lfs":
    d["kd"]["class_templates"] = world.class_templates(n_templates, cfg.seed)
  d["data"]["root"] = photos
  base = config_base.get_config()
  runs._fill(base, d, "", "configs/mini.py")  # pylint: disable=protected-access
  return base


def _generate(run_model, prompts: Sequence[str], seeds: Sequence[int], strength: float,
              cfg) -> np.ndarray:
  from lfs_jax import sample  # pylint: disable=g-import-not-at-top

  settings = dataclasses.replace(sample.SampleSettings.from_config(cfg), strength=strength)
  images, _ = sample.generate(run_model, list(prompts), list(seeds), settings)
  return images


def evaluate_session(run_model, cfg, *, icgen: bool, oracle_params, refs: Dict[str, np.ndarray],
                     classes: Sequence[str], photos: Optional[Dict[str, np.ndarray]] = None
                     ) -> Dict[str, Any]:
  """One variant after one session: concept and class-prompt scores (and sample images).

  IA ("ia") is scored against `refs`, fresh renders of each concept's design that
  neither training nor ICGen saw; "ia_photos" against the concept's own photos (the
  ICGen context), so what ICGen copies from them shows as the gap between the two.

  All prompts go to the sampler in one list, so its batches are full; ICGen (if
  on) only touches the prompts that name a concept.
  """
  from lfs_jax.mini import ceiling, oracle  # pylint: disable=g-import-not-at-top

  m = cfg.mini
  strength = float(cfg.icgen.strength) if icgen else 1.0
  concepts = list(run_model.registry.concepts)
  # Each class prompt with m.class_seeds seeds: one sample a prompt would make a
  # single sample worth 1/(classes * class_prompts) of the accuracy.
  cls = [pc for pc in class_prompts(classes, m.class_prompts, cfg.seed)
         for _ in range(m.class_seeds)]
  prompts = [f"a {c.token} {c.class_word}" for c in concepts for _ in range(m.eval_images)]
  seeds = [i for _ in concepts for i in range(m.eval_images)]
  prompts += [p for p, _ in cls]
  seeds += [i % m.class_seeds for i in range(len(cls))]
  images = _generate(run_model, prompts, seeds, strength, cfg)
  feats, pred = oracle.predict(oracle_params, images)
  out: Dict[str, Any] = {"concepts": {}, "samples": {}}
  for i, c in enumerate(concepts):
    spec = world.concept(c.name)
    sl = slice(i * m.eval_images, (i + 1) * m.eval_images)
    ref_feats, _ = oracle.predict(oracle_params, refs[c.name])
    right = ceiling.concept_right({k: v[sl] for k, v in pred.items()}, spec)
    out["concepts"][c.name] = {"ia": float((feats[sl] @ ref_feats.T).mean()),
                               "accuracy": float(right.mean()), "prompt": prompts[sl.start]}
    if photos is not None:
      photo_feats, _ = oracle.predict(oracle_params, photos[c.name])
      out["concepts"][c.name]["ia_photos"] = float((feats[sl] @ photo_feats.T).mean())
    out["samples"][c.name] = images[sl][:4]
  n = len(concepts) * m.eval_images
  shape_ok = pred["shape"][n:] == np.array([world.SHAPES.index(s.shape) for _, s in cls])
  colour_ok = pred["colour"][n:] == np.array([world.COLOURS.index(s.colour) for _, s in cls])
  out["class"] = {"accuracy": float((shape_ok & colour_ok).mean()),
                  "shape": float(shape_ok.mean()), "colour": float(colour_ok.mean()),
                  "patterned": float((pred["pattern"][n:] != 0).mean()), "n": len(cls)}
  out["samples"]["class"] = images[n:][::m.class_seeds][:4]
  return out


def base_run_model(cfg):
  """The base model as a "session 0" RunModel (no concepts), for sampling."""
  from lfs_jax import base as base_lib, concepts as concepts_lib, runs  # pylint: disable=g-import-not-at-top

  pipe = base_lib.load_base(cfg.model, cfg.seed)
  d = pipe.text_encoder.config.hidden_size
  return runs.RunModel(cfg, "", 0, [], pipe, np.zeros((0, d), np.float32),
                       concepts_lib.Registry(), {})


def heldout_accuracy(cfg, oracle_params, per_caption: int = 8) -> Dict[str, float]:
  """The base on every held-out caption: share with shape / colour / both right."""
  from lfs_jax.mini import oracle  # pylint: disable=g-import-not-at-top

  triples = world.caption_triples("heldout")
  prompts = [world.caption(world.Scene(*t)) for t in triples for _ in range(per_caption)]
  seeds = [i for _ in triples for i in range(per_caption)]
  imgs = _generate(base_run_model(cfg), prompts, seeds, 1.0, cfg)
  _, pred = oracle.predict(oracle_params, imgs)
  want = [t for t in triples for _ in range(per_caption)]
  shape = pred["shape"] == np.array([world.SHAPES.index(t[0]) for t in want])
  colour = pred["colour"] == np.array([world.COLOURS.index(t[1]) for t in want])
  bg = pred["background"] == np.array([world.BACKGROUNDS.index(t[2]) for t in want])
  asked = np.array([t[0] for t in want])
  return {"shape_and_colour": float((shape & colour).mean()), "shape": float(shape.mean()),
          "colour": float(colour.mean()), "background": float(bg.mean()), "n": len(prompts),
          "by_shape": {s: float((shape & colour)[asked == s].mean())
                       for s in world.SHAPES if (asked == s).any()}}


def ia_bounds(cfg, oracle_params, refs: Dict[str, np.ndarray], names: Sequence[str],
              base_model) -> Dict[str, Dict[str, float]]:
  """Per concept, the IA that normalised IA maps to 0 and 1 (mean oracle-feature cosines):
  floor = the base model's samples of the class prompt ("a star") against the
  references; ceiling = other fresh renders of the concept against the references.
  """
  from lfs_jax.mini import oracle  # pylint: disable=g-import-not-at-top

  n = cfg.mini.eval_images
  prompts = [f"a {world.concept(c).shape}" for c in names for _ in range(n)]
  feats, _ = oracle.predict(oracle_params, _generate(
      base_model, prompts, [i for _ in names for i in range(n)], 1.0, cfg))
  out = {}
  for i, c in enumerate(names):
    ref_feats, _ = oracle.predict(oracle_params, refs[c])
    fresh = world.render_all(world.concept_scenes(world.concept(c), n,
                                                  cfg.seed + CEILING_SEED_OFFSET))
    fresh_feats, _ = oracle.predict(oracle_params, fresh)
    out[c] = {"floor": float((feats[i * n:(i + 1) * n] @ ref_feats.T).mean()),
              "ceiling": float((fresh_feats @ ref_feats.T).mean())}
  return out


def normalised_ia(ia: float, bound: Dict[str, float]) -> float:
  """(IA - floor) / (ceiling - floor): 0 = the base's class samples, 1 = fresh renders."""
  return (ia - bound["floor"]) / (bound["ceiling"] - bound["floor"])


def _summary(per_session: Dict[int, Dict[str, Any]], names: List[str],
             sessions_of: Dict[str, int], base_class: float,
             bounds: Dict[str, Dict[str, float]]) -> Dict[str, Any]:
  k_last = max(per_session)

  def matrix(key):
    return {n: {k: per_session[k]["concepts"][n][key] for k in per_session
                if n in per_session[k]["concepts"] and key in per_session[k]["concepts"][n]}
            for n in names}

  ia, acc, ia_photos = matrix("ia"), matrix("accuracy"), matrix("ia_photos")
  nia = {n: {k: normalised_ia(v, bounds[n]) for k, v in ia[n].items()} for n in names}
  iad = {n: ia[n][sessions_of[n]] - ia[n][k_last] for n in names if sessions_of[n] < k_last}
  niad = {n: nia[n][sessions_of[n]] - nia[n][k_last] for n in iad}
  final_class = per_session[k_last]["class"]["accuracy"]
  return {
      "ia_matrix": ia, "accuracy_matrix": acc, "nia_matrix": nia, "iad": iad,
      "ia_photos_matrix": ia_photos,
      "iad_mean": float(np.mean(list(iad.values()))) if iad else 0.0,
      "niad_mean": float(np.mean(list(niad.values()))) if niad else 0.0,
      "ia_final": float(np.mean([ia[n][k_last] for n in names])),
      "nia_final": float(np.mean([nia[n][k_last] for n in names])),
      "ia_photos_final": float(np.mean([ia_photos[n][k_last] for n in names]))
                         if all(k_last in ia_photos[n] for n in names) else float("nan"),
      "concept_accuracy_final": float(np.mean([acc[n][k_last] for n in names])),
      # plasticity: each concept right after its own session
      "concept_accuracy_own": float(np.mean([acc[n][sessions_of[n]] for n in names])),
      "nia_own": float(np.mean([nia[n][sessions_of[n]] for n in names])),
      "class_accuracy": {k: per_session[k]["class"]["accuracy"] for k in per_session},
      "class_shape": {k: per_session[k]["class"]["shape"] for k in per_session},
      "class_colour": {k: per_session[k]["class"]["colour"] for k in per_session},
      "class_patterned": {k: per_session[k]["class"]["patterned"] for k in per_session},
      "class_accuracy_final": final_class,
      "class_accuracy_drop": base_class - final_class,
  }


def _samples_png(path: str, header: List[str], rows: List[Tuple[str, List[np.ndarray]]]) -> None:
  """A header of column labels, then one labelled row of tiles per variant (3x upscaled)."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top

  tile, label_w, head_h = 96, 130, 18
  width = label_w + tile * max(len(t) for _, t in rows)
  canvas = Image.new("RGB", (width, head_h + tile * len(rows)), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for i, text in enumerate(header):
    draw.text((label_w + i * tile + 2, 3), text[:15], fill=(0, 0, 0))
  for r, (label, tiles) in enumerate(rows):
    draw.text((4, head_h + r * tile + tile // 2 - 6), label, fill=(0, 0, 0))
    for i, t in enumerate(tiles):
      canvas.paste(Image.fromarray(t).resize((tile, tile), Image.NEAREST),
                   (label_w + i * tile, head_h + r * tile))
  canvas.save(path)


def _plots(path: str, summaries: Dict[str, Dict[str, Any]], base_class: float) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for v, s in summaries.items():
    ks = sorted(s["class_accuracy"])
    axes[0].plot(ks, [np.mean([m[k] for m in s["ia_matrix"].values() if k in m]) for k in ks],
                 marker="o", label=v)
    axes[1].plot(ks, [np.mean([m[k] for m in s["accuracy_matrix"].values() if k in m])
                      for k in ks], marker="o", label=v)
    axes[2].plot(ks, [s["class_accuracy"][k] for k in ks], marker="o", label=v)
  axes[2].axhline(base_class, color="gray", ls="--", label="base")
  for ax, title in zip(axes, ("mean IA of learned concepts", "concept accuracy (oracle)",
                              "class-prompt accuracy")):
    ax.set_title(title)
    ax.set_xlabel("session")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _report(summaries, base, names, sessions_of, cfg, timings) -> str:
  lines = ["# Mini-world lifelong benchmark", "",
           f"Sessions: `{cfg.data.sessions}`; {cfg.train.steps} steps per session; "
           f"sampler {cfg.sample.sampler} {cfg.sample.steps} steps, guidance "
           f"{cfg.sample.guidance}; ICGen strength {cfg.icgen.strength}; "
           f"DFKD weight {cfg.kd.weight}, mode {cfg.kd.mode}, T_tau {cfg.kd.steps}; "
           f"K/V anchor weight {cfg.kd.kv_weight} (ours; 0 = the paper's loss alone).", "",
           f"Base model: class-prompt accuracy {base['class']['accuracy']:.3f} "
           f"(shape {base['class']['shape']:.3f}, colour {base['class']['colour']:.3f}, "
           f"patterned {base['class']['patterned']:.3f}).", "",
           "IA is scored against fresh renders of each concept's design that neither "
           "training nor ICGen saw; IA photos against the concept's training photos (the "
           "ICGen context). nIA = (IA - floor) / (ceiling - floor), floor = the base's "
           "class-prompt samples, ceiling = other fresh renders, both against the same "
           "references. \"own\" = right after the concept's own session.", "",
           "| variant | IA final | IA photos final | IAD mean | nIA own | nIA final | "
           "nIAD mean | concept acc own | concept acc final | class acc final | "
           "class acc drop vs base | class patterned final |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for v, s in summaries.items():
    k = max(s["class_patterned"])
    lines.append(f"| {v} | {s['ia_final']:.3f} | {s['ia_photos_final']:.3f} | "
                 f"{s['iad_mean']:.3f} | {s['nia_own']:.3f} | {s['nia_final']:.3f} | "
                 f"{s['niad_mean']:.3f} | {s['concept_accuracy_own']:.3f} | "
                 f"{s['concept_accuracy_final']:.3f} | {s['class_accuracy_final']:.3f} | "
                 f"{s['class_accuracy_drop']:+.3f} | {s['class_patterned'][k]:.3f} |")
  verdict = goal(summaries)
  if verdict:
    lines += ["", verdict + "."]
  for v, s in summaries.items():
    ks = sorted(s["class_accuracy"])
    lines += ["", f"## {v}: IA[concept, session] (concept accuracy in brackets)", "",
              "| concept (session) | " + " | ".join(f"s{k}" for k in ks) + " | IAD |",
              "|---|" + "---|" * (len(ks) + 1)]
    for n in names:
      cells = [f"{s['ia_matrix'][n][k]:.3f} ({s['accuracy_matrix'][n][k]:.2f})"
               if k in s["ia_matrix"][n] else "" for k in ks]
      iad = s["iad"].get(n)
      lines.append(f"| {n} ({sessions_of[n]}) | " + " | ".join(cells) + " | "
                   + (f"{iad:.3f}" if iad is not None else "-") + " |")
    for key in ("accuracy", "shape", "colour"):
      lines.append(f"| class {key} | " + " | ".join(
          f"{s['class_' + key][k]:.3f}" for k in ks) + " | |")
  lines += ["", "Wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()), ""]
  return "\n".join(lines)


def goal(summaries: Dict[str, Dict[str, Any]]) -> str:
  """Issue 7's goal, when lfs and custom_diffusion were both judged: one line."""
  if not {"lfs", "custom_diffusion"} <= set(summaries):
    return ""
  lfs, cd = summaries["lfs"], summaries["custom_diffusion"]
  iad_ok = lfs["iad_mean"] <= 0.5 * cd["iad_mean"]
  class_ok = lfs["class_accuracy_drop"] <= 0.05
  return (f"goal: IAD(lfs) {lfs['iad_mean']:.3f} <= half of IAD(custom_diffusion) "
          f"{cd['iad_mean']:.3f}: {'met' if iad_ok else 'NOT met'}; class-prompt accuracy "
          f"of lfs within 5 points of the base ({-lfs['class_accuracy_drop']:+.3f}): "
          f"{'met' if class_ok else 'NOT met'}")


def table(summaries: Dict[str, Dict[str, Any]], base_class: float) -> str:
  """The printed table. IA is against held-out renders of each concept (IA photos: against
  its training photos); nIA normalised by ia_bounds; "own" = right after the concept's
  own session (plasticity), "final" = after the last."""
  head = (f"{'variant':<17}{'IA':>7}{'IA photos':>10}{'nIA own':>8}{'nIA':>7}{'nIAD':>7}"
          f"{'acc own':>8}{'acc':>7}{'class acc':>10}{'drop':>8}")
  rows = [head, "-" * len(head)]
  for v, s in summaries.items():
    rows.append(f"{v:<17}{s['ia_final']:>7.3f}{s['ia_photos_final']:>10.3f}"
                f"{s['nia_own']:>8.3f}{s['nia_final']:>7.3f}{s['niad_mean']:>7.3f}"
                f"{s['concept_accuracy_own']:>8.3f}{s['concept_accuracy_final']:>7.3f}"
                f"{s['class_accuracy_final']:>10.3f}{s['class_accuracy_drop']:>+8.3f}")
  rows.append(f"{'base model':<17}{'':>7}{'':>10}{'':>8}{'':>7}{'':>7}{'':>8}{'':>7}"
              f"{base_class:>10.3f}")
  verdict = goal(summaries)
  return "\n".join(rows + ([verdict] if verdict else []))


def run(cfg, workdir: str) -> Dict[str, Any]:
  """Trains the runs the variants need, evaluates every session, writes the report."""
  from lfs_jax import runs  # pylint: disable=g-import-not-at-top
  from lfs_jax.mini import oracle  # pylint: disable=g-import-not-at-top
  from lfs_jax.train import session as session_lib  # pylint: disable=g-import-not-at-top

  variants = parse_variants(cfg)
  sessions = concept_names(cfg)
  names = [n for s in sessions for n in s]
  for n in names:
    world.concept(n)  # unknown names fail here, before anything is written
  if cfg.mini.references < 1:
    raise ValueError(f"mini.references must be >= 1, got {cfg.mini.references}")
  sessions_of = {n: k + 1 for k, s in enumerate(sessions) for n in s}
  classes = sorted({world.concept(n).shape for n in names})
  os.makedirs(workdir, exist_ok=True)
  photo_dir = os.path.join(workdir, "photos")
  write_photos(photo_dir, names, cfg.mini.photos, cfg.seed)
  oracle_params = oracle.load(cfg.mini.oracle or oracle.DEFAULT_DIR)
  photos = {n: world.render_all(world.concept_scenes(world.concept(n), cfg.mini.photos,
                                                     cfg.seed)) for n in names}
  refs = {n: world.render_all(world.concept_scenes(world.concept(n), cfg.mini.references,
                                                   cfg.seed + REF_SEED_OFFSET)) for n in names}
  timings: Dict[str, float] = {}
  stamp = {"sample": cfg.sample.to_dict(), "icgen": cfg.icgen.to_dict(),
           "mini": cfg.mini.to_dict()}

  # Train the runs the variants need; an existing run directory is resumed.
  train_runs = {}  # run dir name -> (kind, data.sessions override)
  for v in variants:
    kind = VARIANTS[v][0]
    if kind == "separate":
      train_runs.update({f"separate_{n}": (kind, n) for n in names})
    else:
      train_runs[kind] = (kind, "")
  run_configs = {}
  for r, (kind, only) in sorted(train_runs.items()):
    t = time.time()
    rdir = os.path.join(workdir, "runs", r)
    rcfg = training_config(cfg, kind, photo_dir, only)
    run_configs[r] = rcfg.to_dict()
    alone = ", kd.weight 0: the K/V anchor alone" if kind == "anchor" else ""
    _log(f"== training run {r!r} ({rcfg.method}{alone}), sessions {rcfg.data.sessions!r} ==")
    session_lib.run(rcfg, rdir, resume=os.path.exists(os.path.join(rdir, "config.json")))
    timings[f"train {r}"] = time.time() - t

  def cached(path, compute, trained_by):
    # Reused only if the sampling, the judging and the model's training all match.
    key = json.loads(json.dumps(dict(stamp, trained_by=trained_by)))
    if os.path.exists(path):
      with open(path) as f:
        got = json.load(f)
      if got.get("stamp") == key:
        return got
    got = compute()
    got["stamp"] = key
    samples = got.pop("samples", {})
    _atomic_json(path, got)
    np.savez(path[:-5] + ".npz", **samples)
    return got

  def load_samples(path):
    with np.load(path[:-5] + ".npz") as z:
      return {k: z[k] for k in z.files}

  t = time.time()
  evdir = os.path.join(workdir, "eval")
  os.makedirs(evdir, exist_ok=True)
  base_cfg = training_config(cfg, "cd", photo_dir)
  base_model = base_run_model(base_cfg)
  base_key = {"model": cfg.model.to_dict()}
  base = cached(os.path.join(evdir, "base.json"), lambda: dict(evaluate_session(
      base_model, cfg, icgen=False, oracle_params=oracle_params, refs=refs,
      classes=classes)), base_key)
  bounds = cached(os.path.join(evdir, "ia_bounds.json"), lambda: {"concepts": ia_bounds(
      cfg, oracle_params, refs, names, base_model)}, base_key)["concepts"]
  per_variant: Dict[str, Dict[int, Dict[str, Any]]] = {v: {} for v in variants}
  pngs = []
  for k in range(1, len(sessions) + 1):
    learned = [n for n in names if sessions_of[n] <= k]
    header = learned + ["class prompt"] * 3
    rows = [("photos", [photos[n][0] for n in learned])]
    models: Dict[Tuple[str, int], Any] = {}  # each run's model, loaded once if needed

    def model_of(r, session):
      if (r, session) not in models:
        models[(r, session)] = runs.load_run(os.path.join(workdir, "runs", r), session)
      return models[(r, session)]

    def evaluate(r, session, icgen):
      return evaluate_session(model_of(r, session), cfg, icgen=icgen,
                              oracle_params=oracle_params, refs=refs, classes=classes,
                              photos=photos)

    for v in variants:
      kind, icgen = VARIANTS[v]
      _log(f"evaluating {v} after session {k}")
      if kind == "separate":  # each concept by its own one-session run, never retrained
        got, samples = {"concepts": {}}, {}
        for n in learned:
          path = os.path.join(evdir, f"separate_{n}.json")
          r = f"separate_{n}"
          one = cached(path, lambda r=r: evaluate(r, 1, icgen), run_configs[r])
          got["concepts"].update(one["concepts"])
          s = load_samples(path)
          samples[n] = s[n]
          if sessions_of[n] == k:  # class prompts: the model of this session's concept
            got["class"], samples["class"] = one["class"], s["class"]
        per_variant[v][k] = got
      else:
        path = os.path.join(evdir, f"{v}_session{k}.json")
        per_variant[v][k] = cached(path, lambda kind=kind, icgen=icgen: evaluate(
            kind, k, icgen), run_configs[kind])
        samples = load_samples(path)
      tiles = [samples[n][0] for n in learned] + list(samples["class"][:3])
      rows.append((f"{v}", tiles))
    png = os.path.join(workdir, f"samples_session{k}.png")
    _samples_png(png, header, rows)
    pngs.append(png)
  timings["evaluate"] = time.time() - t

  base_class = base["class"]["accuracy"]
  summaries = {v: _summary(per_variant[v], names, sessions_of, base_class, bounds)
               for v in variants}
  results = {"base": {k: v for k, v in base.items() if k != "stamp"}, "ia_bounds": bounds,
             "variants": summaries, "config": cfg.to_dict(), "timings_s": timings}
  _atomic_json(os.path.join(workdir, "results.json"), results)
  _plots(os.path.join(workdir, "plots.png"), summaries, base_class)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(_report(summaries, base, names, sessions_of, cfg, timings))
  results["table"] = table(summaries, base_class)
  results["pngs"] = pngs
  return results


def main(argv):
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  from lfs_jax import console  # pylint: disable=g-import-not-at-top

  console.setup(console.absl_verbosity())
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  cfg = flags.FLAGS.config
  if flags.FLAGS.heldout:
    from lfs_jax.mini import oracle  # pylint: disable=g-import-not-at-top

    print(json.dumps(heldout_accuracy(cfg, oracle.load(cfg.mini.oracle or oracle.DEFAULT_DIR),
                                      per_caption=flags.FLAGS.per_caption)))
    return 0
  workdir = flags.FLAGS.workdir
  if not workdir:
    raise app.UsageError("--workdir is required")
  t = time.time()
  got = run(cfg, workdir)
  print()
  print(got["table"])
  print(f"\nreport: {os.path.join(workdir, 'report.md')}; samples: "
        f"{', '.join(got['pngs'])}; {time.time() - t:.0f}s")
  return 0


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from lfs_jax.mini import config as _config  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file("config", _config.__file__ + ":short",
                                  "the benchmark config (default: its short version)")
  flags.DEFINE_string("workdir", None, "output folder (reused: finished parts are skipped)")
  flags.DEFINE_bool("heldout", False, "only measure the base (--config.model.path) on the "
                    "held-out captions with the config's sampler and print the oracle's scores")
  flags.DEFINE_integer("per_caption", 8, "--heldout: samples (seeds) per held-out caption")
  app.run(main)
