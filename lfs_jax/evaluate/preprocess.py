"""uint8 images -> CLIP pixel_values, exactly as transformers' CLIPImageProcessor (PIL).

The steps and their arithmetic follow the PIL path of transformers (its
`CLIPImageProcessorPil`, and the only CLIPImageProcessor of transformers 4), which
is also what OpenAI's CLIP does:

  1. resize with PIL (BICUBIC by default) so the shortest side is
     size["shortest_edge"], the long side `int(shortest * long / short)` (floored);
     PIL filters over the whole source footprint (it antialiases on downscaling)
     and rounds the result to uint8;
  2. center crop, top = (h - crop_h) // 2, left = (w - crop_w) // 2;
  3. rescale: float64 multiply by rescale_factor (1/255), then float32;
  4. normalize: (x - mean) / std in float32.

So the output matches transformers' to float32 rounding (the tests find it
bit-identical). transformers 5 prefers a torchvision backend when torchvision is
installed (bicubic on tensors, no uint8 rounding after resizing): its values differ
slightly from these, and from OpenAI's, which are the PIL ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from lfs_jax.errors import UnsupportedConfigError
from lfs_jax.weights.files import WeightsNotFoundError

# Keys of a preprocessor_config.json that do not change the result for RGB uint8
# input: bookkeeping, and output-format switches we fix (NHWC float32 numpy).
_INERT_KEYS = frozenset({
    "image_processor_type", "feature_extractor_type", "processor_class",
    "do_convert_rgb", "data_format", "input_data_format", "return_tensors", "device",
    "disable_grouping", "default_to_square",
})
_FIELDS = ("size", "crop_size", "resample", "do_resize", "do_center_crop", "do_rescale",
           "rescale_factor", "do_normalize", "image_mean", "image_std", "do_pad",
           "use_square_size")


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """Hashable CLIP preprocessing; defaults are CLIPImageProcessor's (ViT-B/32).

  Attributes:
    resize: (shortest_edge,) to keep the aspect ratio, or (height, width) exactly.
    crop: (height, width) of the center crop, the model's input size.
    resample: a PIL filter number (3 = BICUBIC).
    rescale_factor: multiplies the uint8 values, or None to skip that step.
    mean, std: per-channel normalisation, or None to skip it.
  """

  resize: Tuple[int, ...] = (224,)
  crop: Tuple[int, int] = (224, 224)
  resample: int = 3
  rescale_factor: Union[float, None] = 1 / 255
  mean: Union[Tuple[float, float, float], None] = (0.48145466, 0.4578275, 0.40821073)
  std: Union[Tuple[float, float, float], None] = (0.26862954, 0.26130258, 0.27577711)

  def __post_init__(self):
    if len(self.resize) not in (1, 2) or any(
        not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in self.resize):
      raise UnsupportedConfigError(f"preprocessor: resize={self.resize} is not a size")
    if len(self.crop) != 2 or any(not isinstance(s, int) or s < 1 for s in self.crop):
      raise UnsupportedConfigError(f"preprocessor: crop_size={self.crop} is not a size")
    # A crop larger than the resized image is zero-padded by transformers; no CLIP
    # checkpoint asks for that, so it is refused rather than reimplemented.
    smallest = self.resize * 2 if len(self.resize) == 1 else self.resize
    if any(c > r for c, r in zip(self.crop, smallest)):
      raise UnsupportedConfigError(
          f"preprocessor: crop_size={self.crop} is larger than the resized image "
          f"(size={self.resize}); padding is not implemented")
    if self.resample not in {int(f) for f in Image.Resampling}:
      raise UnsupportedConfigError(
          f"preprocessor: resample={self.resample!r} is not a PIL filter number")
    for name in ("mean", "std"):
      value = getattr(self, name)
      if value is not None and len(value) != 3:
        raise UnsupportedConfigError(
            f"preprocessor: image_{name}={value} must have 3 values (RGB)")

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any]) -> "PreprocessConfig":
    """Builds the config from a preprocessor_config.json dict (any transformers version).

    Legacy integer `size` / `crop_size` mean shortest edge / square crop, as
    CLIPImageProcessor reads them.

    Raises:
      UnsupportedConfigError: naming an unknown key or a value we do not implement.
    """
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _FIELDS
                     and k not in _INERT_KEYS)
    if unknown:
      raise UnsupportedConfigError(
          f"preprocessor: unknown key(s) {unknown}; lfs_jax implements {list(_FIELDS)}")
    get = lambda k, default: config[k] if config.get(k) is not None else default
    for flag in ("do_resize", "do_center_crop"):
      if not get(flag, True):
        raise UnsupportedConfigError(
            f"preprocessor: {flag}=false; CLIP needs images resized and cropped to its "
            "input size")
    for flag in ("do_pad", "use_square_size"):
      if get(flag, False):
        raise UnsupportedConfigError(f"preprocessor: {flag}=true is not implemented")
    size = get("size", {"shortest_edge": 224})
    if isinstance(size, int):
      resize = (size,)
    elif isinstance(size, Mapping) and set(size) == {"shortest_edge"}:
      resize = (size["shortest_edge"],)
    elif isinstance(size, Mapping) and set(size) == {"height", "width"}:
      resize = (size["height"], size["width"])
    else:
      raise UnsupportedConfigError(
          f"preprocessor: size={size!r}; only an int, {{'shortest_edge'}} or "
          "{'height', 'width'} are implemented")
    crop = get("crop_size", {"height": 224, "width": 224})
    if isinstance(crop, int):
      crop = {"height": crop, "width": crop}
    if not isinstance(crop, Mapping) or set(crop) != {"height", "width"}:
      raise UnsupportedConfigError(
          f"preprocessor: crop_size={crop!r}; only an int or {{'height', 'width'}} are "
          "implemented")
    rescale = get("rescale_factor", 1 / 255) if get("do_rescale", True) else None
    normalize = get("do_normalize", True)
    return cls(
        resize=tuple(resize), crop=(crop["height"], crop["width"]),
        resample=get("resample", 3), rescale_factor=rescale,
        mean=tuple(get("image_mean", cls.mean)) if normalize else None,
        std=tuple(get("image_std", cls.std)) if normalize else None)

  @classmethod
  def from_folder(cls, folder: str) -> "PreprocessConfig":
    """Reads and validates `folder/preprocessor_config.json`."""
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
      raise WeightsNotFoundError(
          f"{path} is missing: a CLIP folder needs the preprocessor_config.json of its "
          "CLIPImageProcessor (image size, mean and std)")
    try:
      with open(path) as f:
        return cls.from_transformers(json.load(f))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e})") from None


def _resized_size(h: int, w: int, resize: Tuple[int, ...]) -> Tuple[int, int]:
  if len(resize) == 2:
    return resize
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = resize[0], int(resize[0] * long / short)
  return (new_long, new_short) if w <= h else (new_short, new_long)


def preprocess_one(image: np.ndarray, config: PreprocessConfig) -> np.ndarray:
  """One uint8 RGB image [H, W, 3] -> float32 pixel values [crop_h, crop_w, 3]."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(
        f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
  h, w = _resized_size(image.shape[0], image.shape[1], config.resize)
  pil = Image.fromarray(np.ascontiguousarray(image))
  x = np.asarray(pil.resize((w, h), resample=config.resample))
  ch, cw = config.crop
  top, left = (h - ch) // 2, (w - cw) // 2
  x = x[top:top + ch, left:left + cw]
  if config.rescale_factor is not None:
    x = (x.astype(np.float64) * config.rescale_factor).astype(np.float32)
  else:
    x = x.astype(np.float32)
  if config.mean is not None:
    x = (x - np.asarray(config.mean, np.float32)) / np.asarray(config.std, np.float32)
  return x


def preprocess(images: Union[np.ndarray, Sequence[np.ndarray]],
               config: PreprocessConfig) -> np.ndarray:
  """A batch of uint8 RGB images of any sizes -> CLIP pixel_values.

  Args:
    images: a list of [H_i, W_i, 3] uint8 arrays, or one [B, H, W, 3] uint8 array.
    config: from PreprocessConfig.from_folder (or load_clip's third value).

  Returns:
    float32 numpy [B, crop_h, crop_w, 3] (NHWC), the input of
    CLIPModel.get_image_features.
  """
  if isinstance(images, np.ndarray) and images.ndim == 3:
    raise ValueError(
        f"expected a batch: a list of [H, W, 3] images or one [B, H, W, 3] array, got "
        f"one image of shape {images.shape}")
  if len(images) == 0:
    raise ValueError("no images to preprocess")
  return np.stack([preprocess_one(im, config) for im in images])
