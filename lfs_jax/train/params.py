"""Which UNet weights a session trains: path predicates, split and merge.

The trainable and frozen parts are two disjoint trees with the UNet's own paths,
so the optimizer only ever sees the selected leaves and a teacher is just another
trainable subtree over the same frozen base.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping, Tuple

from lfs_jax.weights.convert import flatten, unflatten

# [choice] selections of DESIGN 1.1; `crossattn_kv` is Custom Diffusion's.
SELECTIONS = {
    "crossattn_kv": re.compile(r".*/attn2/to_[kv]/.*"),
    "crossattn": re.compile(r".*/attn2/.*"),
    "attn": re.compile(r".*/attn[12]/.*"),
}


def selection_predicate(name: str) -> Callable[[str], bool]:
  """The predicate on '/'-joined parameter paths for a selection name."""
  if name not in SELECTIONS:
    raise ValueError(f"train.selection must be one of {sorted(SELECTIONS)}, got {name!r}")
  pattern = SELECTIONS[name]
  return lambda path: bool(pattern.fullmatch(path))


def split(params: Mapping, predicate: Callable[[str], bool]) -> Tuple[dict, dict]:
  """(selected, rest): two disjoint trees whose union is `params`."""
  selected, rest = {}, {}
  for path, leaf in flatten(params).items():
    (selected if predicate("/".join(path)) else rest)[path] = leaf
  if not selected:
    raise ValueError("the parameter selection matches no UNet weight")
  return unflatten(selected), unflatten(rest)


def merge(a: Mapping, b: Mapping) -> dict:
  """The union of two disjoint trees (inverse of `split`)."""
  out = dict(a)
  for k, v in b.items():
    if k in out:
      if not (isinstance(v, Mapping) and isinstance(out[k], Mapping)):
        raise ValueError(f"trees overlap at {k!r}")
      out[k] = merge(out[k], v)
    else:
      out[k] = v
  return out


def count(tree: Mapping) -> int:
  return sum(int(getattr(x, "size", 0)) for x in flatten(tree).values())
