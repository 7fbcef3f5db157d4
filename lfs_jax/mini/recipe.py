"""The mini world's base-model recipe, shared by the JAX and the PyTorch training loops.

`train_base` (JAX) and `train_torch` (diffusers) train the same UNet on the same
batches: both draw images, captions and timesteps and set the learning rate here,
so neither loop imports the other.
"""

from __future__ import annotations

import numpy as np
import optax

# Training timesteps: this share of each batch is drawn from [HIGH_T, 1000), where
# the image is (nearly) gone and only the caption says what to draw; the rest from
# [0, 1000).
HIGH_T = 600


def draw_timesteps(u_share: np.ndarray, u_t: np.ndarray, high_share: float) -> np.ndarray:
  """Timesteps from two uniform [0, 1) draws per image (numpy or jax arrays alike)."""
  low = (u_t * 1000).astype("int32")
  high = (HIGH_T + u_t * (1000 - HIGH_T)).astype("int32")
  return (u_share < high_share) * high + (u_share >= high_share) * low


def draw_batch(rng: np.random.Generator, caption_index: np.ndarray, batch: int, drop: float,
               empty_index: int):
  """Image indices and caption rows of one batch: a random caption variant per image,
  the empty caption with probability `drop` (classifier-free guidance)."""
  idx = rng.integers(0, len(caption_index), batch)
  cap = caption_index[idx, rng.integers(0, caption_index.shape[1], batch)]
  return idx, np.where(rng.random(batch) < drop, empty_index, cap)


def lr_schedule(lr: float, steps: int) -> optax.Schedule:
  """The UNet's learning rate: linear warmup, then cosine down to 5% (both loops)."""
  return optax.warmup_cosine_decay_schedule(0.0, lr, min(200, steps // 10), steps, lr * 0.05)
