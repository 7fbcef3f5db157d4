"""The mini world's lifelong benchmark: sessions on the shipped base, judged by the oracle.

  python -m lfs_jax.mini.bench --config=configs/mini.py:short --workdir=/tmp/lfs_mini

Training runs over the same sessions, photos, steps and seeds give the variants
(`mini.variants`, the table VARIANTS below; "+icgen" = the same run sampled with ICGen):
  custom_diffusion        sequential Custom Diffusion with no regulariser at all;
  custom_diffusion+prior  Custom Diffusion with prior preservation: class images the
                          base drew once (prior.weight, prior.count, prior.template);
  dfkd / lfs              the paper: DFKD (kd.kv_weight forced to 0), without / with ICGen;
  dfkd+kv / lfs+kv        ours: DFKD and the K/V anchor (kd.kv_weight), without / with ICGen;
  anchor                  the K/V anchor alone (kd.weight 0);
  separate                every concept trained alone from the base, one run each, sampled
                          with its own delta: no forgetting by construction, the
                          reference for how well a concept can be learned;
  lora                    lfs+kv training LoRA factors (train.selection=lora).
`mini.seeds=0,1,2` runs every variant on each seed (photos, class prompts, noise: all
drawn from the seed) into --workdir/seed<s>/ and prints mean ± std (over seeds, ddof 1)
beside every number; the goal (`goal_lines`) is judged on the means.
After every session each variant draws every concept learned so far and the class
prompts; the oracle reads the samples:
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
Everything lands in --workdir (per seed in seed<s>/ with mini.seeds): photos/,
runs/<run>/ (ordinary lfs_jax runs: sample, evaluate and export work on them; a
finished run is resumed, not retrained), eval/ (one JSON per variant and session,
reused when rerun), results.json, report.md, plots.png and samples_session<k>.png
(each concept's first photo beside every variant's samples of it and of the class).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from lfs_jax.mini import report
from lfs_jax.mini import world

# variant -> (training run, ICGen on). "separate" trains every concept alone from the
# base (runs/separate_<name>, one session each) and samples each with its own delta.
VARIANTS = {
    "custom_diffusion": ("cd", False),
    "custom_diffusion+icgen": ("cd", True),
    "custom_diffusion+prior": ("cd_prior", False),
    "custom_diffusion+prior+icgen": ("cd_prior", True),
    "dfkd": ("lfs", False),
    "lfs": ("lfs", True),
    "dfkd+kv": ("lfs_kv", False),
    "lfs+kv": ("lfs_kv", True),
    "anchor": ("anchor", False),
    "anchor+icgen": ("anchor", True),
    "separate": ("separate", False),
    "separate+icgen": ("separate", True),
    "lora": ("lfs_lora", True),  # lfs+kv trained as LoRA factors (train.selection=lora, train.lora_*)
}


@dataclasses.dataclass(frozen=True)
class RunKind:
  """What one training run turns on; every other setting is the config's."""
  method: str
  dfkd: bool = False       # kd.weight as configured (else 0)
  kv: bool = False         # kd.kv_weight as configured (else 0: the paper's loss)
  prior: bool = False      # prior.weight as configured (else 0)
  selection: str = ""      # train.selection, where not the config's


RUNS = {
    "cd": RunKind("custom_diffusion"),
    "cd_prior": RunKind("custom_diffusion", prior=True),
    "lfs": RunKind("lfs", dfkd=True),
    "lfs_kv": RunKind("lfs", dfkd=True, kv=True),
    "anchor": RunKind("lfs", kv=True),
    "separate": RunKind("custom_diffusion"),
    "lfs_lora": RunKind("lfs", dfkd=True, kv=True, selection="lora"),
}
# Fresh renders of each concept's design that IA is scored against ("held-out
# references"): another seed than the photos (cfg.seed) and than the ceiling's renders.
REF_SEED_OFFSET, CEILING_SEED_OFFSET = 1000, 2000


def parse_variants(cfg) -> List[str]:
  """cfg.mini.variants as a list; an unknown or empty one, or one whose regulariser is
  configured off, is an error naming the field."""
  variants = [v.strip() for v in cfg.mini.variants.split(",") if v.strip()]
  bad = [v for v in variants if v not in VARIANTS]
  if bad or not variants:
    raise ValueError(f"mini.variants: unknown {bad or 'empty'}; use some of {list(VARIANTS)}")
  for v in variants:
    kind = RUNS[VARIANTS[v][0]]
    if kind.kv and not cfg.kd.kv_weight > 0:
      raise ValueError(f"mini.variants: {v!r} uses the K/V anchor and needs kd.kv_weight > 0, "
                       f"got {cfg.kd.kv_weight}")
    if kind.dfkd and not cfg.kd.weight > 0:
      raise ValueError(f"mini.variants: {v!r} uses DFKD and needs kd.weight > 0, "
                       f"got {cfg.kd.weight}")
    if kind.prior and not cfg.prior.weight > 0:
      raise ValueError(f"mini.variants: {v!r} is prior preservation and needs prior.weight "
                       f"> 0, got {cfg.prior.weight}")
    if kind.prior and cfg.prior.count < 1:
      raise ValueError(f"mini.variants: {v!r} is prior preservation and needs prior.count "
                       f">= 1 class images, got {cfg.prior.count}")
  return variants


def parse_seeds(cfg) -> List[int]:
  """cfg.mini.seeds ("0,1,2") as a list; "" = the config's one seed (no seed<s>/ folders)."""
  try:
    seeds = [int(x) for x in cfg.mini.seeds.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"mini.seeds must be comma-separated integers, got "
                     f"{cfg.mini.seeds!r}") from None
  if len(set(seeds)) != len(seeds) or any(x < 0 for x in seeds):
    raise ValueError(f"mini.seeds: distinct seeds >= 0, got {cfg.mini.seeds!r}")
  return seeds


def designs(cfg) -> Dict[str, world.Concept]:
  """Every concept design the run can name: world.CONCEPTS plus mini.concepts
  ("name=shape,colour,pattern,colour2;..."), each checked against the world's vocabulary."""
  out = {c.name: c for c in world.CONCEPTS}
  for entry in (e.strip() for e in cfg.mini.concepts.split(";")):
    if not entry:
      continue
    name, _, spec = entry.partition("=")
    parts = [p.strip() for p in spec.split(",")]
    ok = (name.strip() and len(parts) == 4 and parts[0] in world.SHAPES
          and parts[1] in world.COLOURS and parts[2] in world.PATTERNS[1:]
          and parts[3] in world.BACKGROUNDS and parts[3] != parts[1])
    if not ok:
      raise ValueError(
          f"mini.concepts: {entry!r} is not name=shape,colour,pattern,colour2 with shape in "
          f"{world.SHAPES}, colour in {world.COLOURS}, pattern in {world.PATTERNS[1:]}, "
          f"colour2 another of {world.BACKGROUNDS}")
    out[name.strip()] = world.Concept(name.strip(), *parts)
  return out


def design(cfg, name: str) -> world.Concept:
  got = designs(cfg)
  if name not in got:
    raise ValueError(f"data.sessions: unknown mini concept {name!r}; known: {', '.join(got)} "
                     "(add designs with mini.concepts)")
  return got[name]


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


def write_photos(root: str, concepts: Sequence[world.Concept], per_concept: int,
                 seed: int) -> None:
  """Renders each concept's photos to root/<name>/<i>.png (and its eval prompts)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  for c in concepts:
    name = c.name
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
  kind = RUNS[run]
  d["method"] = kind.method
  d["train"]["selection"] = kind.selection or d["train"]["selection"]
  if not kind.dfkd:
    d["kd"]["weight"] = 0.0
  if not kind.kv:
    d["kd"]["kv_weight"] = 0.0
  if not kind.prior:
    d["prior"]["weight"] = 0.0
  if sessions:
    d["data"]["sessions"] = sessions
  if n_templates and d["method"] == "lfs":
    d["kd"]["class_templates"] = world.class_templates(n_templates, cfg.seed)
  d["data"]["root"] = photos
  base = config_base.get_config()
  runs._fill(base, d, "", "configs/mini.py")  # pylint: disable=protected-access
  return base


def _generate(run_model, prompts: Sequence[str], seeds: Sequence[int], strength: float,
              cfg, icgen_images: Optional[Sequence[bool]] = None) -> np.ndarray:
  from lfs_jax import sample  # pylint: disable=g-import-not-at-top

  settings = dataclasses.replace(sample.SampleSettings.from_config(cfg), strength=strength)
  images, _ = sample.generate(run_model, list(prompts), list(seeds), settings,
                              icgen_images=icgen_images)
  return images


@dataclasses.dataclass(frozen=True)
class Job:
  """One evaluation's samples on one model: what to draw and how to score the images."""
  prompts: List[str]
  seeds: List[int]
  icgen: bool  # ICGen for the prompts that name a concept
  score: Callable[[np.ndarray], Dict[str, Any]]


def run_jobs(run_model, cfg, jobs: Sequence[Job]) -> List[Dict[str, Any]]:
  """Each job's scores, every job's images drawn in one sampler call on run_model.

  A variant and its +icgen twin share the class prompts (ICGen only starts prompts
  that name a concept): sample.generate draws each (prompt, seed) once, and the
  batches stay full across jobs. The images are those of one call per job, bit for
  bit: an image depends only on its prompt, seed and start (test_sample pins it).
  """
  mask = [j.icgen for j in jobs for _ in j.prompts]
  images = _generate(run_model, [p for j in jobs for p in j.prompts],
                     [s for j in jobs for s in j.seeds],
                     float(cfg.icgen.strength) if any(mask) else 1.0, cfg, icgen_images=mask)
  out, i = [], 0
  for j in jobs:
    out.append(j.score(images[i:i + len(j.prompts)]))
    i += len(j.prompts)
  return out


def oracle_features(oracle_params, images: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """name -> the oracle's unit features of its images (references or photos)."""
  from lfs_jax.mini import oracle  # pylint: disable=g-import-not-at-top

  return {n: oracle.predict(oracle_params, x)[0] for n, x in images.items()}


def session_job(run_model, cfg, *, icgen: bool, oracle_params,
                ref_feats: Dict[str, np.ndarray], classes: Sequence[str],
                photo_feats: Optional[Dict[str, np.ndarray]] = None) -> Job:
  """One variant after one session: concept and class-prompt scores (and sample images).

  IA ("ia") is scored against `ref_feats`, the oracle features of fresh renders of
  each concept's design that neither training nor ICGen saw; "ia_photos" against
  the concept's own photos (the ICGen context), so what ICGen copies from them
  shows as the gap between the two.
  """
  from lfs_jax.mini import oracle  # pylint: disable=g-import-not-at-top

  m = cfg.mini
  concepts = list(run_model.registry.concepts)
  # Each class prompt with m.class_seeds seeds: one sample a prompt would make a
  # single sample worth 1/(classes * class_prompts) of the accuracy.
  cls = [pc for pc in class_prompts(classes, m.class_prompts, cfg.seed)
         for _ in range(m.class_seeds)]
  prompts = [f"a {c.phrase()}" for c in concepts for _ in range(m.eval_images)]
  seeds = [i for _ in concepts for i in range(m.eval_images)]
  prompts += [p for p, _ in cls]
  seeds += [i % m.class_seeds for i in range(len(cls))]

  def score(images):
    feats, pred = oracle.predict(oracle_params, images)
    out: Dict[str, Any] = {"concepts": {}, "samples": {}}
    for i, c in enumerate(concepts):
      spec = design(cfg, c.name)
      sl = slice(i * m.eval_images, (i + 1) * m.eval_images)
      hits = oracle.head_hits({k: v[sl] for k, v in pred.items()}, spec)
      right = oracle.all_right(hits)
      out["concepts"][c.name] = {"ia": float((feats[sl] @ ref_feats[c.name].T).mean()),
                                 "accuracy": float(right.mean()), "prompt": prompts[sl.start],
                                 # which attribute a wrong sample misses
                                 "heads": {h: float(x.mean()) for h, x in hits.items()}}
      if photo_feats is not None:
        out["concepts"][c.name]["ia_photos"] = float((feats[sl] @ photo_feats[c.name].T).mean())
      out["samples"][c.name] = images[sl][:4]
    n = len(concepts) * m.eval_images
    shape_ok = pred["shape"][n:] == np.array([world.SHAPES.index(s.shape) for _, s in cls])
    colour_ok = pred["colour"][n:] == np.array([world.COLOURS.index(s.colour) for _, s in cls])
    out["class"] = {"accuracy": float((shape_ok & colour_ok).mean()),
                    "shape": float(shape_ok.mean()), "colour": float(colour_ok.mean()),
                    "patterned": float((pred["pattern"][n:] != 0).mean()), "n": len(cls)}
    out["samples"]["class"] = images[n:][::m.class_seeds][:4]
    return out

  return Job(prompts, seeds, icgen, score)


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


def bounds_job(cfg, oracle_params, ref_feats: Dict[str, np.ndarray],
               names: Sequence[str]) -> Job:
  """Per concept, the IA that normalised IA maps to 0 and 1 (mean oracle-feature cosines),
  scored as {"concepts": {name: {"floor", "ceiling"}}}, on the base model: floor = its
  samples of the class prompt ("a star") against the references; ceiling = other fresh
  renders of the concept against the references.
  """
  from lfs_jax.mini import oracle  # pylint: disable=g-import-not-at-top

  n = cfg.mini.eval_images
  prompts = [f"a {design(cfg, c).shape}" for c in names for _ in range(n)]

  def score(images):
    feats, _ = oracle.predict(oracle_params, images)
    out = {}
    for i, c in enumerate(names):
      fresh = world.render_all(world.concept_scenes(design(cfg, c), n,
                                                    cfg.seed + CEILING_SEED_OFFSET))
      fresh_feats, _ = oracle.predict(oracle_params, fresh)
      out[c] = {"floor": float((feats[i * n:(i + 1) * n] @ ref_feats[c].T).mean()),
                "ceiling": float((fresh_feats @ ref_feats[c].T).mean())}
    return {"concepts": out}

  return Job(prompts, [i for _ in names for i in range(n)], False, score)


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
  heads = matrix("heads")  # evaluations stored before 2026-12-06 have none
  heads_own = ({h: float(np.mean([heads[n][sessions_of[n]][h] for n in names]))
                for h in report.CONCEPT_HEADS}
               if all(sessions_of[n] in heads[n] for n in names) else {})
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
      # the same, per oracle head (shape, colour, pattern, colour2): what acc own misses
      "heads_own": heads_own,
      "class_accuracy": {k: per_session[k]["class"]["accuracy"] for k in per_session},
      "class_shape": {k: per_session[k]["class"]["shape"] for k in per_session},
      "class_colour": {k: per_session[k]["class"]["colour"] for k in per_session},
      "class_patterned": {k: per_session[k]["class"]["patterned"] for k in per_session},
      "class_accuracy_final": final_class,
      "class_accuracy_drop": base_class - final_class,
  }


def check(cfg) -> Tuple[List[str], List[int], List[List[str]]]:
  """(variants, seeds, sessions' concept names): every bad input is an error naming its
  field, raised before anything is written or trained."""
  from lfs_jax.train import losses  # pylint: disable=g-import-not-at-top

  variants, seeds = parse_variants(cfg), parse_seeds(cfg)
  sessions = concept_names(cfg)
  if not sessions:
    raise ValueError("data.sessions: no concept named")
  for n in (n for s in sessions for n in s):
    design(cfg, n)  # an unknown name, or a design the world cannot render
  if cfg.mini.references < 1:
    raise ValueError(f"mini.references must be >= 1, got {cfg.mini.references}")
  losses.check_prior(cfg)
  return variants, seeds, sessions


def with_seed(cfg, seed: int):
  """A locked copy of cfg with `seed` (photos, class prompts, noise: all drawn from it)."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  d = cfg.to_dict()
  d["seed"] = seed
  out = ml_collections.ConfigDict(d)
  out.lock()
  return out


def run(cfg, workdir: str) -> Dict[str, Any]:
  """Every seed of mini.seeds (or the config's one seed) through `run_seed`, then the
  table with mean ± std, the goal, plots and report.md over them.

  With mini.seeds empty everything lands in `workdir` itself; else seed s's run in
  workdir/seed<s>/ (finished training runs and evaluations there are reused).
  """
  variants, seeds, sessions = check(cfg)
  if not seeds:
    return run_seed(cfg, workdir)
  per_seed, bases, timings = [], [], {}
  for s in seeds:
    _log(f"==== seed {s} ====")
    got = run_seed(with_seed(cfg, s), os.path.join(workdir, f"seed{s}"))
    per_seed.append(got["variants"])
    bases.append(got["base"]["class"]["accuracy"])
    timings.update({f"seed{s} {k}": v for k, v in got["timings_s"].items()})
  names = [n for s in sessions for n in s]
  sessions_of = {n: k + 1 for k, s in enumerate(sessions) for n in s}
  results = {"seeds": seeds, "per_seed": per_seed, "base_class_accuracy": bases,
             "means": report.means(per_seed, bases), "config": cfg.to_dict(),
             "timings_s": timings,
             "goal": report.goal_lines(per_seed, bases, len(sessions))}
  _atomic_json(os.path.join(workdir, "results.json"), results)
  report.plots(os.path.join(workdir, "plots.png"), per_seed, bases)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(report.markdown(per_seed, bases, seeds, names, sessions_of, cfg, timings))
  results["table"] = report.table(per_seed, bases, len(sessions))
  results["pngs"] = [os.path.join(workdir, f"seed{seeds[0]}", f"samples_session{k}.png")
                     for k in range(1, len(sessions) + 1)]
  results["variants"] = {v: {k: x for k, x in m.items()} for v, m in results["means"].items()
                         if v != "base"}
  return results


def run_seed(cfg, workdir: str) -> Dict[str, Any]:
  """One seed: trains the runs the variants need, evaluates every session, writes the report."""
  from lfs_jax import runs  # pylint: disable=g-import-not-at-top
  from lfs_jax.mini import oracle  # pylint: disable=g-import-not-at-top
  from lfs_jax.train import session as session_lib  # pylint: disable=g-import-not-at-top

  variants, _, sessions = check(cfg)
  names = [n for s in sessions for n in s]
  concepts = {n: design(cfg, n) for n in names}
  sessions_of = {n: k + 1 for k, s in enumerate(sessions) for n in s}
  classes = sorted({c.shape for c in concepts.values()})
  os.makedirs(workdir, exist_ok=True)
  photo_dir = os.path.join(workdir, "photos")
  write_photos(photo_dir, list(concepts.values()), cfg.mini.photos, cfg.seed)
  oracle_params = oracle.load(cfg.mini.oracle or oracle.DEFAULT_DIR)
  photos = {n: world.render_all(world.concept_scenes(c, cfg.mini.photos, cfg.seed))
            for n, c in concepts.items()}
  refs = {n: world.render_all(world.concept_scenes(c, cfg.mini.references,
                                                   cfg.seed + REF_SEED_OFFSET))
          for n, c in concepts.items()}
  timings: Dict[str, float] = {}
  # What an evaluation depends on besides its model (which variants or seeds are run does not).
  mini = {k: v for k, v in cfg.mini.to_dict().items() if k not in ("variants", "seeds")}
  stamp = {"sample": cfg.sample.to_dict(), "icgen": cfg.icgen.to_dict(), "mini": mini}

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
    what = ", ".join([rcfg.method] + [f"{k} {v}" for k, v in (
        ("kd.weight", rcfg.kd.weight), ("kd.kv_weight", rcfg.kd.kv_weight),
        ("prior.weight", rcfg.prior.weight)) if v and (k != "kd.weight" or rcfg.method == "lfs")])
    _log(f"== training run {r!r} ({what}), sessions {rcfg.data.sessions!r} ==")
    session_lib.run(rcfg, rdir, resume=os.path.exists(os.path.join(rdir, "config.json")))
    timings[f"train {r}"] = time.time() - t

  def stamp_of(trained_by):
    return json.loads(json.dumps(dict(stamp, trained_by=trained_by)))

  def stored(path, trained_by):
    # Reused only if the sampling, the judging and the model's training all match (a
    # config field added to the code since, at its default, matches).
    if os.path.exists(path):
      with open(path) as f:
        got = json.load(f)
      got_stamp = got.get("stamp") or {}
      if ("trained_by" in got_stamp and runs.same_config(got_stamp["trained_by"], trained_by)
          and runs.same_config(dict(got_stamp, trained_by=None), stamp_of(None))):
        return got
    return None

  def evaluate(what, model, todo):
    """todo: (path, trained_by, job of a model) of one model; those not stored yet are
    drawn in one sampler call on model() (loaded only then) and stored."""
    todo = [(path, by, job) for path, by, job in todo if stored(path, by) is None]
    if not todo:
      return
    _log(f"evaluating {what}")
    m = model()
    for (path, by, _), got in zip(todo, run_jobs(m, cfg, [job(m) for _, _, job in todo])):
      got["stamp"] = stamp_of(by)
      np.savez(path[:-5] + ".npz", **got.pop("samples", {}))
      _atomic_json(path, got)  # last: its stamp says the evaluation is complete

  def load_samples(path):
    with np.load(path[:-5] + ".npz") as z:
      return {k: z[k] for k in z.files}

  t = time.time()
  evdir = os.path.join(workdir, "eval")
  os.makedirs(evdir, exist_ok=True)
  ref_feats, photo_feats = (oracle_features(oracle_params, refs),
                            oracle_features(oracle_params, photos))
  base_key = {"model": cfg.model.to_dict()}
  base_path, bounds_path = (os.path.join(evdir, f) for f in ("base.json", "ia_bounds.json"))
  evaluate("the base model", lambda: base_run_model(training_config(cfg, "cd", photo_dir)), [
      (base_path, base_key, lambda m: session_job(
          m, cfg, icgen=False, oracle_params=oracle_params, ref_feats=ref_feats,
          classes=classes)),
      (bounds_path, base_key, lambda m: bounds_job(cfg, oracle_params, ref_feats, names))])
  base, bounds = stored(base_path, base_key), stored(bounds_path, base_key)["concepts"]
  per_variant: Dict[str, Dict[int, Dict[str, Any]]] = {v: {} for v in variants}
  pngs = []
  for k in range(1, len(sessions) + 1):
    learned = [n for n in names if sessions_of[n] <= k]
    header = learned + ["class prompt"] * 3
    rows = [("photos", [photos[n][0] for n in learned])]
    # What each model (run, session) is judged for: a variant and its +icgen twin are
    # one model, drawn in one sampler call; a separate_<name> run once, when it is new.
    todo: Dict[Tuple[str, int], List[Tuple[str, str, bool]]] = {}
    for v in variants:
      kind, icgen = VARIANTS[v]
      if kind == "separate":  # each concept by its own one-session run, never retrained
        for n in learned:
          todo.setdefault((f"separate_{n}", 1), []).append(
              (v, os.path.join(evdir, f"{v}_{n}.json"), icgen))
      else:
        todo.setdefault((kind, k), []).append(
            (v, os.path.join(evdir, f"{v}_session{k}.json"), icgen))
    for (r, session), items in todo.items():
      evaluate(f"{', '.join(v for v, _, _ in items)} after session {k} ({r})",
               lambda r=r, session=session: runs.load_run(os.path.join(workdir, "runs", r),
                                                          session),
               [(path, run_configs[r], lambda m, icgen=icgen: session_job(
                   m, cfg, icgen=icgen, oracle_params=oracle_params, ref_feats=ref_feats,
                   classes=classes, photo_feats=photo_feats)) for _, path, icgen in items])

    for v in variants:
      kind, icgen = VARIANTS[v]
      if kind == "separate":
        got, samples = {"concepts": {}}, {}
        for n in learned:
          path = os.path.join(evdir, f"{v}_{n}.json")
          one = stored(path, run_configs[f"separate_{n}"])
          got["concepts"].update(one["concepts"])
          s = load_samples(path)
          samples[n] = s[n]
          if sessions_of[n] == k:  # class prompts: the model of this session's concept
            got["class"], samples["class"] = one["class"], s["class"]
        per_variant[v][k] = got
      else:
        path = os.path.join(evdir, f"{v}_session{k}.json")
        per_variant[v][k] = stored(path, run_configs[kind])
        samples = load_samples(path)
      tiles = [samples[n][0] for n in learned] + list(samples["class"][:3])
      rows.append((f"{v}", tiles))
    png = os.path.join(workdir, f"samples_session{k}.png")
    report.samples_png(png, header, rows)
    pngs.append(png)
  timings["evaluate"] = time.time() - t

  base_class = base["class"]["accuracy"]
  summaries = {v: dict(_summary(per_variant[v], names, sessions_of, base_class, bounds),
                      icgen=VARIANTS[v][1]) for v in variants}
  results = {"base": {k: v for k, v in base.items() if k != "stamp"}, "ia_bounds": bounds,
             "variants": summaries, "config": cfg.to_dict(), "timings_s": timings,
             "goal": report.goal_lines([summaries], [base_class], len(sessions))}
  _atomic_json(os.path.join(workdir, "results.json"), results)
  report.plots(os.path.join(workdir, "plots.png"), [summaries], [base_class])
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(report.markdown([summaries], [base_class], [cfg.seed], names, sessions_of, cfg,
                            timings))
  results["table"] = report.table([summaries], [base_class], len(sessions))
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
