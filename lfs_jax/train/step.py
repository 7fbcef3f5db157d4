"""Train state, optimizer and the one pure `train_step`, jitted in one place."""

from __future__ import annotations

import contextlib
import functools
import gc
import time
from typing import Any, NamedTuple, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import optax

from lfs_jax import parallel
from lfs_jax.train import losses
from lfs_jax.train import programs

# The mesh moved to lfs_jax.parallel; kept here for callers of the old name.
make_mesh = parallel.make_mesh


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # int32 scalar, optimiser steps taken this session
  trainable: Any             # {"unet": the delta, "tokens": [n_new, D] (if train.train_tokens)}
  opt_state: Any


def make_optimizer(train_cfg, regularised: bool = False) -> optax.GradientTransformation:
  """AdamW with Custom Diffusion's defaults: lr 1e-5 x batch, wd 1e-2, clip 1.0.

  `regularised`: a regulariser adds rows to every batch (DFKD), so the rate is also
  multiplied by train.regulariser_lr_scale (Custom Diffusion doubles it). The
  modifier tokens' embedding rows train at that rate x train.token_lr_scale.
  train.lr_schedule="cosine" lowers the rate over the session's train.steps, from the
  full rate at the first step along half a cosine towards 0.
  """
  lr = train_cfg.learning_rate * (train_cfg.batch_size if train_cfg.scale_lr else 1)
  lr *= train_cfg.regulariser_lr_scale if regularised else 1.0
  parts = [optax.clip_by_global_norm(train_cfg.grad_clip),
           leafwise(optax.adamw(lr, b1=train_cfg.adam_b1, b2=train_cfg.adam_b2,
                                eps=train_cfg.adam_eps, weight_decay=train_cfg.weight_decay))]
  if train_cfg.token_lr_scale != 1.0:
    # AdamW's update (Adam step and decoupled decay) is linear in lr, so scaling the
    # tokens' final update is AdamW at lr x scale on them; at 1.0 the chain (and its
    # state, which checkpoints hold) stays as it always was.
    parts.append(optax.masked(optax.scale(train_cfg.token_lr_scale), _tokens_only))
  if train_cfg.lr_schedule == "cosine":
    # The same linearity: the final update x the schedule's factor is AdamW at the
    # scheduled rate. Its own step count sits in the state (resumed with it); "constant"
    # adds nothing, so the chain and its checkpoints stay as they always were.
    parts.append(optax.scale_by_schedule(
        optax.cosine_decay_schedule(1.0, max(int(train_cfg.steps), 1))))
  return optax.chain(*parts)


def leafwise(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` (a per-leaf transformation such as AdamW) applied leaf by leaf, traced once
  per distinct leaf shape.

  Same state (`inner.init`, so checkpoints read as before) and the same arithmetic:
  each leaf goes through `inner.update` on its own, as a jitted call that JAX traces,
  and lowers, once for every leaf of that shape (the SD-1.5 K/V delta: 32 leaves, 3
  shapes) instead of once per leaf (docs/benchmarks.md, "Restart time"). `inner` must
  treat leaves independently; its state is split where a subtree has the parameters'
  structure (moments) and shared elsewhere (the step count).
  """
  leaf_update = jax.jit(inner.update)

  def update(updates, state, params=None):
    treedef = jax.tree.structure(updates)
    if treedef.num_leaves < 2 or params is None:
      return inner.update(updates, state, params)
    is_tree = lambda x: jax.tree.structure(x) == treedef
    nodes, outer = jax.tree.flatten(state, is_leaf=is_tree)
    per_param = [is_tree(n) for n in nodes]
    nodes = [treedef.flatten_up_to(n) if p else n for n, p in zip(nodes, per_param)]
    outs, states = [], []
    for i, (u, w) in enumerate(zip(treedef.flatten_up_to(updates),
                                   treedef.flatten_up_to(params))):
      leaf_state = outer.unflatten([n[i] if p else n for n, p in zip(nodes, per_param)])
      out, new = leaf_update(u, leaf_state, w)
      outs.append(out)
      states.append(outer.flatten_up_to(new))
    merged = [treedef.unflatten([s[j] for s in states]) if p else states[0][j]
              for j, p in enumerate(per_param)]
    return treedef.unflatten(outs), outer.unflatten(merged)

  return optax.GradientTransformation(inner.init, update)


def _tokens_only(tree):
  """The mask of the trainable tree's "tokens" subtree (the modifier tokens' rows)."""
  return {k: jax.tree.map(lambda _: k == "tokens", v) for k, v in tree.items()}


def init_state(trainable, optimizer) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                    opt_state=optimizer.init(trainable))


def train_step(state: TrainState, frozen, teacher, batch: losses.SessionData, schedule,
               rng, *, models: losses.Models, spec: losses.LossSpec,
               optimizer: optax.GradientTransformation):
  """One optimiser step. Pure: same inputs, same outputs.

  Args:
    state: the trainable delta and its optimizer state (donated).
    frozen: the frozen base trees (see losses.loss_fn).
    teacher: the previous session's selected leaves, or None.
    batch: the session's data (latents, prompt ids, DFKD conditions, cache).
    schedule: the noise schedule arrays.
    rng: the run's training key; folded with the step here.

  Returns:
    (new state, metrics) with metrics = loss, denoise, kd (if any), grad_norm.
  """
  rng = jax.random.fold_in(rng, state.step)
  grad_fn = jax.value_and_grad(losses.loss_fn, has_aux=True)
  (loss, aux), grads = grad_fn(state.trainable, frozen, teacher, batch, schedule, rng,
                               models=models, spec=spec)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
  return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics


def jit_train_step(mesh, frozen, *, frozen_mode: str, models, spec, optimizer,
                   state=None, teacher=None, trainable_mode: str = "replicated",
                   fsdp_min_size: int):
  """`train_step` jitted with explicit in/out shardings; the state buffers are donated.

  Args:
    mesh: the (data, fsdp) mesh.
    frozen: the frozen trees (arrays or ShapeDtypeStructs): only their structure
      and shapes are read, to lay them out by `frozen_mode` (parallel.frozen_shardings).
    frozen_mode: mesh.frozen, "replicated" or "fsdp".
    state, teacher: the train state and teacher trees (arrays or ShapeDtypeStructs;
      teacher None without DFKD), read for their structure when trainable_mode
      (mesh.trainable) is "fsdp".

  Returns:
    (step_fn, shardings): the jitted step and its parallel.TrainShardings, which the
    caller uses to place the arguments (`parallel.put`) before the first call.
  """
  shardings = parallel.train_shardings(mesh, frozen, frozen_mode, state, teacher,
                                       trainable_mode, min_size=fsdp_min_size)
  step = functools.partial(train_step, models=models, spec=spec, optimizer=optimizer)
  s = shardings
  fn = jax.jit(step, in_shardings=(s.state, s.frozen, s.teacher, s.data, s.schedule, s.rng),
               out_shardings=(s.state, s.metrics), donate_argnums=(0,))
  return fn, shardings


_CACHE_HIT = "/jax/compilation_cache/cache_hits"

# XLA options of the train step on a CPU (no effect on a GPU or TPU, which never get them).
# YNNPACK's fusions off: XLA:CPU (jaxlib 0.10) finds each YNN fusion's instruction by
# scanning the whole module when it loads an executable, so reading the SD-1.5 step back
# from the persistent cache cost ~2,000 fusions x the module's ~70,000 instructions
# (docs/benchmarks.md, "Restart time"). Without them its dots and reductions go to XLA's
# own kernels; the tiny step runs no slower (the same page).
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def xla_options(mesh, extra: Optional[dict] = None) -> Optional[dict]:
  """The train step's XLA options on `mesh`: CPU_OPTIONS on a CPU, then `extra`."""
  on_cpu = mesh.devices.flat[0].platform == "cpu"
  options = {**(CPU_OPTIONS if on_cpu else {}), **(extra or {})}
  return options or None


@contextlib.contextmanager
def gc_paused():
  """Python's cyclic garbage collector off inside the block, as it was after.

  Tracing and lowering the SD-1.5 step allocates millions of short-lived objects; the
  collector's passes over them (and over everything the process already holds) were
  ~10 % of the tracing time (docs/benchmarks.md, "Restart time"). What they would
  have freed is freed by the collector's next pass after the block.
  """
  enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if enabled:
      gc.enable()


class CompileInfo(NamedTuple):
  """How `compile_step` got the executable."""
  trace_s: float      # tracing + lowering, or reading the stored program
  compile_s: float    # XLA compile (or the persistent cache's copy)
  program: str        # "traced", "traced, stored", "stored" (read back) or why not stored


def compile_step(fn, mesh, *args, store: Optional[programs.Store] = None,
                 compiler_options: Optional[dict] = None
                 ) -> Tuple[jax.stages.Compiled, float, bool, CompileInfo]:
  """Compiles the jitted step ahead of time for exactly these (placed) arguments.

  The executable accepts only these shapes, dtypes and shardings: a session that
  differed would fail loudly instead of silently compiling the step again (every
  session is padded to the run's maxima, so a run compiles once). The step is
  traced under `mesh` (`jax.set_mesh`), which kernels without a partitioning rule
  of their own (splash attention) read to split their work over it.

  With a `store` (train/programs.py) the traced program is kept on disk by
  jax.export and read back by a later start whose key matches, which then skips
  tracing; the program compiled is the stored one either way. XLA gets
  `xla_options(mesh, compiler_options)` (`compiler_options`: e.g. the benchmark's
  CPU optimization level).

  Returns:
    (executable, seconds spent lowering and compiling, whether XLA's persistent
    compilation cache supplied the executable, CompileInfo).
  """
  hits = []

  def listener(event, **_):
    if event == _CACHE_HIT:
      hits.append(event)

  jax.monitoring.register_event_listener(listener)
  try:
    t0 = time.perf_counter()
    with gc_paused():
      use, program = _stored_program(fn, mesh, args, store)
      with jax.set_mesh(mesh):
        try:
          lowered = use.lower(*args)
        except Exception as e:  # pylint: disable=broad-except
          if program != "stored":
            raise
          print(f"the stored train step program does not fit ({type(e).__name__}: "
                f"{str(e)[:200]}); tracing the step again")
          use, program = _stored_program(fn, mesh, args, store, reuse=False)
          lowered = use.lower(*args)
    t1 = time.perf_counter()
    compiled = _compile(lowered, xla_options(mesh, compiler_options), compiler_options)
    t2 = time.perf_counter()
  finally:
    jax.monitoring.unregister_event_listener(listener)
  return compiled, t2 - t0, bool(hits), CompileInfo(t1 - t0, t2 - t1, program)


def _compile(lowered, options, fallback):
  """`lowered.compile(options)`; `fallback` where this jaxlib lacks an option of ours."""
  try:
    return lowered.compile(options)
  except jax.errors.JaxRuntimeError as e:
    if options == fallback or "No such compile option" not in str(e):
      raise
    return lowered.compile(fallback)


def _stored_program(fn, mesh, args, store, reuse: bool = True):
  """(the jitted function to lower, how the program was had): see compile_step."""
  if store is None:
    return fn, "traced"
  description = programs.describe(store.static, args, mesh)
  key = programs.key(description)
  exported = programs.load(store.folder, key) if reuse else None
  if exported is not None:
    return programs.as_jit(exported, mesh, args), "stored"
  try:
    blob = programs.export_step(fn, mesh, args)
  except Exception as e:  # pylint: disable=broad-except  # e.g. a kernel export refuses
    return fn, f"traced (not storable: {type(e).__name__}: {str(e)[:200]})"
  how = "traced, stored"
  try:
    programs.save(store.folder, key, blob, description)
  except OSError as e:
    how = f"traced (not stored: {e})"
  return programs.as_jit(jax.export.deserialize(blob), mesh, args), how
