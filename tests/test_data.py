"""lfs_jax.data: every photo mode -> centred square uint8 RGB; bad files name themselves."""

import hashlib
import os

import numpy as np
import pytest
from PIL import Image, features

from lfs_jax import data

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _close(pixel, want, tol=12):
  return np.all(np.abs(np.asarray(pixel, np.int32) - np.asarray(want)) <= tol)


def _stripes(size, colors, horizontal=True):
  """An RGB image split into equal vertical (or horizontal) bands of `colors`."""
  w, h = size
  a = np.zeros((h, w, 3), np.uint8)
  n = len(colors)
  for i, c in enumerate(colors):
    if horizontal:
      a[:, i * w // n:(i + 1) * w // n] = c
    else:
      a[i * h // n:(i + 1) * h // n, :] = c
  return Image.fromarray(a, "RGB")


def test_rgb_png_roundtrip_shape_dtype(tmp_path):
  p = str(tmp_path / "a.png")
  Image.new("RGB", (16, 16), (10, 200, 30)).save(p)
  out = data.load_image(p, 16)
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  assert np.all(out == (10, 200, 30))


def test_cmyk_jpeg(tmp_path):
  p = str(tmp_path / "cmyk.jpg")
  Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p, quality=95)  # pure red
  out = data.load_image(p, 8)
  assert _close(out[4, 4], RED, tol=8)


def test_grey_l(tmp_path):
  p = str(tmp_path / "grey.png")
  Image.new("L", (16, 16), 100).save(p)
  assert np.all(data.load_image(p, 8) == 100)


def test_la_transparency_composites_on_white(tmp_path):
  p = str(tmp_path / "la.png")
  a = np.zeros((16, 16, 2), np.uint8)  # black
  a[:, :8, 1] = 0    # left: fully transparent -> white
  a[:, 8:, 1] = 255  # right: opaque black
  Image.fromarray(a, "LA").save(p)
  out = data.load_image(p, 16)
  assert np.all(out[:, :6] == 255) and np.all(out[:, 10:] == 0)


def test_rgba_half_alpha_over_white(tmp_path):
  p = str(tmp_path / "rgba.png")
  a = np.zeros((16, 16, 4), np.uint8)
  a[..., 0] = 255                  # red everywhere
  a[:8, :, 3] = 0                  # top: transparent -> white, not red, not black
  a[8:, :, 3] = 128                # bottom: half red over white
  Image.fromarray(a, "RGBA").save(p)
  out = data.load_image(p, 16)
  assert np.all(out[:6] == 255)
  assert _close(out[12, 8], (255, 127, 127), tol=3)


def test_palette_with_transparency(tmp_path):
  p = str(tmp_path / "p.png")
  im = Image.new("P", (16, 16), 0)
  im.putpalette([0, 0, 0, 0, 0, 255] + [0] * (254 * 3))  # 0 black (transparent), 1 blue
  im.paste(1, (8, 0, 16, 16))
  im.save(p, transparency=0)
  out = data.load_image(p, 16)
  assert np.all(out[:, :6] == 255)
  assert np.all(out[:, 10:] == BLUE)


def test_rgb_with_transparent_colour_key(tmp_path):
  p = str(tmp_path / "key.png")
  _stripes((16, 16), [GREEN, BLUE]).save(p, transparency=GREEN)
  out = data.load_image(p, 16)
  assert np.all(out[:, :6] == 255) and np.all(out[:, 10:] == BLUE)


def test_16bit_grey_scales_not_clips(tmp_path):
  p = str(tmp_path / "g16.png")
  a = np.full((16, 16), 65535, np.uint16)
  a[:, 8:] = 32768
  a[8:, :] = 1000
  Image.fromarray(a).save(p)
  assert Image.open(p).mode in ("I;16", "I")
  out = data.load_image(p, 16)
  assert np.all(out[:6, :6] == 255)
  assert np.all(out[:6, 10:] == 128)              # 32768 / 65535 * 255 = 127.5
  assert np.all(out[10:, :] == 4)                 # 1000 -> 3.9, not clipped to 255
  assert np.all(out[..., 0] == out[..., 2])


def test_exif_orientation_is_applied(tmp_path):
  p = str(tmp_path / "rot.jpg")
  im = _stripes((40, 20), [RED, BLUE])  # wide: red left, blue right
  exif = Image.Exif()
  exif[0x0112] = 6  # display rotated 90 degrees clockwise: left half -> top
  im.save(p, exif=exif.tobytes(), quality=95)
  out = data.load_image(p, 20)
  assert _close(out[2, 10], RED) and _close(out[17, 10], BLUE)
  # Without the tag the same pixels stay side by side.
  plain = str(tmp_path / "plain.jpg")
  im.save(plain, quality=95)
  out = data.load_image(plain, 20)
  assert _close(out[10, 2], RED) and _close(out[10, 17], BLUE)


def test_mpo_first_frame(tmp_path):
  p = str(tmp_path / "camera.jpg")
  first, second = Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)
  first.save(p, format="MPO", save_all=True, append_images=[second], quality=95)
  with Image.open(p) as im:
    assert im.format == "MPO" and im.n_frames == 2
  assert _close(data.load_image(p, 8)[4, 4], RED)


def test_webp(tmp_path):
  # .webp is an accepted photo type: a Pillow without WebP must fail here, not skip.
  assert features.check("webp"), "this Pillow cannot read .webp, an accepted photo type"
  p = str(tmp_path / "a.webp")
  Image.new("RGB", (16, 16), GREEN).save(p, lossless=True)
  assert np.all(data.load_image(p, 8) == GREEN)


def test_wide_and_tall_center_crop(tmp_path):
  wide = str(tmp_path / "wide.png")
  _stripes((60, 20), [RED, GREEN, BLUE]).save(wide)
  out = data.load_image(wide, 10)
  # Only the green middle third survives; Lanczos' 2x-downscale kernel reads a few
  # source pixels past the crop, so the outermost columns are slightly tinted.
  assert out.shape == (10, 10, 3) and np.all(out[:, 3:-3] == GREEN)
  assert np.all(out[..., 1] > 200) and np.all(out[..., [0, 2]] < 60)
  tall = str(tmp_path / "tall.png")
  _stripes((20, 60), [RED, GREEN, BLUE], horizontal=False).save(tall)
  out = data.load_image(tall, 10)
  assert np.all(out[3:-3] == GREEN) and np.all(out[..., 1] > 200)


def test_downscale_is_antialiased_and_upscale_works(tmp_path):
  p = str(tmp_path / "checker.png")
  a = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)  # 1-px checkerboard
  Image.fromarray(a, "L").save(p)
  out = data.load_image(p, 8).astype(np.float32)
  assert np.all(np.abs(out - 127.5) < 20)  # averaged to grey, not aliased to 0/255
  small = str(tmp_path / "small.png")
  Image.new("RGB", (4, 4), BLUE).save(small)
  assert np.all(data.load_image(small, 12) == BLUE)


def test_truncated_jpeg_names_file(tmp_path):
  p = tmp_path / "cut.jpg"
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(p, quality=95)
  p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
  with pytest.raises(data.DataError, match="cut.jpg"):
    data.load_image(str(p), 16)


def test_corrupt_missing_and_misnamed_files(tmp_path):
  junk = tmp_path / "junk.png"
  junk.write_bytes(b"not an image at all" * 10)
  with pytest.raises(data.DataError, match="junk.png"):
    data.load_image(str(junk), 8)
  with pytest.raises(data.DataError, match="nowhere.jpg"):
    data.load_image(str(tmp_path / "nowhere.jpg"), 8)
  gif_as_png = str(tmp_path / "really_a_gif.png")
  Image.new("RGB", (8, 8)).save(gif_as_png, format="GIF")
  with pytest.raises(data.DataError, match="really_a_gif.png.*GIF"):
    data.load_image(gif_as_png, 8)


def test_gif_extension_refused(tmp_path):
  p = str(tmp_path / "anim.gif")
  Image.new("RGB", (8, 8)).save(p)
  with pytest.raises(data.DataError, match=r"anim\.gif.*\.jpg, \.jpeg, \.png, \.webp"):
    data.load_image(p, 8)


def test_bad_resolution(tmp_path):
  p = str(tmp_path / "a.png")
  Image.new("RGB", (8, 8)).save(p)
  with pytest.raises(data.DataError, match="resolution"):
    data.load_image(p, 0)


def test_load_images_stacks_with_records(tmp_path):
  paths = []
  for i, c in enumerate([RED, GREEN]):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.new("RGB", (12, 8), c).save(paths[-1])
  arrays, records = data.load_images(paths, 8)
  assert arrays.shape == (2, 8, 8, 3) and arrays.dtype == np.uint8
  assert np.all(arrays[1] == GREEN)
  with open(paths[0], "rb") as f:
    assert records[0] == data.ImageRecord(os.path.abspath(paths[0]),
                                          hashlib.sha256(f.read()).hexdigest())
  assert records[1].sha256 == data.sha256_file(paths[1])


def test_load_images_all_or_nothing(tmp_path):
  paths = [str(tmp_path / n) for n in ("a.png", "b.png", "c.jpg")]
  Image.new("RGB", (8, 8), RED).save(paths[0])
  Image.new("RGB", (8, 8), BLUE).save(paths[1])
  with open(paths[2], "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 broken")
  with pytest.raises(data.DataError) as e:
    data.load_images(paths, 8)
  assert "c.jpg" in str(e.value) and "a.png" not in str(e.value)
  with pytest.raises(data.DataError, match="at least one"):
    data.load_images([], 8)


def test_load_images_lists_every_failure(tmp_path):
  ok = str(tmp_path / "ok.png")
  Image.new("RGB", (8, 8)).save(ok)
  with pytest.raises(data.DataError, match=r"2 of 3(.|\n)*x\.gif(.|\n)*y\.png"):
    data.load_images([str(tmp_path / "x.gif"), ok, str(tmp_path / "y.png")], 8)


def test_model_range_roundtrip():
  u = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
  f = data.to_model_range(u)
  assert f.dtype == np.float32 and f.min() == -1.0 and f.max() == 1.0
  np.testing.assert_array_equal(data.to_uint8(f), u)
  np.testing.assert_array_equal(data.to_uint8(np.array([-3.0, 0.0, 0.999, 5.0])),
                                [0, 128, 255, 255])
  with pytest.raises(data.DataError, match="uint8"):
    data.to_model_range(u.astype(np.int32))
  with pytest.raises(data.DataError, match="non-finite"):
    data.to_uint8(np.array([0.0, np.nan]))
