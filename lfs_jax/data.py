"""Few-shot concept photos -> square uint8 arrays, and the [-1, 1] model range.

Host-side only (NumPy + Pillow); a photo may be a URL (`lfs_jax.paths`). Every
photo goes through one path: decode fully
(so a truncated file fails here, not inside a training step), apply the EXIF
orientation, convert any Pillow mode to 8-bit RGB (alpha over white, 16-bit grey
rescaled), centre-crop to a square and resize it to `resolution` with Lanczos.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageOps

from lfs_jax import paths as paths_lib

# Lower-case file extensions that load_image accepts, and the Pillow formats they
# may hold (MPO: the multi-picture JPEG that many cameras write under .jpg).
ALLOWED_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP")
# Modes that carry an alpha channel (or a transparency key) to composite on white.
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# 16/32-bit integer grey modes; PNG stores at most 16 bits, so all are 0..65535.
_WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_HASH_CHUNK = 1 << 20


class DataError(ValueError):
  """A photo that cannot be used (names the file and why)."""


@dataclasses.dataclass(frozen=True)
class ImageRecord:
  """Where a photo came from and its content hash (for the run's concepts.json)."""
  path: str
  sha256: str


def sha256_file(path: str) -> str:
  """Hex SHA-256 of a file's bytes, read in chunks."""
  h = hashlib.sha256()
  try:
    if paths_lib.is_url(path):  # a photo: one request for the whole object
      h.update(paths_lib.read_bytes(path))
    else:
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
          h.update(chunk)
  except paths_lib.StorageError as e:
    raise DataError(f"cannot read {path}: {e}") from None
  except OSError as e:
    raise DataError(f"cannot read {path}: {e.strerror or e}") from None
  return h.hexdigest()


def _check_extension(path: str) -> None:
  ext = os.path.splitext(path)[1].lower()
  if ext not in ALLOWED_EXTENSIONS:
    raise DataError(
        f"{path}: unsupported image type {ext or '(no extension)'!r}; allowed: "
        f"{', '.join(ALLOWED_EXTENSIONS)} (convert it, e.g. to .png)")


def _wide_grey_to_l(im: Image.Image) -> Image.Image:
  """16-bit grey (0..65535) -> 8-bit grey by scaling, not clipping."""
  a = np.asarray(im).astype(np.float64)
  if a.size and (a.min() < 0 or a.max() > 65535):
    raise ValueError(f"{im.mode} pixel values outside 0..65535 "
                     f"(min {a.min():.0f}, max {a.max():.0f})")
  return Image.fromarray(np.round(a * (255.0 / 65535.0)).astype(np.uint8), "L")


def _to_rgb(im: Image.Image) -> Image.Image:
  """Any Pillow mode -> 8-bit RGB; transparent pixels become white."""
  if im.mode in _WIDE_GREY_MODES:
    return _wide_grey_to_l(im).convert("RGB")
  if im.mode in ("P", "L", "RGB") and "transparency" in im.info:
    im = im.convert("RGBA")  # a PNG tRNS key: palette alpha or one transparent colour
  if im.mode == "RGB":
    return im
  if im.mode in _ALPHA_MODES:
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  # L, 1, P without transparency, CMYK (Pillow undoes Adobe's inverted CMYK), YCbCr...
  return im.convert("RGB")


def _center_square(im: Image.Image, resolution: int) -> Image.Image:
  """Resize the shorter side to `resolution` and keep the centred square.

  Done as one resample of the centred square box (the same pixels as resize then
  crop, without rounding the intermediate size). Pillow's Lanczos widens its
  kernel when downscaling, i.e. it is antialiased.
  """
  w, h = im.size
  side = min(w, h)
  left, top = (w - side) / 2.0, (h - side) / 2.0
  return im.resize((resolution, resolution), Image.Resampling.LANCZOS,
                   box=(left, top, left + side, top + side))


def _check_shape(path: str, size: Tuple[int, int], resolution: int, min_side: float,
                 max_aspect: float) -> None:
  """Refuses a photo too small to train on, or too far from square to centre-crop."""
  w, h = size
  floor = min_side * resolution
  if min_side and min(w, h) < floor:
    raise DataError(
        f"{path}: {w}x{h} pixels is smaller than {floor:g} on a side (data.min_side="
        f"{min_side:g} of data.resolution={resolution}); it would be upscaled into noise. "
        "Use a larger photo, or lower data.min_side to accept it")
  if max_aspect and max(w, h) > max_aspect * min(w, h):
    raise DataError(
        f"{path}: {w}x{h} pixels has an aspect ratio of {max(w, h) / min(w, h):.3g}:1, "
        f"beyond data.max_aspect={max_aspect:g}:1; the centre square would keep "
        f"{100 * min(w, h) / max(w, h):.0f}% of it. Crop it to the subject, or raise "
        "data.max_aspect")


def load_image(path: str, resolution: Optional[int], *, min_side: float = 0.0,
               max_aspect: float = 0.0) -> np.ndarray:
  """Reads one photo as a centred square (or whole, at its own size).

  Args:
    path: a .jpg/.jpeg/.png/.webp file (MPO multi-picture JPEGs give their first
      frame; animated PNG/WebP their first frame).
    resolution: output side in pixels; None keeps the photo whole at its native
      size (CLIP evaluation, whose preprocessing resizes and crops by itself).
    min_side: refuse a photo whose shorter side is below min_side * resolution
      (training reads data.min_side; 0 = no floor).
    max_aspect: refuse a photo whose longer side exceeds max_aspect times the shorter
      (training reads data.max_aspect; 0 = any).

  Returns:
    uint8 [resolution, resolution, 3] (or [H, W, 3] for None), RGB.

  Raises:
    DataError: naming `path`, for a missing, truncated, corrupt or unsupported file.
  """
  native = resolution is None
  if not native and (not isinstance(resolution, (int, np.integer)) or resolution <= 0):
    raise DataError(f"resolution must be a positive integer, got {resolution!r}")
  _check_extension(path)
  try:
    if not paths_lib.isfile(path):
      raise DataError(f"{path}: no such file")
    source = io.BytesIO(paths_lib.read_bytes(path)) if paths_lib.is_url(path) else path
  except paths_lib.StorageError as e:
    raise DataError(f"cannot read {path}: {e}") from None
  try:
    with Image.open(source) as im:
      if im.format not in _ALLOWED_FORMATS:
        raise DataError(
            f"{path}: file content is {im.format or 'unknown'}, not one of "
            f"{', '.join(_ALLOWED_FORMATS)} (its extension is misleading; convert it)")
      im.seek(0)
      im.load()  # full decode here: truncated data raises now, not later
      im = ImageOps.exif_transpose(im)
      if not native:
        _check_shape(path, im.size, int(resolution), min_side, max_aspect)
      im = _to_rgb(im)
      if not native:
        im = _center_square(im, int(resolution))
      out = np.array(im, dtype=np.uint8)
  except DataError:
    raise
  except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
    # Pillow reports truncation/corruption as OSError, and some broken headers as
    # SyntaxError/ValueError; all mean "this file is not a usable photo".
    raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
  if native:
    if out.ndim != 3 or out.shape[-1] != 3 or not out.size:
      raise DataError(f"{path}: decoded to shape {out.shape}, expected [H, W, 3]")
  elif out.shape != (resolution, resolution, 3):
    raise DataError(f"{path}: decoded to shape {out.shape}, expected "
                    f"{(resolution, resolution, 3)}")
  return out


def load_images(paths: Sequence[str], resolution: int, *, min_side: float = 0.0,
                max_aspect: float = 0.0) -> Tuple[np.ndarray, List[ImageRecord]]:
  """Reads all photos of a concept, or none.

  Every file is decoded before anything is returned; if any fails, one DataError
  lists every failing file with its reason.

  Args:
    paths: image files, in the order wanted.
    resolution: output side in pixels.
    min_side, max_aspect: the size and shape limits of `load_image` (0 = none).

  Returns:
    (uint8 [N, resolution, resolution, 3], one ImageRecord per photo with its
    absolute path and sha256).
  """
  paths = list(paths)
  if not paths:
    raise DataError("no images given: a concept needs at least one photo")
  arrays, records, errors = [], [], []
  for p in paths:
    try:
      arrays.append(load_image(p, resolution, min_side=min_side, max_aspect=max_aspect))
      records.append(ImageRecord(path=paths_lib.abspath(p), sha256=sha256_file(p)))
    except DataError as e:
      errors.append(str(e))
  if errors:
    if len(errors) == 1:
      raise DataError(errors[0])
    raise DataError(f"{len(errors)} of {len(paths)} images failed:\n  " +
                    "\n  ".join(errors))
  return np.stack(arrays), records


def to_model_range(images_uint8) -> np.ndarray:
  """uint8 [..., 3] in 0..255 -> float32 in [-1, 1]."""
  a = np.asarray(images_uint8)
  if a.dtype != np.uint8:
    raise DataError(f"to_model_range expects uint8 images, got dtype {a.dtype}")
  return a.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(images_float) -> np.ndarray:
  """Float images in [-1, 1] -> uint8 (clipped, rounded); non-finite values raise."""
  a = np.asarray(images_float, dtype=np.float32)
  if not np.all(np.isfinite(a)):
    raise DataError(f"to_uint8: {int(np.size(a) - np.isfinite(a).sum())} non-finite "
                    "values (NaN/inf) in the images")
  return np.round(np.clip((a + 1.0) * 127.5, 0.0, 255.0)).astype(np.uint8)
