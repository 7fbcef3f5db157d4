"""Trains the mini world's base model: a small Stable Diffusion, CPU, minutes.

  python -m lfs_jax.mini.train_base --out=lfs_jax/assets/mini_base

Three parts, in Stable Diffusion's shape so that every loader and session of the
project runs on it unchanged:
  - text encoder: a 2-layer CLIP text transformer over the real CLIP vocabulary.
    By default frozen at its random initialisation (the UNet's cross-attention learns
    to read it); `--train_text_encoder` trains its layers with the UNet (the token
    rows stay frozen), which the shipped base needed before a caption could name a
    design (docs/mini_world_history.md, "A base trained from scratch on
    pattern-naming captions");
  - VAE (AutoencoderKL, 32 px -> 16x16x4 latents; `--vae_latent_channels=8` gives
    16x16x8, the UNet's input and output following), trained first, in JAX or with
    `--vae_backend=torch` in PyTorch;
  - UNet (UNet2DConditionModel), v-prediction on SD's schedule rescaled to zero
    terminal SNR, half of each batch at high noise (where only the caption says
    what to draw), captions that drop the colour or the background at random (and
    10% empty captions, for classifier-free guidance); its EMA weights are shipped.
    `--backend=torch` runs this loop in PyTorch (2.5x faster on a CPU);
    `--unet_from` continues from a folder's UNet (and its text encoder);
    `--unet_arch` picks another shape (cross16: attention at 16x16 too, grafted from
    `--unet_from`; wide: blocks twice as wide, from scratch).
Both see the same renders: solid shapes, and (30%, `--pattern_share`) shapes with a
pattern in a second colour. Without `--name_patterns` the caption never names it, so
the base can draw patterns but no prompt can ask for a particular one; with it, half
of a patterned shape's captions name the pattern ("a blue star with yellow stripes";
`--pattern_words=distinct`: "with gold stripes", words nothing else uses), so a
concept's design is reachable from words. The shipped base was trained from scratch
that way (`--name_patterns --pattern_words=distinct --train_text_encoder
--pattern_share=0.5`), on the VAE of the base before it; TRAINING.json records every
command in the chain.
The folder is written in diffusers' layout (safetensors), with TRAINING.json: the
command, the wall time per part and the final losses.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lfs_jax import concepts as concepts_lib
from lfs_jax.diffusion import schedule as schedule_lib
from lfs_jax import console
from lfs_jax import mini
from lfs_jax.mini import world
from lfs_jax.mini.recipe import HIGH_T, draw_batch, draw_timesteps, lr_schedule  # pylint: disable=unused-import
from lfs_jax import tiny
from lfs_jax.models import clip, unet, vae
from lfs_jax.weights import loaders

# The tiny model's text encoder (2 layers, width 32, the full CLIP vocabulary).
TEXT = tiny.TEXT
# Share of the base's training renders that carry a pattern (never captioned unless
# --name_patterns); the base shipped until 2026-12-03 was trained at this default, the
# one shipped since at --pattern_share=0.5.
TRAIN_PATTERN_SHARE = 0.3
VAE = {
    "_class_name": "AutoencoderKL",
    "block_out_channels": [16, 32],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "mid_block_add_attention": False,  # self-attention at 16x16 would triple the cost
    "latent_channels": 4,
    "in_channels": 3,
    "out_channels": 3,
    "sample_size": 32,
    "scaling_factor": 1.0,   # replaced by 1/std of the trained latents
}
UNET = {
    "_class_name": "UNet2DConditionModel",
    "block_out_channels": [32, 64],
    # Attention (self and cross) at 8x8 and in the mid block only: at 16x16 it would
    # more than double a CPU step.
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "attention_head_dim": 4,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "in_channels": 4,
    "out_channels": 4,
    "sample_size": 16,
}
# The same UNet with attention (self and cross) at the 16x16 level too, as Stable
# Diffusion has at every level but its lowest: at 8x8 one latent cell is 4x4 pixels,
# a whole stripe period, so the cross-attention K/V that Custom Diffusion trains
# cannot place a stripe. `--unet_arch=cross16 --unet_from=BASE` grafts BASE onto it.
UNET_CROSS16 = dict(UNET, down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
# The base UNet twice as wide (blocks 64/128, 3.9 M parameters against 985 k): PyTorch's
# training step at batch 32 takes 296 ms on 2 cores against the base's 122 (UNet alone,
# fp32). Trained from scratch; a base's weights cannot be grafted onto it.
UNET_WIDE = dict(UNET, block_out_channels=[64, 128])
UNET_ARCHS = {"base": UNET, "cross16": UNET_CROSS16, "wide": UNET_WIDE}
# The text encoder config fields that set its shape (--text_width changes them).
_TEXT_SHAPE = ("hidden_size", "intermediate_size", "projection_dim", "num_attention_heads",
               "num_hidden_layers")
# Stable Diffusion's schedule, with SD 2.x's v-prediction: a model this small,
# trained this briefly, learned to denoise with epsilon-prediction but could not
# generate from pure noise (at high noise an epsilon error is amplified ~14x in the
# predicted image; v is the image there). Rescaled to zero terminal SNR, sampled
# with trailing timesteps (arXiv 2305.08891): with SD's own schedule the last step
# still holds sqrt(0.0047) = 7% of the image, enough for these big shapes to be read
# from the "noise" in training, so the model learned to take the shape from its
# noise and ignore the caption's shape word (its samples' shapes followed the seed).
SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
}
def _log(msg: str) -> None:
  print(msg, flush=True)


def graft_unet(source: dict, target_config: dict, seed: int) -> dict:
  """`source` (a Flax UNet tree) placed into the UNet of `target_config`, same function.

  Every source weight lands at its own path (diffusers' names do not move when a
  block gains attention) with its own shape, or ValueError names the first that
  cannot; every target weight the source lacks must belong to a new attention block
  (`.../attentions_k/...`). Those are drawn like the JAX loop's fresh init
  (`tiny.random_tree`, deterministic in `seed`) and their `proj_out` is zeroed, so
  each new block returns its input (Transformer2D adds proj_out's output to its
  residual) and the grafted UNet computes exactly what `source` did.
  """
  from lfs_jax.weights import convert  # pylint: disable=g-import-not-at-top

  abstract = unet.abstract_params(unet.UNetConfig.from_diffusers(target_config))
  want, have = convert.flatten(abstract), convert.flatten(source)
  for path, leaf in sorted(have.items()):
    if path not in want:
      raise ValueError(f"graft: source weight {'/'.join(path)} has no place in the target "
                       "UNet (the target must keep every block of the source)")
    if tuple(leaf.shape) != tuple(want[path].shape):
      raise ValueError(f"graft: source weight {'/'.join(path)} has shape {tuple(leaf.shape)}, "
                       f"the target's is {tuple(want[path].shape)}")
  new = sorted(p for p in want if p not in have)
  for path in new:
    if not any(part.startswith("attentions_") for part in path):
      raise ValueError(f"graft: target weight {'/'.join(path)} is new but not part of an "
                       "attention block; only attention blocks can be added without "
                       "changing the UNet's output")
  fresh = convert.flatten(tiny.random_tree(abstract, [seed, 11]))
  out = {}
  for path in want:
    if path in have:
      out[path] = jnp.asarray(have[path])
    elif "proj_out" in path:
      out[path] = jnp.zeros(want[path].shape, want[path].dtype)
    else:
      out[path] = fresh[path]
  return convert.unflatten(out)


def to_unit(images: np.ndarray) -> np.ndarray:
  """uint8 [N, H, W, 3] -> float32 in [-1, 1]."""
  return images.astype(np.float32) / 127.5 - 1.0


def caption_variants(scene: world.Scene, name_patterns: bool = False,
                     pattern_words: str = "plain") -> List[str]:
  """The captions a training image is shown with (the full one, and shorter ones).

  Each attribute (colour, background and, with `name_patterns`, the pattern with its
  second colour) is named in half of them; without `name_patterns` a pattern is
  never named. A solid scene's pattern-named variants equal the others, so every
  image has the same number of variants and each attribute is dropped as often.
  """
  named = (True, False) if name_patterns else (False,)
  return [world.caption(scene, colour=c, background=b, pattern=p, pattern_words=pattern_words)
          for p in named for b in (True, False) for c in (True, False)]


def train_vae(images: np.ndarray, steps: int, batch: int, seed: int, kl_weight: float,
              vae_config: dict = VAE):
  cfg = vae.VAEConfig.from_diffusers(vae_config)
  model = vae.AutoencoderKL(cfg)
  params = tiny.random_tree(vae.abstract_params(cfg), [seed, 1])
  opt = optax.adam(optax.cosine_decay_schedule(2e-3, steps, 0.05))
  opt_state = opt.init(params)

  def loss_fn(p, x, key):
    mean, logvar = model.apply({"params": p}, x, method="encode")
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    rec = model.apply({"params": p}, z, method="decode")
    mse = jnp.mean((rec - x) ** 2)
    kl = 0.5 * jnp.mean(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar)
    return mse + kl_weight * kl, (mse, kl)

  @jax.jit
  def step(p, s, x, key):
    (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x, key)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, aux

  rng = np.random.default_rng([seed, 2])
  key = jax.random.PRNGKey(seed)
  x_all = to_unit(images)
  t0, mse = time.time(), None
  for i in range(steps):
    idx = rng.integers(0, len(x_all), batch)
    params, opt_state, (mse, kl) = step(params, opt_state, x_all[idx], jax.random.fold_in(key, i))
    if (i + 1) % max(1, steps // 10) == 0:
      _log(f"vae step {i + 1}/{steps}  mse {float(mse):.5f}  kl {float(kl):.3f}  "
           f"{time.time() - t0:.0f}s")
  return model, params, float(mse)


def encode_latents(model, params, images: np.ndarray, batch: int = 256) -> np.ndarray:
  fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode")[0])
  x = to_unit(images)
  return np.concatenate([np.asarray(fn(params, x[i:i + batch]))
                         for i in range(0, len(x), batch)])


def encode_captions(text_model, text_params, tokenizer, captions: List[str]) -> np.ndarray:
  ids = concepts_lib.tokenize(tokenizer, captions, 77)
  fn = jax.jit(lambda p, i: text_model.apply({"params": p}, i))
  return np.concatenate([np.asarray(fn(text_params, ids[i:i + 128]))
                         for i in range(0, len(ids), 128)])


def new_paths(grafted: dict, source: dict) -> List[str]:
  """The '/'-joined paths of `grafted` that `source` lacks (the blocks a graft added)."""
  from lfs_jax.weights import convert  # pylint: disable=g-import-not-at-top

  have = convert.flatten(source)
  return sorted("/".join(p) for p in convert.flatten(grafted) if p not in have)


def train_unet(latents: np.ndarray, caption_index: np.ndarray, text_table: np.ndarray,
               empty_index: int, steps: int, batch: int, seed: int, lr: float,
               ema_decay: float, drop: float, high_share: float = 0.0, init=None,
               unet_config: dict = UNET, fast=(), fast_scale: float = 1.0):
  """latents [N, h, w, 4] (scaled); caption_index [N, V] rows of text_table per image.

  `fast`: '/'-joined parameter paths trained at `fast_scale` x the rate (a graft's
  new blocks)."""
  cfg = unet.UNetConfig.from_diffusers(unet_config)
  model = unet.UNet2DConditionModel(cfg)
  params = init if init is not None else tiny.random_tree(unet.abstract_params(cfg), [seed, 3])
  _log(f"unet: {unet.num_params(params):,} parameters")
  noise_sched = schedule_lib.make_schedule(schedule_lib.SchedulerConfig.from_diffusers(SCHEDULER))
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      lr_schedule(lr, steps), weight_decay=1e-4))
  opt_state = opt.init(params)
  fast = set(fast)
  scale = jax.tree_util.tree_map_with_path(
      lambda path, _: fast_scale if "/".join(k.key for k in path) in fast else 1.0, params)
  ema = jax.tree.map(jnp.zeros_like, params)
  table = jnp.asarray(text_table)

  def loss_fn(p, z0, ctx, key):
    k1, k2 = jax.random.split(key)
    u = jax.random.uniform(k1, (2, z0.shape[0]))
    t = draw_timesteps(u[0], u[1], high_share)
    noise = jax.random.normal(k2, z0.shape)
    zt = schedule_lib.add_noise(noise_sched, z0, noise, t)
    out = model.apply({"params": p}, zt, t, ctx)
    target = schedule_lib.training_target(noise_sched, SCHEDULER["prediction_type"], z0,
                                          noise, t)
    return jnp.mean((out - target) ** 2)

  @jax.jit
  def step(p, s, e, z0, cap, key):
    loss, g = jax.value_and_grad(loss_fn)(p, z0, table[cap], key)
    u, s = opt.update(g, s, p)
    p = optax.apply_updates(p, jax.tree.map(lambda a, b: a * b, u, scale))
    # EMA from zero, bias-corrected at the end (an EMA started at the random init
    # keeps 0.999^2000 = 13.5% of it).
    e = jax.tree.map(lambda a, b: ema_decay * a + (1 - ema_decay) * b, e, p)
    return p, s, e, loss

  rng = np.random.default_rng([seed, 4])
  key = jax.random.PRNGKey(seed + 1)
  t0, losses = time.time(), []
  for i in range(steps):
    idx, cap = draw_batch(rng, caption_index, batch, drop, empty_index)
    z0 = latents[idx]
    params, opt_state, ema, loss = step(params, opt_state, ema, z0, cap,
                                        jax.random.fold_in(key, i))
    losses.append(float(loss))
    if (i + 1) % max(1, steps // 20) == 0:
      rate = (i + 1) / (time.time() - t0)
      _log(f"unet step {i + 1}/{steps}  loss {np.mean(losses[-100:]):.4f}  "
           f"{rate:.2f} steps/s  ETA {(steps - i - 1) / rate:.0f}s")
  correction = 1.0 - ema_decay ** steps
  return model, jax.tree.map(lambda e: e / correction, ema), float(np.mean(losses[-200:]))


def _write_reconstructions(model, params, images: np.ndarray, out: str) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  z = encode_latents(model, params, images)
  rec = np.asarray(jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))(params, z))
  rec = np.clip((rec + 1) * 127.5, 0, 255).round().astype(np.uint8)
  cols = min(8, len(images))  # up to 4 rows of 8 (render, reconstruction) pairs
  rows = len(images) // cols
  pairs = np.concatenate([images, rec], axis=2)[:rows * cols].reshape(rows, cols, 32, 64, 3)
  grid = pairs.transpose(0, 2, 1, 3, 4).reshape(rows * 32, cols * 64, 3)
  os.makedirs(out, exist_ok=True)
  Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(
      os.path.join(out, "reconstructions.png"))


def _torch_device_problem(name: str) -> str:
  """Why PyTorch cannot train on device `name` here ('' when it can)."""
  import torch  # pylint: disable=g-import-not-at-top
  try:
    dev = torch.device(name)
  except (RuntimeError, ValueError) as e:
    return f"not a PyTorch device ({str(e)[:160]})"
  if dev.type == "meta":
    return "the meta device holds no values to train"
  try:
    torch.zeros(1, device=dev)
  except (RuntimeError, AssertionError) as e:  # no such backend, or no such card
    return f"PyTorch has no such device on this machine ({str(e).splitlines()[0][:160]})"
  return ""


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True, help="folder to write (replaced atomically)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--images", type=int, default=12000, help="training renders")
  ap.add_argument("--pattern_share", type=float, default=TRAIN_PATTERN_SHARE,
                  help="share of training shapes with an uncaptioned pattern")
  ap.add_argument("--vae_steps", type=int, default=500)
  ap.add_argument("--vae_batch", type=int, default=32)
  ap.add_argument("--kl_weight", type=float, default=1e-4)
  ap.add_argument("--unet_steps", type=int, default=2000)
  ap.add_argument("--unet_batch", type=int, default=32)
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--ema", type=float, default=0.999)
  ap.add_argument("--cfg_drop", type=float, default=0.1)
  ap.add_argument("--high_noise", type=float, default=0.5,
                  help=f"share of each batch trained at timesteps >= {HIGH_T}")
  ap.add_argument("--name_patterns", action="store_true",
                  help="captions name a patterned shape's pattern and second colour in half "
                  "of its variants ('a blue star with yellow stripes on a black background'); "
                  "without it no caption names a pattern")
  ap.add_argument("--pattern_words", choices=world.PATTERN_WORDINGS, default="plain",
                  help="with --name_patterns: the second colour as a bare colour word "
                  "('yellow stripes', plain) or in words no other colour uses ('gold "
                  "stripes', distinct: world.PATTERN_COLOUR_WORDS)")
  ap.add_argument("--text_width", type=int, default=None,
                  help="width of a new text encoder (its MLP twice that, heads of 16) and "
                       "of the UNet's cross-attention input; default the tiny encoder's "
                       f"{TEXT['hidden_size']} (a UNet continued with --unet_from keeps its "
                       "folder's encoder)")
  ap.add_argument("--train_text_encoder", action="store_true",
                  help="train the text encoder's layers with the UNet (--backend=torch; the "
                  "token embedding table stays frozen); by default the encoder is frozen")
  ap.add_argument("--unet_from", default="",
                  help="a model folder: start the UNet from its weights and keep its text "
                  "encoder (continue training; --seed then only picks new renders)")
  ap.add_argument("--unet_arch", choices=sorted(UNET_ARCHS), default=None,
                  help="the UNet's architecture: base (attention at 8x8 and in the mid "
                  "block), cross16 (at 16x16 too) or wide (base's blocks twice as wide); "
                  "default: --unet_from's, else base. "
                  "With --unet_from of another architecture its weights are grafted in "
                  "(a base onto cross16; wide is trained from scratch): "
                  "every one kept, the new attention blocks added with a zero output "
                  "projection, so training starts from the same function")
  ap.add_argument("--graft_lr_scale", type=float, default=1.0,
                  help="with a graft (--unet_arch): the new attention blocks train at this "
                  "times --lr. They start with a zero output inside a UNet that already "
                  "does the job, and at the base's rate they stay near zero")
  ap.add_argument("--backend", choices=("jax", "torch"), default="jax",
                  help="the UNet's training loop: jax, or torch (PyTorch, on the CPU "
                  "2.5x faster than XLA:CPU on 2 cores; needs the test extras)")
  ap.add_argument("--snapshot_every", type=int, default=0,
                  help="also write the EMA so far to OUT_step<N> every N UNet steps "
                  "(torch backend)")
  ap.add_argument("--resume_every", type=int, default=0,
                  help="(torch backend) every N UNet steps, write the whole training state "
                  "(weights, optimiser, EMA, random streams, step) to OUT.resume; rerunning "
                  "the same command continues from it (with the same --torch_threads and "
                  "device: to the bytes one uninterrupted run gives). OUT.resume is "
                  "removed when OUT is written")
  ap.add_argument("--stop_after", type=int, default=0,
                  help="(torch backend) stop after this UNet step of the schedule and write "
                  "the state to OUT.resume (no OUT yet); rerun the command, without or "
                  "with a later --stop_after, to continue")
  ap.add_argument("--vae_from", default="",
                  help="a model folder written by this command: reuse its VAE and scaling "
                  "factor, skip that stage")
  ap.add_argument("--decoder_steps", type=int, default=0,
                  help="with --vae_from: fine-tune that VAE's decoder this many steps on the "
                  "renders (PyTorch), the encoder frozen so the latent space (and any UNet "
                  "trained on it) stays valid")
  ap.add_argument("--decoder_batch", type=int, default=32)
  ap.add_argument("--decoder_lr", type=float, default=1e-3)
  ap.add_argument("--torch_threads", type=int, default=0,
                  help="PyTorch CPU threads of the torch UNet loop and VAE stages "
                  "(0 = one a core)")
  ap.add_argument("--torch_device", default="cpu",
                  help="the torch UNet loop's device: cpu, or a PyTorch accelerator "
                  "(cuda, cuda:1, ...); the same draws as on the CPU. The VAE stages "
                  "stay on the CPU")
  ap.add_argument("--vae_latent_channels", type=int, default=None,
                  help="the VAE's latent channels (the UNet's input and output follow); "
                  f"default: --vae_from's, else {VAE['latent_channels']} (Stable Diffusion's)")
  ap.add_argument("--vae_backend", choices=("jax", "torch"), default="jax",
                  help="the VAE stage's training loop (without --vae_from): jax, or torch "
                  "(PyTorch CPU, the same loss and schedule)")
  ap.add_argument("--vae_only", action="store_true",
                  help="stop after the VAE (tuning): write reconstructions.png and "
                  "ceiling.json (the oracle's accuracy on reconstructions of fresh renders, "
                  "as python -m lfs_jax.mini.ceiling) to --out, and print that table")
  console.add_verbosity(ap)
  args = ap.parse_args(argv)
  console.setup(args.verbosity)
  if args.decoder_steps < 0 or args.unet_steps < 0:
    ap.error("--decoder_steps and --unet_steps must be >= 0")
  if args.decoder_steps and not args.vae_from:
    ap.error("--decoder_steps fine-tunes the decoder of --vae_from's VAE; give --vae_from")
  if args.unet_steps == 0 and not args.unet_from and not args.vae_only:
    ap.error("--unet_steps=0 keeps --unet_from's UNet unchanged; give --unet_from")
  if args.resume_every < 0 or args.stop_after < 0:
    ap.error("--resume_every and --stop_after must be >= 0")
  if (args.resume_every or args.stop_after) and (args.backend != "torch"
                                                 or not args.unet_steps):
    ap.error("--resume_every and --stop_after resume the torch UNet loop: give "
             "--backend=torch and --unet_steps > 0")
  if args.stop_after >= args.unet_steps > 0:
    ap.error(f"--stop_after={args.stop_after} is not before the schedule's end "
             f"(--unet_steps={args.unet_steps})")
  if args.torch_device != "cpu":
    if args.backend != "torch":
      ap.error(f"--torch_device={args.torch_device} is the torch loop's device; give "
               "--backend=torch (the JAX loop runs on JAX's default device)")
    problem = _torch_device_problem(args.torch_device)
    if problem:
      ap.error(f"--torch_device={args.torch_device}: {problem}")
  command = "python -m lfs_jax.mini.train_base " + " ".join(
      argv if argv is not None else sys.argv[1:])
  # A state left by an earlier run of this command (--resume_every, --stop_after, or a
  # kill) is continued, and only by the same command.
  state_dir = os.path.abspath(args.out) + ".resume"
  resumed = None
  if args.backend == "torch" and args.unet_steps:
    from lfs_jax.mini import train_torch  # pylint: disable=g-import-not-at-top
    resumed = train_torch.read_state_meta(state_dir)
  if resumed is not None:
    mine, theirs = _resume_args(vars(args)), _resume_args(resumed.get("args", {}))
    differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if differ:
      ap.error(f"{state_dir} holds the state of another command (it differs in "
               + ", ".join(f"--{k}={theirs.get(k)!r} there, {mine.get(k)!r} here"
                           for k in differ[:4])
               + "): rerun that command to continue it, or remove the folder to start over")
    if args.stop_after and args.stop_after <= resumed["step"]:
      ap.error(f"--stop_after={args.stop_after}: {state_dir} is already at step "
               f"{resumed['step']}")
  # The VAE's latent channels and the UNet to start from (grafted if the architecture
  # changes): checked before any work.
  from lfs_jax.weights import files  # pylint: disable=g-import-not-at-top
  if args.vae_from:
    vae_base_cfg = files.read_config(files.component_folder(args.vae_from, "vae"))
    if args.vae_latent_channels not in (None, vae_base_cfg["latent_channels"]):
      ap.error(f"--vae_latent_channels={args.vae_latent_channels}: --vae_from={args.vae_from}"
               f" has {vae_base_cfg['latent_channels']} latent channels")
  else:
    lc = VAE["latent_channels"] if args.vae_latent_channels is None else args.vae_latent_channels
    if lc < 1:
      ap.error(f"--vae_latent_channels must be >= 1, got {lc}")
    vae_base_cfg = dict(VAE, latent_channels=lc)
  latent_channels = vae_base_cfg["latent_channels"]
  if args.vae_from and args.vae_backend != "jax":
    ap.error("--vae_backend trains a VAE; --vae_from reuses one (give one of them)")
  # The text encoder's shape: --unet_from's folder's (its UNet reads that encoder), else
  # the tiny one's, or --text_width's.
  w = args.text_width
  if w is not None and (w < 16 or w % 16):
    ap.error(f"--text_width must be a multiple of 16 (heads of 16), got {w}")
  if args.unet_from:
    src = files.read_config(files.component_folder(args.unet_from, "text_encoder"))
    text_config = dict(TEXT, **{k: src[k] for k in _TEXT_SHAPE if k in src})
    if w is not None and text_config["hidden_size"] != w:
      ap.error(f"--text_width={w}: --unet_from={args.unet_from} has a "
               f"{text_config['hidden_size']}-wide text encoder, which it keeps")
  elif w is not None:
    text_config = dict(TEXT, hidden_size=w, intermediate_size=2 * w, projection_dim=w,
                       num_attention_heads=w // 16)
  else:
    text_config = TEXT
  unet_config = dict(UNET_ARCHS[args.unet_arch or "base"], in_channels=latent_channels,
                     out_channels=latent_channels,
                     cross_attention_dim=text_config["hidden_size"])
  init_params, graft, added = None, None, []
  if args.train_text_encoder and (args.backend != "torch" or not args.unet_steps):
    ap.error("--train_text_encoder needs --backend=torch (the JAX loop reads a frozen "
             "encoder's table) and --unet_steps > 0 (the encoder trains with the UNet)")
  if args.graft_lr_scale <= 0:
    ap.error(f"--graft_lr_scale must be > 0, got {args.graft_lr_scale}")
  if args.unet_from:
    source_config = files.read_config(files.component_folder(args.unet_from, "unet"))
    if source_config["in_channels"] != latent_channels:
      ap.error(f"--unet_from={args.unet_from} reads {source_config['in_channels']}-channel "
               f"latents, the VAE has {latent_channels}")
    init_params = loaders.load_unet(args.unet_from, on_host=True)[1]
    if args.unet_arch is None:
      unet_config = source_config
    elif unet.UNetConfig.from_diffusers(source_config) != unet.UNetConfig.from_diffusers(
        unet_config):
      try:
        grafted = graft_unet(init_params, unet_config, args.seed)
      except ValueError as e:
        ap.error(f"--unet_arch={args.unet_arch} from --unet_from={args.unet_from}: {e}")
      added, init_params = new_paths(grafted, init_params), grafted
      graft = {"from": args.unet_from, "arch": args.unet_arch, "seed": args.seed,
               "lr_scale": args.graft_lr_scale}
      _log(f"unet: grafted {args.unet_from} onto the {args.unet_arch} architecture "
           f"({unet.num_params(init_params):,} parameters)")

  started = time.time()
  timings: Dict[str, float] = {}
  t = time.time()
  # Some shapes carry a pattern their caption never names: the base can draw
  # patterns (as Stable Diffusion can draw any dog) but cannot be told which one.
  scenes = world.scenes(args.seed, args.images, split="train", patterns=True,
                        pattern_share=args.pattern_share)
  images = world.render_all(scenes)
  timings["render_s"] = time.time() - t
  _log(f"rendered {len(images)} images in {timings['render_s']:.0f}s")

  t = time.time()
  if args.vae_from:  # the VAE of an earlier run of this command
    vae_model, vae_params = loaders.load_vae(args.vae_from)
    raw = encode_latents(vae_model, vae_params, images) if args.unet_steps else None
    scale = float(vae_model.config.scaling_factor)  # the scale a continued UNet learned
    with open(os.path.join(args.vae_from, "TRAINING.json")) as f:
      source = json.load(f)
    vae_mse = source["vae_mse"]
    # Where that VAE came from (its own --vae_from chain included).
    vae_record = source.get("vae_record") or {
        "command": source["command"], "vae_s": source["timings_s"].get("vae_s")}
    if args.decoder_steps:  # the encoder (so `raw` and `scale`) stays; the decoder learns
      from lfs_jax.mini import train_torch  # pylint: disable=g-import-not-at-top
      from lfs_jax.weights import files  # pylint: disable=g-import-not-at-top
      folder = files.component_folder(args.vae_from, "vae")
      t_dec = time.time()
      vae_params, vae_mse = train_torch.tune_decoder(
          files.read_config(folder), files.read_state(folder), images, args.decoder_steps,
          args.decoder_batch, args.seed, args.decoder_lr, _log, args.torch_threads)
      timings["decoder_s"] = time.time() - t_dec
      vae_record = {"command": command, "decoder_steps": args.decoder_steps,
                    "decoder_s": round(timings["decoder_s"], 1), "decoder_mse": vae_mse,
                    "encoder_from": vae_record}
  else:
    vae_record = None
    if args.vae_backend == "torch":
      from lfs_jax.mini import train_torch  # pylint: disable=g-import-not-at-top
      vae_params, vae_mse = train_torch.train_vae(
          vae_base_cfg, images, args.vae_steps, args.vae_batch, args.seed, args.kl_weight,
          _log, args.torch_threads)
      vae_model = vae.AutoencoderKL(vae.VAEConfig.from_diffusers(vae_base_cfg))
    else:
      vae_model, vae_params, vae_mse = train_vae(images, args.vae_steps, args.vae_batch,
                                                 args.seed, args.kl_weight, vae_base_cfg)
    raw = encode_latents(vae_model, vae_params, images)
    scale = float(1.0 / raw.std())
  latents = raw * scale if raw is not None else None
  timings["vae_s"] = time.time() - t
  _log(f"vae: mse {vae_mse:.5f}, scaling_factor {scale:.4f}, {timings['vae_s']:.0f}s")
  if args.vae_only:  # tuning: the VAE's reconstructions and the ceiling they put on a UNet
    from lfs_jax.mini import oracle, roundtrip  # pylint: disable=g-import-not-at-top
    _write_reconstructions(vae_model, vae_params, images[-32:], args.out)
    rows = roundtrip.vae_ceiling(vae_model, vae_params, oracle.load())
    with open(os.path.join(args.out, "ceiling.json"), "w") as f:
      json.dump({"command": command, "vae_mse": vae_mse, "rows": rows}, f, indent=2)
    _log(roundtrip.table(rows))
    return 0

  text_cfg = clip.CLIPTextConfig.from_transformers(text_config)
  text_model = clip.CLIPTextModel(text_cfg)
  if args.unet_from:  # the UNet learned to read that folder's frozen encoder, whatever --seed is
    text_params = loaders.load_text_encoder(args.unet_from)[1]
  else:
    text_params = tiny.random_tree(clip.abstract_params(text_cfg), [args.seed, 5])
  tokenizer = loaders.load_tokenizer(tiny.TOKENIZER_DIR)
  variants = [caption_variants(s, args.name_patterns, args.pattern_words) for s in scenes]
  captions = sorted({c for v in variants for c in v} | {""})
  cap_id = {c: i for i, c in enumerate(captions)}
  if args.unet_steps:
    table = (None if args.train_text_encoder  # encoded at each step instead
             else encode_captions(text_model, text_params, tokenizer, captions))
    caption_index = np.array([[cap_id[c] for c in v] for v in variants])
    _log(f"{len(captions)} distinct captions")

  vae_cfg = dict(vae_base_cfg, scaling_factor=round(scale, 5))
  resume_history: List[dict] = []
  out = os.path.abspath(args.out)

  def save(unet_params, folder: str, unet_loss, steps_done: int, text_out=None) -> None:
    def write(tmp):
      tiny.write_folder({"unet": unet_params, "vae": vae_params,
                         "text_encoder": text_params if text_out is None else text_out},
                        tmp, unet_config=unet_config, vae_config=vae_cfg, text_config=text_config,
                        scheduler_config=SCHEDULER)
      record = {
          "command": command,
          "args": vars(args), "wall_s": round(time.time() - started, 1),
          "timings_s": {k: round(v, 1) for k, v in timings.items()},
          "vae_mse": vae_mse, "unet_loss": unet_loss, "scaling_factor": scale,
          "jax": jax.__version__, "device": jax.devices()[0].device_kind,
          "backend": args.backend, "steps_done": steps_done,
      }
      if vae_record:
        record["vae_record"] = vae_record
      if graft:
        record["graft"] = graft
      if resume_history:  # the runs this one's UNet schedule was split into
        record["resumed"] = resume_history
      if args.unet_from:  # the run the UNet continued from (and its own predecessors)
        with open(os.path.join(args.unet_from, "TRAINING.json")) as f:
          source = json.load(f)
        record["unet_record"] = [{"command": source["command"],
                                  "unet_s": source["timings_s"].get("unet_s"),
                                  "steps": source.get("steps_done")}
                                 ] + source.get("unet_record", [])
      with open(os.path.join(tmp, "TRAINING.json"), "w") as f:
        json.dump(record, f, indent=2)
    mini.write_folder_atomically(folder, write)

  t = time.time()
  if args.unet_steps == 0:  # a VAE-only (or graft-only) stage: --unet_from's UNet
    unet_params, unet_loss = init_params, None
  elif args.backend == "torch":
    from lfs_jax.mini import train_torch  # pylint: disable=g-import-not-at-top
    sched = schedule_lib.make_schedule(schedule_lib.SchedulerConfig.from_diffusers(SCHEDULER))

    def snapshot(params, text_out, step):
      timings["unet_s"] = time.time() - t
      save(params, f"{out}_step{step}", None, step, text_out)
      _log(f"wrote {out}_step{step}")

    text = None
    if args.train_text_encoder:
      text = (text_config, text_params, concepts_lib.tokenize(tokenizer, captions, 77))
    # The latents a state was trained on: a VAE stage that did not reproduce them must
    # not be continued silently.
    latents_sum = hashlib.sha256(np.ascontiguousarray(latents, np.float32)).hexdigest()
    if resumed is not None and resumed.get("latents_sha256") != latents_sum:
      raise SystemExit(f"train_base: {state_dir} was trained on other latents than this "
                       "run's VAE stage gives (a VAE trained again on another machine?); "
                       "remove it to start over")
    if resumed is not None:
      resume_history.extend(resumed.get("history", []))
      resume_history.append({"resumed_at": resumed["step"],
                             "unet_s_before": resumed["elapsed_s"]})
    state_meta = {"args": vars(args), "command": command, "latents_sha256": latents_sum,
                  "history": resume_history}
    unet_params, unet_loss, trained_text = train_torch.train_unet(
        unet_config, np.asarray(sched.alphas_cumprod), SCHEDULER["prediction_type"],
        latents, caption_index, table, cap_id[""], args.unet_steps, args.unet_batch,
        args.seed, args.lr, args.ema, args.cfg_drop, _log, snapshot, args.snapshot_every,
        high_share=args.high_noise, init=init_params, init_name=args.unet_from,
        threads=args.torch_threads, fast=added, fast_scale=args.graft_lr_scale, text=text,
        device=args.torch_device, state_dir=state_dir, state_every=args.resume_every,
        stop_after=args.stop_after, state_meta=state_meta)
    if unet_params is None:  # --stop_after: the state is written, the model is not
      _log(f"stopped after step {args.stop_after} of {args.unet_steps}: the training "
           f"state is in {state_dir}; rerun the command to continue")
      return 0
    if trained_text is not None:  # what save() writes from here on
      text_params = trained_text
  else:
    unet_model, unet_params, unet_loss = train_unet(
        latents, caption_index, table, cap_id[""], args.unet_steps, args.unet_batch,
        args.seed, args.lr, args.ema, args.cfg_drop, args.high_noise, init_params,
        unet_config, added, args.graft_lr_scale)
    del unet_model
  timings["unet_s"] = time.time() - t
  save(unet_params, out, unet_loss, args.unet_steps)
  if os.path.exists(state_dir):  # OUT holds what the state was for
    shutil.rmtree(state_dir)
  _log(f"wrote {out} in {time.time() - started:.0f}s")
  return 0


# Flags that change how a run goes, not what it computes: a state written under one value
# is continued under another.
_RESUME_FREE = ("stop_after", "resume_every", "torch_threads", "torch_device", "verbosity",
                "snapshot_every")


def _resume_args(args: dict) -> dict:
  return {k: v for k, v in args.items() if k not in _RESUME_FREE}


if __name__ == "__main__":
  sys.exit(main())
