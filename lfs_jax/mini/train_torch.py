"""The base UNet's training loop in PyTorch, for CPUs (`train_base --backend=torch`).

The same loss, data, optimiser and EMA as `train_base.train_unet`, on diffusers'
UNet2DConditionModel: on a 2-core CPU, PyTorch's oneDNN convolutions run this small
UNet's forward, backward and Adam step 2.5x faster than XLA:CPU (294 vs 747 ms at
batch 32, measured side by side; docs/mini_world.md), which is the difference
between one and three hours of training. The UNet loop also runs on a PyTorch
accelerator (`device`, `train_base --torch_device=cuda`): the only loop that trains
the text encoder with the UNet, so the shipped base's recipe on a GPU. Batches, noise
and timesteps are drawn on the host from the same streams on every device, so a
device changes only the arithmetic. The trained weights come back as a Flax tree
through the project's own torch->Flax converter, so the shipped folder is written, and
read, exactly as with the JAX loop.
"""

from __future__ import annotations

import collections
import json
import os
import time
from typing import Callable, Optional

import numpy as np


def train_unet(unet_config: dict, alphas_cumprod: np.ndarray, prediction_type: str,
               latents: np.ndarray, caption_index: np.ndarray, text_table: np.ndarray,
               empty_index: int, steps: int, batch: int, seed: int, lr: float,
               ema_decay: float, drop: float, log: Callable[[str], None],
               snapshot: Optional[Callable[[dict, Optional[dict], int], None]] = None,
               snapshot_every: int = 0, high_share: float = 0.0,
               init: Optional[dict] = None, init_name: str = "", threads: int = 0,
               fast=(), fast_scale: float = 1.0, text: Optional[tuple] = None,
               device: str = "cpu", state_dir: str = "", state_every: int = 0,
               stop_after: int = 0, state_meta: Optional[dict] = None):
  """Returns (Flax UNet params of the bias-corrected EMA, mean loss of the last 200 steps,
  the text encoder's Flax params of the EMA, or None when it stays frozen); (None, loss,
  None) when `stop_after` ended the run before the schedule's end.

  latents [N, h, w, c] (scaled, NHWC as in JAX); caption_index [N, V] rows of
  text_table [C, 77, d] per image; `snapshot(params, text_params, step)` is called
  every `snapshot_every` steps with the EMA so far (bias-corrected); `init`: a Flax UNet
  tree of `unet_config` to start from (`init_name` says where it came from, for the
  log); `high_share`: see recipe.HIGH_T; `threads`:
  PyTorch's CPU threads (0 = one a core); `fast`: '/'-joined Flax parameter paths
  (a graft's new blocks) trained at `fast_scale` x the rate; `text`: (transformers
  CLIPTextConfig dict, its Flax params, token ids [C, 77] of text_table's captions) to
  train the encoder's layers with the UNet (the token embedding table stays frozen, so
  every word keeps its row), the captions then encoded at each step and `text_table`
  unused (None); `device`: the torch device the models, data and optimiser live on
  (the host draws every random number either way).

  Resuming: with `state_dir`, the whole training state (weights, optimiser, EMA, both
  random streams, the step, the recent losses, and `state_meta`) is written there every
  `state_every` steps and when the run stops after step `stop_after` (0: run to the
  end), each time atomically; if `state_dir` holds a state when the loop starts, it
  continues from that step, so a run stopped and rerun ends with the weights of one
  uninterrupted run (on one device, thread count and library version). The caller
  checks that the state was written by the same command (`read_state_meta`) and
  removes it when done.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import diffusers  # pylint: disable=g-import-not-at-top

  from lfs_jax.mini import recipe  # pylint: disable=g-import-not-at-top
  from lfs_jax.models import clip  # pylint: disable=g-import-not-at-top
  from lfs_jax.models import unet as unet_lib  # pylint: disable=g-import-not-at-top
  from lfs_jax.weights import convert  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  torch.set_num_threads(threads or os.cpu_count() or 1)
  dev = torch.device(device)
  model = diffusers.UNet2DConditionModel(
      **{k: v for k, v in unet_config.items() if not k.startswith("_")})
  if init is not None:  # strict: every weight of the model, each with its shape
    state = convert.flax_to_torch(init)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    log(f"unet (torch): starting from {init_name or 'the given weights'}")
  model.to(dev).train()
  encoder, ids, text_trained = None, None, []
  if text is not None:
    encoder = _text_encoder(text[0], text[1]).to(dev)
    ids = torch.from_numpy(np.asarray(text[2])).to(dev)
    encoder.train()
    for n, p in encoder.named_parameters():
      p.requires_grad_(not n.endswith("token_embedding.weight"))
    text_trained = [p for p in encoder.parameters() if p.requires_grad]
    log(f"text encoder (torch): {sum(p.numel() for p in text_trained):,} parameters "
        f"trained with the UNet")
  log(f"unet (torch): {sum(p.numel() for p in model.parameters()):,} parameters, "
      + (f"{torch.get_num_threads()} threads" if dev.type == "cpu" else str(dev)))
  # The JAX loop's schedule, evaluated once for every step.
  lr_at = np.asarray(recipe.lr_schedule(lr, steps)(np.arange(steps)), np.float64)
  fast_names = {convert.torch_name(tuple(p.split("/"))) for p in fast}
  named = list(model.named_parameters())
  unknown = fast_names - {n for n, _ in named}
  if unknown:
    raise ValueError(f"fast parameters not in the UNet: {sorted(unknown)[:3]}")
  groups = [{"params": [p for n, p in named if n not in fast_names], "scale": 1.0},
            {"params": [p for n, p in named if n in fast_names], "scale": fast_scale}]
  groups[0]["params"] += text_trained
  trained = [p for _, p in named] + text_trained
  opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=1e-4)
  if fast_names:
    log(f"unet (torch): {sum(p.numel() for n, p in named if n in fast_names):,} parameters "
        f"at {fast_scale:g}x the rate")
  ema = [torch.zeros_like(p) for p in trained]
  ab = torch.tensor(alphas_cumprod, dtype=torch.float32, device=dev)
  z_all = torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 3, 1, 2))).to(dev)
  table = (None if text_table is None
           else torch.from_numpy(np.asarray(text_table, np.float32)).to(dev))
  rng = np.random.default_rng([seed, 4])
  gen = torch.Generator().manual_seed(seed + 1)
  # The last 200 losses, kept on the device: reading one back each step would make the
  # host wait for the accelerator at every step.
  losses = collections.deque(maxlen=200)
  start, elapsed_before, began = 0, 0.0, time.time()
  if state_dir and os.path.exists(os.path.join(state_dir, STATE_JSON)):
    start, elapsed_before = _load_state(state_dir, model, encoder, opt, ema, rng, gen,
                                        losses, dev)
    log(f"unet (torch): resuming at step {start} of {steps} from {state_dir}")
  if not 0 <= start < steps:
    raise ValueError(f"{state_dir} is at step {start}, outside this run's {steps} steps")
  if stop_after and not state_dir:
    raise ValueError("stop_after without a state_dir would lose the steps it ran")

  def save_state(done: int):
    _save_state(state_dir, done, elapsed_before + time.time() - began, model, encoder,
                opt, ema, rng, gen, losses, state_meta or {})
    log(f"unet (torch): training state at step {done} written to {state_dir}")

  def ema_params(done: int):
    correction = 1.0 - ema_decay ** done
    averaged = {id(p): (e / correction).cpu().numpy().copy() for p, e in zip(trained, ema)}

    def state_of(module):
      state = {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}
      for name, p in module.named_parameters():
        if id(p) in averaged:
          state[name] = averaged[id(p)]
      return state

    cfg = unet_lib.UNetConfig.from_diffusers(unet_config)
    unet_out = convert.torch_to_flax(state_of(model), unet_lib.abstract_params(cfg),
                                     source="torch UNet", on_host=True)
    if encoder is None:
      return unet_out, None
    text_cfg = clip.CLIPTextConfig.from_transformers(text[0])
    return unet_out, convert.torch_to_flax(
        state_of(encoder), clip.abstract_params(text_cfg), ignore=clip.IGNORED_KEYS,
        rename=clip.torch_rename, source="torch text encoder", on_host=True)

  t0 = time.time()
  for i in range(start, steps):
    idx, cap = recipe.draw_batch(rng, caption_index, batch, drop, empty_index)
    z0 = z_all[torch.from_numpy(idx).to(dev)]
    cap = torch.from_numpy(cap).to(dev)
    u = torch.rand((2, batch), generator=gen).numpy()
    t = torch.from_numpy(recipe.draw_timesteps(u[0], u[1], high_share)).long().to(dev)
    noise = torch.randn(z0.shape, generator=gen).to(dev)
    a = ab[t].sqrt()[:, None, None, None]
    s = (1 - ab[t]).sqrt()[:, None, None, None]
    zt = a * z0 + s * noise
    target = a * noise - s * z0 if prediction_type == "v_prediction" else noise
    for g in opt.param_groups:
      g["lr"] = float(lr_at[i]) * g["scale"]
    if encoder is None:
      ctx = table[cap]
    else:
      ctx = encoder(input_ids=ids[cap]).last_hidden_state
    out = model(zt, t, ctx).sample
    loss = torch.mean((out - target) ** 2)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trained, 1.0)
    opt.step()
    with torch.no_grad():  # one kernel per op on an accelerator, not one per tensor
      torch._foreach_mul_(ema, ema_decay)  # pylint: disable=protected-access
      torch._foreach_add_(ema, [p.detach() for p in trained], alpha=1 - ema_decay)  # pylint: disable=protected-access
    losses.append(loss.detach())
    if (i + 1) % max(1, steps // 50) == 0:
      rate = (i + 1 - start) / (time.time() - t0)
      log(f"unet step {i + 1}/{steps}  loss {_mean(losses):.4f}  "
          f"{rate:.2f} steps/s  ETA {(steps - i - 1) / rate:.0f}s")
    if snapshot is not None and snapshot_every and (i + 1) % snapshot_every == 0 \
        and i + 1 < steps:
      snapshot(*ema_params(i + 1), i + 1)
    stopping = i + 1 == stop_after < steps
    periodic = state_every and (i + 1) % state_every == 0 and i + 1 < steps
    if state_dir and (stopping or periodic):
      save_state(i + 1)
    if stopping:
      return None, _mean(losses), None
  unet_out, text_out = ema_params(steps)
  return unet_out, _mean(losses), text_out


STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"


def read_state_meta(state_dir: str) -> Optional[dict]:
  """The `state_meta` and step of the state in `state_dir` (None if there is none)."""
  path = os.path.join(state_dir, STATE_JSON)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    state = json.load(f)
  return dict(state["meta"], step=state["step"], elapsed_s=state["elapsed_s"])


def _save_state(state_dir: str, done: int, elapsed_s: float, model, encoder, opt, ema,
                rng, gen, losses, meta: dict) -> None:
  """Writes the loop's whole state to `state_dir` atomically (safetensors + JSON)."""
  import torch  # pylint: disable=g-import-not-at-top
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top

  from lfs_jax import mini  # pylint: disable=g-import-not-at-top

  def host(x):
    return x.detach().to("cpu").contiguous().clone()

  tensors = {f"unet/{k}": host(v) for k, v in model.state_dict().items()}
  if encoder is not None:
    tensors.update({f"text/{k}": host(v) for k, v in encoder.state_dict().items()})
  tensors.update({f"ema/{i}": host(e) for i, e in enumerate(ema)})
  opt_state = opt.state_dict()
  for pid, entry in opt_state["state"].items():
    for key, value in entry.items():
      tensors[f"opt/{pid}/{key}"] = host(torch.as_tensor(value))
  tensors["gen"] = gen.get_state()
  tensors["torch_rng"] = torch.get_rng_state()
  if losses:
    tensors["losses"] = host(torch.stack(list(losses)))
  state = {"step": done, "elapsed_s": round(elapsed_s, 1), "rng": rng.bit_generator.state,
           "param_groups": opt_state["param_groups"], "meta": meta}

  def write(tmp):
    save_file(tensors, os.path.join(tmp, STATE_TENSORS))
    with open(os.path.join(tmp, STATE_JSON), "w") as f:
      json.dump(state, f, indent=1)
  mini.write_folder_atomically(state_dir, write)


def _load_state(state_dir: str, model, encoder, opt, ema, rng, gen, losses, dev):
  """Puts the state `_save_state` wrote back into the loop's objects; returns its step
  and the training seconds spent before it."""
  import torch  # pylint: disable=g-import-not-at-top
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top

  with open(os.path.join(state_dir, STATE_JSON)) as f:
    state = json.load(f)
  tensors = load_file(os.path.join(state_dir, STATE_TENSORS))

  def part(prefix):
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

  model.load_state_dict(part("unet/"))  # strict: the same architecture
  if encoder is not None:
    encoder.load_state_dict(part("text/"))
  elif part("text/"):
    raise ValueError(f"{state_dir} trained the text encoder; this run keeps it frozen")
  saved_ema = part("ema/")
  if len(saved_ema) != len(ema):
    raise ValueError(f"{state_dir} holds {len(saved_ema)} averaged tensors, this run "
                     f"trains {len(ema)}")
  with torch.no_grad():
    for i, e in enumerate(ema):
      e.copy_(saved_ema[str(i)])
  opt_state = collections.defaultdict(dict)
  for k, v in part("opt/").items():
    pid, key = k.split("/", 1)
    opt_state[int(pid)][key] = v
  opt.load_state_dict({"state": dict(opt_state), "param_groups": state["param_groups"]})
  rng.bit_generator.state = state["rng"]
  gen.set_state(tensors["gen"])
  torch.set_rng_state(tensors["torch_rng"])
  if "losses" in tensors:
    losses.extend(tensors["losses"].to(dev))
  return int(state["step"]), float(state["elapsed_s"])


def _mean(losses) -> float:
  """The mean of scalar loss tensors, read back to the host once (float64, as np.mean)."""
  import torch  # pylint: disable=g-import-not-at-top
  return float(np.mean(torch.stack(list(losses)).cpu().numpy().astype(np.float64)))


def _text_encoder(config: dict, params: dict):
  """transformers' CLIPTextModel holding `params` (a Flax tree of lfs_jax's CLIP)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from lfs_jax.weights import convert  # pylint: disable=g-import-not-at-top

  model = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      **{k: v for k, v in config.items() if not k.startswith("_")}))
  state = {k: torch.from_numpy(np.array(v)) for k, v in convert.flax_to_torch(params).items()}
  own = model.state_dict()
  state = {k if k in own else k.replace("text_model.", "", 1): v for k, v in state.items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  missing = [k for k in missing if not k.endswith("position_ids")]
  if missing or unexpected:
    raise ValueError(f"text encoder weights do not fit transformers' CLIPTextModel: "
                     f"missing {missing[:3]}, unexpected {unexpected[:3]}")
  return model


def _cosine_rates(lr: float, steps: int) -> np.ndarray:
  """The VAE stages' per-step rates: `lr` cosine-decayed to 5 % (optax's cosine_decay)."""
  return 0.05 * lr + 0.95 * lr * 0.5 * (1 + np.cos(np.pi * np.arange(steps) / max(steps, 1)))


def _images_nchw(images: np.ndarray):
  """uint8 [N, H, W, 3] -> a float torch tensor [N, 3, H, W] in [-1, 1]."""
  import torch  # pylint: disable=g-import-not-at-top
  return torch.from_numpy(np.ascontiguousarray(
      (images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)))


def _vae_to_flax(model, vae_config: dict) -> dict:
  """A diffusers AutoencoderKL's weights as the project's Flax VAE tree."""
  from lfs_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  from lfs_jax.weights import convert  # pylint: disable=g-import-not-at-top

  state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  return convert.torch_to_flax(state, vae_lib.abstract_params(vae_lib.VAEConfig.from_diffusers(
      vae_config)), source="torch VAE", rename=vae_lib.legacy_rename, on_host=True)


def train_vae(vae_config: dict, images: np.ndarray, steps: int, batch: int, seed: int,
              kl_weight: float, log: Callable[[str], None], threads: int = 0,
              lr: float = 2e-3):
  """A VAE trained from scratch in PyTorch: `train_base.train_vae`'s loss and schedule.

  Pixel MSE of the decoded posterior sample plus `kl_weight` x the KL to N(0, 1) (both
  means over elements), Adam at `lr` cosine to 5 %, batches of `batch` renders drawn
  with replacement. On the 2-core CPU, two threads ran 2,000 steps of 32 at 10.5
  steps/s (docs/mini_world_history.md, "A VAE with 8 latent channels"); the JAX loop's
  recorded VAE stage took 521 s for 500 steps, renders included. images: uint8
  [N, H, W, 3]. Returns (Flax VAE params, mean MSE of the last 100 steps).
  """
  import torch  # pylint: disable=g-import-not-at-top
  import diffusers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  torch.set_num_threads(threads or os.cpu_count() or 1)
  model = diffusers.AutoencoderKL(**{k: v for k, v in vae_config.items() if not k.startswith("_")})
  model.train()
  log(f"vae (torch): {sum(p.numel() for p in model.parameters()):,} parameters, "
      f"{vae_config['latent_channels']} latent channels, {torch.get_num_threads()} threads")
  opt = torch.optim.Adam(model.parameters(), lr=lr)
  lr_at = _cosine_rates(lr, steps)
  x_all = _images_nchw(images)
  rng = np.random.default_rng([seed, 2])
  gen = torch.Generator().manual_seed(seed + 14)
  t0, losses = time.time(), []
  for i in range(steps):
    x = x_all[torch.from_numpy(rng.integers(0, len(x_all), batch))]
    q = model.encode(x).latent_dist
    z = q.mean + q.std * torch.randn(q.mean.shape, generator=gen)
    mse = torch.mean((model.decode(z).sample - x) ** 2)
    kl = 0.5 * torch.mean(q.mean ** 2 + q.var - 1.0 - q.logvar)
    for g in opt.param_groups:
      g["lr"] = float(lr_at[i])
    opt.zero_grad(set_to_none=True)
    (mse + kl_weight * kl).backward()
    opt.step()
    losses.append(mse.item())
    if (i + 1) % max(1, steps // 10) == 0:
      rate = (i + 1) / (time.time() - t0)
      log(f"vae step {i + 1}/{steps}  mse {np.mean(losses[-100:]):.5f}  kl {kl.item():.3f}  "
          f"{rate:.2f} steps/s  ETA {(steps - i - 1) / rate:.0f}s")
  return _vae_to_flax(model, vae_config), float(np.mean(losses[-100:]))


def tune_decoder(vae_config: dict, vae_state: dict, images: np.ndarray, steps: int,
                 batch: int, seed: int, lr: float, log: Callable[[str], None],
                 threads: int = 0):
  """Fine-tunes a VAE's decoder (post_quant_conv + decoder), the encoder frozen.

  The latent space the UNet was trained on stays exactly as it was (the encoder,
  hence the latents and their scaling factor, are unchanged); only how latents are
  turned back into pixels improves. Loss: pixel MSE of the decoded posterior sample
  (as in the VAE's own training). images: uint8 [N, H, W, 3]; vae_state: the torch
  state dict (numpy); threads: PyTorch's CPU threads (0 = one a core; on a shared,
  busy CPU one thread ran this step 5x faster than two). Returns (Flax VAE params,
  mean MSE of the last 100 steps).
  """
  import torch  # pylint: disable=g-import-not-at-top
  import diffusers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  torch.set_num_threads(threads or os.cpu_count() or 1)
  model = diffusers.AutoencoderKL(**{k: v for k, v in vae_config.items() if not k.startswith("_")})
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in vae_state.items()})
  trained = list(model.post_quant_conv.parameters()) + list(model.decoder.parameters())
  for p in model.parameters():
    p.requires_grad_(False)
  for p in trained:
    p.requires_grad_(True)
  model.train()
  log(f"decoder (torch): {sum(p.numel() for p in trained):,} trained parameters, "
      f"{torch.get_num_threads()} threads")
  opt = torch.optim.Adam(trained, lr=lr)
  t_enc = time.time()
  lr_at = _cosine_rates(lr, steps)
  # The encoder is frozen: its posterior for every image is computed once.
  x_all = _images_nchw(images)
  with torch.no_grad():
    posts = [model.encode(x_all[i:i + 256]).latent_dist for i in range(0, len(x_all), 256)]
    z_mean = torch.cat([q.mean for q in posts])
    z_std = torch.cat([q.std for q in posts])
  log(f"decoder (torch): encoded {len(x_all)} images in {time.time() - t_enc:.0f}s")
  rng = np.random.default_rng([seed, 12])
  gen = torch.Generator().manual_seed(seed + 13)
  t0, losses = time.time(), []
  for i in range(steps):
    idx = torch.from_numpy(rng.integers(0, len(x_all), batch))
    x = x_all[idx]
    z = z_mean[idx] + z_std[idx] * torch.randn(z_mean[idx].shape, generator=gen)
    rec = model.decode(z).sample
    loss = torch.mean((rec - x) ** 2)
    for g in opt.param_groups:
      g["lr"] = float(lr_at[i])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    losses.append(loss.item())
    if (i + 1) % max(1, steps // 20) == 0:
      rate = (i + 1) / (time.time() - t0)
      log(f"decoder step {i + 1}/{steps}  mse {np.mean(losses[-100:]):.5f}  "
          f"{rate:.2f} steps/s  ETA {(steps - i - 1) / rate:.0f}s")
  return _vae_to_flax(model, vae_config), float(np.mean(losses[-100:]))
