"""The Orbax layout of a run directory (DESIGN section 3).

    <workdir>/config.json     resolved config (written once; a restart must match it)
    <workdir>/concepts.json   the registry after the last finished session
    <workdir>/sessions/<k>/   delta (selected UNet leaves + all token rows so far),
                              context bank of session k's concepts, optimizer state,
                              meta (registry, config)
    <workdir>/progress/<s>/   the in-session train state at step s, for --resume

Only the trainable delta is ever written, never the frozen base. A finished session
is never rewritten. Orbax writes each checkpoint to a temporary directory and
renames it when complete, so an interrupted save leaves no half-written session; on
a bucket (`gs://`, no rename) it writes a commit marker last, and a checkpoint
without it is not a checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
import threading
from typing import Any, Dict, List, Optional

import jax
import orbax.checkpoint as ocp

from lfs_jax import parallel
from lfs_jax import paths

SESSIONS = "sessions"
PROGRESS = "progress"


class CheckpointError(RuntimeError):
  """A run directory that cannot be used as asked (names what is wrong)."""


def _first_line(e: BaseException) -> str:
  """The innermost cause's first line (Orbax wraps TensorStore's precise error)."""
  while e.__cause__ is not None:
    e = e.__cause__
  return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


@contextlib.contextmanager
def _reading(what: str, path: str, recover: str):
  """Turns a damaged (truncated, missing) checkpoint file into a CheckpointError.

  Nothing is repaired or deleted: the message names the damaged folder and the
  command that recovers, and the user decides.
  """
  hooks = _quiet_closed_loop()
  try:
    yield
  except CheckpointError:
    _restore_hooks(hooks)
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Orbax raises ValueError, FileNotFoundError, JSONDecodeError or a bare Exception
    # around TensorStore's DATA_LOSS / OUT_OF_RANGE / NOT_FOUND. The hooks stay: the
    # reads still in flight land on Orbax's closed event loop, now or a bit later, and
    # the sibling reads that failed too are reported by asyncio when collected.
    logging.getLogger("asyncio").addFilter(_drop_unretrieved_reads)
    raise CheckpointError(f"{what} is damaged and cannot be trusted: {path} "
                          f"({_first_line(e)}). Nothing was changed. {recover}") from None
  _restore_hooks(hooks)


def _closed_loop(value) -> bool:
  return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


def _quiet_closed_loop():
  """Silences the "Event loop is closed" reports of TensorStore reads that finish after
  a failed Orbax restore closed its loop (noise after a clear error). They arrive on
  the main thread (sys.excepthook), on Orbax's threads (threading.excepthook) or at
  interpreter exit (sys.unraisablehook); each hook passes every other report on.
  Returns the hooks it replaced."""
  old = (sys.excepthook, threading.excepthook, sys.unraisablehook)

  def excepthook(kind, value, tb):
    if not _closed_loop(value):
      old[0](kind, value, tb)

  def thread_hook(args):
    if not _closed_loop(args.exc_value):
      old[1](args)

  def unraisable_hook(args):
    if not _closed_loop(args.exc_value):
      old[2](args)

  sys.excepthook, threading.excepthook, sys.unraisablehook = (
      excepthook, thread_hook, unraisable_hook)
  return old


def _drop_unretrieved_reads(record: logging.LogRecord) -> bool:
  """asyncio's "Task exception was never retrieved" for the other reads of a damaged
  checkpoint: the first failure is already the CheckpointError that names it."""
  return not record.getMessage().startswith("Task exception was never retrieved")


def _restore_hooks(old) -> None:
  sys.excepthook, threading.excepthook, sys.unraisablehook = old


def _out_of_space(e: BaseException) -> bool:
  while e is not None:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      return True
    e = e.__cause__ or e.__context__
  return False


@contextlib.contextmanager
def _writing(what: str, path: str, kept: str):
  """A full disk while writing a checkpoint -> a CheckpointError that says what is kept."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    if not _out_of_space(e):
      raise
    raise CheckpointError(
        f"out of disk space while writing {what} to {path}; nothing of it was committed "
        f"({kept} are intact). Free space, then run again with --resume.") from None


def _session_recovery(workdir: str, session: int) -> str:
  path = os.path.join(workdir, SESSIONS, str(session))
  moved = os.path.join(workdir, f"damaged_session_{session}")
  return (f"To recover, move it out of the run ({paths.move_command(path, moved)}) and run "
          f"`python -m lfs_jax.main --config=<the run's config> --workdir={workdir} "
          f"--resume`: session {session} is trained again from its photos and session "
          f"{session - 1}.")


def _manager(path: str, max_to_keep: Optional[int] = None) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      paths.abspath(path),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False))


def finished_sessions(workdir: str) -> List[int]:
  """Session indices with a complete checkpoint, ascending."""
  path = os.path.join(workdir, SESSIONS)
  if not paths.isdir(path):
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
  with _writing(f"session {session}", os.path.join(workdir, SESSIONS, str(session)),
                "the sessions before it and the progress checkpoints"):
    # force: Orbax would silently skip a step below the latest (a damaged session k
    # trained again while k+1 exists).
    saved = mngr.save(session, args=ocp.args.Composite(**items), force=True)
    mngr.wait_until_finished()
  if not saved:
    raise CheckpointError(f"Orbax did not write session {session} to {workdir}/{SESSIONS}")
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
  with _reading(f"session {session}", os.path.join(workdir, SESSIONS, str(session)),
                _session_recovery(workdir, session)):
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
  with _reading(f"session {session}", os.path.join(workdir, SESSIONS, str(session)),
                _session_recovery(workdir, session)):
    out = mngr.restore(session, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
  mngr.close()
  return out["meta"]


def _has_bank(workdir: str, session: int) -> bool:
  """False for a session saved with an empty context bank (see save_session)."""
  return paths.isdir(os.path.join(workdir, SESSIONS, str(session), "bank"))


def restore_bank(workdir: str, session: int) -> Dict[str, Any]:
  """Reads only the context bank of sessions/<session>/ (not its delta or optimizer)."""
  mngr = _manager(os.path.join(workdir, SESSIONS))
  if session not in mngr.all_steps():
    raise CheckpointError(
        f"no session {session} in {workdir}/{SESSIONS} (have {list(mngr.all_steps())})")
  if not _has_bank(workdir, session):
    mngr.close()
    return {}
  with _reading(f"session {session}", os.path.join(workdir, SESSIONS, str(session)),
                _session_recovery(workdir, session)):
    out = mngr.restore(session, args=ocp.args.Composite(bank=ocp.args.StandardRestore()))
  mngr.close()
  return out["bank"]


def save_progress(workdir: str, step: int, state, meta: Dict[str, Any], keep: int) -> None:
  """Writes progress/<step>/ (the in-session TrainState), keeping the newest `keep`."""
  mngr = _manager(os.path.join(workdir, PROGRESS), max_to_keep=keep)
  with _writing(f"the progress of step {step}", os.path.join(workdir, PROGRESS, str(step)),
                "the finished sessions and the earlier progress checkpoints"):
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave(meta)), force=True)
    mngr.wait_until_finished()
  mngr.close()


def _restore_latest_progress(workdir: str, **items) -> Optional[Dict[str, Any]]:
  path = os.path.join(workdir, PROGRESS)
  if not paths.isdir(path):
    return None
  mngr = _manager(path)
  step = mngr.latest_step()
  out = None
  if step is not None:
    with _reading(f"the progress checkpoint of step {step}", os.path.join(path, str(step)),
                  "To recover, move it out of the run ("
                  f"{paths.move_command(path, os.path.join(workdir, 'damaged_progress'))}) "
                  "and run again with "
                  "--resume: the interrupted session restarts from its first step."):
      out = dict(mngr.restore(
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
  if jax.process_index() == 0 and paths.isdir(path):
    paths.rmtree(path)
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
  """Process 0 writes run metadata, atomically (`paths.write_text`): readers never see
  half a file."""
  if jax.process_index() != 0:
    return
  with _writing(os.path.basename(path), path, "every file written before"):
    paths.write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def read_json(path: str, what: str) -> Any:
  """A run's JSON file (config.json, ...); a damaged one is named, never guessed at."""
  with _reading(what, path, f"Restore {os.path.basename(path)} from a copy, or start a new "
                "--workdir."):
    return json.loads(paths.read_text(path))
