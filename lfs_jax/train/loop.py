"""The inner loop of a session: steps, metric windows, progress saves and restores, SIGTERM.

`steps` calls the compiled step from the state's step to `train.steps`; metrics come
to the host every `train.log_every` steps (a non-finite value raises, naming the
window); progress is saved every `train.progress_every` steps and when SIGTERM asks
to stop (also inside a validation grid), once per step whoever asks.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import jax
import numpy as np
import tqdm

from lfs_jax import checkpoint
from lfs_jax import parallel
from lfs_jax.train.tensorboard import SummaryWriter


class Preempted(Exception):
  """SIGTERM arrived; the session's progress was saved."""


def stop_if_asked(stop, where: str) -> None:
  """Raises Preempted if SIGTERM came (to any process) since the last saved state."""
  if parallel.agree_any(stop["flag"]):
    raise Preempted(f"{where}; nothing new to save")


def should_stop(stop, done: int, every: int) -> bool:
  """Whether SIGTERM asks to stop after step `done`, decided alike on every process.

  One process checks its flag after every step; several agree (any flag set) at
  the metric syncs only (every `train.log_every` steps), so all save together.
  """
  if jax.process_count() == 1:
    return stop["flag"]
  return done % every == 0 and parallel.agree_any(stop["flag"])


def log(pending, done: int, session: int, writer) -> Dict[str, float]:
  """Brings a window of step metrics to the host; raises on a non-finite value."""
  host = parallel.to_host(pending)
  first = done - len(host) + 1
  for i, m in enumerate(host):
    bad = [k for k, v in m.items() if not math.isfinite(float(v))]
    if bad:
      raise FloatingPointError(
          f"session {session}: non-finite {bad} between steps {first} and {done}")
    if writer:
      for k, v in m.items():
        writer.scalar(f"session_{session}/{k}", float(v), first + i)
  if writer:
    writer.flush()
  return {k: float(v) for k, v in host[-1].items()}


def steps(run, su, state, session: int, stop, *, writer: Optional[SummaryWriter] = None,
          validate: Optional[Callable] = None, first_step: Optional[Callable] = None):
  """Runs session `session` from `state.step` to `train.steps`.

  Args:
    run: the prepare.Run.
    su: the session's session.SessionSetup (compiled step and its placed arguments).
    state: the train state to start from (fresh, or restored by --resume).
    stop: {"flag": bool}, set by the SIGTERM handler.
    writer: the run's TensorBoard writer (process 0; None elsewhere).
    validate: `validate(state, step) -> stopped`, called after every step but the
      last and at a resumed start (validation grids; train/validation.py); it only
      reads the state. True: SIGTERM stopped it, so progress is saved at this step.
    first_step: called once the first step has finished (its outputs ready), or None.

  Returns:
    (final state, the last metric window's values).

  Raises:
    Preempted: SIGTERM asked to stop; progress was saved at the step reached.
  """
  cfg = run.cfg
  first, total = int(state.step), cfg.train.steps
  # A resumed start may be a step whose grid a SIGTERM stopped: progress is saved there.
  if validate is not None and 0 < first < total and validate(state, first):
    raise Preempted(f"session {session} stopped at step {first}; progress saved")
  bar = tqdm.tqdm(total=total, initial=first,
                  desc=f"session {session}/{run.first + len(run.sessions) - 1}",
                  unit="step", disable=jax.process_index() != 0, dynamic_ncols=True)
  last: Dict[str, float] = {}
  pending = []
  for s in range(first, total):
    state, metrics = su.step_fn(state, su.frozen, su.teacher, su.data, run.schedule,
                                su.train_key)
    pending.append(metrics)
    if first_step is not None and s == first:
      jax.block_until_ready(metrics)
      first_step()
    done = s + 1
    if done % cfg.train.log_every == 0 or done == total:
      last = log(pending, done, session, writer)
      pending = []
      bar.set_postfix({k: f"{v:.4g}" for k, v in last.items() if k != "grad_norm"})
    bar.update(1)
    if done == total:
      continue  # the session save keeps this step
    stopped = validate is not None and validate(state, done)
    stopping = stopped or should_stop(stop, done, cfg.train.log_every)
    # One save a step, whoever asks: the progress cadence and SIGTERM can name the same step.
    if stopping or (cfg.train.progress_every and done % cfg.train.progress_every == 0):
      checkpoint.save_progress(run.workdir, done, state, {"session": session},
                               cfg.checkpoint.keep_progress)
    if stopping:
      bar.close()
      raise Preempted(f"session {session} stopped at step {done}; progress saved")
  bar.close()
  return state, last


def latest_progress(run, su, state):
  """The newest progress checkpoint restored into `state`'s layout, or None.

  Before token rows were frozen by structure, a train.train_tokens=False run kept
  them in its TrainState (with zeroed gradients): such a checkpoint is read in that
  layout and the rows dropped, since the UNet delta's Adam moments never depend on
  them. Anything else that does not fit is a damaged checkpoint (CheckpointError).
  """
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  try:
    return checkpoint.latest_progress(run.workdir, target)
  except checkpoint.CheckpointError:
    if run.cfg.train.train_tokens:
      raise
    rows = np.zeros(np.shape(su.new_rows), np.float32)
    old = jax.tree.map(np.asarray, parallel.to_host(state))
    old = old.replace(trainable={**old.trainable, "tokens": rows},
                      opt_state=_with_token_rows(old.opt_state, rows))
    got = checkpoint.latest_progress(run.workdir, old)  # still no fit: damaged
    restored = got["state"]
    restored = restored.replace(
        trainable={"unet": restored.trainable["unet"]},
        opt_state=_with_token_rows(restored.opt_state, None))
    return {**got, "state": parallel.put(restored, su.trainer.shardings.state)}


def _with_token_rows(tree, rows):
  """Every {"unet": ...} node of an optax state with a "tokens" entry (rows) or without (None)."""
  if isinstance(tree, dict):
    out = {k: _with_token_rows(v, rows) for k, v in tree.items() if k != "tokens"}
    if rows is not None and "unet" in tree:
      out["tokens"] = rows
    return out
  if isinstance(tree, tuple):
    items = [_with_token_rows(v, rows) for v in tree]
    return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
  return tree
