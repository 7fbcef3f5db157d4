"""Image encoders of the evaluation other than CLIP (DINO), and the batching they share.

    dino = DinoEncoder("/models/dino-vits16", batch_size=32)
    emb = dino.image_embeddings(photos)        # unit CLS embeddings [N, D], any sizes

Every call pads to `batch_size`, so each encoder compiles once per process.
"""

from __future__ import annotations

import collections
from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lfs_jax import paths
from lfs_jax.errors import EvalError
from lfs_jax.weights import preprocess as preprocess_lib
from lfs_jax.weights import loaders

# How many times the DINO encoder was traced (a retrace is a recompile).
TRACES: collections.Counter = collections.Counter()


def batched(fn: Callable, params, model, x: np.ndarray, batch_size: int) -> np.ndarray:
  """Applies a jitted `fn(params, x, model=model)` over x [N, ...] in padded batches.

  The last batch is padded with copies of its last row, so every call has the same
  shape (one compilation); the padding rows are dropped. Returns [N, P] float32.
  """
  out = []
  for i in range(0, len(x), batch_size):
    chunk = x[i:i + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    out.append(np.asarray(jax.device_get(fn(params, jnp.asarray(chunk), model=model)),
                          np.float32)[:batch_size - pad])
  return np.concatenate(out)


def _dino_features(params, pixels: jax.Array, *, model) -> jax.Array:
  """pixel_values [B, H, W, 3] -> unit CLS embeddings [B, D] float32."""
  TRACES["dino"] += 1
  cls = model.apply({"params": params}, pixels)[1].astype(jnp.float32)
  return cls / jnp.linalg.norm(cls, axis=-1, keepdims=True)


_dino_jit = jax.jit(_dino_features, static_argnames=("model",))


class DinoEncoder:
  """A local DINO folder (ViTModel or Dinov2Model) as an image encoder.

  Attributes:
    folder: the DINO folder.
    batch_size: images per device call.
    model, params, prep: the Flax DinoViT, its parameters and its preprocessing.
  """

  def __init__(self, folder: str, batch_size: int = 32):
    """Loads the folder.

    Raises:
      EvalError: no folder given, or it does not exist.
      WeightsNotFoundError, PickleRefusedError, UnsupportedConfigError,
        WeightsMismatchError: from loaders.load_dino, naming the folder or tensor.
    """
    if not folder:
      raise EvalError(
          "no DINO model: pass --config.eval.dino=DIR, a local Hugging Face ViTModel or "
          "Dinov2Model folder such as a safetensors copy of facebook/dino-vits16 (or use "
          "--config.eval.image_encoders=clip)")
    if not paths.isdir(folder):
      raise EvalError(f"DINO folder {folder!r} does not exist (eval.dino)")
    if batch_size < 1:
      raise EvalError(f"eval.batch_size={batch_size}: must be >= 1")
    self.folder = folder
    self.batch_size = int(batch_size)
    self.model, self.params, self.prep = loaders.load_dino(folder)

  def image_embeddings(self, images: Union[np.ndarray, Sequence[np.ndarray]]) -> np.ndarray:
    """uint8 RGB images (one [N, H, W, 3] array or a list of any sizes) -> unit [N, D]."""
    return batched(_dino_jit, self.params, self.model,
                   preprocess_lib.preprocess(images, self.prep), self.batch_size)
