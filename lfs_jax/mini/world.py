"""A procedural world of captioned shapes, small enough to train a base model on a CPU.

Every image is one shape (circle, square, ...) in one colour on a plain background,
at a random size, position and small rotation, captioned "a red circle on a blue
background". The base model learns this world from captions. Concepts are designs:
a pattern in a second colour (stripes, checks, dots, a two-tone split, a ring) on a
base shape; a concept's photos are renders of it at random sizes, positions and
backgrounds. The base's captions may name patterns ("a blue star with yellow
stripes", `caption(pattern=True)`), so a concept is reachable from words, as a
particular dog is close to "a dog" for Stable Diffusion, but never by its own name:
a few-shot session still has to teach "<c1> star".

Everything is deterministic in the seed: `scenes(seed, n)` gives the same list on
every machine, and `render` is plain numpy (4x supersampled, box-filtered).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
# Shape colours; backgrounds use these and the neutrals.
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
NEUTRALS = ("white", "black", "gray")
BACKGROUNDS = COLOURS + NEUTRALS
RGB: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (240, 210, 40), "purple": (150, 60, 190), "orange": (245, 140, 30),
    "white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128),
}
# "solid" is the base world; the rest exist only in concepts (and the VAE's data).
PATTERNS = ("solid", "stripes", "checks", "dots", "split", "ring")

SUPERSAMPLE = 4


@dataclasses.dataclass(frozen=True)
class Scene:
  shape: str
  colour: str
  background: str
  pattern: str = "solid"
  colour2: str = "white"       # the pattern's second colour (unused when solid)
  radius: float = 0.35         # of the image side
  cx: float = 0.5              # centre, fractions of the image side
  cy: float = 0.5
  angle: float = 0.0           # degrees


@dataclasses.dataclass(frozen=True)
class Concept:
  """A thing the base cannot draw from text: a patterned two-colour shape."""
  name: str
  shape: str                   # its class word, a base shape
  colour: str
  pattern: str
  colour2: str

  def scene(self, rng: np.random.Generator) -> Scene:
    bg = _pick(rng, [b for b in BACKGROUNDS if b not in (self.colour, self.colour2)])
    return _place(rng, Scene(self.shape, self.colour, bg, self.pattern, self.colour2))


# How a caption names a pattern and its second colour: "a blue star with yellow
# stripes on a black background".
PATTERN_PHRASES: Dict[str, str] = {
    "stripes": "{} stripes", "checks": "{} checks", "dots": "{} dots",
    "split": "a {} side", "ring": "a {} ring",
}


# `caption(..., pattern_words="distinct")`: a pattern's second colour in words that no
# shape or background colour uses ("a blue star with gold stripes"), so a caption never
# leaves it to the model which object a colour word belongs to.
PATTERN_COLOUR_WORDS: Dict[str, str] = {
    "red": "crimson", "green": "emerald", "blue": "navy", "yellow": "gold",
    "purple": "violet", "orange": "amber", "white": "ivory", "black": "ebony",
    "gray": "silver",
}
PATTERN_WORDINGS = ("plain", "distinct")


def caption(scene: Scene, *, colour: bool = True, background: bool = True,
            pattern: bool = True, pattern_words: str = "plain") -> str:
  """'a red circle on a blue background', or a shorter form without some attributes.

  A patterned scene's caption names its pattern ("a blue star with yellow stripes on
  a black background") unless `pattern` is False; a solid scene's never does.
  `pattern_words="distinct"` names the second colour in PATTERN_COLOUR_WORDS ("a blue
  star with gold stripes").
  """
  if pattern_words not in PATTERN_WORDINGS:
    raise ValueError(f"pattern_words must be one of {PATTERN_WORDINGS}, got {pattern_words!r}")
  words = ["a"] + ([scene.colour] if colour else []) + [scene.shape]
  if pattern and scene.pattern != "solid":
    colour2 = (PATTERN_COLOUR_WORDS[scene.colour2] if pattern_words == "distinct"
               else scene.colour2)
    words += ["with", PATTERN_PHRASES[scene.pattern].format(colour2)]
  if background:
    words += ["on", "a", scene.background, "background"]
  return " ".join(words)


def _pick(rng: np.random.Generator, items: Sequence[str]) -> str:
  return items[int(rng.integers(len(items)))]


def _place(rng: np.random.Generator, scene: Scene) -> Scene:
  r = float(rng.uniform(0.26, 0.38))
  return dataclasses.replace(
      scene, radius=r, cx=float(rng.uniform(0.5 - 0.12, 0.5 + 0.12)),
      cy=float(rng.uniform(0.5 - 0.12, 0.5 + 0.12)), angle=float(rng.uniform(-15, 15)))


def is_held_out(shape: str, colour: str, background: str) -> bool:
  """About one (shape, colour, background) caption in nine never appears in training.

  A fixed arithmetic rule, so every shape and colour is still seen with most
  backgrounds and the held-out captions test composition, not new words.
  """
  i, j, k = SHAPES.index(shape), COLOURS.index(colour), BACKGROUNDS.index(background)
  return (i + 2 * j + 4 * k) % 9 == 0


def class_templates(n: int, seed: int) -> Tuple[str, ...]:
  """n DFKD class templates in the world's caption form: "a {}" and n-1 coloured ones.

  ("a red {} on a blue background", ...), the (colour, background) pairs drawn with
  `seed`, so the teacher is also asked about the colour-and-background phrasing the
  class prompts use, not only about the bare class word.
  """
  pairs = [(c, b) for c in COLOURS for b in BACKGROUNDS if b != c]
  rng = np.random.default_rng([seed, 47])
  picked = [pairs[i] for i in rng.permutation(len(pairs))[:max(n - 1, 0)]]
  return ("a {}",) + tuple(caption(Scene("{}", c, b)) for c, b in picked)


def caption_triples(split: str) -> List[Tuple[str, str, str]]:
  """All (shape, colour, background) of a split: "train", "heldout" or "all"."""
  if split not in ("train", "heldout", "all"):
    raise ValueError(f"split must be train, heldout or all, got {split!r}")
  out = []
  for s in SHAPES:
    for c in COLOURS:
      for b in BACKGROUNDS:
        if b == c:
          continue
        held = is_held_out(s, c, b)
        if split == "all" or (split == "heldout") == held:
          out.append((s, c, b))
  return out


def scenes(seed: int, n: int, *, split: str = "train", patterns: bool = False,
           pattern_share: float = 0.5) -> List[Scene]:
  """`n` random scenes of a caption split; with `patterns`, that share is patterned."""
  triples = caption_triples(split)
  rng = np.random.default_rng([seed, 7])
  out = []
  for _ in range(n):
    s, c, b = triples[int(rng.integers(len(triples)))]
    scene = Scene(s, c, b)
    if patterns and rng.random() < pattern_share:
      c2 = _pick(rng, [x for x in BACKGROUNDS if x not in (c, b)])
      scene = dataclasses.replace(scene, pattern=_pick(rng, PATTERNS[1:]), colour2=c2)
    out.append(_place(rng, scene))
  return out


def _polygon(shape: str) -> Optional[np.ndarray]:
  """Vertices of a shape of circumradius 1 centred on the origin (y down), or None."""
  if shape == "square":
    return np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]])
  if shape == "diamond":
    return np.array([[0.0, -1.0], [0.85, 0.0], [0.0, 1.0], [-0.85, 0.0]])
  if shape == "triangle":
    return np.array([[0.0, -1.0], [math.sqrt(3) / 2, 0.5], [-math.sqrt(3) / 2, 0.5]])
  if shape == "star":
    a = np.arange(10) * math.pi / 5 - math.pi / 2
    r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    return np.stack([r * np.cos(a), r * np.sin(a)], -1)
  if shape == "cross":
    w = 0.33
    return np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1],
                     [-w, w], [-1, w], [-1, -w], [-w, -w]], dtype=np.float64)
  return None


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Whether local points (u, v) lie inside the shape (even-odd rule for polygons)."""
  if shape == "circle":
    return u * u + v * v <= 0.9 ** 2
  poly = _polygon(shape)
  if poly is None:
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
  inside = np.zeros(u.shape, bool)
  for (x1, y1), (x2, y2) in zip(poly, np.roll(poly, -1, axis=0)):
    crosses = (y1 > v) != (y2 > v)
    with np.errstate(divide="ignore", invalid="ignore"):
      x_at = (x2 - x1) * (v - y1) / (y2 - y1) + x1
    inside ^= crosses & (u < x_at)
  return inside


def _second_colour(pattern: str, shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Where the pattern shows its second colour, in the shape's local frame.

  The first colour always covers most of the shape (the second about a third), so
  "a red star" stays true of a red star with white stripes.
  """
  if pattern == "solid":
    return np.zeros(u.shape, bool)
  # The lattices are coarse: at 32 px a feature must span several latent pixels
  # for a small base to draw it (with stripes of period 0.4 and checks of 0.5 its
  # samples were blotchy textures, read as the wrong lattice;
  # docs/mini_world_history.md, "Coarser patterns").
  if pattern == "stripes":  # period 0.8 of the radius: two bands across a star
    return (v + 1) * 1.25 % 1 > 0.62
  if pattern == "checks":  # squares 0.4 of the radius on a side: four on a square
    return ((u + 1) * 1.25 % 1 > 0.5) & ((v + 1) * 1.25 % 1 > 0.5)
  if pattern == "dots":  # round, period 1, one at the centre
    fu, fv = (u + 0.5) % 1 - 0.5, (v + 0.5) % 1 - 0.5
    return fu * fu + fv * fv <= 0.35 ** 2
  if pattern == "split":  # the right third
    return u > 0.3
  if pattern == "ring":
    return ~_inside(shape, u / 0.78, v / 0.78)
  raise ValueError(f"unknown pattern {pattern!r}; known: {', '.join(PATTERNS)}")


def render(scene: Scene, size: int = 32) -> np.ndarray:
  """The scene as a [size, size, 3] uint8 image."""
  n = size * SUPERSAMPLE
  c = (np.arange(n) + 0.5) / n
  x, y = np.meshgrid(c, c)
  r = scene.radius
  t = math.radians(scene.angle)
  dx, dy = (x - scene.cx) / r, (y - scene.cy) / r
  u = math.cos(t) * dx + math.sin(t) * dy
  v = -math.sin(t) * dx + math.cos(t) * dy
  mask = _inside(scene.shape, u, v)
  second = _second_colour(scene.pattern, scene.shape, u, v)
  fg = np.where(second[..., None], np.array(RGB[scene.colour2], np.float32),
                np.array(RGB[scene.colour], np.float32))
  img = np.where(mask[..., None], fg, np.array(RGB[scene.background], np.float32))
  img = img.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


def render_all(items: Sequence[Scene], size: int = 32) -> np.ndarray:
  """[n, size, size, 3] uint8."""
  return np.stack([render(s, size) for s in items]) if items else np.zeros(
      (0, size, size, 3), np.uint8)


# The concepts of the mini benchmark, in session order. Several share a class
# (three stars, two circles), so learning one can disturb another.
CONCEPTS: Tuple[Concept, ...] = (
    Concept("striped_star", "star", "blue", "stripes", "yellow"),
    Concept("checked_square", "square", "red", "checks", "white"),
    Concept("dotted_star", "star", "purple", "dots", "white"),
    Concept("split_circle", "circle", "green", "split", "orange"),
    Concept("ringed_star", "star", "yellow", "ring", "black"),
    Concept("striped_circle", "circle", "red", "stripes", "blue"),
)


def concept(name: str) -> Concept:
  for c in CONCEPTS:
    if c.name == name:
      return c
  raise ValueError(f"unknown mini concept {name!r}; known: "
                   f"{', '.join(c.name for c in CONCEPTS)}")


def concept_scenes(c: Concept, n: int, seed: int) -> List[Scene]:
  rng = np.random.default_rng([seed, 11, SHAPES.index(c.shape), PATTERNS.index(c.pattern)])
  return [c.scene(rng) for _ in range(n)]
