"""PyTorch state dicts (diffusers / transformers names) <-> Flax parameter trees.

Our Flax modules are named after the PyTorch modules, with list indices folded
into the name (`down_blocks.0.resnets.1.conv1.weight` ->
`down_blocks_0/resnets_1/conv1/kernel`). So conversion needs no per-model table:
the target tree (from `jax.eval_shape(module.init, ...)`) says which leaf each
tensor becomes, and only the layout changes:

  conv weight    [O, I, kh, kw] -> kernel [kh, kw, I, O]
  linear weight  [O, I]         -> kernel [I, O]   (also from a 1x1 conv [O, I, 1, 1])
  norm weight    [C]            -> scale  [C]
  embedding      [N, C]         -> embedding [N, C]
  bias                           -> bias
  other names (a bare torch Parameter such as class_embedding) -> the same name,
                                    unchanged, where the target has that leaf

Loading is strict: every tensor must land on a leaf of the right shape and every
leaf must be filled; the first offender is named. Nothing is materialised on the
device until everything has been checked.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Iterable, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Path = Tuple[str, ...]


class WeightsMismatchError(ValueError):
  """Tensors that do not fit the model built from the config (names the key)."""


def torch_key_to_path(key: str) -> Path:
  """"a.b.0.c.weight" -> ("a", "b_0", "c", "weight")."""
  parts = []
  for p in key.split("."):
    if p.isdigit() and parts:
      parts[-1] = f"{parts[-1]}_{p}"
    else:
      parts.append(p)
  return tuple(parts)


# Module names that really end in "_<digit>" in diffusers (TimestepEmbedding).
_LITERAL_NAMES = frozenset({"linear_1", "linear_2"})


def path_to_torch_key(path: Path) -> str:
  """Inverse of `torch_key_to_path` for a module path plus the torch leaf name."""
  return ".".join(p if p in _LITERAL_NAMES else re.sub(r"_(\d+)$", r".\1", p)
                  for p in path)


def torch_name(path: Path) -> str:
  """The torch key of a Flax leaf's path (kernel, scale and embedding are torch's weight)."""
  leaf = "weight" if path[-1] in ("kernel", "scale", "embedding") else path[-1]
  return path_to_torch_key(path[:-1] + (leaf,))


def flatten(tree: Mapping, prefix: Path = ()) -> Dict[Path, object]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten(flat: Mapping[Path, object]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return tree


def _torch_to_flax_leaf(key: str, arr: np.ndarray, module: Path,
                        leaves: Dict[Path, object]) -> Tuple[Path, np.ndarray]:
  """Picks the Flax leaf for one torch tensor and converts its layout."""
  name = module[-1]
  mod = module[:-1]
  if name == "bias":
    return mod + ("bias",), arr
  if name != "weight":
    # A bare nn.Parameter (class_embedding, logit_scale) keeps name and layout; the
    # Flax leaf names that stand for a torch "weight" are not accepted verbatim.
    if module in leaves and name not in ("kernel", "scale", "embedding"):
      return module, arr
    raise WeightsMismatchError(f"unexpected tensor {key!r}: no such parameter in the model")
  if mod + ("kernel",) in leaves:
    target = leaves[mod + ("kernel",)]
    if arr.ndim == 4 and len(target.shape) == 4:
      return mod + ("kernel",), np.transpose(arr, (2, 3, 1, 0))
    if arr.ndim == 4 and arr.shape[2:] == (1, 1) and len(target.shape) == 2:
      arr = arr[:, :, 0, 0]  # 1x1 conv stored where we use a linear layer
    if arr.ndim == 2:
      return mod + ("kernel",), arr.T
    raise WeightsMismatchError(
        f"tensor {key!r} has shape {tuple(arr.shape)}, the model expects a kernel of "
        f"shape {tuple(target.shape)} (after layout conversion)")
  if mod + ("scale",) in leaves:
    return mod + ("scale",), arr
  if mod + ("embedding",) in leaves:
    return mod + ("embedding",), arr
  raise WeightsMismatchError(f"unexpected tensor {key!r}: no such parameter in the model")


def torch_to_flax(
    state: Mapping[str, np.ndarray],
    target: Mapping,
    *,
    dtype=jnp.float32,
    ignore: Iterable[str] = (),
    rename: Callable[[str], str] | None = None,
    source: str = "checkpoint",
    on_host: bool = False,
) -> dict:
  """Converts a torch-named state dict to a Flax parameter tree shaped like `target`.

  Args:
    state: {torch key: numpy array}.
    target: the abstract parameter tree (leaves with `.shape`), e.g. from eval_shape.
    dtype: dtype of the returned parameters (float32 default).
    ignore: regexes of torch keys that are known buffers (e.g. position_ids).
    rename: optional torch-key rewrite applied first (legacy checkpoint names).
    source: what to call the state in error messages (a folder name).
    on_host: return numpy arrays in host memory instead of arrays on the default
      device, for a caller that places each leaf with its own sharding.

  Returns:
    A nested dict of jax (or numpy) arrays with exactly `target`'s structure.

  Raises:
    WeightsMismatchError: naming the first unexpected tensor, wrong shape or
      missing parameter.
  """
  leaves = flatten(target)
  ignore_re = [re.compile(p) for p in ignore]
  out: Dict[Path, np.ndarray] = {}
  for key in sorted(state):
    if any(r.fullmatch(key) for r in ignore_re):
      continue
    new_key = rename(key) if rename else key
    path, arr = _torch_to_flax_leaf(key, np.asarray(state[key]),
                                    torch_key_to_path(new_key), leaves)
    if path not in leaves:
      raise WeightsMismatchError(
          f"unexpected tensor {key!r} in {source}: the model has no parameter "
          f"{'/'.join(path)}")
    want = tuple(leaves[path].shape)
    if tuple(arr.shape) != want:
      raise WeightsMismatchError(
          f"tensor {key!r} in {source} has shape {tuple(state[key].shape)}; the model "
          f"built from config.json expects {want} for {'/'.join(path)} (after layout "
          "conversion): the weights and the config do not belong together")
    if path in out:
      raise WeightsMismatchError(f"tensor {key!r} in {source} fills {'/'.join(path)} twice")
    out[path] = arr
  missing = [p for p in leaves if p not in out]
  if missing:
    p = missing[0]
    raise WeightsMismatchError(
        f"{source} is missing {len(missing)} tensor(s), first {'/'.join(p)} "
        f"(torch name {torch_name(p)!r})")
  to_array = np.asarray if on_host else jnp.asarray
  return unflatten({p: to_array(a, dtype=dtype) for p, a in out.items()})


def flax_to_torch(params: Mapping) -> Dict[str, np.ndarray]:
  """Inverse layout conversion: a Flax tree -> {torch key: numpy array} (float32 kept)."""
  out = {}
  for path, leaf in flatten(params).items():
    arr = np.asarray(jax.device_get(leaf))
    if path[-1] == "kernel":
      arr = np.transpose(arr, (3, 2, 0, 1)) if arr.ndim == 4 else arr.T
    out[torch_name(path)] = np.ascontiguousarray(arr).reshape(arr.shape)  # 0-d stays 0-d
  return out
