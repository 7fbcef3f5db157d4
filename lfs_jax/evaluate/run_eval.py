"""`--mode=evaluate`: TA / IA of every concept after every session, with and without ICGen.

A *cell* is (session k, concept j learned in a session <= k, variant): `eval.num_images`
images for each of j's first `eval.num_prompts` prompts from session k's model, scored
by CLIP against the prompt (TA, modifier token removed) and, by each encoder of
`eval.image_encoders` (CLIP, DINO), against each reference set of `eval.references`
(the photos j was learned from, and/or the photos held out from training) (IA).

    <workdir>/<eval.out>/cells.json     every finished cell, rewritten atomically after each
    <workdir>/<eval.out>/grids/session_<k>/<concept>_<variant>.png
    <workdir>/<eval.out>/metrics.json, metrics.csv, report.md, forgetting.png

A rerun computes only the cells cells.json lacks (more sessions trained since, another
variant), and refuses to mix cells made under other settings (it names the field).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import jax
import numpy as np
import tqdm

from lfs_jax import checkpoint
from lfs_jax import concepts as concepts_lib
from lfs_jax import data as data_lib
from lfs_jax import datasets
from lfs_jax import icgen
from lfs_jax import lock as lock_lib
from lfs_jax import paths
from lfs_jax import runs
from lfs_jax import sample as sample_lib
from lfs_jax.errors import ConfigError, EvalError
from lfs_jax.evaluate import clip_scorer
from lfs_jax.evaluate import encoders as encoders_lib
from lfs_jax.evaluate import metrics
from lfs_jax.evaluate import report

VARIANTS = ("icgen", "plain")
_CHOICES = {"image_encoders": {"clip": ("clip",), "dino": ("dino",), "both": ("clip", "dino")},
            "references": {"train": ("train",), "heldout": ("heldout",),
                           "both": ("train", "heldout")}}
PROTOCOLS = ("", "customconcept101", "dreambooth")
_CELLS_VERSION = 1
# What a cells.json from before a fingerprint field existed was computed with.
_FINGERPRINT_DEFAULTS = {"image_encoders": "clip", "dino": "", "references": "train",
                         "sample.guidance_rescale": 0.0}


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """cfg.eval, validated once (see config_base for each field)."""
  clip: str
  num_prompts: int
  num_images: int
  variants: Tuple[str, ...]
  keep_token: bool
  batch_size: int
  grid: int
  out: str
  image_encoders: str = "clip"
  dino: str = ""
  references: str = "train"
  protocol: str = ""

  def __post_init__(self):
    for name, choices in _CHOICES.items():
      if getattr(self, name) not in choices:
        raise ConfigError(f"eval.{name}={getattr(self, name)!r}: use one of "
                          f"{', '.join(choices)}")
    if self.protocol not in PROTOCOLS:
      raise ConfigError(f"eval.protocol={self.protocol!r}: use one of "
                        f"{', '.join(repr(p) for p in PROTOCOLS)}")
    bad = [v for v in self.variants if v not in VARIANTS]
    if not self.variants or bad:
      raise ConfigError(f"eval.variants={','.join(self.variants)!r}: use a comma "
                        f"separated subset of {','.join(VARIANTS)}")
    for name, low in (("num_prompts", 0), ("num_images", 1), ("batch_size", 1), ("grid", 0)):
      if getattr(self, name) < low:
        raise ConfigError(f"eval.{name}={getattr(self, name)}: must be >= {low}")
    if not self.out or os.path.isabs(self.out) or ".." in self.out.split(os.sep):
      raise ConfigError(f"eval.out={self.out!r}: a folder name inside the run directory")

  @classmethod
  def from_config(cls, cfg, clip: Optional[str] = None) -> "EvalSettings":
    e = cfg.eval
    variants = tuple(v.strip() for v in e.variants.split(",") if v.strip())
    return cls(clip=clip or e.clip, num_prompts=e.num_prompts, num_images=e.num_images,
               variants=variants, keep_token=bool(e.keep_token), batch_size=e.batch_size,
               grid=e.grid, out=e.out, image_encoders=e.image_encoders, dino=e.dino,
               references=e.references, protocol=e.protocol)

  @property
  def ia_metrics(self) -> Tuple[Tuple[str, str, str], ...]:
    """(metric name, encoder, reference set) of every IA this evaluation computes."""
    return tuple((metrics.ia_name(enc, refs), enc, refs)
                 for enc in _CHOICES["image_encoders"][self.image_encoders]
                 for refs in _CHOICES["references"][self.references])


class Cell(NamedTuple):
  session: int
  concept: concepts_lib.Concept
  variant: str

  @property
  def key(self) -> str:
    return f"{self.session}/{self.concept.name}/{self.variant}"


def fingerprint(cfg, settings: EvalSettings) -> Dict[str, Any]:
  """What a cell's numbers depend on besides the run itself (batch sizes do not count)."""
  s = cfg.sample
  return {"clip": paths.abspath(settings.clip), "num_prompts": settings.num_prompts,
          "num_images": settings.num_images, "keep_token": settings.keep_token,
          "sample.sampler": s.sampler, "sample.steps": s.steps,
          "sample.guidance": float(s.guidance),
          "sample.guidance_rescale": float(s.guidance_rescale), "sample.eta": float(s.eta),
          "sample.seed": s.seed, "icgen.strength": float(cfg.icgen.strength),
          "icgen.select": cfg.icgen.select, "image_encoders": settings.image_encoders,
          "dino": paths.abspath(settings.dino) if settings.dino else "",
          "references": settings.references}


class CellStore:
  """cells.json: the finished cells of one evaluation, written by process 0 atomically."""

  def __init__(self, path: str, settings: Dict[str, Any]):
    self.path, self.settings, self.cells = path, settings, {}
    if paths.isfile(path):
      try:
        stored = json.loads(paths.read_text(path))
        old, cells = {**_FINGERPRINT_DEFAULTS, **stored["settings"]}, stored["cells"]
      except (ValueError, KeyError, TypeError) as e:
        raise EvalError(
            f"{path} is damaged or not a cells file of lfs_jax ({e}); nothing was changed. "
            f"To recover, move it away (mv {path} {path}.damaged) and run --mode=evaluate "
            "again: every cell is computed again") from None
      for key in sorted(set(old) | set(settings)):
        if old.get(key) != settings.get(key):
          raise EvalError(
              f"{path} holds cells computed with {key}={old.get(key)!r}, but now "
              f"{key}={settings.get(key)!r}; evaluate into another folder "
              "(--config.eval.out=NAME) or move that one away")
      self.cells = dict(cells)

  def __contains__(self, key: str) -> bool:
    return key in self.cells

  def put(self, key: str, record: Dict[str, Any]) -> None:
    self.cells[key] = record
    paths.makedirs(os.path.dirname(self.path))
    checkpoint.write_json_atomic(self.path, {"version": _CELLS_VERSION,
                                             "settings": self.settings, "cells": self.cells})


def run_registry(workdir: str, session: int) -> concepts_lib.Registry:
  """The concepts learned up to `session`, from its checkpoint meta."""
  meta = checkpoint.session_meta(workdir, session)
  return concepts_lib.Registry.from_json(json.dumps(meta["concepts"]))


def reference_photos(concept: concepts_lib.Concept, which: str = "train"
                     ) -> List[np.ndarray]:
  """The concept's reference photos, whole, after checking each sha256.

  Args:
    concept: from the run's registry.
    which: "train" (the photos the run learned it from) or "heldout" (the photos
      data.heldout kept out of training).

  Returns:
    uint8 [H, W, 3] arrays; an empty list for a concept imported with --mode=import
    (no photos): its IA is undefined.

  Raises:
    EvalError: a photo that is missing or whose content changed since training; or
      "heldout" for a concept trained without held-out photos.
  """
  records = concept.images if which == "train" else concept.references
  if which == "heldout" and not records and concept.images:
    raise EvalError(
        f"concept {concept.name!r} ({concept.token}) has no held-out reference photos: "
        "its run was trained with data.heldout=0. Train with --config.data.heldout=N to "
        "hold photos out, or evaluate with --config.eval.references=train")
  out = []
  for rec in records:
    where = f"reference photo {rec.path} of concept {concept.name!r} ({concept.token})"
    if not paths.isfile(rec.path):
      raise EvalError(f"{where} is missing; IA compares against the photos the run "
                      "learned from: put it back at that path")
    if data_lib.sha256_file(rec.path) != rec.sha256:
      raise EvalError(f"{where} changed since training (sha256 differs from concepts.json); "
                      "restore the original file")
    out.append(data_lib.load_image(rec.path, None))
  return out


def prompts_of(concept: concepts_lib.Concept, settings: EvalSettings) -> List[str]:
  """The concept's first `num_prompts` evaluation prompts, "{}" -> "<token> <class>"."""
  templates = list(concept.prompts or datasets.DEFAULT_PROMPTS)
  if settings.num_prompts:
    templates = templates[:settings.num_prompts]
  return [t.replace(datasets.PLACEHOLDER, concept.phrase()) for t in templates]


def _grid_tiles(images: np.ndarray, n_prompts: int, per_prompt: int, limit: int) -> np.ndarray:
  """The first image of every prompt, then the second, ... (images are prompt-major)."""
  order = [p * per_prompt + i for i in range(per_prompt) for p in range(n_prompts)]
  return images[order[:limit]]


class Scorers(NamedTuple):
  """The evaluation's encoders: CLIP (TA, and IA) and DINO (IA) when asked for."""
  clip: clip_scorer.ClipScorer
  dino: Optional[encoders_lib.DinoEncoder] = None

  def image_embeddings(self, encoder: str, images) -> np.ndarray:
    return getattr(self, encoder).image_embeddings(images)


def compute_cell(run: runs.RunModel, cell: Cell, scorers: Scorers,
                 references: Dict[str, Optional[np.ndarray]], settings: EvalSettings,
                 out_dir: str) -> Dict[str, Any]:
  """Samples and scores one cell; writes its grid; returns its record.

  Args:
    run: the model of session `cell.session`.
    cell: what to compute.
    scorers: the encoders.
    references: IA metric name (metrics.ia_name) -> [M, P] embeddings of the
      concept's reference photos by that metric's encoder, None without photos.
    settings: the evaluation settings.
    out_dir: the results folder (for the grid).

  Returns:
    The cell's record: its key fields, prompts, TA texts, how many images ICGen
    started, "ta", "clipscore", each IA metric (None without photos) and "grid".
  """
  c = cell.concept
  prompts = prompts_of(c, settings)
  st = dataclasses.replace(sample_lib.SampleSettings.from_config(run.cfg),
                           num_images=settings.num_images)
  # An imported concept has no context bank: its "icgen" cell is sampled without
  # ICGen, and says so (icgen_images = 0).
  no_bank = icgen.bank_key(run.registry, c.token) not in run.bank
  if cell.variant == "plain" or no_bank:
    st = dataclasses.replace(st, strength=1.0)
  all_prompts, seeds = sample_lib.expand(prompts, st)
  images, records = sample_lib.generate(run, all_prompts, seeds, st)
  pattern = icgen.token_pattern(run.cfg.concepts.token_format, rows=True)
  texts = [p if settings.keep_token else metrics.strip_tokens(p, pattern) for p in all_prompts]
  record = {"session": cell.session, "concept": c.name, "token": c.token,
            "class_word": c.class_word, "learned": c.session, "variant": cell.variant,
            "num_images": len(images), "prompts": prompts,
            "ta_texts": list(dict.fromkeys(texts)),
            "icgen_images": sum(bool(r["icgen"]) for r in records)}
  emb = {"clip": scorers.clip.image_embeddings(images)}
  record.update(scorers.clip.text_scores(emb["clip"], texts))
  for name, encoder, _ in settings.ia_metrics:
    if encoder not in emb:
      emb[encoder] = scorers.image_embeddings(encoder, images)
    ref = references[name]
    record[name] = None if ref is None else metrics.image_alignment(emb[encoder], ref)
  if settings.grid:
    rel = os.path.join("grids", f"session_{cell.session}", f"{c.name}_{cell.variant}.png")
    tiles = _grid_tiles(images, len(prompts), settings.num_images, settings.grid)
    report.save_png(os.path.join(out_dir, rel), sample_lib.grid(tiles))
    record["grid"] = rel
  return record


def reference_embeddings(concepts: List[concepts_lib.Concept], scorers: Scorers,
                         settings: EvalSettings) -> Dict[str, Dict[str, Optional[np.ndarray]]]:
  """Per concept name: IA metric name -> embeddings of its reference photos (or None).

  Every photo of every concept is read and checked before anything is embedded, so
  a missing, changed or absent (held-out) photo fails before any sampling.
  """
  sets = sorted({refs for _, _, refs in settings.ia_metrics})
  photos = {(c.name, refs): reference_photos(c, refs) for c in concepts for refs in sets}
  out: Dict[str, Dict[str, Optional[np.ndarray]]] = {}
  for c in concepts:
    out[c.name] = {}
    for name, encoder, refs in settings.ia_metrics:
      p = photos[(c.name, refs)]
      out[c.name][name] = scorers.image_embeddings(encoder, p) if p else None
  return out


def plan(registry: concepts_lib.Registry, sessions: List[int],
         variants: Tuple[str, ...]) -> List[Cell]:
  """Every cell of the run: sessions ascending, concepts in registry order, variants."""
  return [Cell(k, c, v) for k in sessions for c in registry.concepts if c.session <= k
          for v in variants]


def evaluate(workdir: str, *, clip: Optional[str] = None,
             overrides: Optional[Dict[str, Any]] = None,
             progress: bool = True) -> Dict[str, Any]:
  """What `--mode=evaluate` does: the missing cells, then every summary file.

  Args:
    workdir: the run directory.
    clip: the CLIP folder (default: the config's eval.clip); the DINO folder is
      eval.dino.
    overrides: dotted config fields from the command line (sample.*, icgen.*, eval.*).
    progress: show a progress bar over the cells.

  Returns:
    {"computed": cells computed now, "reused": cells found done, "out_dir": the
     results folder, "files": the summary files written, "metrics": metrics.json's dict}.

  Raises:
    RunError / EvalError: not a run, no finished session, no or a bad CLIP or DINO
      folder, a moved or changed reference photo, held-out references asked of a run
      trained without them, cells from other settings; all before any sampling.
    WorkdirLocked: another evaluation of this run writes the same results folder.
  """
  cfg = runs.run_config(workdir, overrides)
  settings = EvalSettings.from_config(cfg, clip)
  out_dir = os.path.join(workdir, settings.out)
  # One evaluation per results folder (a second would drop the other's cells); a
  # training job on the same run holds <workdir>/lock, not this one, so finished
  # sessions can be evaluated while later ones train.
  with lock_lib.acquire(out_dir, "evaluation"):
    return _evaluate(workdir, cfg, settings, out_dir, progress)


def _evaluate(workdir: str, cfg, settings: "EvalSettings", out_dir: str,
              progress: bool) -> Dict[str, Any]:
  """`evaluate` with its results folder locked."""
  finished = checkpoint.finished_sessions(workdir)
  if not finished:
    raise EvalError(f"{workdir} has no finished session to evaluate "
                    "(train one with --mode=train)")
  registry = run_registry(workdir, finished[-1])
  if any(refs == "heldout" for _, _, refs in settings.ia_metrics):  # before loading models
    for c in registry.concepts:
      reference_photos(c, "heldout")
  use_dino = any(enc == "dino" for _, enc, _ in settings.ia_metrics)
  scorers = Scorers(clip_scorer.ClipScorer(settings.clip, settings.batch_size),
                    encoders_lib.DinoEncoder(settings.dino, settings.batch_size)
                    if use_dino else None)
  store = CellStore(os.path.join(out_dir, "cells.json"), fingerprint(cfg, settings))
  cells = plan(registry, finished, settings.variants)
  todo = [c for c in cells if c.key not in store]
  todo_concepts = list({c.concept.name: c.concept for c in todo}.values())
  refs = reference_embeddings(todo_concepts, scorers, settings)
  bar = tqdm.tqdm(total=len(todo), desc="evaluate", unit="cell", dynamic_ncols=True,
                  disable=not progress or jax.process_index() != 0)
  for k in sorted({c.session for c in todo}):
    run = runs.load_run(workdir, k, cfg=cfg)
    for cell in (c for c in todo if c.session == k):
      bar.set_postfix_str(cell.key)
      store.put(cell.key, compute_cell(run, cell, scorers, refs[cell.concept.name],
                                       settings, out_dir))
      bar.update()
  bar.close()

  done = [store.cells[c.key] for c in cells]
  summary = report.summarize(done, registry, finished, settings.variants,
                             settings=store.settings, workdir=workdir, method=cfg.method,
                             ia_metrics=[m for m, _, _ in settings.ia_metrics],
                             protocol=settings.protocol)
  files = report.write_all(out_dir, summary) if jax.process_index() == 0 else []
  return {"computed": len(todo), "reused": len(cells) - len(todo), "out_dir": out_dir,
          "files": files, "metrics": summary}
