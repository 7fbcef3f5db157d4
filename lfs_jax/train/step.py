"""Train state, optimizer and the one pure `train_step`, jitted in one place."""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from lfs_jax.train import losses


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # int32 scalar, optimiser steps taken this session
  trainable: Any             # {"unet": selected leaves, "tokens": [n_new, D]}
  opt_state: Any


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """AdamW with Custom Diffusion's defaults: lr 1e-5 x batch, wd 1e-2, clip 1.0."""
  lr = train_cfg.learning_rate * (train_cfg.batch_size if train_cfg.scale_lr else 1)
  return optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip),
      optax.adamw(lr, b1=train_cfg.adam_b1, b2=train_cfg.adam_b2, eps=train_cfg.adam_eps,
                  weight_decay=train_cfg.weight_decay))


def init_state(trainable, optimizer) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                    opt_state=optimizer.init(trainable))


def train_step(state: TrainState, frozen, teacher, batch: losses.SessionData, schedule,
               rng, *, models: losses.Models, spec: losses.LossSpec,
               optimizer: optax.GradientTransformation, train_tokens: bool):
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
  if not train_tokens:
    grads = {**grads, "tokens": jnp.zeros_like(grads["tokens"])}
  updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  if not train_tokens:  # weight decay would still move them
    trainable = {**trainable, "tokens": state.trainable["tokens"]}
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
  return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp) mesh over the first data*fsdp devices; data=-1 takes all of them."""
  devices = jax.devices() if devices is None else devices
  fsdp = mesh_cfg.fsdp
  data = mesh_cfg.data if mesh_cfg.data > 0 else len(devices) // fsdp
  devices = devices[:data * fsdp]
  if data * fsdp != len(devices) or data < 1:
    raise ValueError(
        f"mesh data={mesh_cfg.data} x fsdp={fsdp} does not fit {len(devices)} devices")
  return jax.sharding.Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))


def jit_train_step(mesh, *, models, spec, optimizer, train_tokens: bool):
  """`train_step` jitted with explicit shardings; state donated.

  Everything the step reads is replicated (a few-shot session's data is small);
  the sampled batch is split over the mesh's data axis inside the step.
  """
  replicated = NamedSharding(mesh, P())
  step = functools.partial(train_step, models=models, spec=spec, optimizer=optimizer,
                           train_tokens=train_tokens)
  return jax.jit(step, in_shardings=replicated, out_shardings=replicated,
                 donate_argnums=(0,))
