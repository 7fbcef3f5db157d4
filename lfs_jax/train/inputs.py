"""Host-side inputs of one session: what its steps read, built once at its start.

`session_inputs` gives the arrays, `host_trees` the frozen, teacher and trainable
parameter trees; train/session.py places both on the mesh.

Photos become VAE latent distributions, captions become token ids, the DFKD
conditions (`kd.conditions`) become text contexts, and the run's token table gets
the session's new rows. Everything is padded to the run's largest session, so every
session of a run has the same shapes and the train step compiles once.
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lfs_jax import concepts as concepts_lib
from lfs_jax import data as data_lib
from lfs_jax.train import kd as kd_lib
from lfs_jax.train import losses


class SessionInputs(NamedTuple):
  """One session's inputs (arrays not yet placed on the mesh)."""
  registry: concepts_lib.Registry  # concepts learnt up to this session
  data: losses.SessionData
  token_table: np.ndarray          # [R, D] earlier concepts' rows, zero rows after them
  new_rows: np.ndarray             # [max_new, D] this session's rows, from the initializer word
  bank: Dict[str, Any]             # "concept<i>" -> {"mean", "logvar"} of this session's photos


def pad(a: np.ndarray, n: int) -> np.ndarray:
  """`a` with zero rows appended up to length n."""
  return np.concatenate([a, np.zeros((n - len(a),) + a.shape[1:], a.dtype)])


def encode_latents(run, images: np.ndarray):
  """uint8 photos [N, R, R, 3] -> (mean, logvar) [N, h, w, c], float32."""
  means, logvars = [], []
  x = data_lib.to_model_range(images)
  for i in range(0, len(x), 8):
    m, lv = run.encode(run.pipe.vae_params, jnp.asarray(x[i:i + 8]))
    means.append(np.asarray(m, np.float32))
    logvars.append(np.asarray(lv, np.float32))
  return np.concatenate(means), np.concatenate(logvars)


def session_inputs(run, session: int, prev_delta) -> SessionInputs:
  """Latents, prompt ids, DFKD conditions and token rows of `session` (padded).

  Args:
    run: the prepare.Run of the run.
    session: the run session number.
    prev_delta: session k-1's delta ({"tokens": [R', D]} is read here).
  """
  cfg, pipe = run.cfg, run.pipe
  registry = run.registry.up_to(session)
  new = registry.in_session(session)
  tokenizer = pipe.tokenizer
  concepts_lib.add_tokens(tokenizer, registry, pipe.text_encoder.config.vocab_size)
  table = np.asarray(pipe.text_encoder_params["text_model"]["embeddings"]
                     ["token_embedding"]["embedding"], np.float32)
  old_rows = np.asarray(prev_delta["tokens"], np.float32)
  n_rows = len(run.registry.tokens) + run.max_new
  token_table = pad(old_rows, n_rows)
  new_rows = pad(concepts_lib.initial_rows(tokenizer, new, table), run.max_new)

  imgs = np.concatenate([run.images[c.name] for c in new])
  owner = sum(([c] * len(run.images[c.name]) for c in new), [])
  mean, logvar = encode_latents(run, imgs)
  max_len = pipe.text_encoder.config.max_position_embeddings
  cues = losses.RESCALE_CUES if cfg.data.rescale_cues else ("",)  # the order losses expects
  prompt_ids = np.stack([
      concepts_lib.tokenize(tokenizer, [cue + t for t in c.training_prompts(
          cfg.concepts.templates) for cue in cues], max_len)
      for c in owner])

  kd_conds = kd_lib.conditions(cfg, registry, session) or [("", False)]
  kd_prompts = [p for p, _ in kd_conds]
  kd_ids = pad(concepts_lib.tokenize(tokenizer, kd_prompts, max_len), run.max_kd)
  kd_context = run.text(pipe.text_encoder_params, jnp.asarray(kd_ids),
                        jnp.asarray(token_table, pipe.text_encoder.dtype))
  data = losses.SessionData(
      latent_mean=jnp.asarray(pad(mean, run.max_images)),
      latent_logvar=jnp.asarray(pad(logvar, run.max_images)),
      prompt_ids=jnp.asarray(pad(prompt_ids, run.max_images)),
      n_images=jnp.asarray(len(imgs), jnp.int32),
      token_offset=jnp.asarray(len(old_rows), jnp.int32),
      kd_context=kd_context, n_kd=jnp.asarray(len(kd_prompts), jnp.int32),
      kd_base=(jnp.asarray(pad(np.asarray([b for _, b in kd_conds]), run.max_kd))
               if run.spec.kd_from_base else None),
      kv_gram=kd_lib.kv_gram(kd_context, len(kd_prompts)) if run.spec.kv_weight else None,
      **(prior_data(run, new, max_len) if run.spec.prior_weight > 0 else {}))
  bank = {f"concept{registry.concepts.index(c) + 1}": {
      "mean": mean[[i for i, o in enumerate(owner) if o is c]],
      "logvar": logvar[[i for i, o in enumerate(owner) if o is c]]} for c in new}
  return SessionInputs(registry, data, token_table, new_rows, bank)


def prior_data(run, new, max_len: int) -> Dict[str, Any]:
  """SessionData's prior_* fields: the class images of this session's classes (each
  with its class prompt, prior.template), as latent distributions padded to run.max_prior."""
  classes = list(dict.fromkeys(c.class_word for c in new))
  images = np.concatenate([run.prior_images[w] for w in classes])
  prompts = [run.cfg.prior.template.format(w) for w in classes
             for _ in range(len(run.prior_images[w]))]
  mean, logvar = encode_latents(run, images)
  ids = concepts_lib.tokenize(run.pipe.tokenizer, prompts, max_len)
  return {"prior_mean": jnp.asarray(pad(mean, run.max_prior)),
          "prior_logvar": jnp.asarray(pad(logvar, run.max_prior)),
          "prior_ids": jnp.asarray(pad(np.asarray(ids, np.int32), run.max_prior)),
          "n_prior": jnp.asarray(len(images), jnp.int32)}


def host_trees(run, prev_delta, inp: SessionInputs):
  """(frozen, teacher, trainable) in host memory, before they are placed on the mesh.

  The teacher (for DFKD and the K/V anchor) is session k-1's delta; with
  kd.from_base also the base's own (`Selection.initial`). With train.train_tokens=False the
  session's token rows are written into the frozen table: the optimizer never sees
  them (frozen by structure, not by zeroed gradients).
  """
  spec = run.spec
  table = inp.token_table
  if not run.cfg.train.train_tokens:
    table = np.array(table)
    offset = int(inp.data.token_offset)
    table[offset:offset + len(inp.new_rows)] = inp.new_rows
  frozen = {"unet": run.selection.frozen(run.pipe.unet_params),
            "text": run.pipe.text_encoder_params, "tokens": table}
  f32 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float32), tree)
  start = f32(prev_delta["unet"])
  teacher = None
  if spec.use_kd or spec.kv_weight > 0:
    teacher = {"unet": start}
    if spec.kd_from_base:
      teacher["base"] = f32(run.selection.initial(run.pipe.unet_params, run.cfg.seed))
  trainable = {"unet": jax.tree.map(np.copy, start)}
  if run.cfg.train.train_tokens:
    trainable["tokens"] = np.asarray(inp.new_rows)
  return frozen, teacher, trainable
