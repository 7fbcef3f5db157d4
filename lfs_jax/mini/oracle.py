"""The mini world's oracle: a small CNN that reads a rendered image's attributes.

  python -m lfs_jax.mini.oracle --out=lfs_jax/assets/mini_oracle

Heads: shape, colour (the shape's first colour), background, pattern and the
pattern's second colour. Its 64-d penultimate features, L2-normalised, stand in for
CLIP image features (image alignment, IA); its attribute predictions on samples of
class prompts stand in for text alignment (TA). Trained on fresh renders of every
attribute combination, with blur and noise so that imperfect samples still read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lfs_jax import console
from lfs_jax import mini
from lfs_jax.mini import world
from lfs_jax.weights import convert, safetensors_io


def head_hits(pred: Mapping[str, np.ndarray], c: world.Concept) -> Dict[str, np.ndarray]:
  """Per sample, whether each of the four concept heads reads the concept's value."""
  return {"shape": pred["shape"] == world.SHAPES.index(c.shape),
          "colour": pred["colour"] == world.COLOURS.index(c.colour),
          "pattern": pred["pattern"] == world.PATTERNS.index(c.pattern),
          "colour2": pred["colour2"] == world.BACKGROUNDS.index(c.colour2)}


def all_right(hits: Mapping[str, np.ndarray]) -> np.ndarray:
  """[N] bool: every head of `head_hits` right (strict accuracy)."""
  return np.logical_and.reduce(list(hits.values()))


def concept_right(pred: Mapping[str, np.ndarray], c: world.Concept) -> np.ndarray:
  """[N] bool: shape, colour, pattern and second colour all right (strict accuracy)."""
  return all_right(head_hits(pred, c))


HEADS = {
    "shape": world.SHAPES,
    "colour": world.COLOURS,
    "background": world.BACKGROUNDS,
    "pattern": world.PATTERNS,
    "colour2": world.BACKGROUNDS,
}
FEATURES = 64
DEFAULT_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "mini_oracle")


class Oracle(nn.Module):
  """[B, 32, 32, 3] in [-1, 1] -> (features [B, 64], {head: logits})."""

  @nn.compact
  def __call__(self, x):
    for i, ch in enumerate((16, 32, 64)):
      x = nn.relu(nn.Conv(ch, (3, 3), name=f"conv{i}a")(x))
      x = nn.relu(nn.Conv(ch, (3, 3), name=f"conv{i}b")(x))
      x = nn.avg_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    feats = nn.Dense(FEATURES, name="features")(nn.relu(nn.Dense(128, name="hidden")(x)))
    h = nn.relu(feats)
    return feats, {k: nn.Dense(len(v), name=f"head_{k}")(h) for k, v in HEADS.items()}


def labels(scenes: Sequence[world.Scene]) -> Dict[str, np.ndarray]:
  """Attribute indices of each head; colour2 of a solid shape is its own colour."""
  out = {k: [] for k in HEADS}
  for s in scenes:
    out["shape"].append(world.SHAPES.index(s.shape))
    out["colour"].append(world.COLOURS.index(s.colour))
    out["background"].append(world.BACKGROUNDS.index(s.background))
    out["pattern"].append(world.PATTERNS.index(s.pattern))
    c2 = s.colour if s.pattern == "solid" else s.colour2
    out["colour2"].append(world.BACKGROUNDS.index(c2))
  return {k: np.asarray(v, np.int32) for k, v in out.items()}


def training_scenes(seed: int, n: int, pattern_share: float = 0.5):
  """Every caption split, `pattern_share` of them patterned, plus the benchmark's concepts."""
  items = world.scenes(seed, n, split="all", patterns=True, pattern_share=pattern_share)
  for c in world.CONCEPTS:
    items += world.concept_scenes(c, max(1, n // 50), seed + 100)
  return items


def _augment(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
  """Light blur (a 3x3 box mixed half and half with the image, a quarter of the
  images) and Gaussian noise, in [-1, 1] units. A stronger blur erases the dots and
  stripes the pattern head must read."""
  blur = rng.random(len(x)) < 0.25
  if blur.any():
    p = np.pad(x[blur], ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    x = x.copy()
    box = sum(p[:, i:i + 32, j:j + 32] for i in range(3) for j in range(3)) / 9.0
    x[blur] = 0.5 * x[blur] + 0.5 * box
  return x + np.abs(rng.normal(0, 0.05, (len(x), 1, 1, 1))) * rng.standard_normal(x.shape)


def train(out: str, *, seed: int = 0, images: int = 16000, steps: int = 4000,
          batch: int = 64, lr: float = 2e-3, pattern_share: float = 0.5,
          init_from: Optional[str] = None, eval_seed: Optional[int] = None
          ) -> Dict[str, float]:
  """Trains (or, with `init_from`, continues) an oracle and saves it to `out`.

  Returns the accuracy per head on 1,000 fresh renders of `eval_seed` (default
  seed + 1000); the record in config.json keeps the command, the starting oracle's
  own record and the pattern head's confusion matrix.
  """
  if not 0.0 <= pattern_share <= 1.0:
    raise ValueError(f"--pattern_share must be in [0, 1], got {pattern_share}")
  if steps < 1 or images < 1 or batch < 1 or not lr > 0:
    raise ValueError(f"--steps, --images, --batch and --lr must be positive, got "
                     f"{steps}, {images}, {batch}, {lr}")
  started = time.time()
  model = Oracle()
  if init_from:
    params = load(init_from)  # before rendering: a bad folder fails at once
    with open(os.path.join(init_from, "config.json")) as f:
      start_record = {k: v for k, v in json.load(f).items() if k not in ("heads",)}
  else:
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 32, 32, 3)))["params"]
    start_record = None
  scenes = training_scenes(seed, images, pattern_share)
  x_all = world.render_all(scenes).astype(np.float32) / 127.5 - 1
  y_all = labels(scenes)
  print(f"oracle: {len(scenes)} renders in {time.time() - started:.0f}s", flush=True)
  opt = optax.adam(optax.cosine_decay_schedule(lr, steps, 0.02))
  opt_state = opt.init(params)

  def loss_fn(p, x, y):
    _, logits = model.apply({"params": p}, x)
    return sum(optax.softmax_cross_entropy_with_integer_labels(logits[k], y[k]).mean()
               for k in HEADS)

  @jax.jit
  def step(p, s, x, y):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  rng = np.random.default_rng([seed, 21])
  for i in range(steps):
    idx = rng.integers(0, len(x_all), batch)
    params, opt_state, loss = step(params, opt_state, _augment(rng, x_all[idx]),
                                   {k: v[idx] for k, v in y_all.items()})
    if (i + 1) % max(1, steps // 10) == 0:
      print(f"oracle step {i + 1}/{steps}  loss {float(loss):.4f}  "
            f"{time.time() - started:.0f}s", flush=True)
  eval_seed = seed + 1000 if eval_seed is None else eval_seed
  fresh = world.scenes(eval_seed, 1000, split="all", patterns=True)
  images_fresh, y_fresh = world.render_all(fresh), labels(fresh)
  acc = accuracy(params, images_fresh, y_fresh)
  conf = confusion(params, images_fresh, y_fresh, "pattern")
  print(format_confusion(conf, "pattern"), flush=True)
  save(params, out, {"command": "python -m lfs_jax.mini.oracle " + " ".join(sys.argv[1:]),
                     "seed": seed, "images": images, "steps": steps, "batch": batch,
                     "lr": lr, "pattern_share": pattern_share, "init_from": start_record,
                     "eval_seed": eval_seed, "fresh_accuracy": acc,
                     "pattern_confusion": conf.tolist(),
                     "wall_s": round(time.time() - started, 1)})
  return acc


def predict(params, images: np.ndarray, batch: int = 256):
  """uint8 images [N, 32, 32, 3] -> (unit features [N, 64], {head: predicted index [N]})."""
  feats, preds = [], {k: [] for k in HEADS}
  for i in range(0, len(images), batch):
    f, p = _predict(params, jnp.asarray(images[i:i + batch], jnp.float32) / 127.5 - 1)
    feats.append(np.asarray(f))
    for k in HEADS:
      preds[k].append(np.asarray(p[k]))
  if not feats:
    return np.zeros((0, FEATURES), np.float32), {k: np.zeros((0,), np.int32) for k in HEADS}
  return np.concatenate(feats), {k: np.concatenate(v) for k, v in preds.items()}


@jax.jit
def _predict(params, x):
  feats, logits = Oracle().apply({"params": params}, x)
  feats = feats / jnp.maximum(jnp.linalg.norm(feats, axis=-1, keepdims=True), 1e-8)
  return feats, {k: jnp.argmax(v, -1) for k, v in logits.items()}


def accuracy(params, images: np.ndarray, y: Dict[str, np.ndarray]) -> Dict[str, float]:
  _, p = predict(params, images)
  return {k: float(np.mean(p[k] == y[k])) for k in HEADS}


def confusion(params, images: np.ndarray, y: Dict[str, np.ndarray], head: str) -> np.ndarray:
  """[true, predicted] counts of one head over `images`."""
  _, p = predict(params, images)
  n = len(HEADS[head])
  return np.bincount(y[head] * n + p[head], minlength=n * n).reshape(n, n)


def format_confusion(conf: np.ndarray, head: str) -> str:
  """The matrix as text: rows true, columns predicted."""
  names = [v[:6] for v in HEADS[head]]
  lines = [f"{head} (rows true, columns predicted):", " " * 8 + "".join(f"{n:>7}" for n in names)]
  lines += [f"{n:>8}" + "".join(f"{c:>7d}" for c in row) for n, row in zip(names, conf)]
  return "\n".join(lines)


def save(params, out: str, record: dict) -> None:
  """Writes model.safetensors + config.json atomically."""
  def write(tmp):
    flat = {".".join(p): np.asarray(v) for p, v in convert.flatten(params).items()}
    safetensors_io.save_file(flat, os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump({"heads": {k: list(v) for k, v in HEADS.items()}, "features": FEATURES,
                 "resolution": 32, **record}, f, indent=2)

  mini.write_folder_atomically(out, write)


def load(folder: str = DEFAULT_DIR):
  """The oracle's params from its folder (safetensors only); checks the heads match."""
  path = os.path.join(folder, "model.safetensors")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no oracle at {folder!r} (model.safetensors missing); train one "
                            "with python -m lfs_jax.mini.oracle --out=FOLDER")
  with open(os.path.join(folder, "config.json")) as f:
    cfg = json.load(f)
  if cfg["heads"] != {k: list(v) for k, v in HEADS.items()}:
    raise ValueError(f"oracle at {folder!r} was trained for other attributes; retrain it")
  flat = safetensors_io.load_file(path)
  abstract = jax.eval_shape(Oracle().init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  want = {".".join(p): v.shape for p, v in convert.flatten(abstract["params"]).items()}
  if set(want) != set(flat) or any(flat[k].shape != s for k, s in want.items()):
    raise ValueError(f"oracle weights at {path!r} do not match the Oracle module")
  return convert.unflatten({tuple(k.split(".")): jnp.asarray(v) for k, v in flat.items()})


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=DEFAULT_DIR)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--images", type=int, default=16000)
  ap.add_argument("--steps", type=int, default=4000)
  ap.add_argument("--lr", type=float, default=2e-3, help="Adam peak, cosine to 2 %%")
  ap.add_argument("--pattern_share", type=float, default=0.5,
                  help="share of the training renders that are patterned")
  ap.add_argument("--init_from", default="",
                  help="continue from this oracle folder (e.g. the shipped one)")
  ap.add_argument("--eval_seed", type=int, default=None,
                  help="seed of the 1,000 fresh renders scored at the end (seed + 1000)")
  console.add_verbosity(ap)
  args = ap.parse_args(argv)
  console.setup(args.verbosity)
  acc = train(args.out, seed=args.seed, images=args.images, steps=args.steps, lr=args.lr,
              pattern_share=args.pattern_share, init_from=args.init_from or None,
              eval_seed=args.eval_seed)
  print("accuracy on fresh renders:", json.dumps(acc))
  return 0


if __name__ == "__main__":
  sys.exit(main())
