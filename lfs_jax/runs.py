"""A finished session of a run, rebuilt from its directory for sampling.

Nothing but the run directory is read (never the photos): config.json says which
base model and trainable selection the run used, sessions/<k>/ holds the trained
delta (selected UNet leaves + every modifier token row so far), the registry in
its meta, and the context bank of the concepts it learned. Sampling k needs the
banks of sessions 1..k.
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
from lfs_jax.errors import ConfigError
from lfs_jax.train import params as params_lib
from lfs_jax.train import session as session_lib
from lfs_jax.weights.convert import flatten


class RunError(ValueError):
  """A run directory or session that cannot be sampled (says what is missing)."""


class RunModel(NamedTuple):
  """The model of one finished session, ready to sample."""
  cfg: ml_collections.ConfigDict  # the run's config (+ sampling overrides), locked
  workdir: str
  session: int                    # the session whose weights these are
  finished: List[int]             # every finished session of the run
  pipe: Any                       # weights.Pipeline: unet_params = base + delta; tokens added
  token_rows: np.ndarray          # [R, D] float32 rows of <c1>..<cR> (text extra_embeddings)
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
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise RunError(f"{workdir} is not a run directory: {path} does not exist")
  with open(path) as f:
    stored = json.load(f)
  cfg = config_base.get_config()
  _fill(cfg, stored, "", path)
  for key, value in (overrides or {}).items():
    try:
      current = _get(cfg, key)
    except (KeyError, AttributeError):
      raise ConfigError(f"--config.{key}: no such config field") from None
    if value == current:
      continue  # restating the run's own value is harmless
    if not session_lib.is_free_field(key):
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


def _check_delta(delta_unet, selected, session: int) -> None:
  """The stored delta must cover exactly the selection, with the same shapes."""
  got, want = flatten(delta_unet), flatten(selected)
  for p in sorted(set(got) | set(want)):
    name = "/".join(p)
    if p not in got:
      raise RunError(f"session {session}: the checkpoint lacks UNet weight {name}")
    if p not in want:
      raise RunError(f"session {session}: the checkpoint has {name}, which the run's "
                     "train.selection does not select")
    if tuple(np.shape(got[p])) != tuple(np.shape(want[p])):
      raise RunError(f"session {session}: {name} has shape {np.shape(got[p])} in the "
                     f"checkpoint but {np.shape(want[p])} in the base model")


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
  selected, rest = params_lib.split(pipe.unet_params,
                                    params_lib.selection_predicate(cfg.train.selection))
  _check_delta(delta["unet"], selected, session)
  # The trained leaves stay float32, as the session trained and evaluated them.
  unet_params = params_lib.merge(jax.tree.map(jnp.asarray, delta["unet"]), rest)

  registry = concepts_lib.Registry.from_json(json.dumps(meta["concepts"]))
  rows = np.asarray(delta["tokens"], np.float32)
  d = pipe.text_encoder.config.hidden_size
  if rows.shape != (len(registry.concepts), d):
    raise RunError(f"session {session}: token rows have shape {rows.shape}, expected "
                   f"({len(registry.concepts)}, {d}) for tokens {registry.tokens}")
  concepts_lib.add_tokens(pipe.tokenizer, registry, pipe.text_encoder.config.vocab_size)

  bank: Dict[str, Dict[str, np.ndarray]] = {}
  for k in range(1, session + 1):
    got = stored["bank"] if k == session else checkpoint.restore_bank(workdir, k)
    bank.update({name: {f: np.asarray(v, np.float32) for f, v in entry.items()}
                 for name, entry in got.items()})
  return RunModel(cfg, workdir, session, finished, pipe._replace(unet_params=unet_params),
                  rows, registry, bank)
