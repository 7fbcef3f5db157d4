"""Finding and reading the weight files of one diffusers / transformers component folder.

Folders may be URLs (`gs://...`, read through `lfs_jax.paths`). Handles
`config.json`, single-file and sharded (`*.safetensors.index.json`)
safetensors, and the `fp16` variant naming of both libraries. Pickle formats are
refused: unpickling runs arbitrary code, and a safetensors copy is one call away.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional

import numpy as np

from lfs_jax import paths
from lfs_jax.weights import safetensors_io

# Basenames used by diffusers (models) and transformers (text encoders).
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


class WeightsNotFoundError(FileNotFoundError):
  """A folder, config or weight file that is not where it should be (names it)."""


class PickleRefusedError(ValueError):
  """Only pickle checkpoints were found; we never unpickle."""


def read_config(folder: str) -> dict:
  """Reads `folder/config.json` with errors that name the file."""
  if not paths.isdir(folder):
    raise WeightsNotFoundError(f"model folder {folder!r} does not exist")
  path = os.path.join(folder, "config.json")
  if not paths.isfile(path):
    raise WeightsNotFoundError(
        f"{path} is missing: a diffusers/transformers component folder needs its config.json")
  try:
    return json.loads(paths.read_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e})") from None


def _pickle_message(folder: str, pickles: List[str]) -> str:
  names = ", ".join(sorted(os.path.basename(p) for p in pickles))
  return (
      f"{folder} holds only pickle weights ({names}); lfs_jax never unpickles (it can run "
      "arbitrary code). Convert once with PyTorch, in a trusted environment:\n"
      "  python -c \"import diffusers, transformers, sys; d=sys.argv[1]; "
      "(transformers.CLIPTextModel if 'text' in d else diffusers.AutoModel)"
      ".from_pretrained(d).save_pretrained(d, safe_serialization=True)\" "
      f"{folder}\n"
      "or for a whole pipeline: StableDiffusionPipeline.from_pretrained(dir)"
      ".save_pretrained(dir, safe_serialization=True).")


def weight_files(folder: str, variant: Optional[str] = None) -> List[str]:
  """Returns the safetensors files that hold this component's weights.

  Args:
    folder: a component folder (unet/, vae/, text_encoder/ ...).
    variant: e.g. "fp16" for `*.fp16.safetensors`; None takes the plain files, or
      the only variant present when there are no plain files.
  """
  if not paths.isdir(folder):
    raise WeightsNotFoundError(f"model folder {folder!r} does not exist")
  names = paths.listdir(folder)

  def candidates(var):
    tag = f".{var}" if var else ""
    for stem in WEIGHT_STEMS:
      single = f"{stem}{tag}.safetensors"
      if single in names:
        return [os.path.join(folder, single)]
      for index in (f"{stem}.safetensors.index{tag}.json", f"{stem}{tag}.safetensors.index.json"):
        if index in names:
          return _shards_from_index(os.path.join(folder, index))
    return None

  found = candidates(variant)
  if found is None and variant is None:
    # "<stem>.fp16.safetensors" and the shards "<stem>.fp16-00001-of-00002.safetensors".
    variants = sorted({re.sub(r"-\d+-of-\d+$", "", n.split(".")[-2]) for n in names
                       if n.endswith(".safetensors") and n.count(".") >= 2})
    if len(variants) == 1:
      found = candidates(variants[0])
  if found:
    return found
  pickles = [os.path.join(folder, n) for n in names if n.endswith(PICKLE_SUFFIXES)]
  if pickles:
    raise PickleRefusedError(_pickle_message(folder, pickles))
  want = f" with variant {variant!r}" if variant else ""
  raise WeightsNotFoundError(
      f"no safetensors weights{want} in {folder} (looked for "
      f"{' / '.join(s + '.safetensors' for s in WEIGHT_STEMS)} and sharded index files)")


def _shards_from_index(index_path: str) -> List[str]:
  try:
    weight_map = json.loads(paths.read_text(index_path)).get("weight_map")
  except (json.JSONDecodeError, AttributeError) as e:
    raise ValueError(f"{index_path} is not a valid safetensors index ({e})") from None
  if not isinstance(weight_map, dict) or not weight_map:
    raise ValueError(f"{index_path} has no weight_map")
  folder = os.path.dirname(index_path)
  shards = sorted(set(weight_map.values()))
  for s in shards:
    if not paths.isfile(os.path.join(folder, s)):
      raise WeightsNotFoundError(f"shard {s} listed in {index_path} is missing")
  return [os.path.join(folder, s) for s in shards]


def read_state(folder: str, variant: Optional[str] = None) -> Dict[str, np.ndarray]:
  """Reads every tensor of a component folder into {torch key: numpy array}."""
  state: Dict[str, np.ndarray] = {}
  for path in weight_files(folder, variant):
    for k, v in safetensors_io.load_file(path).items():
      if k in state:
        raise ValueError(f"tensor {k!r} appears in two shards of {folder}")
      state[k] = v
  return state


def component_folder(path: str, component: str) -> str:
  """`path/component` for a whole-model folder, else `path` itself."""
  if not paths.isdir(path):
    raise WeightsNotFoundError(f"model folder {path!r} does not exist")
  sub = os.path.join(path, component)
  return sub if paths.isdir(sub) else path

