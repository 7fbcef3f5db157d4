"""Data-free knowledge distillation (DFKD) and the K/V anchor: the teacher side of the loss.

Everything that keeps a session from forgetting what the previous one knew lives
here, found by name:

  conditions / prompts   which text conditions a session distils on (kd.prompts,
                         kd.from_base, kd.class_templates), built on the host;
  teacher_trajectory     the teacher's DDIM path from pure noise (kd.mode, kd.steps);
  kd_inputs              one step's distillation points: fresh teacher calls, or
                         picks from the session's cache (kd.cache_size);
  kd_cache               the teacher's targets for a pool of noises, once a session;
  kv_gram / kv_anchor    the exact, data-free anchor on the cross-attention keys
                         and values (kd.kv_weight).

The teacher is the previous session's delta merged into the same frozen base
(`spec.delta.merge`), never a copy of the base. `losses.loss_fn` adds these terms
to the denoising loss; the functions here are pure and take the modules and the
static `losses.LossSpec` as arguments.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import jax
import jax.numpy as jnp

from lfs_jax import delta as delta_lib
from lfs_jax.diffusion import steps as steps_lib
from lfs_jax.errors import ConfigError

PROMPT_KINDS = ("class", "past_classes", "previous", "empty")


def kinds(cfg, field: str) -> List[str]:
  """The kinds of condition a kd.* field lists (validated)."""
  kinds = [s.strip() for s in str(cfg.kd[field]).split(",") if s.strip()]
  bad = [k for k in kinds if k not in PROMPT_KINDS]
  if bad:
    raise ConfigError(f"kd.{field}: unknown kind(s) {bad}; use any of {list(PROMPT_KINDS)}")
  return kinds


def conditions(cfg, registry, session: int) -> List[Tuple[str, bool]]:
  """Session `session`'s DFKD conditions: (prompt, distilled from the base model?)."""
  used = kinds(cfg, "prompts")
  from_base = kinds(cfg, "from_base")
  if "previous" in from_base:
    raise ConfigError("kd.from_base cannot hold 'previous': those prompts name earlier "
                      "concepts, which only the previous session's model has learnt")
  if set(from_base) - set(used):
    raise ConfigError(f"kd.from_base={cfg.kd.from_base!r} names kinds that "
                      f"kd.prompts={cfg.kd.prompts!r} does not use")
  template = cfg.concepts.templates[0]
  class_templates = tuple(cfg.kd.class_templates) or (template,)
  bad = [t for t in class_templates if not isinstance(t, str) or t.count("{}") != 1]
  if bad:
    raise ConfigError(f"kd.class_templates: each needs exactly one '{{}}' for the class "
                      f"word, got {bad}")
  out = []
  for kind, concepts in (("class", registry.in_session(session)),
                         ("past_classes", registry.before(session))):
    if kind in used:  # past_classes: the classes of earlier sessions' concepts, also kept
      words = dict.fromkeys(c.class_word for c in concepts)
      out += [(t.format(w), kind in from_base) for w in words for t in class_templates]
  if "previous" in used:
    out += [(template.format(c.phrase()), False) for c in registry.before(session)]
  if "empty" in used:
    out.append(("", "empty" in from_base))
  return _first_of_each(out)


def _first_of_each(pairs: List[Tuple[str, bool]]) -> List[Tuple[str, bool]]:
  """Drops repeated prompts, keeping each one's first place and flag."""
  seen = {}
  for prompt, flag in pairs:
    seen.setdefault(prompt, flag)
  return list(seen.items())


def prompts(cfg, registry, session: int) -> List[str]:
  return [p for p, _ in conditions(cfg, registry, session)]


def trajectory_timesteps(num_train_timesteps: int, points: int) -> jax.Array:
  """[choice] DFKD points: T-1 (pure noise) then evenly spaced down, e.g. 999,749,499,249."""
  stride = num_train_timesteps // points
  return jnp.asarray([num_train_timesteps - 1 - i * stride for i in range(points)], jnp.int32)


def teacher_trajectory(models, unet_params, schedule, spec,
                       z: jax.Array, context: jax.Array):
  """Runs the teacher from pure noise z along `spec.kd_points` DDIM (eta=0) steps.

  Args:
    unet_params: the full teacher UNet tree.
    z: [K, h, w, c] Gaussian noise (the input at t = T-1).
    context: [K, L, D] text conditions.

  Returns:
    (xs [P, K, h, w, c], ts [P], outputs [P, K, h, w, c]): the points of the path and
    the teacher's predictions there; no gradient flows through them.
  """
  ts = trajectory_timesteps(spec.scheduler.num_train_timesteps, spec.kd_points)
  prev = jnp.concatenate([ts[1:], jnp.asarray([-1], jnp.int32)])

  def body(x, tt):
    t, t_prev = tt
    out = models.unet.apply({"params": unet_params}, x,
                            jnp.full((x.shape[0],), t, jnp.int32), context)
    x_next = steps_lib.ddim_step(schedule, spec.scheduler, out, t, t_prev, x, 0.0,
                                 jnp.zeros_like(x))
    return x_next, (x, out)

  _, (xs, outs) = jax.lax.scan(body, z, (ts, prev))
  return jax.lax.stop_gradient(xs), ts, jax.lax.stop_gradient(outs)


def kd_inputs(teacher, frozen, batch, schedule, rng, *, models, spec):
  """(x, t, context, teacher output) for `spec.kd_batch_size` distillation points."""
  k = spec.kd_batch_size
  k_pick, k_z, k_c, k_p = jax.random.split(rng, 4)
  if spec.kd_cached:
    cache = batch.kd_cache
    j = jax.random.randint(k_pick, (k,), 0, cache["x"].shape[0])
    return cache["x"][j], cache["t"][j], batch.kd_context[cache["cond"][j]], cache["target"][j]
  shape = (k,) + batch.latent_mean.shape[1:]
  z = jax.random.normal(k_z, shape, jnp.float32)
  cond = jax.random.randint(k_c, (k,), 0, batch.n_kd)
  context = batch.kd_context[cond]
  xs, ts, outs = _teachers(teacher, frozen, batch.kd_base, cond, schedule, spec, models,
                           z, context)
  p = jax.random.randint(k_p, (k,), 0, spec.kd_points)
  rows = jnp.arange(k)
  return xs[p, rows], ts[p], context, outs[p, rows]


def _teachers(teacher, frozen, kd_base, cond, schedule, spec, models,
              z: jax.Array, context: jax.Array):
  """teacher_trajectory for conditions `cond`: each from the teacher its condition names.

  Without spec.kd_from_base every condition is the previous session's. With it, the
  conditions flagged in `kd_base` [NC] take the base model's path and predictions
  instead; both teachers run on every row (a second teacher forward per point) and
  each row keeps its own teacher's.
  """
  prev = spec.delta.merge(teacher["unet"], frozen["unet"])
  xs, ts, outs = teacher_trajectory(models, prev, schedule, spec, z, context)
  if not spec.kd_from_base:
    return xs, ts, outs
  base = spec.delta.merge(teacher["base"], frozen["unet"])
  xs_b, _, outs_b = teacher_trajectory(models, base, schedule, spec, z, context)
  pick = kd_base[cond].reshape((1, -1) + (1,) * (z.ndim - 1))
  return jnp.where(pick, xs_b, xs), ts, jnp.where(pick, outs_b, outs)


def kd_cache(teacher, frozen, kd_context, n_kd, schedule, rng, *, size: int,
             latent_shape: Tuple[int, int, int], models,
             spec, kd_base=None) -> Dict[str, jax.Array]:
  """Teacher targets for `size` noises, all trajectory points: computed once a session.

  The teacher is frozen for the whole session, so its prediction at a given
  (x, t, condition) never changes; caching trades memory (size x points latents)
  for the teacher forwards of every step.

  Returns:
    {"x": [size*P, h, w, c], "t": [size*P], "cond": [size*P], "target": [size*P, h, w, c]}.
  """
  k_z, k_c = jax.random.split(rng)
  chunk = spec.kd_batch_size
  n_chunks = -(-size // chunk)
  shape = (n_chunks, chunk) + tuple(latent_shape)
  z = jax.random.normal(k_z, shape, jnp.float32)
  cond = jax.random.randint(k_c, (n_chunks, chunk), 0, n_kd)

  def one(args):
    zc, cc = args
    xs, ts, outs = _teachers(teacher, frozen, kd_base, cc, schedule, spec, models, zc,
                             kd_context[cc])
    return xs, jnp.broadcast_to(ts[:, None], (ts.shape[0], chunk)), outs, jnp.broadcast_to(
        cc[None], (ts.shape[0], chunk))

  xs, ts, outs, conds = jax.lax.map(one, (z, cond))
  flat = lambda a: a.reshape((-1,) + a.shape[3:])[: size * spec.kd_points]
  return {"x": flat(xs), "t": flat(ts), "cond": flat(conds), "target": flat(outs)}


def kv_gram(contexts: jax.Array, n: int) -> jax.Array:
  """[D, D] float32 second moment E[c c^T] over every token of contexts[:n] ([NC, L, D])."""
  x = jnp.asarray(contexts[:n], jnp.float32).reshape(-1, contexts.shape[-1])
  return x.T @ x / x.shape[0]


def kv_anchor(student, teacher, gram: jax.Array,
              selection: delta_lib.Selection = delta_lib.Leaves("crossattn_kv")) -> jax.Array:
  """[choice] How far the trained keys and values have moved on the anchor contexts.

  Only the cross-attention keys and values (attn2 to_k / to_v, c -> c @ W) read the
  text, and they are all a class prompt's condition reaches: a class prompt's
  samples change only as far as c @ W does on its context tokens c. For each trained
  attn2 to_k / to_v kernel W against the teacher's W0 (D = W - W0), the mean over the
  anchor tokens of |c @ D|^2 per output channel is tr(D^T G D) / width with G =
  E[c c^T] (`kv_gram`); the result is the mean over those kernels. Exact and
  data-free (no UNet call): a distillation of the keys and values on the DFKD
  conditions, where DFKD proper matches the UNet's output on noise.

  `selection.kernels` says what each delta makes of a kernel: the kernel itself for
  a leaf selection (any selection's leaves do: their kernels' difference is D), the
  product (alpha / r) A @ B for LoRA, so D = scale (A B - A0 B0) there.
  """
  is_kv = delta_lib.selection_predicate("crossattn_kv")
  s_k, t_k = selection.kernels(student), selection.kernels(teacher)
  terms = []
  for path, w in s_k.items():
    if is_kv("/".join(path)):
      d = w.astype(jnp.float32) - t_k[path].astype(jnp.float32)
      terms.append(jnp.sum(d * (gram @ d)) / d.shape[1])
  if not terms:
    raise ValueError("kv_anchor: the trained UNet leaves hold no attn2 to_k/to_v kernel")
  return jnp.mean(jnp.stack(terms))
