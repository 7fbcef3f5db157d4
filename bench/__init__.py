"""Speed benchmarks of lfs_jax against PyTorch diffusers, on the SD-1.5 architecture.

Random weights (the work per step does not depend on their values), so nothing is
downloaded. `python -m bench` runs both sides and prints a table; docs/benchmarks.md
says how to read it. This module holds what both sides share and imports neither
framework: the model sizes, the peak FLOP/s table and the JSON record.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from typing import Any, Dict, Optional, Sequence

# The JSON line of one measurement; bench_jax and bench_torch print nothing else on stdout.
FIELDS = ("workload", "framework", "device", "batch", "resolution", "ms", "img_per_s",
          "peak_mem_gib", "compile_s", "flops", "mfu", "notes")
WORKLOADS = ("cd", "lfs", "lfs_cached", "sample", "vae")
DESCRIPTIONS = {
    "cd": "Custom-Diffusion train step (attn2 to_k/to_v + token rows, AdamW, no KD)",
    "lfs": "LFS train step: B data + B pure-noise KD latents, fresh teacher forward",
    "lfs_cached": "LFS train step, teacher targets from the per-session DFKD cache",
    "sample": "50-step DDIM classifier-free-guided sampling (UNet batch 2B)",
    "vae": "VAE decode",
}

# Dense bf16 peak of each card (matrix units, no sparsity), matched in order on the
# device name; anything else (CPU included) has no MFU.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),      # SXM (HBM3)
    ("H200", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
)

# SD 1.5 component configs (diffusers / transformers config.json contents of the public
# model card; the same as tests/data/sd_configs/sd15, written out here so the bench
# needs no test data; tests/test_bench.py compares them).
SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu",
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "out_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "attention_head_dim": 8, "cross_attention_dim": 768,
    "sample_size": 64,
}
SD15_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "scaling_factor": 0.18215, "sample_size": 512,
}
SD15_TEXT = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05, "projection_dim": 768,
}
SD15_SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False,
    "steps_offset": 1, "_class_name": "PNDMScheduler", "skip_prk_steps": True,
    "prediction_type": "epsilon",
}


@dataclasses.dataclass(frozen=True)
class Size:
  """One benchmark size: the component configs and the per-call shapes."""
  name: str            # "full" (SD 1.5, 512 px) | "tiny" (CPU smoke size)
  unet: Dict[str, Any]
  vae: Dict[str, Any]
  text: Dict[str, Any]
  scheduler: Dict[str, Any]
  batch: int           # data images per train step / images per sampler or decode call
  sample_steps: int
  warmup: int          # untimed calls before the timed ones
  iters: int           # timed calls (train steps, decodes)
  sample_iters: int    # timed sampler calls

  @property
  def latent(self) -> int:
    return int(self.unet["sample_size"])

  @property
  def resolution(self) -> int:
    """Image side in pixels: the latent side times the VAE's downsampling."""
    return self.latent * 2 ** (len(self.vae["block_out_channels"]) - 1)

  @property
  def context_dim(self) -> int:
    return int(self.unet["cross_attention_dim"])


def full_size(batch: int = 8) -> Size:
  return Size("full", SD15_UNET, SD15_VAE, SD15_TEXT, SD15_SCHEDULER, batch=batch,
              sample_steps=50, warmup=3, iters=10, sample_iters=2)


def tiny_size(batch: int = 2) -> Size:
  """lfs_jax's tiny model (lfs_jax/tiny.py): 32 px images, 16x16 latents, width-32 text."""
  from lfs_jax import tiny  # pylint: disable=g-import-not-at-top
  return Size("tiny", tiny.UNET, tiny.VAE, tiny.TEXT, tiny.SCHEDULER, batch=batch,
              sample_steps=50, warmup=1, iters=3, sample_iters=1)


def peak_flops(device: str) -> Optional[float]:
  """Dense bf16 FLOP/s of the card named `device`, None if unknown (CPUs)."""
  for key, value in PEAK_BF16_FLOPS:
    if key.lower() in device.lower():
      return value
  return None


def median_ms(seconds: Sequence[float]) -> float:
  return 1e3 * statistics.median(seconds)


def record(*, workload: str, framework: str, device: str, batch: int, resolution: int,
           ms: float, peak_mem_gib: Optional[float], compile_s: Optional[float],
           flops: Optional[float], notes: str, **extra) -> Dict[str, Any]:
  """One JSON-ready measurement: img/s and MFU derived from ms, flops and the card."""
  peak = peak_flops(device)
  secs = ms / 1e3 if ms else None
  mfu = flops / secs / peak if (flops and secs and peak) else None
  out = dict(workload=workload, framework=framework, device=device, batch=batch,
             resolution=resolution, ms=_round(ms), img_per_s=_round(batch / secs) if secs else None,
             peak_mem_gib=_round(peak_mem_gib), compile_s=_round(compile_s),
             flops=flops, mfu=_round(mfu, 4), notes=notes)
  out.update({k: _round(v) if isinstance(v, float) else v for k, v in extra.items()})
  return out


def emit(rec: Dict[str, Any]) -> None:
  print(json.dumps(rec), flush=True)


def _round(x, digits: int = 3):
  return None if x is None else round(float(x), digits)
