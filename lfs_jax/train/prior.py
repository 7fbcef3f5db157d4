"""Prior preservation's class images: generated once by the base model, cached in the run.

`<workdir>/prior/<class>/` holds `prior.count` PNGs of the class prompt
(`prior.template` with the class word) drawn by the project's sampler from the base
model (sample.* settings, plain text-to-image, seeds fixed by the run's `seed`) and
`class.json`, the record of what made them. A rerun or `--resume` reads them back
instead of sampling again; a record that no longer matches the config (another
count, prompt, seed, sampler setting, resolution or base) is refused with the field
named: the class images are training data of the finished sessions, so they change
only when the user deletes the folder on purpose. A folder is written under a
temporary name and renamed when complete, so an interrupted generation is redone.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
from typing import Any, Dict, List, Optional, Sequence

import jax
import numpy as np

from lfs_jax import concepts as concepts_lib
from lfs_jax import config_base
from lfs_jax import paths
from lfs_jax import runs
from lfs_jax import sample as sample_lib
from lfs_jax.errors import ConfigError

PRIOR_DIR = "prior"
CLASS_JSON = "class.json"
_SEED_PURPOSE = 47  # folded with `seed` into the class images' seeds
_SAMPLE_KEYS = ("sampler", "steps", "guidance", "guidance_rescale", "eta")
_MODEL_KEYS = ("source", "path", "variant", "param_dtype", "compute_dtype")
# record key -> the config field that sets it (named in a refusal)
_FIELDS = {"class": "data.classes", "prompt": "prior.template", "count": "prior.count",
           "seeds": "seed", "resolution": "data.resolution"}


def seeds(run_seed: int, count: int) -> List[int]:
  """The class images' sampler seeds: fixed by the run's seed, distinct across seeds."""
  rng = np.random.default_rng([run_seed, _SEED_PURPOSE])
  return [int(s) for s in rng.integers(0, 2 ** 31 - 1, count)]


def record(cfg, class_word: str) -> Dict[str, Any]:
  """What the class images of `class_word` are made from (class.json's content)."""
  return {"class": class_word, "prompt": cfg.prior.template.format(class_word),
          "count": int(cfg.prior.count), "seeds": seeds(cfg.seed, cfg.prior.count),
          "resolution": int(cfg.data.resolution),
          "sample": {k: cfg.sample[k] for k in _SAMPLE_KEYS},
          "model": {k: cfg.model[k] for k in _MODEL_KEYS}}


def _added_at_default(sample: Dict[str, Any]) -> Dict[str, Any]:
  """A record's sample settings, a field it lacks (added to the code since it was
  written) at its config_base default: what those images were made with."""
  defaults = config_base.get_config().sample
  return {**{k: defaults[k] for k in _SAMPLE_KEYS}, **sample}


def run_sampling(cfg, stored: Optional[Dict[str, Any]]):
  """`cfg` with the sample.* settings the run began with (`stored`, its config.json; None
  for a new run). Class images are training data made with those; sample.* is free to
  change on a resume (to sample or evaluate differently) and must not reach them."""
  if stored is None:
    return cfg
  out = cfg.copy_and_resolve_references()
  began = _added_at_default(stored.get("sample", {}))
  for key in _SAMPLE_KEYS:
    out.sample[key] = began[key]
  return out


def folder(workdir: str, class_word: str) -> str:
  return os.path.join(workdir, PRIOR_DIR, sample_lib.slug(class_word))


def _check(got: Dict[str, Any], want: Dict[str, Any], path: str) -> None:
  got = dict(got, sample=_added_at_default(got.get("sample", {})))
  for key, value in want.items():
    if got.get(key) == value:
      continue
    if key in ("sample", "model"):
      bad = [f"{key}.{k}" for k in value if got.get(key, {}).get(k) != value[k]]
      field = ", ".join(bad)
    else:
      field = _FIELDS[key]
    shown = "..." if key == "seeds" else repr(got.get(key))
    raise ConfigError(
        f"{field}: {path} holds class images made with {key}={shown}, the config asks "
        f"for {'...' if key == 'seeds' else repr(value)}; they are training data of this run "
        f"and are never replaced silently: delete {path} to generate them again")


def _read(path: str, rec: Dict[str, Any]) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  images = []
  for i in range(rec["count"]):
    with Image.open(io.BytesIO(paths.read_bytes(os.path.join(path, f"{i}.png")))) as im:
      images.append(np.asarray(im.convert("RGB")))
  out = np.stack(images)
  side = rec["resolution"]
  if out.shape[1:] != (side, side, 3):
    raise ConfigError(f"{path}: class images are {out.shape[1:3]}, expected {side}x{side}")
  return out


def _generate(cfg, workdir: str, pipe, rec: Dict[str, Any]) -> np.ndarray:
  """`rec["count"]` images of rec["prompt"] by the base model (no concepts, no ICGen)."""
  d = pipe.text_encoder.config.hidden_size
  model = runs.RunModel(cfg, workdir, 0, [], pipe, np.zeros((0, d), np.float32),
                        concepts_lib.Registry(), {})
  settings = dataclasses.replace(sample_lib.SampleSettings.from_config(cfg), strength=1.0)
  images, _ = sample_lib.generate(model, [rec["prompt"]] * rec["count"], rec["seeds"],
                                  settings, progress=True)
  return images


def _write(path: str, images: np.ndarray, rec: Dict[str, Any]) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if paths.is_url(path):  # a bucket has no rename: class.json, written last, marks it done
    for i, img in enumerate(images):
      paths.write_bytes(os.path.join(path, f"{i}.png"), sample_lib.png_bytes(img))
    paths.write_text(os.path.join(path, CLASS_JSON), json.dumps(rec, indent=2))
    return
  tmp = path + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)  # an interrupted earlier attempt
  os.makedirs(tmp)
  for i, img in enumerate(images):
    Image.fromarray(img).save(os.path.join(tmp, f"{i}.png"))
  with open(os.path.join(tmp, CLASS_JSON), "w") as f:
    json.dump(rec, f, indent=2)
  os.replace(tmp, path)


def class_images(cfg, workdir: str, pipe, classes: Sequence[str]) -> Dict[str, np.ndarray]:
  """class word -> uint8 [prior.count, R, R, 3]: read from the run's cache, else generated
  by the base (`pipe`, before any session changed it) and cached (process 0 writes).

  Raises:
    ConfigError: a cached class's record differs from the config (the field is named).
  """
  out = {}
  for word in dict.fromkeys(classes):
    rec, path = record(cfg, word), folder(workdir, word)
    if paths.exists(os.path.join(path, CLASS_JSON)):
      _check(json.loads(paths.read_text(os.path.join(path, CLASS_JSON))), rec, path)
      out[word] = _read(path, rec)
      print(f"prior: {rec['count']} class images of {rec['prompt']!r} read from {path}")
      continue
    print(f"prior: generating {rec['count']} class images of {rec['prompt']!r} with the base")
    out[word] = _generate(cfg, workdir, pipe, rec)
    if jax.process_index() == 0:
      paths.makedirs(os.path.dirname(path))
      _write(path, out[word], rec)
  return out
