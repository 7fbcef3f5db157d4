"""A local CLIP folder as an evaluator: uint8 images and texts -> unit embeddings -> metrics.

    scorer = ClipScorer("/models/clip-vit-base-patch32", batch_size=32)
    emb = scorer.image_embeddings(images)              # unit [N, P], any image sizes
    scorer.text_scores(emb, texts)                     # {"ta": ., "clipscore": .}

The folder is a Hugging Face CLIPModel saved with save_pretrained (config.json,
model.safetensors, preprocessor_config.json) plus its tokenizer files (vocab.json,
merges.txt), as openai/clip-vit-base-patch32 ships them. Nothing is downloaded.
Every call pads to `batch_size`, so each tower compiles once per process.
"""

from __future__ import annotations

import collections
from typing import Dict, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lfs_jax import concepts as concepts_lib
from lfs_jax import paths
from lfs_jax.errors import EvalError
from lfs_jax.evaluate import encoders
from lfs_jax.evaluate import metrics
from lfs_jax.weights import preprocess as preprocess_lib
from lfs_jax.weights import loaders

# How many times each tower was traced (a retrace is a recompile).
TRACES: collections.Counter = collections.Counter()


def _unit(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _image_features(params, pixels: jax.Array, *, model) -> jax.Array:
  """pixel_values [B, S, S, 3] -> unit image embeddings [B, P] float32."""
  TRACES["image"] += 1
  return _unit(model.apply({"params": params}, pixels, method="get_image_features"))


def _text_features(params, ids: jax.Array, *, model) -> jax.Array:
  """Token ids [B, L] -> unit text embeddings [B, P] float32."""
  TRACES["text"] += 1
  return _unit(model.apply({"params": params}, ids, method="get_text_features"))


# The module is static (hashable), the parameters an argument: no closed-over weights.
_image_jit = jax.jit(_image_features, static_argnames=("model",))
_text_jit = jax.jit(_text_features, static_argnames=("model",))


class ClipScorer:
  """CLIP embeddings and the TA / CLIPScore of a set of generated images.

  Attributes:
    folder: the CLIP folder.
    batch_size: images or texts per device call.
    model, params, prep: the Flax CLIPModel, its parameters and its preprocessing.
    tokenizer: the folder's CLIPTokenizer.
  """

  def __init__(self, folder: str, batch_size: int = 32):
    """Loads the folder.

    Raises:
      EvalError: no folder given, or it does not exist, or its tokenizer has more
        tokens than the text tower's vocabulary.
      WeightsNotFoundError, UnsupportedConfigError, WeightsMismatchError: from the
        loaders, naming the missing file or the bad field / tensor.
    """
    if not folder:
      raise EvalError(
          "no CLIP model: pass --clip=DIR (or --config.eval.clip=DIR), a local Hugging "
          "Face CLIPModel folder such as a copy of openai/clip-vit-base-patch32")
    if not paths.isdir(folder):
      raise EvalError(f"CLIP folder {folder!r} does not exist (--clip / eval.clip)")
    if batch_size < 1:
      raise EvalError(f"eval.batch_size={batch_size}: must be >= 1")
    self.folder = folder
    self.batch_size = int(batch_size)
    self.model, self.params, self.prep = loaders.load_clip(folder)
    self.tokenizer = loaders.load_tokenizer(folder)
    vocab = self.model.config.text.vocab_size
    if len(self.tokenizer) > vocab:
      raise EvalError(
          f"{folder}: the tokenizer has {len(self.tokenizer)} tokens but the text model "
          f"only {vocab} embeddings; the tokenizer files belong to another model")
    self.max_length = self.model.config.text.max_position_embeddings

  def _batched(self, fn, x: np.ndarray) -> np.ndarray:
    return encoders.batched(fn, self.params, self.model, x, self.batch_size)

  def image_embeddings(self, images: Union[np.ndarray, Sequence[np.ndarray]]) -> np.ndarray:
    """uint8 RGB images (one [N, H, W, 3] array or a list of any sizes) -> unit [N, P]."""
    return self._batched(_image_jit, preprocess_lib.preprocess(images, self.prep))

  def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
    """Texts -> unit [N, P]; tokenized to the model's length (77), truncated."""
    if not len(texts):
      raise ValueError("no text to embed")
    ids = concepts_lib.tokenize(self.tokenizer, list(texts), self.max_length)
    return self._batched(_text_jit, ids)

  def text_scores(self, image_embeddings: np.ndarray, texts: Sequence[str]
                  ) -> Dict[str, float]:
    """{"ta": ., "clipscore": .} of images [N, P] (image_embeddings) against N texts.

    Text i is the one image i is scored against; repeated texts are embedded once.
    """
    if len(image_embeddings) != len(texts):
      raise ValueError(f"{len(image_embeddings)} images but {len(texts)} texts")
    unique = list(dict.fromkeys(texts))
    text_emb = self.text_embeddings(unique)
    per_image = text_emb[[unique.index(t) for t in texts]]
    ta, cs = metrics.text_alignment(image_embeddings, per_image)
    return {"ta": ta, "clipscore": cs}
