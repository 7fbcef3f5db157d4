"""The traced train step kept on disk (`jax.export`), so that a restart skips tracing.

A start pays tracing (Python runs `train_step` under jit, ~900 Flax parameters, the
teacher and the student UNet) and lowering to StableHLO before XLA compiles; the
persistent compilation cache skips only the compile. This keeps the lowered program,
serialized by `jax.export` (a flatbuffer holding StableHLO bytecode, never a
pickle), in `<compile_cache>/programs/<key>.jaxexport`. The key is a sha256 of
everything that decides the program:

  - `static`: what the jitted step closes over (the modules' and the loss spec's
    reprs, the config less the fields that never reach the step);
  - every argument leaf's shape, dtype and sharding, and the arguments' structure;
  - the mesh (axis names, shape, device ids), the platform and device kind;
  - the versions of jax, jaxlib, flax and optax, and jax settings read at tracing;
  - the source of every lfs_jax module.

A start whose key has an entry reads it (a restart); any other traces and writes
one. An entry that cannot be read is reported and traced again (and rewritten).
Either way the step that runs is the deserialized program wrapped in one jit
(`as_jit`), so a cold start and a restart compile the same HLO (the persistent
cache serves the restart) and give the same bits.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import uuid
from typing import Any, NamedTuple, Optional, Sequence

import jax

SUFFIX = ".jaxexport"
_DIGEST = 32  # an entry ends with the sha256 of what precedes it
_SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the lfs_jax package
# jax settings that change what tracing produces.
_JAX_SETTINGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
                 "jax_threefry_partitionable", "jax_numpy_dtype_promotion",
                 "jax_numpy_rank_promotion", "jax_softmax_custom_jvp",
                 "jax_dynamic_shapes", "jax_use_shardy_partitioner")


class Store(NamedTuple):
  """Where programs live and what the jitted function closes over."""
  folder: str    # <compile_cache>/programs
  static: str    # a description of the closure (reprs, config), part of the key


def folder_for(compile_cache: str) -> Optional[str]:
  """`<compile_cache>/programs`, or None without a local compile cache."""
  if not compile_cache or "://" in compile_cache:
    return None
  return os.path.join(os.path.expanduser(compile_cache), "programs")


_SOURCE_HASH: dict = {}


def source_hash() -> str:
  """sha256 over every .py file of the lfs_jax package (paths and contents)."""
  if "h" not in _SOURCE_HASH:
    h = hashlib.sha256()
    for root, dirs, files in os.walk(_SOURCE):
      dirs.sort()
      for name in sorted(files):
        if name.endswith(".py"):
          path = os.path.join(root, name)
          h.update(os.path.relpath(path, _SOURCE).encode() + b"\0")
          with open(path, "rb") as f:
            h.update(f.read() + b"\0")
    _SOURCE_HASH["h"] = h.hexdigest()
  return _SOURCE_HASH["h"]


def _version(name: str) -> str:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return "-"


def describe(static: str, args: Sequence[Any], mesh) -> dict:
  """Everything the key hashes, as JSON-able text (also written beside the entry)."""
  leaves, treedef = jax.tree.flatten(tuple(args))
  device = jax.devices()[0]
  return {
      "static": static,
      "structure": str(treedef),
      "leaves": [f"{jax.typeof(x).str_short()} {getattr(x, 'sharding', None)}"
                 for x in leaves],
      "mesh": f"{mesh.axis_names} {mesh.devices.shape} "
              f"{[d.id for d in mesh.devices.flat]}",
      "platform": f"{device.platform} {device.device_kind} {jax.device_count()} devices, "
                  f"{jax.process_count()} processes",
      "versions": {n: _version(n) for n in ("jax", "jaxlib", "flax", "optax")},
      "jax_settings": {n: str(getattr(jax.config, n, None)) for n in _JAX_SETTINGS},
      "source": source_hash(),
  }


def key(description: dict) -> str:
  return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def load(folder: str, k: str):
  """The stored program of key `k` (jax.export.Exported), or None (absent or unreadable).

  An unreadable entry is said on the console and left to be rewritten.
  """
  path = os.path.join(folder, k + SUFFIX)
  if not os.path.exists(path):
    return None
  try:
    with open(path, "rb") as f:
      data = f.read()
    blob, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(blob).digest() != digest:
      raise ValueError("checksum mismatch (truncated or altered)")
    return jax.export.deserialize(bytearray(blob))
  except Exception as e:  # pylint: disable=broad-except  # any damage: trace instead
    print(f"train step program {path} is unreadable ({type(e).__name__}: {e}); tracing "
          "the step again")
    return None


def save(folder: str, k: str, blob: bytes, description: dict) -> None:
  """Writes the entry (the blob and its sha256) atomically: a temporary file renamed;
  and its description beside it (`<key>.json`, for a reader; never read back)."""
  os.makedirs(folder, exist_ok=True)
  blob = bytes(blob)
  for suffix, data in ((".json", json.dumps(description, indent=1, sort_keys=True).encode()),
                       (SUFFIX, blob + hashlib.sha256(blob).digest())):
    path = os.path.join(folder, k + suffix)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"  # one per writer: hosts may share the folder
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)


def export_step(fn, mesh, args: Sequence[Any]) -> bytearray:
  """Traces and lowers the jitted step `fn` for the placed `args`, serialized.

  The exported function takes the argument leaves flat and returns (the new
  state's leaves, metrics): built-in containers only, so the entry holds no Python
  types of ours. Shardings: each argument's own; the state comes out as it went in,
  the metrics replicated (as `parallel.train_shardings`).
  """
  leaves, treedef = jax.tree.flatten(tuple(args))

  def flat(*xs):
    state, metrics = fn(*jax.tree.unflatten(treedef, xs))
    return jax.tree.leaves(state), metrics

  shardings = [x.sharding for x in leaves]
  n_state = jax.tree.structure(args[0]).num_leaves
  with jax.set_mesh(mesh):
    exported = jax.export.export(jax.jit(
        flat, in_shardings=shardings,
        out_shardings=(shardings[:n_state], jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec()))))(*leaves)
  return exported.serialize()


def as_jit(exported, mesh, args: Sequence[Any]):
  """The exported step as `fn(state, *rest) -> (state, metrics)`, jitted like the original:
  the export's shardings, the state's buffers donated."""
  treedef = jax.tree.structure(tuple(args))
  state_def = jax.tree.structure(args[0])
  out_state, out_metrics = jax.tree.unflatten(exported.out_tree,
                                              list(exported.out_shardings_jax(mesh)))

  def step(*tree_args):
    state_leaves, metrics = exported.call(*jax.tree.leaves(tree_args))
    return jax.tree.unflatten(state_def, state_leaves), metrics

  in_sh = jax.tree.unflatten(treedef, list(exported.in_shardings_jax(mesh)))
  return jax.jit(step, in_shardings=tuple(in_sh),
                 out_shardings=(jax.tree.unflatten(state_def, out_state), out_metrics),
                 donate_argnums=(0,))
