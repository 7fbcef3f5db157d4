"""uint8 images -> pixel_values, exactly as transformers' image processors (PIL path).

Three processors are implemented, chosen by the `image_processor_type` (or legacy
`feature_extractor_type`) of preprocessor_config.json: CLIPImageProcessor (CLIP),
ViTImageProcessor (DINO ViT, e.g. facebook/dino-vits16) and BitImageProcessor
(DINOv2). They share one pipeline and differ only in their defaults and in what an
integer `size` means (CLIP, BiT: the shortest edge; ViT: a square). The steps and
their arithmetic follow the PIL path of transformers (its `*ImageProcessorPil`, and
the only processors of transformers 4), which is also what OpenAI's CLIP does:

  1. resize with PIL (the processor's filter: BICUBIC for CLIP and BiT, BILINEAR for
     ViT) either to size (height, width) exactly or so the shortest side is
     size["shortest_edge"], the long side `int(shortest * long / short)` (floored);
     PIL filters over the whole source footprint (it antialiases on downscaling)
     and rounds the result to uint8;
  2. center crop (CLIP, BiT; ViT has none), top = (h - crop_h) // 2,
     left = (w - crop_w) // 2;
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
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from lfs_jax import paths
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
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Each processor's class defaults (transformers' *ImageProcessorPil attributes):
# size, crop_size, do_center_crop, resample, mean, std, and whether an integer size
# is a square ("square") or the shortest edge ("shortest").
_PROCESSORS = {
    "CLIPImageProcessor": dict(size={"shortest_edge": 224},
                               crop={"height": 224, "width": 224}, center_crop=True,
                               resample=3, mean=_CLIP_MEAN, std=_CLIP_STD, int_size="shortest"),
    "BitImageProcessor": dict(size={"shortest_edge": 224},
                              crop={"height": 224, "width": 224}, center_crop=True,
                              resample=3, mean=_CLIP_MEAN, std=_CLIP_STD, int_size="shortest"),
    "ViTImageProcessor": dict(size={"height": 224, "width": 224}, crop=None,
                              center_crop=False, resample=2, mean=(0.5, 0.5, 0.5),
                              std=(0.5, 0.5, 0.5), int_size="square"),
}
_LEGACY_NAMES = {"CLIPFeatureExtractor": "CLIPImageProcessor",
                 "ViTFeatureExtractor": "ViTImageProcessor"}


def processor_type(config: Mapping[str, Any], default: str) -> str:
  """The implemented processor a preprocessor_config.json names (default if none)."""
  name = config.get("image_processor_type") or config.get("feature_extractor_type") or default
  for suffix in ("Pil", "Fast"):
    if name.endswith(suffix):
      name = name[:-len(suffix)]
  name = _LEGACY_NAMES.get(name, name)
  if name not in _PROCESSORS:
    raise UnsupportedConfigError(
        f"preprocessor: image_processor_type={name!r}; lfs_jax implements "
        f"{sorted(_PROCESSORS)}")
  return name


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """Hashable image preprocessing; defaults are CLIPImageProcessor's (ViT-B/32).

  Attributes:
    resize: (shortest_edge,) to keep the aspect ratio, or (height, width) exactly.
    crop: (height, width) of the center crop, or None for no crop (then `resize`
      must be (height, width)).
    resample: a PIL filter number (3 = BICUBIC).
    rescale_factor: multiplies the uint8 values, or None to skip that step.
    mean, std: per-channel normalisation, or None to skip it.
  """

  resize: Tuple[int, ...] = (224,)
  crop: Optional[Tuple[int, int]] = (224, 224)
  resample: int = 3
  rescale_factor: Union[float, None] = 1 / 255
  mean: Union[Tuple[float, float, float], None] = (0.48145466, 0.4578275, 0.40821073)
  std: Union[Tuple[float, float, float], None] = (0.26862954, 0.26130258, 0.27577711)

  def __post_init__(self):
    if len(self.resize) not in (1, 2) or any(
        not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in self.resize):
      raise UnsupportedConfigError(f"preprocessor: resize={self.resize} is not a size")
    if self.crop is None:
      if len(self.resize) != 2:
        raise UnsupportedConfigError(
            f"preprocessor: size={self.resize} keeps the aspect ratio and there is no "
            "center crop, so images would not share one size; set a crop_size or a "
            "{'height', 'width'} size")
      return self._check_filters()
    if len(self.crop) != 2 or any(not isinstance(s, int) or s < 1 for s in self.crop):
      raise UnsupportedConfigError(f"preprocessor: crop_size={self.crop} is not a size")
    # A crop larger than the resized image is zero-padded by transformers; no CLIP
    # checkpoint asks for that, so it is refused rather than reimplemented.
    smallest = self.resize * 2 if len(self.resize) == 1 else self.resize
    if any(c > r for c, r in zip(self.crop, smallest)):
      raise UnsupportedConfigError(
          f"preprocessor: crop_size={self.crop} is larger than the resized image "
          f"(size={self.resize}); padding is not implemented")
    self._check_filters()

  @property
  def output_size(self) -> Tuple[int, int]:
    """(height, width) of every preprocessed image: the model's input size."""
    return tuple(self.crop) if self.crop is not None else tuple(self.resize)

  def _check_filters(self) -> None:
    if self.resample not in {int(f) for f in Image.Resampling}:
      raise UnsupportedConfigError(
          f"preprocessor: resample={self.resample!r} is not a PIL filter number")
    for name in ("mean", "std"):
      value = getattr(self, name)
      if value is not None and len(value) != 3:
        raise UnsupportedConfigError(
            f"preprocessor: image_{name}={value} must have 3 values (RGB)")

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any],
                        default_type: str = "CLIPImageProcessor") -> "PreprocessConfig":
    """Builds the config from a preprocessor_config.json dict (any transformers version).

    Args:
      config: the JSON dict.
      default_type: the processor assumed when the file names none.

    An integer `size` means the shortest edge (CLIP, BiT) or a square (ViT), as each
    processor reads it; an integer `crop_size` is a square crop.

    Raises:
      UnsupportedConfigError: naming an unknown key, processor or a value we do not
        implement.
    """
    kind = processor_type(config, default_type)
    defaults = _PROCESSORS[kind]
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _FIELDS
                     and k not in _INERT_KEYS)
    if unknown:
      raise UnsupportedConfigError(
          f"preprocessor: unknown key(s) {unknown}; lfs_jax implements {list(_FIELDS)}")
    get = lambda k, default: config[k] if config.get(k) is not None else default
    if not get("do_resize", True):
      raise UnsupportedConfigError(
          "preprocessor: do_resize=false; the model needs images resized to its input size")
    for flag in ("do_pad", "use_square_size"):
      if get(flag, False):
        raise UnsupportedConfigError(f"preprocessor: {flag}=true is not implemented")
    size = get("size", defaults["size"])
    if isinstance(size, int) and not isinstance(size, bool):
      resize = (size,) if defaults["int_size"] == "shortest" else (size, size)
    elif isinstance(size, Mapping) and set(size) == {"shortest_edge"}:
      resize = (size["shortest_edge"],)
    elif isinstance(size, Mapping) and set(size) == {"height", "width"}:
      resize = (size["height"], size["width"])
    else:
      raise UnsupportedConfigError(
          f"preprocessor: size={size!r}; only an int, {{'shortest_edge'}} or "
          "{'height', 'width'} are implemented")
    crop = None
    if get("do_center_crop", defaults["center_crop"]):
      crop = get("crop_size", defaults["crop"] or {"height": 224, "width": 224})
      if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
      if not isinstance(crop, Mapping) or set(crop) != {"height", "width"}:
        raise UnsupportedConfigError(
            f"preprocessor: crop_size={crop!r}; only an int or {{'height', 'width'}} are "
            "implemented")
      crop = (crop["height"], crop["width"])
    rescale = get("rescale_factor", 1 / 255) if get("do_rescale", True) else None
    normalize = get("do_normalize", True)
    return cls(
        resize=tuple(resize), crop=crop,
        resample=get("resample", defaults["resample"]), rescale_factor=rescale,
        mean=tuple(get("image_mean", defaults["mean"])) if normalize else None,
        std=tuple(get("image_std", defaults["std"])) if normalize else None)

  @classmethod
  def from_folder(cls, folder: str, default_type: str = "CLIPImageProcessor"
                  ) -> "PreprocessConfig":
    """Reads and validates `folder/preprocessor_config.json`.

    Raises:
      WeightsNotFoundError: the file is missing (names the folder).
      UnsupportedConfigError, ValueError: a bad or unsupported file (names it).
    """
    path = os.path.join(folder, "preprocessor_config.json")
    if not paths.isfile(path):
      raise WeightsNotFoundError(
          f"{path} is missing: the model folder {folder} needs the "
          f"preprocessor_config.json of its image processor ({default_type}: image "
          "size, crop, mean and std), as save_pretrained writes it")
    try:
      return cls.from_transformers(json.loads(paths.read_text(path)), default_type)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e})") from None
    except UnsupportedConfigError as e:
      raise UnsupportedConfigError(f"{path}: {e}") from None


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
  if config.crop is not None:
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
  """A batch of uint8 RGB images of any sizes -> pixel_values.

  Args:
    images: a list of [H_i, W_i, 3] uint8 arrays, or one [B, H, W, 3] uint8 array.
    config: from PreprocessConfig.from_folder (or load_clip's third value).

  Returns:
    float32 numpy [B, H, W, 3] (NHWC, config.output_size), the input of
    CLIPModel.get_image_features or the DINO ViT.
  """
  if isinstance(images, np.ndarray) and images.ndim == 3:
    raise ValueError(
        f"expected a batch: a list of [H, W, 3] images or one [B, H, W, 3] array, got "
        f"one image of shape {images.shape}")
  if len(images) == 0:
    raise ValueError("no images to preprocess")
  return np.stack([preprocess_one(im, config) for im in images])
