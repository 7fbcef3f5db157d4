"""How much of each mini-world concept survives a base model's VAE: a ceiling for any UNet.

  python -m lfs_jax.mini.ceiling [--model=lfs_jax/assets/mini_base] [--images=64]
  python -m lfs_jax.mini.ceiling --named [--model=...] [--images=32] [--backgrounds [--misses]]
  python -m lfs_jax.mini.ceiling --drawn [--model=...] [--images=96] [--guidance=1,4]

A sample is decoded by the VAE, so a concept whose fresh renders the oracle no
longer reads right after an encode-decode round trip cannot be drawn right by any
UNet. For each concept: the oracle's strict concept accuracy (shape, colour,
pattern and second colour all right) on fresh renders and on their VAE
reconstructions, each head's accuracy on the reconstructions, and the pixel MSE
(images in [-1, 1]).

`--named` asks the base model for each concept's design in words ("a blue star with
yellow stripes") and scores the samples the same way: whether a concept is reachable
from the base's vocabulary before any session teaches it.

`--named --backgrounds` asks for each design on each of the nine backgrounds ("a blue
star with yellow stripes on a green background"): a concept's photos sit on random
backgrounds, and a base may draw a design on some backgrounds and not on others.
With `--misses`, each of those cells (the design's own two colours left out) says which
head misses and what it reads instead ("pattern dots 12": checks drawn as dots).

`--drawn` asks whether the base draws patterns at all: the share of its samples that
the oracle's pattern head reads as patterned (and as each pattern), for the class
prompts ("a star") and for captions drawn as the base's training drew them (shape,
colour and background named or not; the pattern never), beside the same share of
the training renders themselves (`TRAIN_PATTERN_SHARE` of them patterned).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np

from lfs_jax.mini import oracle, world
from lfs_jax.mini.roundtrip import SEED, table, vae_ceiling

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "mini_base")


def named_design(c: world.Concept, pattern_words: str = "plain",
                 background: str = "") -> str:
  """The concept's design in the world's words: "a blue star with yellow stripes".

  With `background`, on it: "a blue star with yellow stripes on a green background".
  """
  if background and background not in world.BACKGROUNDS:
    raise ValueError(f"background must be one of {world.BACKGROUNDS}, got {background!r}")
  return world.caption(world.Scene(c.shape, c.colour, background or "white", c.pattern,
                                   c.colour2),
                       background=bool(background), pattern_words=pattern_words)


def _oracle_on_prompts(cfg, oracle_params, prompts: Sequence[str],
                       n: int) -> List[Dict[str, np.ndarray]]:
  """The base (cfg's model and sampler) on each prompt with seeds 0..n-1: the oracle's
  predictions {head: [n]} per prompt, in order."""
  from lfs_jax.mini import bench  # pylint: disable=g-import-not-at-top

  imgs = bench._generate(bench.base_run_model(cfg), [p for p in prompts for _ in range(n)],  # pylint: disable=protected-access
                         [i for _ in prompts for i in range(n)], 1.0, cfg)
  _, pred = oracle.predict(oracle_params, imgs)
  return [{h: v[k * n:(k + 1) * n] for h, v in pred.items()} for k in range(len(prompts))]


def reachability(cfg, oracle_params, n: int = 32,
                 pattern_words: str = "plain") -> Dict[str, Dict[str, float]]:
  """The base model asked for each concept's design in words (`named_design`), `n` seeds.

  {concept: {prompt, named (strict accuracy), shape, colour, pattern, colour2}}: how
  close the base can already come to a concept without being taught it, the mini
  world's "a particular dog is close to 'a dog'". A concept session never sees these
  prompts (it trains "a <ck> star"); cfg is a benchmark config (its model.path and
  sampler are used).
  """
  prompts = [named_design(c, pattern_words) for c in world.CONCEPTS]
  out = {}
  for c, prompt, p in zip(world.CONCEPTS, prompts,
                          _oracle_on_prompts(cfg, oracle_params, prompts, n)):
    row = {"prompt": prompt, "named": float(oracle.concept_right(p, c).mean())}
    row.update({h: float(v.mean()) for h, v in oracle.head_hits(p, c).items()})
    out[c.name] = row
  return out


def reachability_by_background(cfg, oracle_params, n: int = 16,
                               pattern_words: str = "plain",
                               concepts: Sequence[world.Concept] = world.CONCEPTS
                               ) -> Dict[str, Dict[str, float]]:
  """Each concept's design asked in words on each background, `n` seeds a caption.

  {concept: {background: strict accuracy, ..., "mean": over the backgrounds a photo
  can have}}. A concept's photos sit on random backgrounds (`world.Concept.scene`: any
  but the design's two colours), and the base may draw a design on some and not on
  others. A background equal to one of the design's colours appears neither among the
  photos nor in the base's training renders (`world.scenes`), so its cell asks for a
  scene the base never saw and stays out of the mean.
  """
  out: Dict[str, Dict[str, float]] = {}
  for c, b, p in _background_cells(cfg, oracle_params, n, pattern_words, concepts):
    out.setdefault(c.name, {})[b] = float(oracle.concept_right(p, c).mean())
  for c in concepts:
    row = out[c.name]
    row["mean"] = float(np.mean([row[b] for b in world.BACKGROUNDS
                                 if b not in (c.colour, c.colour2)]))
  return out


def _background_cells(cfg, oracle_params, n: int, pattern_words: str,
                      concepts: Sequence[world.Concept]):
  """[(concept, background, the oracle's predictions {head: [n]})], every background."""
  cells = [(c, b) for c in concepts for b in world.BACKGROUNDS]
  prompts = [named_design(c, pattern_words, b) for c, b in cells]
  return [(c, b, p) for (c, b), p in zip(
      cells, _oracle_on_prompts(cfg, oracle_params, prompts, n))]


def misses(pred, c: world.Concept) -> Dict[str, object]:
  """How samples of concept `c` (the oracle's predictions {head: [n]}) go wrong.

  {"right": strict accuracy, <head>: that head's hit rate for each judged head,
  "read as": the commonest wrong reading of each head that missed, with its count
  ("pattern dots 12, colour purple 3"), or "" when every head read right}.
  """
  hits = oracle.head_hits(pred, c)
  row: Dict[str, object] = {"right": float(oracle.concept_right(pred, c).mean())}
  read_as = []
  for head, hit in hits.items():  # the judged heads, as oracle.head_hits names them
    row[head] = float(hit.mean())
    wrong = np.asarray(pred[head])[~hit]
    if wrong.size:
      values, counts = np.unique(wrong, return_counts=True)
      k = int(np.argmax(counts))  # np.unique sorts, so ties go to the lower index
      read_as.append(f"{head} {oracle.HEADS[head][int(values[k])]} {int(counts[k])}")
  row["read as"] = ", ".join(read_as)
  return row


def misses_by_background(cfg, oracle_params, n: int = 16, pattern_words: str = "plain",
                         concepts: Sequence[world.Concept] = world.CONCEPTS
                         ) -> Dict[str, Dict[str, object]]:
  """`misses` of each design asked in words on each background a photo can have.

  {"<concept> on <background>": misses(...)}: where `reachability_by_background`
  says a cell fails, which head fails there and what it reads instead. The design's
  own two colours are left out, as from that table's mean.
  """
  return {f"{c.name} on {b}": misses(p, c)
          for c, b, p in _background_cells(cfg, oracle_params, n, pattern_words, concepts)
          if b not in (c.colour, c.colour2)}


def misses_table(rows: Dict[str, Dict[str, object]]) -> str:
  heads = [h for h in next(iter(rows.values()), {}) if h in oracle.HEADS]
  lines = ["| cell | right | " + " | ".join(heads) + " | read as (commonest miss, count) |",
           "|---" * (len(heads) + 3) + "|"]
  for name, r in rows.items():
    lines.append(f"| {name} | {r['right']:.2f} | "
                 + " | ".join(f"{r[h]:.2f}" for h in heads) + f" | {r['read as']} |")
  return "\n".join(lines)


def pattern_shares(pattern_pred: np.ndarray) -> Dict[str, float]:
  """Oracle pattern predictions [N] -> {"patterned": share not solid, <pattern>: share}."""
  pattern_pred = np.asarray(pattern_pred)
  if pattern_pred.size == 0:
    raise ValueError("pattern_shares: no predictions")
  out = {"patterned": float((pattern_pred != 0).mean())}
  out.update({p: float((pattern_pred == i).mean()) for i, p in enumerate(world.PATTERNS)
              if i > 0})
  return out


def training_captions(n: int, seed: int) -> Tuple[List[world.Scene], List[str]]:
  """`n` training scenes as the base saw them (`TRAIN_PATTERN_SHARE` patterned), each with
  one of its caption variants (never naming the pattern), picked with `seed`."""
  from lfs_jax.mini import train_base  # pylint: disable=g-import-not-at-top

  scenes = world.scenes(seed, n, split="train", patterns=True,
                        pattern_share=train_base.TRAIN_PATTERN_SHARE)
  rng = np.random.default_rng([seed, 53])
  caps = []
  for s in scenes:
    variants = train_base.caption_variants(s)
    caps.append(variants[int(rng.integers(len(variants)))])
  return scenes, caps


def drawn_patterns(cfg, oracle_params, n: int = 96, seed: int = SEED,
                   guidances: Sequence[float] = (1.0, 4.0)) -> Dict[str, Dict[str, float]]:
  """{row: pattern_shares}: the training renders, then the base's samples of the
  training captions and of the class prompts (one per shape of `world.SHAPES`, "a circle"
  ... "a cross", n // 6 seeds each) at each guidance scale. cfg: a benchmark config (model, sampler)."""
  from lfs_jax import sample  # pylint: disable=g-import-not-at-top
  from lfs_jax.mini import bench  # pylint: disable=g-import-not-at-top

  scenes, caps = training_captions(n, seed)
  rows = {"training renders": pattern_shares(
      oracle.predict(oracle_params, world.render_all(scenes))[1]["pattern"])}
  per = max(n // len(world.SHAPES), 1)
  cls = [f"a {s}" for s in world.SHAPES for _ in range(per)]
  model = bench.base_run_model(cfg)
  for g in guidances:
    settings = dataclasses.replace(sample.SampleSettings.from_config(cfg), guidance=float(g))
    imgs, _ = sample.generate(model, caps + cls, list(range(len(caps))) + [
        i % per for i in range(len(cls))], settings)
    pred = oracle.predict(oracle_params, imgs)[1]["pattern"]
    rows[f"base, training captions, guidance {g:g}"] = pattern_shares(pred[:len(caps)])
    rows[f"base, class prompts, guidance {g:g}"] = pattern_shares(pred[len(caps):])
  return rows


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default=DEFAULT_MODEL, help="a model folder (its vae/ is read)")
  ap.add_argument("--oracle", default="", help="oracle folder ('' = the shipped one)")
  ap.add_argument("--images", type=int, default=64, help="fresh renders per concept")
  ap.add_argument("--seed", type=int, default=SEED)
  ap.add_argument("--json", default="", help="also write the rows to this file")
  ap.add_argument("--named", action="store_true",
                  help="instead: sample the base (--model) on each concept's design in words "
                  "('a blue star with yellow stripes', --images seeds, the benchmark's short "
                  "config's sampler) and score those samples")
  ap.add_argument("--backgrounds", action="store_true",
                  help="--named: ask each design on each of the nine backgrounds ('... on a "
                  "green background', --images seeds each) and print concept x background")
  ap.add_argument("--misses", action="store_true",
                  help="--named --backgrounds: instead of the concept x background table, "
                  "each cell's head hit rates and the commonest wrong reading of each head")
  ap.add_argument("--pattern_words", choices=world.PATTERN_WORDINGS, default="plain",
                  help="--named: how the design's second colour is worded (as the base "
                  "was trained: train_base --pattern_words)")
  ap.add_argument("--drawn", action="store_true",
                  help="instead: the share of the base's samples (training captions, class "
                  "prompts) that the oracle reads as patterned, beside the training renders'")
  ap.add_argument("--guidance", default="1,4",
                  help="--drawn: comma-separated guidance scales to sample at")
  args = ap.parse_args(argv)
  if args.images < 1:
    raise SystemExit(f"--images must be >= 1, got {args.images}")
  if args.backgrounds and not args.named:
    raise SystemExit("--backgrounds goes with --named (it asks designs in words)")
  if args.misses and not args.backgrounds:
    raise SystemExit("--misses goes with --named --backgrounds (it reads each cell's samples)")
  try:
    guidances = [float(g) for g in args.guidance.split(",") if g.strip()]
  except ValueError:
    guidances = []
  if not guidances:
    raise SystemExit(f"--guidance must be comma-separated numbers, got {args.guidance!r}")
  from lfs_jax.weights import loaders  # pylint: disable=g-import-not-at-top

  oracle_params = oracle.load(args.oracle) if args.oracle else oracle.load()
  oracle_params = oracle_params[0] if isinstance(oracle_params, tuple) else oracle_params
  if args.named or args.drawn:
    from lfs_jax.mini import config  # pylint: disable=g-import-not-at-top

    cfg = config.get_config("short")
    cfg.model.path = args.model
  if args.drawn:
    rows = drawn_patterns(cfg, oracle_params, args.images, args.seed, guidances)
    print(table(rows, ("patterned",) + world.PATTERNS[1:], first="samples", mean=False))
  elif args.misses:
    rows = misses_by_background(cfg, oracle_params, args.images, args.pattern_words)
    print(misses_table(rows))
  elif args.backgrounds:
    rows = reachability_by_background(cfg, oracle_params, args.images, args.pattern_words)
    print(table(rows, world.BACKGROUNDS + ("mean",)))
  elif args.named:
    rows = reachability(cfg, oracle_params, args.images, args.pattern_words)
    print(table(rows, ("named", "shape", "colour", "pattern", "colour2")))
  else:
    vae_model, vae_params = loaders.load_vae(args.model)
    rows = vae_ceiling(vae_model, vae_params, oracle_params, args.images, args.seed)
    print(table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
