"""Validation images while training: what the model draws after each session.

After session k (`validation.every_session`) and every `validation.every_steps` steps
inside it, the model of that moment (the frozen base merged with the student's delta,
by the run's selection, as `runs.load_run` does for a finished session) samples one
fixed-seed grid:

  rows     per concept learned so far: its training prompt ("photo of a <c1> dog"),
           then its evaluation prompts, the first `prompts_per_concept`, each once per
           variant of `validation.variants` (icgen: ICGen at icgen.strength; plain:
           strength 1); then per class word of those concepts the same prompts
           without the token ("photo of a dog"), the first `prompts_per_class`
           (ICGen never touches them: one row each);
  columns  the seeds sample.seed, sample.seed + 1, ... (`validation.seeds` of them).

Sampling follows sample.* and icgen.*; the sampler is `sample.generate`'s own jitted
program (prompts and seeds are arrays: one compile a run, never the train step's).
Nothing here touches the train state or the run's random keys, so training with or
without validation gives the same bits.

Files (process 0), each written whole (tmp + rename); the JSON index and the
TensorBoard image before the PNG, whose presence marks the grid done:

  <workdir>/samples/validation/session_<kkk>.png               after session k
  <workdir>/samples/validation/session_<kkk>_step_<ssssss>.png inside it, after step s
  ... .json beside each: the rows (prompt, variant, concept, seeds, ICGen start),
      the settings, the seconds it took

and TensorBoard images in <workdir>/logs/: tag `validation/sessions` (step = k) for
the grids after a session, `validation/session_<k>` (step = s) inside one.

[choice] Preemption: a SIGTERM during a validation stops it at the next sampler
batch with nothing written; the session (or its progress at that step) is saved
as usual. The PNG is the mark of a finished validation: `--resume` renders every
one that is missing (a finished session's from its checkpoint, before the next
session; a step's from the restored progress state, before the next step) and
never renders one that exists, so a run ends with no hole and nothing twice.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import jax
import numpy as np
import tqdm
from PIL import Image, ImageDraw, ImageFont

from lfs_jax import checkpoint
from lfs_jax import concepts as concepts_lib
from lfs_jax import datasets
from lfs_jax import icgen
from lfs_jax import parallel
from lfs_jax import paths
from lfs_jax import runs
from lfs_jax import sample as sample_lib
from lfs_jax.errors import ConfigError
from lfs_jax.train.tensorboard import SummaryWriter

VARIANTS = ("icgen", "plain")
FOLDER = os.path.join("samples", "validation")
TB_TILE = 256  # TensorBoard gets the grid scaled down to tiles of at most this many pixels


@dataclasses.dataclass(frozen=True)
class Settings:
  """cfg.validation, validated once (`from_config`)."""
  every_session: bool
  every_steps: int
  prompts_per_concept: int
  prompts_per_class: int
  seeds: int
  variants: Tuple[str, ...]

  def __post_init__(self):
    def need(ok, field, value, what):
      if not ok:
        raise ConfigError(f"validation.{field}={value!r}: {what}")
    need(self.every_steps >= 0, "every_steps", self.every_steps, "must be >= 0 (0 = off)")
    need(self.prompts_per_concept >= 1, "prompts_per_concept", self.prompts_per_concept,
         "must be >= 1")
    need(self.prompts_per_class >= 0, "prompts_per_class", self.prompts_per_class,
         "must be >= 0 (0 = no class rows)")
    need(self.seeds >= 1, "seeds", self.seeds, "must be >= 1")
    need(self.variants and set(self.variants) <= set(VARIANTS), "variants",
         ",".join(self.variants), f"use a comma-separated subset of {list(VARIANTS)}")

  @classmethod
  def from_config(cls, cfg) -> "Settings":
    v = cfg.validation
    return cls(every_session=bool(v.every_session), every_steps=int(v.every_steps),
               prompts_per_concept=int(v.prompts_per_concept),
               prompts_per_class=int(v.prompts_per_class), seeds=int(v.seeds),
               variants=tuple(s.strip() for s in str(v.variants).split(",") if s.strip()))

  @property
  def enabled(self) -> bool:
    return self.every_session or self.every_steps > 0

  def at_step(self, step: int, total: int) -> bool:
    """Whether step `step` (1-based, < total: the session's end has its own) gets a grid."""
    return bool(self.every_steps) and 0 < step < total and step % self.every_steps == 0


class Row(NamedTuple):
  """One row of the grid."""
  prompt: str
  variant: str                # icgen | plain | class
  concept: Optional[str]      # the modifier token it names (None for a class row)


def _templates(c: concepts_lib.Concept, templates: Sequence[str]) -> List[str]:
  """The concept's training template, then its evaluation prompts; "{}" kept."""
  first = (c.train_prompts or tuple(templates))[0]
  return list(dict.fromkeys([first, *(c.prompts or datasets.DEFAULT_PROMPTS)]))


def rows(cfg, registry: concepts_lib.Registry, bank: Dict[str, Any],
         settings: Settings) -> List[Row]:
  """The grid's rows for the concepts of `registry`; an icgen row needs a bank entry
  (an imported concept has no photos: plain only)."""
  out, classes = [], {}
  for c in registry.concepts:
    for t in _templates(c, cfg.concepts.templates)[:settings.prompts_per_concept]:
      prompt = t.replace(datasets.PLACEHOLDER, c.phrase())
      for v in settings.variants:
        if v == "plain" or icgen.bank_key(registry, c.token) in bank:
          out.append(Row(prompt, v, c.token))
    classes.setdefault(c.class_word, _templates(c, cfg.concepts.templates))
  for word, templates in classes.items():
    for t in templates[:settings.prompts_per_class]:
      out.append(Row(t.replace(datasets.PLACEHOLDER, word), "class", None))
  return out


def name(session: int, step: Optional[int] = None) -> str:
  """"session_002" after session 2; "session_002_step_000050" after its step 50."""
  return f"session_{session:03d}" + ("" if step is None else f"_step_{step:06d}")


def _font(size: int):
  return ImageFont.load_default(size=size)


def labelled_grid(images: np.ndarray, labels: Sequence[str]) -> np.ndarray:
  """Images [rows * cols, H, W, 3] (row-major) -> one grid with a label left of each row."""
  n, h, w, _ = images.shape
  cols = n // len(labels)
  font = _font(max(8, min(h // 3, 20)))
  pad = 4
  width = pad * 2 + max(int(np.ceil(font.getlength(t))) for t in labels)
  canvas = Image.new("RGB", (width + cols * w, len(labels) * h), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for r, text in enumerate(labels):
    top, bottom = font.getbbox(text)[1], font.getbbox(text)[3]
    draw.text((pad, r * h + (h - (bottom - top)) // 2 - top), text, fill=(0, 0, 0), font=font)
    for c in range(cols):
      canvas.paste(Image.fromarray(images[r * cols + c]), (width + c * w, r * h))
  return np.asarray(canvas)


class Moment(NamedTuple):
  """The model to validate: a session's delta at its end or at one of its steps."""
  session: int
  step: Optional[int]         # None: the end of the session
  unet_delta: Any             # the selection's trainable UNet tree (host or on the mesh)
  token_rows: np.ndarray      # [R, D] rows of every token learned so far
  registry: concepts_lib.Registry  # the concepts learned so far
  bank: Dict[str, Any]        # "concept<i>" -> {"mean", "logvar"} of those concepts


class Validator:
  """Renders and writes the grids of one training run (built once a run).

  `render` needs every process (the sampler runs on the run's mesh); only process 0
  writes files and TensorBoard events.
  """

  def __init__(self, run, writer: Optional[SummaryWriter]):
    self.run = run
    self.settings = Settings.from_config(run.cfg)
    self.sample = sample_lib.SampleSettings.from_config(run.cfg)
    self.folder = os.path.join(run.workdir, FOLDER)
    self.writer = writer
    # Rows of the token table: the run's whole registry, so the text encoder's
    # shapes (and its compile) are the same at every session.
    self.n_rows = len(run.registry.tokens)

  def missing(self, session: int, step: Optional[int] = None) -> bool:
    """No finished grid for this moment (agreed by every process)."""
    return parallel.agree_any(
        not paths.isfile(os.path.join(self.folder, name(session, step) + ".png")))

  def render(self, moment: Moment, frozen_unet, stop) -> Optional[str]:
    """Samples the moment's grid and writes it; None if SIGTERM stopped it (nothing written).

    Args:
      moment: the weights to sample with.
      frozen_unet: `selection.frozen(base)` on the mesh (the Trainer's), or None to
        place it here for this call.
      stop: {"flag": bool}, set by the SIGTERM handler.

    Returns:
      The PNG's path, or None when stopped.
    """
    run, cfg, t0 = self.run, self.run.cfg, time.time()
    mesh_mode, min_size = cfg.mesh.frozen, cfg.mesh.fsdp_min_size
    if frozen_unet is None:
      frozen_unet = run.selection.frozen(run.pipe.unet_params)
    unet = run.selection.merge(moment.unet_delta, frozen_unet)
    # One layout for every call (the sampler's), so it compiles once a run.
    unet = parallel.put(unet, parallel.frozen_shardings(unet, run.mesh, mesh_mode, min_size))
    # Text encoder and VAE on this process's default device for this validation only,
    # uncommitted (as host arrays would be): their outputs may then join the mesh.
    pipe = run.pipe._replace(unet_params=unet,
                             text_encoder_params=jax.device_put(run.pipe.text_encoder_params),
                             vae_params=jax.device_put(run.pipe.vae_params))
    concepts_lib.add_tokens(pipe.tokenizer, moment.registry, pipe.text_encoder.config.vocab_size)
    rows_ = np.zeros((self.n_rows, moment.token_rows.shape[1]), np.float32)
    rows_[:len(moment.token_rows)] = moment.token_rows
    model = runs.RunModel(cfg, run.workdir, moment.session, [], pipe, rows_, moment.registry,
                          moment.bank)
    grid_rows = rows(cfg, moment.registry, moment.bank, self.settings)
    seeds = [self.sample.seed + j for j in range(self.settings.seeds)]
    images, records = self._sample(model, grid_rows, seeds, stop)
    if images is None:
      return None
    seconds = time.time() - t0
    return self._write(moment, grid_rows, seeds, images, records, seconds)

  def _sample(self, model, grid_rows: List[Row], seeds: List[int], stop):
    """Images [rows * seeds, H, W, 3] in row-major order and their records; (None,
    None) when SIGTERM asked to stop (checked between sampler batches)."""
    strength = {"icgen": self.sample.strength}
    pairs = [(r, s) for r in grid_rows for s in seeds]
    images: List[Optional[np.ndarray]] = [None] * len(pairs)
    records: List[Optional[dict]] = [None] * len(pairs)
    b = self.sample.batch_size
    if self.run.mesh.size > 1:  # one batch row per device at least, as sample.generate does
      b = -(-b // self.run.mesh.size) * self.run.mesh.size
    chunks = []
    for variant_strength in sorted({strength.get(r.variant, 1.0) for r in grid_rows}):
      idx = [i for i, (r, _) in enumerate(pairs)
             if strength.get(r.variant, 1.0) == variant_strength]
      chunks += [(variant_strength, idx[i:i + b]) for i in range(0, len(idx), b)]
    bar = tqdm.tqdm(chunks, desc=f"validation session {model.session}", unit="batch",
                    leave=False, disable=jax.process_index() != 0, dynamic_ncols=True)
    settings = dataclasses.replace(self.sample, num_images=1)
    for s, idx in bar:
      if parallel.agree_any(stop["flag"]):
        bar.close()
        return None, None
      got, recs = sample_lib.generate(
          model, [pairs[i][0].prompt for i in idx], [pairs[i][1] for i in idx],
          dataclasses.replace(settings, strength=s), mesh=self.run.mesh)
      for i, im, rec in zip(idx, got, recs):
        images[i], records[i] = im, rec
    bar.close()
    return np.stack(images), records

  def _write(self, moment: Moment, grid_rows, seeds, images, records, seconds) -> str:
    stem = os.path.join(self.folder, name(moment.session, moment.step))
    if jax.process_index() == 0:
      labels = [f"[{r.variant}] {r.prompt}" for r in grid_rows]
      grid = labelled_grid(images, labels)
      k = len(seeds)
      index = {
          "session": moment.session, "step": moment.step, "seconds": round(seconds, 3),
          "images": len(images), "columns": {"seeds": seeds},
          "rows": [{"row": i, "label": labels[i], "prompt": r.prompt, "variant": r.variant,
                    "concept": r.concept,
                    "icgen": [rec["icgen"] for rec in records[i * k:(i + 1) * k]],
                    "context_photo": [rec["context_photo"] for rec in records[i * k:(i + 1) * k]],
                    "start_step": records[i * k]["start_step"]}
                   for i, r in enumerate(grid_rows)],
          "sample": dataclasses.asdict(self.sample),
          # Tile (r, c) is grid[r*H:(r+1)*H, label_width + c*W: label_width + (c+1)*W].
          "tile": list(images.shape[1:3]), "label_width": grid.shape[1] - k * images.shape[2]}
      paths.makedirs(self.folder)
      checkpoint.write_json_atomic(stem + ".json", runs.jsonable(index))
      if self.writer is not None:  # a kill before the PNG: drawn again, TensorBoard shows the last
        small = _scaled(grid, images.shape[1])
        if moment.step is None:
          self.writer.image("validation/sessions", sample_lib.png_bytes(small), small.shape[0],
                            small.shape[1], moment.session)
        else:
          self.writer.image(f"validation/session_{moment.session}", sample_lib.png_bytes(small),
                            small.shape[0], small.shape[1], moment.step)
        self.writer.flush()
      # last: its presence marks the grid done
      paths.write_bytes(stem + ".png", sample_lib.png_bytes(grid))
      where = "" if moment.step is None else f" step {moment.step}"
      tqdm.tqdm.write(f"validation session {moment.session}{where}: {len(images)} images in "
                      f"{seconds:.1f} s -> {stem}.png")
    return stem + ".png"


def _scaled(grid: np.ndarray, tile: int) -> np.ndarray:
  """The grid scaled so a tile is at most TB_TILE pixels (TensorBoard's copy)."""
  if tile <= TB_TILE:
    return grid
  f = TB_TILE / tile
  h, w = grid.shape[:2]
  return np.asarray(Image.fromarray(grid).resize((max(1, round(w * f)), max(1, round(h * f))),
                                                 Image.Resampling.BOX))


def end_of_session(stored: Dict[str, Any], session: int,
                   banks: Dict[str, Any]) -> Moment:
  """The moment of a finished session from its checkpoint (`checkpoint.restore_session`).

  Args:
    stored: the session's restored {"delta", "meta", ...}.
    session: the session.
    banks: the context banks of sessions 1..k, merged.
  """
  registry = concepts_lib.Registry.from_json(json.dumps(stored["meta"]["concepts"]))
  return Moment(session, None, stored["delta"]["unet"],
                np.asarray(stored["delta"]["tokens"], np.float32), registry, dict(banks))


def in_session(su, state, session: int, step: int, banks: Dict[str, Any]) -> Moment:
  """The moment of a session at step `step` from its train state (on the mesh).

  The token rows are those `session._save` would write now; the bank is the banks
  of the earlier sessions and this session's.
  """
  n_new = len(su.registry.in_session(session))
  offset = int(su.data.token_offset)
  tokens = np.array(su.token_table[:offset + n_new], np.float32)
  trained = state.trainable
  tokens[offset:] = np.asarray(parallel.to_host(trained["tokens"]) if "tokens" in trained
                               else su.new_rows)[:n_new]
  return Moment(session, step, trained["unet"], tokens, su.registry, {**banks, **su.bank})


def make_step_hook(validator: Optional[Validator], su, session: int, banks, stop
                   ) -> Optional[Callable]:
  """`hook(state, step) -> stopped` for loop.steps: renders the grid of `step` when
  validation.every_steps names it and none exists; True when SIGTERM stopped it."""
  if validator is None or not validator.settings.every_steps:
    return None
  total = validator.run.cfg.train.steps

  def hook(state, step: int) -> bool:
    if not validator.settings.at_step(step, total) or not validator.missing(session, step):
      return False
    moment = in_session(su, state, session, step, banks)
    return validator.render(moment, su.trainer.frozen_base["unet"], stop) is None
  return hook


def check_config(cfg) -> Optional[Settings]:
  """Validates cfg.validation (and the sampling settings it uses); the settings, or
  None when validation is off. Called before anything is written."""
  settings = Settings.from_config(cfg)
  if not settings.enabled:
    return None
  sample_lib.SampleSettings.from_config(cfg)
  return settings
