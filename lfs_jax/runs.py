"""The run directory's one owner: its config, its resume rules, its session records.

    <workdir>/config.json     the resolved config, written once (`write_config`);
                              read back strictly (`stored_config`, `run_config`)
    <workdir>/concepts.json   the registry after the last finished session
    <workdir>/sessions/<k>/   the trained delta, context bank, optimizer state and
                              the session's meta (`session_meta`, built here for
                              training and for import alike)
    <workdir>/progress/<s>/   the in-session train state, for --resume

The Orbax reading and writing is `lfs_jax.checkpoint`'s; what the files mean and
which config changes a run survives (`check_compatible`) is decided here, and
nowhere else. Sampling and evaluation rebuild a finished session with `load_run`
from nothing but the run directory (never the photos): config.json says which base
model and selection (`lfs_jax.delta`) the run used, sessions/<k>/ holds the delta
and the registry, and the banks of sessions 1..k feed ICGen.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lfs_jax import base as base_lib
from lfs_jax import checkpoint
from lfs_jax import concepts as concepts_lib
from lfs_jax import config_base
from lfs_jax import delta as delta_lib
from lfs_jax import paths
from lfs_jax.errors import ConfigError

CONFIG = "config.json"
CONCEPTS = "concepts.json"
# Config fields that may change between a run's start and its resumption.
_FREE_FIELDS = ("compile_cache", "train.log_every", "train.progress_every", "checkpoint.keep_progress",
                "model.attention", "model.remat", "mesh.data", "mesh.fsdp", "mesh.frozen", "mesh.trainable",
                "mesh.fsdp_min_size",
                "distributed.cluster", "distributed.coordinator", "distributed.num_processes",
                "distributed.process_id", "distributed.cpu_collectives")
# Config groups that only steer sampling, never the trained weights.
_FREE_PREFIXES = ("sample.", "icgen.", "eval.", "validation.")


class RunError(ValueError):
  """A run directory or session that cannot be sampled (says what is missing)."""


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def is_free_field(key: str) -> bool:
  """True for a dotted config field that may differ from the run's config.json."""
  return key in _FREE_FIELDS or key.startswith(_FREE_PREFIXES)


def _added_at_default(recorded: Dict[str, Any], current: Dict[str, Any]) -> set:
  """The flat keys of `current` that `recorded` lacks and that hold their config_base
  default: fields added to the code after the record was written, at the value it was
  made under."""
  defaults = _flat(config_base.get_config().to_dict())
  return {k for k, v in current.items() if k not in recorded and k in defaults and v == defaults[k]}


def same_config(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
  """True when `current` is the config `recorded` was written under, up to fields added
  since at their default (a stored record, the benchmark's evaluations, stays valid when
  the code gains a field, and only then)."""
  a, b = _flat(jsonable(recorded)), _flat(jsonable(current))
  added = _added_at_default(a, b)
  return a == {k: v for k, v in b.items() if k not in added}


def check_compatible(stored: Dict[str, Any], current: Dict[str, Any]) -> None:
  """Refuses to continue a run under a config that would change its results.

  data.sessions may grow (new sessions appended: that is lifelong learning). A field
  that `stored` lacks (added to the code after the run began) is compatible at its
  default, which is how that run was trained.
  """
  a, b = _flat(stored), _flat(current)
  added = _added_at_default(a, b)
  for key in sorted(set(a) | set(b)):
    if is_free_field(key) or a.get(key) == b.get(key) or key in added:
      continue
    if key == "data.sessions":
      # "" = none yet (a run that starts with an imported session, see interop).
      old, new = (str(a[key]).split(";") if a[key] else []), str(b[key]).split(";")
      if new[:len(old)] == old:
        continue
    raise ConfigError(
        f"this run was started with {key}={a.get(key)!r}; the config now says "
        f"{b.get(key)!r}. Continue with the original value or use a new --workdir.")


def jsonable(obj):
  """`obj` as it reads back from JSON (tuples become lists, anything odd a string)."""
  return json.loads(json.dumps(obj, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def stored_config(workdir: str) -> Optional[Dict[str, Any]]:
  """The run's config.json as a dict, or None where the directory holds no run yet."""
  path = os.path.join(workdir, CONFIG)
  if not paths.isfile(path):
    return None
  return checkpoint.read_json(path, "the run's config")  # a damaged one is named


def write_config(workdir: str, config: Mapping[str, Any]) -> None:
  """Writes config.json (once a run: a run's config is never rewritten)."""
  checkpoint.write_json_atomic(os.path.join(workdir, CONFIG), jsonable(dict(config)))


def session_meta(session: int, registry: concepts_lib.Registry, config: Mapping[str, Any], *,
                 steps: int, metrics: Mapping[str, float], seconds: float,
                 imported: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """The meta record of sessions/<k>/, for a trained session and an imported one alike."""
  meta = {"session": session, "concepts": json.loads(registry.to_json()),
          "config": dict(config), "steps": steps, "metrics": dict(metrics),
          "seconds": seconds}
  if imported is not None:
    meta["imported"] = dict(imported)
  return jsonable(meta)


def imported_registry(workdir: str) -> concepts_lib.Registry:
  """The concepts of an imported session 1 (`--mode=import`), else an empty registry."""
  if 1 not in checkpoint.finished_sessions(workdir):
    return concepts_lib.Registry()
  meta = checkpoint.session_meta(workdir, 1)
  if "imported" not in meta:
    return concepts_lib.Registry()
  return concepts_lib.Registry.from_json(json.dumps(meta["concepts"]))


class RunModel(NamedTuple):
  """The model of one finished session, ready to sample."""
  cfg: ml_collections.ConfigDict  # the run's config (+ sampling overrides), locked
  workdir: str
  session: int                    # the session whose weights these are
  finished: List[int]             # every finished session of the run
  pipe: Any                       # weights.Pipeline: unet_params = base + delta; tokens added
  token_rows: np.ndarray          # [R, D] float32 rows of registry.tokens (text extra_embeddings)
  registry: concepts_lib.Registry  # concepts learned up to `session`
  # "concept<i>" -> {"mean", "logvar"}, each [n, h, w, c] unscaled VAE latents of its photos
  bank: Dict[str, Dict[str, np.ndarray]]


def _fill(node: ml_collections.ConfigDict, stored: Mapping[str, Any], prefix: str,
          path: str) -> None:
  """Sets `node`'s fields from a stored dict, strictly (an unknown field is an error)."""
  for key, value in stored.items():
    if key not in node:
      raise RunError(f"{path}: unknown config field {prefix}{key} (a run of another "
                     "lfs_jax version?)")
    if isinstance(node[key], ml_collections.ConfigDict):
      _fill(node[key], value, f"{prefix}{key}.", path)
    else:
      node[key] = tuple(value) if isinstance(node[key], tuple) else value


def run_config(workdir: str, overrides: Optional[Mapping[str, Any]] = None
               ) -> ml_collections.ConfigDict:
  """The run's config.json as a locked ConfigDict, with sampling overrides applied.

  Fields the stored config lacks (a run from before they existed) take the
  defaults of `config_base`.

  Args:
    workdir: the run directory.
    overrides: dotted field -> value, e.g. {"sample.steps": 50, "icgen.strength": 1.0};
      only fields that do not change the trained model (sample.*, icgen.*, eval.*
      and the machine settings that `--resume` also lets change) are accepted.

  Raises:
    RunError: no config.json, or an unreadable one.
    ConfigError: an override of a field that belongs to the trained run.
  """
  path = os.path.join(workdir, CONFIG)
  stored = stored_config(workdir)
  if stored is None:
    raise RunError(f"{workdir} is not a run directory: {path} does not exist")
  cfg = config_base.get_config()
  _fill(cfg, stored, "", path)
  for key, value in (overrides or {}).items():
    try:
      current = _get(cfg, key)
    except (KeyError, AttributeError):
      raise ConfigError(f"--config.{key}: no such config field") from None
    if value == current:
      continue  # restating the run's own value is harmless
    if not is_free_field(key):
      raise ConfigError(
          f"--config.{key}: sampling uses the run's own {key}={current!r} from {path}; "
          "only sample.*, icgen.*, eval.* and machine settings may be changed")
    cfg.update_from_flattened_dict({key: value})
  cfg.lock()
  return cfg


def _get(cfg, dotted: str):
  node = cfg
  for part in dotted.split("."):
    node = node[part]
  return node


def load_run(workdir: str, session: Optional[int] = None, *,
             cfg: Optional[ml_collections.ConfigDict] = None) -> RunModel:
  """Rebuilds the model of a finished session.

  Args:
    workdir: the run directory.
    session: 1-based session; None = the latest finished one.
    cfg: the config to use (default: `run_config(workdir)`).

  Returns:
    The RunModel of that session.

  Raises:
    RunError: not a run directory, no finished session, or `session` not finished.
  """
  cfg = run_config(workdir) if cfg is None else cfg
  finished = checkpoint.finished_sessions(workdir)
  if not finished:
    raise RunError(f"{workdir} has no finished session yet (train one with --mode=train)")
  if session is None:
    session = finished[-1]
  elif session not in finished:
    raise RunError(f"session {session} is not a finished session of {workdir}; "
                   f"finished sessions: {', '.join(map(str, finished))}")
  if cfg.compile_cache:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cfg.compile_cache))

  pipe = base_lib.load_base(cfg.model, cfg.seed)
  stored = checkpoint.restore_session(workdir, session)
  delta, meta = stored["delta"], stored["meta"]
  selection = delta_lib.from_config(cfg.train)
  try:
    selection.check(delta["unet"], pipe.unet_params, "the checkpoint")
  except delta_lib.DeltaError as e:
    raise RunError(f"session {session}: {e}") from None
  # The trained leaves stay float32, as the session trained and evaluated them.
  unet_params = selection.merge(jax.tree.map(jnp.asarray, delta["unet"]),
                                selection.frozen(pipe.unet_params))

  registry = concepts_lib.Registry.from_json(json.dumps(meta["concepts"]))
  rows = np.asarray(delta["tokens"], np.float32)
  d = pipe.text_encoder.config.hidden_size
  if rows.shape != (len(registry.tokens), d):
    raise RunError(f"session {session}: token rows have shape {rows.shape}, expected "
                   f"({len(registry.tokens)}, {d}) for tokens {registry.tokens}")
  concepts_lib.add_tokens(pipe.tokenizer, registry, pipe.text_encoder.config.vocab_size)

  bank: Dict[str, Dict[str, np.ndarray]] = {}
  for k in range(1, session + 1):
    got = stored["bank"] if k == session else checkpoint.restore_bank(workdir, k)
    bank.update({name: {f: np.asarray(v, np.float32) for f, v in entry.items()}
                 for name, entry in got.items()})
  return RunModel(cfg, workdir, session, finished, pipe._replace(unet_params=unet_params),
                  rows, registry, bank)
