"""The Orbax layout of a run directory (DESIGN section 3).

    <workdir>/config.json     resolved config (written once; a restart must match it)
    <workdir>/concepts.json   the registry after the last finished session
    <workdir>/sessions/<k>/   delta (selected UNet leaves + all token rows so far),
                              context bank of session k's concepts, optimizer state,
                              meta (registry, config)
    <workdir>/progress/<s>/   the in-session train state at step s, for --resume

Only the trainable delta is ever written, never the frozen base. A finished session
is never rewritten. Orbax writes each checkpoint to a temporary directory and
renames it when complete, so an interrupted save leaves no half-written session.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import jax
import orbax.checkpoint as ocp

from lfs_jax import parallel

SESSIONS = "sessions"
PROGRESS = "progress"


class CheckpointError(RuntimeError):
  """A run directory that cannot be used as asked (names what is wrong)."""


def _manager(path: str, max_to_keep: Optional[int] = None) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(path),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False))


def finished_sessions(workdir: str) -> List[int]:
  """Session indices with a complete checkpoint, ascending."""
  path = os.path.join(workdir, SESSIONS)
  if not os.path.isdir(path):
    return []
  return sorted(_manager(path).all_steps())


def save_session(workdir: str, session: int, *, delta, bank, opt_state,
                 meta: Dict[str, Any]) -> None:
  """Writes sessions/<session>/; refuses to overwrite a finished session."""
  mngr = _manager(os.path.join(workdir, SESSIONS))
  if session in mngr.all_steps():
    raise CheckpointError(
        f"session {session} already exists in {workdir}/{SESSIONS}: finished sessions "
        "are never rewritten (use a new --workdir)")
  items = dict(delta=ocp.args.StandardSave(delta),
               opt_state=ocp.args.StandardSave(opt_state),
               meta=ocp.args.JsonSave(meta))
  if bank:  # Orbax refuses an empty tree; an imported session has no photos, no bank
    items["bank"] = ocp.args.StandardSave(bank)
  mngr.save(session, args=ocp.args.Composite(**items))
  mngr.wait_until_finished()
  mngr.close()


def restore_session(workdir: str, session: int, *, delta_target=None,
                    bank_target=None, with_opt_state: bool = False) -> Dict[str, Any]:
  """Reads sessions/<session>/: {"delta", "bank", "meta"[, "opt_state"]}.

  Targets (abstract trees with shardings) place the arrays; without one the arrays
  come back as stored. A session saved without a bank (imported) gives bank {}.
  """
  mngr = _manager(os.path.join(workdir, SESSIONS))
  if session not in mngr.all_steps():
    raise CheckpointError(
        f"no session {session} in {workdir}/{SESSIONS} (have {list(mngr.all_steps())})")
  has_bank = _has_bank(workdir, session)
  items = dict(delta=ocp.args.StandardRestore(delta_target),
               meta=ocp.args.JsonRestore())
  if has_bank:
    items["bank"] = ocp.args.StandardRestore(bank_target)
  if with_opt_state:
    items["opt_state"] = ocp.args.StandardRestore()
  out = dict(mngr.restore(session, args=ocp.args.Composite(**items)).items())
  mngr.close()
  if not has_bank:
    out["bank"] = {}
  return out


def session_meta(workdir: str, session: int) -> Dict[str, Any]:
  """Reads only the meta of sessions/<session>/ (registry, config, ...)."""
  mngr = _manager(os.path.join(workdir, SESSIONS))
  if session not in mngr.all_steps():
    raise CheckpointError(
        f"no session {session} in {workdir}/{SESSIONS} (have {list(mngr.all_steps())})")
  out = mngr.restore(session, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
  mngr.close()
  return out["meta"]


def _has_bank(workdir: str, session: int) -> bool:
  """False for a session saved with an empty context bank (see save_session)."""
  return os.path.isdir(os.path.join(workdir, SESSIONS, str(session), "bank"))


def restore_bank(workdir: str, session: int) -> Dict[str, Any]:
  """Reads only the context bank of sessions/<session>/ (not its delta or optimizer)."""
  mngr = _manager(os.path.join(workdir, SESSIONS))
  if session not in mngr.all_steps():
    raise CheckpointError(
        f"no session {session} in {workdir}/{SESSIONS} (have {list(mngr.all_steps())})")
  if not _has_bank(workdir, session):
    mngr.close()
    return {}
  out = mngr.restore(session, args=ocp.args.Composite(bank=ocp.args.StandardRestore()))
  mngr.close()
  return out["bank"]


def save_progress(workdir: str, step: int, state, meta: Dict[str, Any], keep: int) -> None:
  """Writes progress/<step>/ (the in-session TrainState), keeping the newest `keep`."""
  mngr = _manager(os.path.join(workdir, PROGRESS), max_to_keep=keep)
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=True)
  mngr.wait_until_finished()
  mngr.close()


def _restore_latest_progress(workdir: str, **items) -> Optional[Dict[str, Any]]:
  path = os.path.join(workdir, PROGRESS)
  if not os.path.isdir(path):
    return None
  mngr = _manager(path)
  step = mngr.latest_step()
  out = None if step is None else dict(mngr.restore(
      step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **items)).items())
  mngr.close()
  return out


def latest_progress(workdir: str, state_target) -> Optional[Dict[str, Any]]:
  """The newest progress checkpoint as {"state", "meta"}, or None."""
  return _restore_latest_progress(workdir, state=ocp.args.StandardRestore(state_target))


def progress_meta(workdir: str) -> Optional[Dict[str, Any]]:
  """The meta of the newest progress checkpoint (which session it belongs to), or None."""
  got = _restore_latest_progress(workdir)
  return None if got is None else got["meta"]


def clear_progress(workdir: str) -> None:
  """Drops the progress checkpoints once their session is saved for good."""
  path = os.path.join(workdir, PROGRESS)
  if os.path.isdir(path) and jax.process_index() == 0:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(path)
  parallel.barrier("lfs_jax: progress cleared")  # no process sees it half deleted


def drop_finished_progress(workdir: str, finished: List[int]) -> None:
  """Drops progress/ when it belongs to a finished session.

  A kill between a session's save and `clear_progress` leaves that session's
  progress behind; the next session would resume from it or collide with its steps.
  """
  meta = progress_meta(workdir)
  if meta is not None and meta["session"] in finished:
    clear_progress(workdir)


def write_json_atomic(path: str, obj: Any) -> None:
  """Process 0 writes run metadata; tmp file + rename so readers never see half a file."""
  if jax.process_index() != 0:
    return
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
