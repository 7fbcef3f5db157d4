"""LoRA factors <-> diffusers' LoRA file (`pipe.load_lora_weights` reads it).

diffusers keeps a UNet LoRA in PEFT's layout, one pair per adapted linear layer:

    unet.<module>.lora_A.weight   [r, in]    (our A, [in, r], transposed)
    unet.<module>.lora_B.weight   [out, r]   (our B, [r, out], transposed)

and computes W x + scale * B_t (A_t x), with scale = lora_alpha / r from the file's
`lora_adapter_metadata` ("unet.lora_alpha", "unet.r"), 1 when the file has none.
We write no alpha: our scale (train.lora_alpha / train.lora_rank) is folded into
B, so any reader that follows PEFT's default gets the same product. Reading honours
the metadata's single alpha and rank; per-module patterns are refused by name.
"""

from __future__ import annotations

import json
import re
from typing import Dict, Mapping, Tuple

import numpy as np

from lfs_jax import delta as delta_lib
from lfs_jax.weights import convert, safetensors_io

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
_KEY_RE = re.compile(r"unet\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight")

Path = Tuple[str, ...]


class LoraFormatError(ValueError):
  """A LoRA delta or file that this format cannot hold or read (names the tensor)."""


def to_diffusers(delta_unet: Mapping, selection: delta_lib.LoRA) -> Dict[str, np.ndarray]:
  """Trained factors (delta tree of `selection`) -> {diffusers key: float32 array}."""
  flat = convert.flatten(delta_unet)
  out = {}
  for path, leaf in sorted(flat.items()):
    if path[-1] not in ("lora_A", "lora_B"):
      raise LoraFormatError(f"{'/'.join(path)} is not a LoRA factor (lora_A / lora_B)")
    if path[-1] == "lora_B":
      continue
    module = path[:-1]
    if module + ("lora_B",) not in flat:
      raise LoraFormatError(f"{'/'.join(module)} has lora_A but no lora_B")
    key = "unet." + convert.path_to_torch_key(module)
    a = np.asarray(leaf, np.float32)
    b = selection.scale * np.asarray(flat[module + ("lora_B",)], np.float32)
    out[f"{key}.lora_A.weight"] = np.ascontiguousarray(a.T)
    out[f"{key}.lora_B.weight"] = np.ascontiguousarray(b.T.astype(np.float32))
  return out


def _file_scale(path: str) -> float:
  """lora_alpha / r from the file's adapter metadata; 1 (PEFT's default) without it."""
  raw = safetensors_io.read_metadata(path).get("lora_adapter_metadata")
  if not raw:
    return 1.0
  try:
    meta = json.loads(raw)
  except json.JSONDecodeError as e:
    raise LoraFormatError(f"{path}: unreadable lora_adapter_metadata ({e})") from None
  for key in ("unet.alpha_pattern", "unet.rank_pattern"):
    if meta.get(key):
      raise LoraFormatError(f"{path}: {key} gives layers their own rank or alpha; only one "
                            "rank and alpha for the whole UNet is supported")
  if "unet.lora_alpha" in meta and "unet.r" in meta:
    return float(meta["unet.lora_alpha"]) / float(meta["unet.r"])
  return 1.0


def from_diffusers(path: str, state: Mapping[str, np.ndarray]
                   ) -> Dict[Path, Tuple[np.ndarray, np.ndarray]]:
  """A diffusers LoRA file's tensors -> {module path: (A [in, r], B [r, out])}.

  B comes back with the file's scale folded in, so the layer's change is A @ B.
  """
  scale = _file_scale(path)
  halves: Dict[Path, Dict[str, np.ndarray]] = {}
  for key in sorted(state):
    m = _KEY_RE.fullmatch(key)
    if m is None:
      raise LoraFormatError(
          f"{path}: tensor {key!r} is not a UNet LoRA factor (unet.<layer>.lora_A/B.weight); "
          "text-encoder LoRA and other layouts are not supported")
    halves.setdefault(convert.torch_key_to_path(m["module"]), {})[m["which"]] = np.asarray(
        state[key], np.float32)
  out = {}
  for module, pair in halves.items():
    name = convert.path_to_torch_key(module)
    if set(pair) != {"A", "B"}:
      raise LoraFormatError(f"{path}: {name} has lora_{''.join(pair)} without its partner")
    a, b = pair["A"], pair["B"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
      raise LoraFormatError(f"{path}: {name}: lora_A {a.shape} and lora_B {b.shape} do not "
                            "make a rank-r pair [r, in], [out, r]")
    out[module] = (np.ascontiguousarray(a.T),
                   np.ascontiguousarray((scale * b).T.astype(np.float32)))
  if not out:
    raise LoraFormatError(f"{path} holds no LoRA factors")
  return out
