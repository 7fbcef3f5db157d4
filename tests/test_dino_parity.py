"""The DINO image encoders (ViTModel, Dinov2Model) and their preprocessing against transformers.

Tiny random models saved with save_pretrained(safe_serialization=True) next to a
ViTImageProcessor / BitImageProcessor (PIL backend), read back with
weights.load_dino; float32, relative error <= 1e-5 on the CLS embedding that the
DINO metric compares.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lfs_jax.errors import EvalError, UnsupportedConfigError
from lfs_jax.evaluate import encoders
from lfs_jax.weights import preprocess
from lfs_jax.models import dino
from lfs_jax.weights import PickleRefusedError, WeightsNotFoundError, load_dino

# Module fixtures worth building once: keep this module on one xdist worker.
pytestmark = pytest.mark.xdist_group("dino_parity")

SIZES = ((45, 61), (70, 40), (32, 32), (33, 100))  # (H, W), odd and exact
ARCH = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def pil_processor(name, **kw):
  # transformers 5 prefers a torchvision backend when torchvision is installed; the
  # PIL one is the reference (transformers 4's only one).
  return getattr(transformers, f"{name}Pil", getattr(transformers, name))(**kw)


def images(sizes=SIZES, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]


def save(folder, model, proc):
  with torch.no_grad():  # biases start at 0 and norms / layer scales at 1: perturb them
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name or "lambda1" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.eval().save_pretrained(folder, safe_serialization=True)
  proc.save_pretrained(folder)
  return folder, model, proc


def make_vit(folder):
  torch.manual_seed(0)
  config = transformers.ViTConfig(**ARCH, intermediate_size=64, image_size=32, patch_size=8)
  return save(folder, transformers.ViTModel(config),
              pil_processor("ViTImageProcessor", size={"height": 32, "width": 32}))


def make_dinov2(folder, swiglu=False):
  """Position embeddings for a 4x4 grid (28 px), fed 21 px crops: a 3x3 grid (resized)."""
  torch.manual_seed(1)
  config = transformers.Dinov2Config(**ARCH, mlp_ratio=2, image_size=28, patch_size=7,
                                     use_swiglu_ffn=swiglu)
  return save(folder, transformers.Dinov2Model(config),
              pil_processor("BitImageProcessor", size={"shortest_edge": 24},
                            crop_size={"height": 21, "width": 21}))


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
  return make_vit(str(tmp_path_factory.mktemp("dino_vit")))


@pytest.mark.parametrize("kind", ["vit", "dinov2", "dinov2_swiglu"])
def test_cls_embedding_matches_transformers(kind, vit_dir, tmp_path):
  if kind == "vit":
    folder, ref, proc = vit_dir
  else:
    folder, ref, proc = make_dinov2(str(tmp_path), swiglu=kind.endswith("swiglu"))
  module, params, prep = load_dino(folder)
  ims = images()
  pixels_t = proc(images=ims, return_tensors="pt")["pixel_values"]
  with torch.no_grad():
    out = ref(pixel_values=pixels_t)
  want_hidden = out.last_hidden_state.numpy()
  pixels = preprocess.preprocess(ims, prep)
  # Our preprocessing equals the processor's to float32 rounding.
  np.testing.assert_allclose(pixels, np.transpose(pixels_t.numpy(), (0, 2, 3, 1)),
                             rtol=0, atol=1e-6)
  hidden, cls = jax.jit(lambda p, x: module.apply({"params": p}, x))(params, pixels)
  assert cls.shape == (len(ims), 32)
  assert rel_err(cls, want_hidden[:, 0]) <= 1e-5
  assert rel_err(hidden, want_hidden) <= 1e-5
  if kind != "vit":
    assert dino.DinoConfig.from_transformers(ref.config.to_dict()).swiglu == kind.endswith(
        "swiglu")


def test_torch_bicubic_matrix_matches_torch_interpolate():
  grid = torch.randn(1, 3, 5, 5)
  for n_out in (2, 3, 7, 11):
    want = torch.nn.functional.interpolate(grid, size=(n_out, n_out), mode="bicubic",
                                           align_corners=False).numpy()
    w = dino.torch_bicubic_matrix(5, n_out)
    got = np.einsum("oh,pw,bchw->bcop", w, w, grid.numpy())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_encoder_gives_unit_cls_embeddings_compiled_once(vit_dir):
  folder, ref, proc = vit_dir
  enc = encoders.DinoEncoder(folder, batch_size=3)
  before = encoders.TRACES["dino"]
  emb = enc.image_embeddings(images())  # 4 images: one full and one padded batch
  again = enc.image_embeddings(images(seed=1)[:2])
  assert encoders.TRACES["dino"] - before <= 1
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1, atol=1e-6)
  with torch.no_grad():
    cls = ref(pixel_values=proc(images=images(), return_tensors="pt")["pixel_values"]
              ).last_hidden_state[:, 0].numpy()
  np.testing.assert_allclose(emb, cls / np.linalg.norm(cls, axis=-1, keepdims=True),
                             atol=1e-5)
  assert again.shape == (2, 32)


def test_dino_vits16_processor_config_reads_as_vit_image_processor():
  # facebook/dino-vits16's preprocessor_config.json (legacy: integer size = a square,
  # bilinear, no crop) after its "Fix image mean and std" commit.
  legacy = {"do_normalize": True, "do_resize": True,
            "feature_extractor_type": "ViTFeatureExtractor",
            "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
            "resample": 2, "size": 224}
  cfg = preprocess.PreprocessConfig.from_transformers(legacy)
  assert (cfg.resize, cfg.crop, cfg.resample, cfg.output_size) == ((224, 224), None, 2,
                                                                  (224, 224))
  proc = pil_processor("ViTImageProcessor", size={"height": 224, "width": 224}, resample=2,
                       image_mean=legacy["image_mean"], image_std=legacy["image_std"])
  ims = images(((45, 61), (300, 260)))
  want = np.transpose(proc(images=ims, return_tensors="np")["pixel_values"], (0, 2, 3, 1))
  np.testing.assert_allclose(preprocess.preprocess(ims, cfg), want, rtol=0, atol=1e-6)
  with pytest.raises(UnsupportedConfigError, match="SiglipImageProcessor"):
    preprocess.PreprocessConfig.from_transformers(
        {**legacy, "image_processor_type": "SiglipImageProcessor"})
  with pytest.raises(UnsupportedConfigError, match="center crop"):
    preprocess.PreprocessConfig.from_transformers(
        {**legacy, "size": {"shortest_edge": 224}})


def test_bad_folders_are_named(vit_dir, tmp_path):
  folder = vit_dir[0]
  pickled = str(tmp_path / "pickled")
  os.makedirs(pickled)
  for name in ("config.json", "preprocessor_config.json"):
    shutil.copy(os.path.join(folder, name), pickled)
  open(os.path.join(pickled, "pytorch_model.bin"), "wb").write(b"not unpickled")
  with pytest.raises(PickleRefusedError, match=f"DINO folder {pickled} holds only pickle"):
    load_dino(pickled)
  no_proc = str(tmp_path / "no_proc")
  shutil.copytree(folder, no_proc)
  os.remove(os.path.join(no_proc, "preprocessor_config.json"))
  with pytest.raises(WeightsNotFoundError, match=f"model folder {no_proc} needs"):
    load_dino(no_proc)
  with pytest.raises(EvalError, match="does not exist"):
    encoders.DinoEncoder(str(tmp_path / "nope"))
  with pytest.raises(EvalError, match="no DINO model"):
    encoders.DinoEncoder("")
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  with pytest.raises(UnsupportedConfigError, match="ViTForImageClassification"):
    dino.DinoConfig.from_transformers({**config, "architectures": ["ViTForImageClassification"]})
  with pytest.raises(UnsupportedConfigError, match="model_type='clip'"):
    dino.DinoConfig.from_transformers({**config, "model_type": "clip"})
  with pytest.raises(UnsupportedConfigError, match="unknown key"):
    dino.DinoConfig.from_transformers({**config, "use_absolute_embeddings": True})
