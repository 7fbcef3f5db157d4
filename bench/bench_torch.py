"""PyTorch side of the benchmark: diffusers' UNet2DConditionModel and AutoencoderKL.

The same workloads as bench_jax, the way a PyTorch Custom Diffusion trainer runs
them (the anchors of /work/shared/bench/ANCHORS.md were measured this way): random
init from the SD configs, float32 student under bf16 autocast, only attn2 to_k/to_v
trainable with AdamW (+ global-norm clip 1.0, as lfs_jax's optimizer), a separate
bf16 teacher copy for the LFS step, bf16 weights for sampling and decoding.

    python -m bench.bench_torch --modes eager,compile

prints one JSON line per (workload, mode): framework "torch-eager" / "torch-compile".
Differences from the JAX step, on purpose the anchors': the text context is a fixed
tensor (no text encoder forward/backward, no token rows) and there is no latent
flip/rescale. There is no cached-DFKD variant (lfs_cached is lfs_jax's speed-up).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import time
from typing import Any, Dict, List, Optional

import bench
from lfs_jax import console

TORCH_WORKLOADS = ("cd", "lfs", "sample", "vae")
_SELECTED = ("attn2.to_k", "attn2.to_v")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m bench.bench_torch", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", choices=("auto", "full", "tiny"), default="auto",
                 help="full: SD 1.5 at 512 px; tiny: lfs_jax's tiny model shapes (auto: tiny on CPU)")
  p.add_argument("--workloads", default=",".join(TORCH_WORKLOADS),
                 help=f"comma-separated subset of {','.join(TORCH_WORKLOADS)} "
                      "(lfs_cached, JAX only, is skipped)")
  p.add_argument("--modes", default="eager", help="eager, compile or eager,compile")
  p.add_argument("--batch", type=int, default=0, help="0: 8 (full) or 2 (tiny)")
  p.add_argument("--sample-steps", type=int, default=0, help="0: 50")
  p.add_argument("--warmup", type=int, default=-1)
  p.add_argument("--iters", type=int, default=-1)
  p.add_argument("--sample-iters", type=int, default=-1)
  p.add_argument("--cpu-threads", type=int, default=1, help="torch threads on a CPU")
  p.add_argument("--seed", type=int, default=0)
  console.add_verbosity(p)
  return p.parse_args(argv)


class Bench:
  """The models, inputs and timing helpers of one process."""

  def __init__(self, args: argparse.Namespace):
    import diffusers  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    diffusers.utils.logging.set_verbosity_error()  # no dtype-cast advice on random models
    self.torch = torch
    self.args = args
    self.dev = "cuda" if torch.cuda.is_available() else "cpu"
    name = args.size if args.size != "auto" else ("full" if self.dev == "cuda" else "tiny")
    size = bench.full_size() if name == "full" else bench.tiny_size()
    self.size = size = dataclasses.replace(
        size, batch=args.batch or size.batch,
        sample_steps=args.sample_steps or size.sample_steps,
        warmup=size.warmup if args.warmup < 0 else args.warmup,
        iters=size.iters if args.iters < 0 else args.iters,
        sample_iters=size.sample_iters if args.sample_iters < 0 else args.sample_iters)
    self.device = (torch.cuda.get_device_name() if self.dev == "cuda"
                   else f"cpu ({os.cpu_count()} cores)")
    # bf16 on an accelerator. The CPU smoke run computes in float32 on one thread: on the
    # 2-core project machine PyTorch's bf16 UNet ran 12x slower than float32, and two
    # OpenMP threads beside other jobs 60x slower than one.
    self.half = torch.bfloat16 if self.dev == "cuda" else torch.float32
    if self.dev == "cpu":
      torch.set_num_threads(args.cpu_threads)
    torch.manual_seed(args.seed)
    b, h, d = size.batch, size.latent, size.context_dim
    self.x0 = torch.randn(b, 4, h, h, device=self.dev)
    self.ctx = torch.randn(b, 77, d, device=self.dev)
    self.kd_ctx = torch.randn(b, 77, d, device=self.dev)
    sched = size.scheduler
    betas = torch.linspace(sched["beta_start"] ** 0.5, sched["beta_end"] ** 0.5,
                           sched["num_train_timesteps"], dtype=torch.float64) ** 2
    self.alphas = torch.cumprod(1 - betas, 0).float().to(self.dev)
    self.student = None

  # ---------------------------------------------------------------- helpers

  @property
  def train_precision(self) -> str:
    if self.dev == "cuda":
      return "fp32 weights + bf16 autocast"
    return f"fp32 weights and compute (CPU, {self.torch.get_num_threads()} thread(s))"

  @property
  def compute(self) -> str:
    if self.half == self.torch.bfloat16:
      return "bf16"
    return f"float32 (CPU, {self.torch.get_num_threads()} thread(s))"

  def sync(self):
    if self.dev == "cuda":
      self.torch.cuda.synchronize()

  def reset_peak(self):
    if self.dev == "cuda":
      self.torch.cuda.reset_peak_memory_stats()

  def peak_gib(self) -> Optional[float]:
    return self.torch.cuda.max_memory_allocated() / 2**30 if self.dev == "cuda" else None

  def time_calls(self, fn, warmup: int, iters: int):
    """(median ms of blocked calls, mean ms of calls synchronised once at the end)."""
    for _ in range(warmup):
      fn()
    self.sync()
    times = []
    for _ in range(iters):
      t0 = time.perf_counter()
      fn()
      self.sync()
      times.append(time.perf_counter() - t0)
    if iters < 2:
      return bench.median_ms(times), None
    t0 = time.perf_counter()
    for _ in range(iters):
      fn()
    self.sync()
    return bench.median_ms(times), 1e3 * (time.perf_counter() - t0) / iters

  def first_call_s(self, fn) -> float:
    t0 = time.perf_counter()
    fn()
    self.sync()
    return time.perf_counter() - t0

  def count_flops(self, fn) -> Optional[float]:
    """FLOPs of one eager call by torch's FlopCounterMode (matmuls, convs, attention)."""
    from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
    with FlopCounterMode(display=False) as counter:
      fn()
    self.sync()
    return float(counter.get_total_flops()) or None

  def unet(self):
    """The float32 student UNet (random init), built once, on the device."""
    from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
    if self.student is None:
      with self.torch.device(self.dev):
        self.student = UNet2DConditionModel.from_config(dict(self.size.unet))
    return self.student

  def record(self, workload, mode, ms, ms_pipe, flops, compile_s, notes, **extra):
    import diffusers  # pylint: disable=g-import-not-at-top
    return bench.record(
        workload=workload, framework=f"torch-{mode}", device=self.device,
        batch=self.size.batch, resolution=self.size.resolution, ms=ms,
        peak_mem_gib=self.peak_gib(), compile_s=compile_s, flops=flops, notes=notes,
        ms_pipelined=ms_pipe, size=self.size.name, torch=self.torch.__version__,
        diffusers=diffusers.__version__, **extra)

  # -------------------------------------------------------------- workloads

  def train(self, workload: str, modes: List[str]) -> List[Dict[str, Any]]:
    """"cd" or "lfs": one optimiser step of the selected cross-attention weights."""
    torch, F = self.torch, self.torch.nn.functional
    b = self.size.batch
    student = self.unet().train()
    student.requires_grad_(False)
    params = [p for n, p in student.named_parameters() if any(s in n for s in _SELECTED)]
    for p in params:
      p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-5 * b, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=1e-2)
    teacher = None
    if workload == "lfs":  # the previous session's model: a bf16 copy, no gradients
      teacher = copy.deepcopy(student).to(self.half).eval().requires_grad_(False)
    autocast = torch.autocast(self.dev, dtype=torch.bfloat16, enabled=self.dev == "cuda")
    t_max = self.size.scheduler["num_train_timesteps"] - 1

    def step(model):
      t = torch.randint(0, t_max + 1, (b,), device=self.dev)
      noise = torch.randn_like(self.x0)
      a = self.alphas[t].view(-1, 1, 1, 1)
      x_t = a.sqrt() * self.x0 + (1 - a).sqrt() * noise
      if teacher is None:
        with autocast:
          out = model(x_t, t, self.ctx).sample
        loss = F.mse_loss(out.float(), noise)
      else:
        z = torch.randn_like(self.x0)
        t_kd = torch.full((b,), t_max, device=self.dev)
        with torch.no_grad():
          target = teacher(z.to(self.half), t_kd, self.kd_ctx.to(self.half)).sample.float()
        with autocast:
          out = model(torch.cat([x_t, z]), torch.cat([t, t_kd]),
                      torch.cat([self.ctx, self.kd_ctx])).sample.float()
        loss = F.mse_loss(out[:b], noise) + F.mse_loss(out[b:], target)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(params, 1.0)
      opt.step()
      opt.zero_grad(set_to_none=True)

    flops = self.count_flops(lambda: step(student))
    out = []
    for mode in modes:
      self.reset_peak()
      model = student if mode == "eager" else torch.compile(student, dynamic=False)
      compile_s = None if mode == "eager" else self.first_call_s(lambda: step(model))
      ms, ms_pipe = self.time_calls(lambda: step(model), self.size.warmup, self.size.iters)
      notes = (f"diffusers UNet2DConditionModel, {self.train_precision}, SDPA; "
               f"{len(params)} attn2 to_k/to_v tensors trainable, AdamW + clip; fixed text "
               "context (no text encoder)")
      if teacher is not None:
        notes += (f"; {b} data + {b} pure-noise latents in one student batch, {self.compute} teacher "
                  "copy forward at t=T-1")
      if mode == "compile":
        notes += "; compile_s = first step's wall time (compile + one step)"
      notes += "; flops: torch FlopCounterMode of one eager step"
      out.append(self.record(workload, mode, ms, ms_pipe, flops, compile_s, notes))
      bench.emit(out[-1])
    del opt, teacher
    for p in params:
      p.grad = None
      p.requires_grad_(False)
    return out

  def sample(self, modes: List[str]) -> List[Dict[str, Any]]:
    """50-step DDIM (eta 0) with classifier-free guidance, bf16 UNet at batch 2B."""
    torch = self.torch
    b, h, steps = self.size.batch, self.size.latent, self.size.sample_steps
    unet = self.unet().to(self.half).eval()  # training (if any) is done
    sched = self.size.scheduler
    stride = sched["num_train_timesteps"] // steps
    grid = [i * stride + sched.get("steps_offset", 0) for i in reversed(range(steps))]
    alphas = self.alphas.tolist()
    final = 1.0 if sched.get("set_alpha_to_one", True) else alphas[0]
    lat = torch.randn(b, 4, h, h, device=self.dev)
    cond = torch.cat([torch.randn(1, 77, self.size.context_dim, device=self.dev).expand(b, -1, -1),
                      torch.randn(b, 77, self.size.context_dim, device=self.dev)]).to(self.half)

    def run(model):
      z = lat.clone()
      with torch.inference_mode():
        for t in grid:
          tt = torch.full((2 * b,), t, device=self.dev)
          e = model(torch.cat([z, z]).to(self.half), tt, cond).sample.float()
          e_u, e_c = e.chunk(2)
          eps = e_u + 7.5 * (e_c - e_u)
          a_t = alphas[t]
          a_prev = alphas[t - stride] if t - stride >= 0 else final
          x0 = (z - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
          z = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
      return z

    flops = self.count_flops(lambda: run(unet))
    out = []
    for mode in modes:
      self.reset_peak()
      model = unet if mode == "eager" else torch.compile(unet, dynamic=False)
      compile_s = None if mode == "eager" else self.first_call_s(lambda: run(model))
      ms, ms_pipe = self.time_calls(lambda: run(model), min(self.size.warmup, 1),
                                    self.size.sample_iters)
      notes = (f"diffusers UNet2DConditionModel {self.compute}, {steps}-step DDIM loop in Python, "
               f"guidance 7.5, UNet batch {2 * b}; flops: torch FlopCounterMode of one eager call")
      if mode == "compile":
        notes += "; compile_s = first call's wall time (compile + one sampling run)"
      out.append(self.record("sample", mode, ms, ms_pipe, flops, compile_s, notes,
                             sample_steps=steps))
      bench.emit(out[-1])
    self.student = None  # now bf16; the training workloads (run first) are done
    return out

  def vae(self, modes: List[str]) -> List[Dict[str, Any]]:
    """VAE decode of B latents, bf16."""
    from diffusers import AutoencoderKL  # pylint: disable=g-import-not-at-top
    torch = self.torch
    with torch.device(self.dev):
      vae = AutoencoderKL.from_config(dict(self.size.vae)).to(self.half).eval()
    sf = self.size.vae["scaling_factor"]
    lat = torch.randn(self.size.batch, 4, self.size.latent, self.size.latent,
                      device=self.dev, dtype=self.half)

    def decode(z):
      with torch.inference_mode():
        return vae.decode(z / sf).sample

    flops = self.count_flops(lambda: decode(lat))
    out = []
    for mode in modes:
      self.reset_peak()
      fn = decode if mode == "eager" else torch.compile(decode, dynamic=False)
      compile_s = None if mode == "eager" else self.first_call_s(lambda: fn(lat))
      ms, ms_pipe = self.time_calls(lambda: fn(lat), self.size.warmup, self.size.iters)
      notes = f"diffusers AutoencoderKL.decode, {self.compute}; flops: torch FlopCounterMode"
      if mode == "compile":
        notes += "; compile_s = first call's wall time"
      out.append(self.record("vae", mode, ms, ms_pipe, flops, compile_s, notes))
      bench.emit(out[-1])
    return out


def run(argv=None) -> List[Dict[str, Any]]:
  args = parse_args(argv)
  console.setup(args.verbosity)
  names = [w.strip() for w in args.workloads.split(",") if w.strip() and w.strip() != "lfs_cached"]
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  bad = [w for w in names if w not in TORCH_WORKLOADS] + [m for m in modes
                                                          if m not in ("eager", "compile")]
  if bad:
    raise SystemExit(f"unknown workload(s) or mode(s) {bad}")
  b = Bench(args)
  out = []
  for name in TORCH_WORKLOADS:  # this order: training before the UNet turns bf16
    if name in names:
      out += (b.train(name, modes) if name in ("cd", "lfs") else
              b.sample(modes) if name == "sample" else b.vae(modes))
  return out


if __name__ == "__main__":
  run()
