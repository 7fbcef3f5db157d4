"""JAX side of the benchmark: lfs_jax's own train step, loss, sampler and VAE decode.

Nothing here re-implements a workload: the train steps are `train.step.jit_train_step`
over `train.losses.loss_fn` (and `kd.kd_cache` for the cached DFKD targets), the
sampler is `diffusion.sampler.sample`, the decode `diffusion.sampler.decode`. Each is
compiled ahead of time (lower + compile, timed apart from the calls), then called
`warmup` times untimed and `iters` times timed, each call ended by block_until_ready.

    python -m bench.bench_jax --workloads cd,lfs,lfs_cached,sample,vae

prints one JSON line per workload (fields in bench.FIELDS, plus a few extras).
`--size auto` is SD 1.5 at 512 px on an accelerator and lfs_jax's tiny model on a CPU.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import os
import time
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

import bench
from lfs_jax import config_base, console, parallel
from lfs_jax import delta as delta_lib
from lfs_jax.diffusion import sampler
from lfs_jax.diffusion import schedule as schedule_lib
from lfs_jax.models import clip, unet, vae
from lfs_jax.train import kd, losses, programs
from lfs_jax.train import step as step_lib
from lfs_jax.weights import convert

_HIT = "/jax/compilation_cache/cache_hits"
_EVENTS: collections.Counter = collections.Counter()
_POOL = 1 << 24  # normals shared by every random leaf (see random_tree)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m bench.bench_jax", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", choices=("auto", "full", "tiny"), default="auto",
                 help="full: SD 1.5 at 512 px; tiny: lfs_jax's tiny model (auto: tiny on CPU)")
  p.add_argument("--workloads", default=",".join(bench.WORKLOADS),
                 help=f"comma-separated subset of {','.join(bench.WORKLOADS)}")
  p.add_argument("--batch", type=int, default=0, help="0: 8 (full) or 2 (tiny)")
  p.add_argument("--sample-steps", type=int, default=0, help="0: 50")
  p.add_argument("--warmup", type=int, default=-1, help="-1: the size's default")
  p.add_argument("--iters", type=int, default=-1, help="timed calls; -1: the size's default")
  p.add_argument("--sample-iters", type=int, default=-1, help="timed sampler calls")
  p.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32",
                 help="storage of the frozen base while training (configs/sd15.py: float32); "
                      "sampling and decoding always use bfloat16 weights")
  p.add_argument("--attention", default="auto", help="xla | cudnn | auto (configs/sd15.py)")
  p.add_argument("--remat", default="none",
                 help="UNet gradient checkpointing policy, where lfs_jax has model.remat")
  p.add_argument("--kd-mode", choices=("noise", "trajectory"), default="noise",
                 help="noise: one teacher forward at t=T-1, as the PyTorch anchor")
  p.add_argument("--kd-steps", type=int, default=4, help="teacher DDIM points (trajectory)")
  p.add_argument("--kd-cache-size", type=int, default=0,
                 help="noises in the DFKD cache of lfs_cached; 0: 64 (full) or 4 (tiny)")
  p.add_argument("--compile-cache", default="~/.cache/lfs_jax/bench_xla",
                 help='persistent XLA compilation cache folder ("" leaves jax as it is)')
  p.add_argument("--store-program", action="store_true",
                 help="train steps: trace through lfs_jax's program store (train/programs.py) "
                      "in <compile-cache>/programs, as a training run does: a second run "
                      "reads the traced step back (lower_s is then that read)")
  p.add_argument("--lower-only", action="store_true",
                 help="with --compile-only: trace and lower, no compile (lower_s is the "
                      "tracing time; compile_s null)")
  p.add_argument("--compile-only", action="store_true",
                 help="lower and compile on abstract inputs, time nothing (e.g. a warm-cache run)")
  p.add_argument("--cpu-full-opt", action="store_true",
                 help="on a CPU, compile the train steps at XLA's full backend optimization "
                      "(default there: level 0, as the tests do: 3x faster to compile, slower to run)")
  p.add_argument("--seed", type=int, default=0)
  console.add_verbosity(p)
  return p.parse_args(argv)


# ------------------------------------------------------------------------ set-up

@dataclasses.dataclass
class Setup:
  """The size, the modules and the run recipe shared by every workload of a process."""
  args: argparse.Namespace
  size: bench.Size
  device: str
  cfg: Any                  # the lfs_jax ConfigDict whose recipe the train steps follow
  unet: Any
  text: Any
  vae: Any
  scheduler: Any            # diffusion.schedule.SchedulerConfig
  _abstract: Dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def abstract_only(self) -> bool:
    return self.args.compile_only

  @property
  def train_compiler_options(self) -> Optional[Dict[str, Any]]:
    """XLA options of the train steps: on a CPU, backend optimization level 0 unless asked."""
    if self.device.startswith("cpu") and not self.args.cpu_full_opt:
      return {"xla_backend_optimization_level": 0}
    return None

  def abstract(self, part: str):
    """The float32 parameter tree of "unet", "text" or "vae" as ShapeDtypeStructs."""
    if part not in self._abstract:
      build = {"unet": lambda: unet.abstract_params(self.unet.config),
               "text": lambda: clip.abstract_params(self.text.config),
               "vae": lambda: vae.abstract_params(self.vae.config)}[part]
      self._abstract[part] = build()
    return self._abstract[part]

  def params(self, part: str, dtype):
    """Random host arrays in `dtype` (or ShapeDtypeStructs with --compile-only)."""
    tree = self.abstract(part)
    if self.abstract_only:
      return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), tree)
    return random_tree(tree, self.args.seed + {"unet": 0, "text": 1, "vae": 2}[part], dtype)


def random_tree(abstract, seed: int, dtype) -> dict:
  """Host arrays for an abstract parameter tree, flax-like by leaf name.

  Norm scales 1, biases 0, embeddings N(0, 0.02), kernels N(0, 1/fan_in). The
  normals are windows of one shared pool of 2**24 draws, so a 1-billion-parameter
  SD tree takes seconds instead of a minute; speed does not depend on the values.
  """
  pool = np.random.default_rng(seed).standard_normal(_POOL, dtype=np.float32)
  out = {}
  for i, (path, leaf) in enumerate(sorted(convert.flatten(abstract).items())):
    shape, name = tuple(leaf.shape), path[-1]
    if name == "scale":
      a = np.ones(shape, np.float32)
    elif name == "bias":
      a = np.zeros(shape, np.float32)
    else:
      n = int(np.prod(shape))
      start = (i * 1_000_003) % _POOL
      reps = -(-(start + n) // _POOL)
      window = (np.tile(pool, reps) if reps > 1 else pool)[start:start + n]
      std = 0.02 if name == "embedding" else 1.0 / np.sqrt(np.prod(shape[:-1]))
      a = (window * np.float32(std)).reshape(shape)
    out[path] = a.astype(dtype)
  return convert.unflatten(out)


def make_setup(args: argparse.Namespace) -> Setup:
  dev = jax.local_devices()[0]
  on_cpu = dev.platform == "cpu"
  name = args.size if args.size != "auto" else ("tiny" if on_cpu else "full")
  size = bench.full_size() if name == "full" else bench.tiny_size()
  size = dataclasses.replace(
      size, batch=args.batch or size.batch, sample_steps=args.sample_steps or size.sample_steps,
      warmup=size.warmup if args.warmup < 0 else args.warmup,
      iters=size.iters if args.iters < 0 else args.iters,
      sample_iters=size.sample_iters if args.sample_iters < 0 else args.sample_iters)

  # The run recipe of configs/sd15.py (full) or the tiny default, at the bench's batch.
  cfg = config_base.get_config()
  if name == "full":
    cfg = config_base.use_local_sd(cfg, resolution=size.resolution)
  cfg.train.batch_size = size.batch
  cfg.kd.batch_size = size.batch

  bf16 = jnp.bfloat16
  u = unet.UNet2DConditionModel(unet.UNetConfig.from_diffusers(size.unet), dtype=bf16,
                                attention=args.attention)
  if args.remat != "none":
    if "remat" not in {f.name for f in dataclasses.fields(u)}:
      raise SystemExit("--remat: this lfs_jax's UNet has no remat option")
    u = u.clone(remat=args.remat)
  t = clip.CLIPTextModel(clip.CLIPTextConfig.from_transformers(size.text), dtype=bf16,
                         attention=args.attention)
  v = vae.AutoencoderKL(vae.VAEConfig.from_diffusers(size.vae), dtype=bf16,
                        attention=args.attention)
  device = f"cpu ({os.cpu_count()} cores)" if on_cpu else dev.device_kind
  return Setup(args, size, device, cfg, u, t, v,
               schedule_lib.SchedulerConfig.from_diffusers(size.scheduler))


def configure_jax(args: argparse.Namespace) -> None:
  """The persistent compilation cache (every compile is written) and the cache-hit counter."""
  if args.compile_cache:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(args.compile_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if not getattr(configure_jax, "listening", False):
    jax.monitoring.register_event_listener(lambda event, **_: _EVENTS.update([event]))
    configure_jax.listening = True


# ---------------------------------------------------------------- measurements

@dataclasses.dataclass
class Compiled:
  fn: Any
  lower_s: float
  compile_s: float          # lower + compile
  cache_warm: Optional[bool]  # None: no persistent cache folder set
  lower_cpu_s: Optional[float] = None  # this process's CPU seconds in lower_s (a shared machine)
  compile_cpu_s: Optional[float] = None  # and in compile_s


def aot(jitted, *args, options: Optional[Dict[str, Any]] = None, mesh=None,
        lower_only: bool = False) -> Compiled:
  """Lowers and compiles `jitted` for `args` (arrays or ShapeDtypeStructs), timed
  (`lower_only`: lowers only; `fn` is then the Lowered, compile_s None).

  A train step is traced under its mesh, as train.step.compile_step does (kernels
  without a partitioning rule of their own read it).
  """
  hits = _EVENTS[_HIT]
  context = (jax.set_mesh(mesh) if mesh is not None and hasattr(jax, "set_mesh")
             else contextlib.nullcontext())
  t0, c0 = time.perf_counter(), time.process_time()
  with context, step_lib.gc_paused():  # as train.step.compile_step traces the step
    lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  cpu = time.process_time() - c0
  if lower_only:
    return Compiled(lowered, t1 - t0, None, None, cpu)
  compiled = lowered.compile(options)
  t2 = time.perf_counter()
  persistent = jax.config.jax_compilation_cache_dir is not None
  return Compiled(compiled, t1 - t0, t2 - t0, (_EVENTS[_HIT] > hits) if persistent else None,
                  cpu, time.process_time() - c0)


def xla_flops(stage) -> Optional[float]:
  """FLOPs of a compiled (or lowered) computation by XLA's cost analysis."""
  try:
    ca = stage.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  flops = (ca or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def memory_analysis_gib(compiled) -> Optional[float]:
  """XLA's static estimate: arguments + outputs - aliased + temporaries."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
           + m.temp_size_in_bytes)
  return total / 2**30


def peak_mem_gib() -> Optional[float]:
  """The device allocator's peak since the process started (None where not reported: CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2**30


def time_calls(call, warmup: int, iters: int):
  """(median ms of `iters` blocked calls, mean ms of `iters` calls blocked once at the end)."""
  for _ in range(warmup):
    jax.block_until_ready(call())
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - t0)
  if iters < 2:
    return bench.median_ms(times), None
  t0 = time.perf_counter()
  out = None
  for _ in range(iters):
    out = call()
  jax.block_until_ready(out)
  return bench.median_ms(times), 1e3 * (time.perf_counter() - t0) / iters


def place(s: Setup, tree, sharding=None):
  """Host values -> device arrays, or ShapeDtypeStructs (carrying `sharding`) with --compile-only."""
  if s.abstract_only:
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
      return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          tree)
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                        tree, sharding)
  if sharding is None:
    return jax.device_put(tree)
  return parallel.put(tree, sharding)


def _record(s: Setup, workload: str, compiled: Compiled, flops, ms, ms_pipelined, batch,
            notes: str, **extra) -> Dict[str, Any]:
  return bench.record(
      workload=workload, framework="jax", device=s.device, batch=batch,
      resolution=s.size.resolution, ms=ms, peak_mem_gib=peak_mem_gib(),
      compile_s=compiled.compile_s, flops=flops, notes=notes, ms_pipelined=ms_pipelined,
      lower_s=compiled.lower_s, lower_cpu_s=compiled.lower_cpu_s,
      compile_cpu_s=compiled.compile_cpu_s,
      cache_warm=compiled.cache_warm,
      mem_analysis_gib=memory_analysis_gib(compiled.fn), size=s.size.name,
      jax=jax.__version__, **extra)


# -------------------------------------------------------------------- workloads

def train_workload(s: Setup, workload: str) -> Dict[str, Any]:
  """"cd", "lfs" or "lfs_cached": `jit_train_step` over the session loss, as session.py wires it."""
  cfg, size, args = s.cfg, s.size, s.args
  kd, cached = workload != "cd", workload == "lfs_cached"
  b, h = size.batch, size.latent
  kd_points = 1 if args.kd_mode == "noise" else args.kd_steps
  spec = losses.LossSpec(
      batch_size=b, kd_batch_size=b, kd_weight=float(cfg.kd.weight), use_kd=kd,
      kd_points=kd_points, kd_cached=cached, flip=cfg.data.flip, rescale=cfg.data.rescale,
      rescale_min=cfg.data.rescale_min, rescale_max=cfg.data.rescale_max,
      scaling_factor=float(size.vae["scaling_factor"]), scheduler=s.scheduler,
      batch_sharding=None, delta=delta_lib.from_config(cfg.train))
  models = losses.Models(unet=s.unet, text=s.text)
  optimizer = step_lib.make_optimizer(cfg.train)
  param_dtype = jnp.dtype(args.param_dtype)

  selected, rest = delta_lib.split(s.params("unet", param_dtype),
                                   delta_lib.selection_predicate(cfg.train.selection))
  to_f32 = ((lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32)) if s.abstract_only
            else (lambda x: np.asarray(x, np.float32)))
  selected = jax.tree.map(to_f32, selected)
  width, vocab = s.text.config.hidden_size, s.text.config.vocab_size
  # A second session: two earlier concepts' token rows, one new row trained now.
  n_prev, n_new, n_kd = 2, 1, 3
  rs = np.random.default_rng(args.seed + 10)
  token_table = (0.02 * rs.standard_normal((n_prev + n_new, width))).astype(np.float32)
  frozen = {"unet": rest, "text": s.params("text", param_dtype), "tokens": token_table}
  trainable = {"unet": selected, "tokens": token_table[n_prev:].copy()}

  mesh = parallel.make_mesh(cfg.mesh, [jax.local_devices()[0]])
  step_fn, sh = step_lib.jit_train_step(mesh, frozen, frozen_mode="replicated", models=models,
                                        spec=spec, optimizer=optimizer,
                                        fsdp_min_size=cfg.mesh.fsdp_min_size)
  prompt_ids = rs.integers(0, vocab, (b, len(cfg.concepts.templates), 77)).astype(np.int32)
  prompt_ids[:, :, 2] = vocab + n_prev  # the new modifier token
  data = losses.SessionData(
      latent_mean=rs.standard_normal((b, h, h, 4)).astype(np.float32),
      latent_logvar=np.full((b, h, h, 4), -6.0, np.float32),
      prompt_ids=prompt_ids, n_images=np.asarray(b, np.int32),
      token_offset=np.asarray(n_prev, np.int32),
      kd_context=rs.standard_normal((n_kd, 77, width)).astype(jnp.bfloat16),
      n_kd=np.asarray(n_kd, np.int32))
  if s.abstract_only:
    state = jax.eval_shape(lambda t: step_lib.init_state(t, optimizer), trainable)
  else:
    state = step_lib.init_state(trainable, optimizer)
  state = place(s, state, sh.state)
  frozen = place(s, frozen, sh.frozen)
  teacher = place(s, {"unet": selected}, sh.teacher) if kd else None
  data = place(s, data, sh.data)
  schedule = place(s, schedule_lib.make_schedule(s.scheduler), sh.schedule)
  rng = place(s, jax.random.key(args.seed), sh.rng)

  extra, cache_note = {}, ""
  if cached:
    cache_size = args.kd_cache_size or (64 if size.name == "full" else 4)
    cache_fn = jax.jit(functools.partial(
        kd.kd_cache, size=cache_size, latent_shape=(h, h, 4), models=models, spec=spec),
                       out_shardings=sh.data)
    cache_args = (teacher, frozen, data.kd_context, data.n_kd, schedule,
                  place(s, jax.random.key(args.seed + 1), sh.rng))
    cache_c = aot(cache_fn, *cache_args, options=s.train_compiler_options, mesh=mesh)
    if s.abstract_only:
      cache = jax.eval_shape(cache_fn, *cache_args)
      build_s = None
    else:
      t0 = time.perf_counter()
      cache = jax.block_until_ready(cache_c.fn(*cache_args))
      build_s = time.perf_counter() - t0
    data = data._replace(kd_cache=cache)
    extra = dict(kd_cache_size=cache_size, cache_build_s=build_s,
                 cache_compile_s=cache_c.compile_s)
    cache_note = (f"; targets from a cache of {cache_size} teacher trajectories x {kd_points} "
                  f"point(s), built once per session in {_fmt(build_s)} s "
                  f"(+{_fmt(cache_c.compile_s)} s compile)")

  if args.store_program:
    compiled, extra["program"] = _stored(s, step_fn, mesh, spec, models,
                                         (state, frozen, teacher, data, schedule, rng))
  else:
    compiled = aot(step_fn, state, frozen, teacher, data, schedule, rng,
                   options=step_lib.xla_options(mesh, s.train_compiler_options), mesh=mesh,
                   lower_only=args.lower_only)
  ms = ms_pipe = None
  if not s.abstract_only:
    box = {"state": state}

    def call():
      box["state"], metrics = compiled.fn(box["state"], frozen, teacher, data, schedule, rng)
      return box["state"], metrics

    ms, ms_pipe = time_calls(call, size.warmup, size.iters)
  notes = (f"lfs_jax jit_train_step + losses.loss_fn, AOT; frozen base {args.param_dtype}, "
           f"bf16 compute, float32 trainable ({cfg.train.selection} + token rows), "
           f"AdamW+clip; step includes CLIP text encoder fwd/bwd and flip/rescale; "
           f"attention={args.attention}, remat={args.remat}")
  if s.train_compiler_options:
    notes += "; CPU: compiled at XLA backend optimization level 0"
  if kd:
    notes += (f"; {b} data + {b} KD latents in one student batch, kd.mode={args.kd_mode}"
              + (f" ({kd_points} points)" if kd_points > 1 else "")
              + (cache_note or "; fresh teacher forward every step"))
  return _record(s, workload, compiled, xla_flops(compiled.fn), ms, ms_pipe, b, notes,
                 **extra)


def _stored(s: Setup, step_fn, mesh, spec, models, args):
  """`step.compile_step` through the program store beside --compile-cache (as
  session.py): (Compiled, how the program was had)."""
  folder = programs.folder_for(s.args.compile_cache)
  if folder is None:
    raise SystemExit("--store-program needs a local --compile-cache folder")
  static = repr((models, spec, s.cfg.train.to_dict()))
  c0 = time.process_time()
  exe, seconds, cached, info = step_lib.compile_step(
      step_fn, mesh, *args, store=programs.Store(folder, static),
      compiler_options=s.train_compiler_options)
  persistent = jax.config.jax_compilation_cache_dir is not None
  return Compiled(exe, info.trace_s, seconds, cached if persistent else None,
                  compile_cpu_s=time.process_time() - c0), info.program


def sample_workload(s: Setup, workload: str) -> Dict[str, Any]:
  """lfs_jax's CFG sampler (DDIM, eta 0): `size.sample_steps` steps, UNet batch 2B."""
  b, h, steps = s.size.batch, s.size.latent, s.size.sample_steps
  spec = sampler.SamplerSpec("ddim", s.scheduler)
  rs = np.random.default_rng(s.args.seed + 20)
  d = s.size.context_dim
  args = (s.params("unet", jnp.bfloat16), sampler.make_schedule(spec, steps),
          rs.standard_normal((b, 77, d)).astype(jnp.bfloat16),
          rs.standard_normal((77, d)).astype(jnp.bfloat16),
          np.arange(b, dtype=np.uint32), np.zeros((b, h, h, 4), np.float32),
          np.zeros((b,), bool), np.float32(7.5), np.float32(1.0), np.float32(0.0))
  args = place(s, args)
  fn = jax.jit(functools.partial(sampler.sample, unet=s.unet, spec=spec))
  compiled = aot(fn, *args, lower_only=s.args.lower_only)
  flops, note = xla_flops(compiled.fn), ""
  # XLA's cost analysis counts a while loop's body once: add the other steps' UNet calls.
  x_cfg = jax.ShapeDtypeStruct((2 * b, h, h, 4), jnp.float32)
  per_step = xla_flops(jax.jit(lambda p, x, t, c: s.unet.apply({"params": p}, x, t, c)).lower(
      jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args[0]), x_cfg,
      jax.ShapeDtypeStruct((2 * b,), jnp.int32),
      jax.ShapeDtypeStruct((2 * b, 77, d), jnp.bfloat16)))
  if flops and per_step and flops < 2 * per_step:
    flops += (steps - 1) * per_step
    note = f"; flops = XLA's count (loop body once) + {steps - 1} x UNet forward at batch {2 * b}"
  ms = ms_pipe = None
  if not s.abstract_only:
    ms, ms_pipe = time_calls(lambda: compiled.fn(*args), min(s.size.warmup, 1),
                             s.size.sample_iters)
  notes = (f"lfs_jax diffusion.sampler.sample (fori_loop), DDIM eta=0, {steps} steps, "
           f"guidance 7.5, UNet batch {2 * b}, bf16 weights and compute, "
           f"attention={s.args.attention}" + note)
  return _record(s, workload, compiled, flops, ms, ms_pipe, b, notes, sample_steps=steps)


def vae_workload(s: Setup, workload: str) -> Dict[str, Any]:
  """lfs_jax's `sampler.decode`: B latents -> B images."""
  b, h = s.size.batch, s.size.latent
  rs = np.random.default_rng(s.args.seed + 30)
  args = place(s, (s.params("vae", jnp.bfloat16),
                   rs.standard_normal((b, h, h, 4)).astype(np.float32)))
  fn = jax.jit(functools.partial(sampler.decode, vae=s.vae,
                                 scaling_factor=float(s.size.vae["scaling_factor"])))
  compiled = aot(fn, *args, lower_only=s.args.lower_only)
  ms = ms_pipe = None
  if not s.abstract_only:
    ms, ms_pipe = time_calls(lambda: compiled.fn(*args), s.size.warmup, s.size.iters)
  notes = (f"lfs_jax diffusion.sampler.decode, bf16 weights and compute, "
           f"attention={s.args.attention}")
  return _record(s, workload, compiled, xla_flops(compiled.fn), ms, ms_pipe, b, notes)


RUNNERS = {"cd": train_workload, "lfs": train_workload, "lfs_cached": train_workload,
           "sample": sample_workload, "vae": vae_workload}


def _fmt(x) -> str:
  return "n/a" if x is None else f"{x:.2f}"


def run(argv=None) -> List[Dict[str, Any]]:
  """Runs the chosen workloads in this process; prints and returns their records."""
  args = parse_args(argv)
  if args.lower_only and (not args.compile_only or args.store_program):
    raise SystemExit("--lower-only goes with --compile-only and without --store-program")
  console.setup(args.verbosity)
  names = [w.strip() for w in args.workloads.split(",") if w.strip()]
  bad = [w for w in names if w not in RUNNERS]
  if bad:
    raise SystemExit(f"unknown workload(s) {bad}; choose from {list(RUNNERS)}")
  configure_jax(args)
  s = make_setup(args)
  out = []
  for i, name in enumerate(names):
    rec = RUNNERS[name](s, name)
    if i and rec["peak_mem_gib"] is not None:
      rec["notes"] += "; peak memory is the process's so far (earlier workloads included)"
    bench.emit(rec)
    out.append(rec)
  return out


if __name__ == "__main__":
  run()
