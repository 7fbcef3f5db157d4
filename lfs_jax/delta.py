"""What a session trains, and how it is merged into the frozen base: the delta seam.

A *selection* (`train.selection`) is one value with five jobs, and every reader of a
trained delta goes through it (the train step and its teacher, sampling, the K/V
anchor, export and import):

  initial(unet, seed)   the "session 0" delta: what session 1 starts from and
                        distils against (merging it gives the base model back);
  frozen(unet)          the part of the base that the step keeps frozen;
  merge(delta, frozen)  the full UNet tree the model runs with (pure, traceable);
  kernels(delta)        {kernel path: [in, out]} what the delta makes of each trained
                        projection's kernel (the K/V anchor compares these;
                        trains_kv() says whether any is an attn2 to_k/to_v);
  check(delta, unet)    a stored delta must fit this selection and base exactly.

Entries:
  crossattn_kv, crossattn, attn   `Leaves`: the base's own leaves under a path
      pattern are the delta (Custom Diffusion's way; 19.2 M parameters for
      crossattn_kv on SD-1.5); merge is the union of two disjoint trees.
  unet                            `Leaves`: every UNet weight (full fine-tuning; a
      diagnostic upper bound, not exportable as Custom Diffusion processors).
  lora                            `LoRA`: low-rank factors A [in, r], B [r, out] beside
      each target projection's kernel W; merge gives W + (alpha / r) * A @ B. The
      delta holds only the factors; the frozen part is the whole base.

Parameter trees are nested dicts with diffusers' paths
(`down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel`), kernels
[in, out] as Flax has them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import Callable, Dict, Mapping, Tuple, Union

import jax.numpy as jnp
import numpy as np

from lfs_jax.errors import ConfigError
from lfs_jax.weights.convert import flatten, unflatten

Path = Tuple[str, ...]

# [choice] leaf selections of the method spec (docs/method.md); `crossattn_kv` is
# Custom Diffusion's.
SELECTIONS = {
    "crossattn_kv": re.compile(r".*/attn2/to_[kv]/.*"),
    "crossattn": re.compile(r".*/attn2/.*"),
    "attn": re.compile(r".*/attn[12]/.*"),
    # Every UNet weight: not a Custom Diffusion selection (no export), the upper bound
    # on what a session can learn (the mini world's plasticity diagnosis,
    # docs/mini_world_history.md, "The diagnosis").
    "unet": re.compile(r".*"),
}
LORA = "lora"
# The projections of an attention layer that a LoRA target may name.
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out_0")


class DeltaError(ValueError):
  """A stored delta that does not fit the run's selection or base (names the leaf)."""


def selection_predicate(name: str) -> Callable[[str], bool]:
  """The predicate on '/'-joined parameter paths for a leaf selection name."""
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


def _check_shapes(got: Dict[Path, object], want: Dict[Path, tuple], what: str) -> None:
  for p in sorted(set(got) | set(want)):
    name = "/".join(p)
    if p not in got:
      raise DeltaError(f"{what} lacks UNet weight {name}")
    if p not in want:
      raise DeltaError(f"{what} has {name}, which the run's train.selection does not select")
    if tuple(np.shape(got[p])) != tuple(want[p]):
      raise DeltaError(f"{name} has shape {tuple(np.shape(got[p]))} in {what} but "
                       f"{tuple(want[p])} for this selection and base model")


@dataclasses.dataclass(frozen=True)
class Leaves:
  """Trains the base's own leaves whose path matches `name`'s pattern."""
  name: str

  def _predicate(self):
    return selection_predicate(self.name)

  def initial(self, unet: Mapping, seed: int = 0) -> dict:  # pylint: disable=unused-argument
    selected, _ = split(unet, self._predicate())
    return selected

  def frozen(self, unet: Mapping) -> dict:
    return split(unet, self._predicate())[1]

  def merge(self, delta: Mapping, frozen: Mapping) -> dict:
    return merge(delta, frozen)

  def kernels(self, delta: Mapping) -> Dict[Path, jnp.ndarray]:
    return {p: w for p, w in flatten(delta).items() if p[-1] == "kernel"}

  def trains_kv(self) -> bool:
    """Whether the delta changes cross-attention keys or values (the K/V anchor's)."""
    return True  # every leaf selection holds attn2 to_k and to_v

  def check(self, delta: Mapping, unet: Mapping, what: str = "the delta") -> None:
    want = {p: np.shape(x) for p, x in flatten(self.initial(unet)).items()}
    _check_shapes(flatten(delta), want, what)


@dataclasses.dataclass(frozen=True)
class LoRA:
  """Low-rank factors beside each target projection: W + (alpha / rank) * A @ B.

  Attributes:
    rank: r, the factors' inner width.
    alpha: the scale numerator (diffusers/PEFT's lora_alpha); the product is
      multiplied by alpha / rank.
    targets: `attn<i>/<projection>` patterns (fnmatch: "attn2/to_[kv]", "attn*/to_*").
  """
  rank: int
  alpha: float
  targets: Tuple[str, ...]

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def trains_kv(self) -> bool:
    """Whether a target adapts the cross-attention keys or values (the K/V anchor's)."""
    return any(fnmatch.fnmatchcase(f"attn2/{p}", t) for p in ("to_k", "to_v")
               for t in self.targets)

  def modules(self, unet: Mapping) -> Tuple[Path, ...]:
    """Paths of the target projections (each holds a `kernel`)."""
    out = []
    for p in flatten(unet):
      if (p[-1] == "kernel" and len(p) >= 3 and re.fullmatch(r"attn\d+", p[-3])
          and p[-2] in PROJECTIONS
          and any(fnmatch.fnmatchcase(f"{p[-3]}/{p[-2]}", t) for t in self.targets)):
        out.append(p[:-1])
    if not out:
      raise ConfigError(f"train.lora_targets={','.join(self.targets)!r} matches no attention "
                        f"projection (attn1|attn2 / {'|'.join(PROJECTIONS)})")
    return tuple(sorted(out))

  def shapes(self, unet: Mapping) -> Dict[Path, tuple]:
    flat = flatten(unet)
    out = {}
    for m in self.modules(unet):
      d_in, d_out = np.shape(flat[m + ("kernel",)])
      out[m + ("lora_A",)] = (d_in, self.rank)
      out[m + ("lora_B",)] = (self.rank, d_out)
    return out

  def initial(self, unet: Mapping, seed: int = 0) -> dict:
    """A ~ N(0, 1/r^2) (seeded per projection), B = 0: the product starts at zero."""
    out = {}
    for i, (p, shape) in enumerate(sorted(self.shapes(unet).items())):
      if p[-1] == "lora_A":
        rng = np.random.default_rng([seed, i])
        out[p] = (rng.standard_normal(shape) / self.rank).astype(np.float32)
      else:
        out[p] = np.zeros(shape, np.float32)
    return unflatten(out)

  def frozen(self, unet: Mapping) -> Mapping:
    return unet

  def kernels(self, delta: Mapping) -> Dict[Path, jnp.ndarray]:
    flat = flatten(delta)
    return {p[:-1] + ("kernel",): self.scale * (jnp.asarray(a, jnp.float32)
                                                 @ jnp.asarray(flat[p[:-1] + ("lora_B",)],
                                                               jnp.float32))
            for p, a in flat.items() if p[-1] == "lora_A"}

  def merge(self, delta: Mapping, frozen: Mapping) -> dict:
    """The base with each target kernel replaced by W + scale * A @ B (float32)."""
    flat = dict(flatten(frozen))
    for p, d in self.kernels(delta).items():
      flat[p] = flat[p].astype(jnp.float32) + d
    return unflatten(flat)

  def check(self, delta: Mapping, unet: Mapping, what: str = "the delta") -> None:
    _check_shapes(flatten(delta), self.shapes(unet), what)


Selection = Union[Leaves, LoRA]


def from_config(train_cfg) -> Selection:
  """The selection a run's `train` config group names (validated)."""
  name = train_cfg.selection
  if name == LORA:
    targets = tuple(t.strip() for t in str(train_cfg.lora_targets).split(",") if t.strip())
    if not isinstance(train_cfg.lora_rank, int) or train_cfg.lora_rank < 1:
      raise ConfigError(f"train.lora_rank must be a positive integer, got "
                        f"{train_cfg.lora_rank!r}")
    if not train_cfg.lora_alpha > 0:
      raise ConfigError(f"train.lora_alpha must be > 0, got {train_cfg.lora_alpha!r}")
    bad = [t for t in targets if "/" not in t]
    if not targets or bad:
      raise ConfigError(f"train.lora_targets: give comma-separated attn<i>/<projection> "
                        f"patterns such as 'attn2/to_k,attn2/to_v', got "
                        f"{train_cfg.lora_targets!r}")
    return LoRA(int(train_cfg.lora_rank), float(train_cfg.lora_alpha), targets)
  if name not in SELECTIONS:
    raise ConfigError(f"train.selection must be one of {sorted(SELECTIONS) + [LORA]}, "
                      f"got {name!r}")
  return Leaves(name)
