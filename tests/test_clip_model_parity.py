"""CLIPModel (both towers) and CLIP preprocessing against transformers (float32).

The reference is a tiny random transformers CLIPModel saved with save_pretrained
plus a CLIPImageProcessor (PIL backend, 32x32) in the same folder, read back with
weights.load_clip.
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

from lfs_jax.errors import UnsupportedConfigError
from lfs_jax.weights import preprocess
from lfs_jax.models import clip_vision
from lfs_jax.weights import (WeightsMismatchError, WeightsNotFoundError, convert, load_clip,
                             safetensors_io)

# Module fixtures worth building once: keep this module on one xdist worker.
pytestmark = pytest.mark.xdist_group("clip_model_parity")

TEXT = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=77, pad_token_id=1,
            bos_token_id=998, eos_token_id=999)
VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
              num_hidden_layers=2, image_size=32, patch_size=8)
SIZES = ((45, 61), (70, 40), (32, 32), (33, 100))  # (H, W), odd and exact


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def processor(**kw):
  # transformers 5 picks the torchvision backend when torchvision is installed; the
  # PIL one is the reference (transformers 4's only CLIPImageProcessor, OpenAI's CLIP).
  cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
  return cls(**kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("clip"))
  torch.manual_seed(0)
  config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION,
                                   projection_dim=16)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():  # CLIP initialises biases to 0 and norms to 1: perturb them
    for name, p in model.named_parameters():
      if name.endswith("bias") or "layernorm" in name or "layer_norm" in name:
        p.add_(0.1 * torch.randn_like(p))
    model.logit_scale.fill_(1.7)
  model.save_pretrained(folder, safe_serialization=True)
  processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
            ).save_pretrained(folder)
  return folder, model


def images(sizes=SIZES, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]


def prompts():
  ids = np.random.default_rng(1).integers(2, 998, size=(3, 77))
  ids[:, 0] = 998
  for b, p in enumerate((5, 20, 76)):
    ids[b, p:] = 999
  return ids


def test_features_match_transformers(reference):
  folder, ref = reference
  module, params, prep = load_clip(folder)
  assert prep.crop == (32, 32) and prep.resize == (32,)
  ims, ids = images(), prompts()
  pixels_t = processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})(
      images=ims, return_tensors="pt")["pixel_values"]
  with torch.no_grad():
    # transformers 5 returns a ModelOutput whose pooler_output is the projection.
    feat = lambda out: getattr(out, "pooler_output", out).numpy()
    out = ref(input_ids=torch.from_numpy(ids), pixel_values=pixels_t)
    want = {
        "text": feat(ref.get_text_features(input_ids=torch.from_numpy(ids))),
        "image": feat(ref.get_image_features(pixel_values=pixels_t)),
        "text_embeds": out.text_embeds.numpy(),
        "image_embeds": out.image_embeds.numpy(),
        "logits_per_image": out.logits_per_image.numpy(),
    }

  @jax.jit
  def run(params, ids, pixels):
    apply = lambda *a, **kw: module.apply({"params": params}, *a, **kw)
    out = apply(ids, pixels)
    return {
        "text": apply(ids, method="get_text_features"),
        "image": apply(pixels, method="get_image_features"),
        "text_embeds": out["text_embeds"],
        "image_embeds": out["image_embeds"],
        "logits_per_image": out["logits_per_image"],
    }

  # Our preprocessing feeds our model; transformers' feeds theirs.
  got = run(params, jnp.asarray(ids, jnp.int32), preprocess.preprocess(ims, prep))
  for name, w in want.items():
    assert got[name].shape == w.shape, name
    err = rel_err(got[name], w)
    assert err <= 1e-5, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("kw", [
    dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    dict(size={"shortest_edge": 50}, crop_size={"height": 40, "width": 30}),
    dict(),  # CLIPImageProcessor's defaults: 224, upsampling every test image
])
def test_preprocess_matches_clip_image_processor(tmp_path, kw):
  proc = processor(**kw)
  proc.save_pretrained(str(tmp_path))
  cfg = preprocess.PreprocessConfig.from_folder(str(tmp_path))
  ims = images()
  want = np.transpose(proc(images=ims, return_tensors="np")["pixel_values"], (0, 2, 3, 1))
  got = preprocess.preprocess(ims, cfg)
  assert got.dtype == np.float32 and got.shape == want.shape
  # Same PIL resize (uint8 out), same crop offsets, same float64 rescale and float32
  # normalisation: the outputs agree to float32 rounding, far inside one uint8 step
  # (1/255 / std ~ 0.015 in this normalised space).
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_preprocess_legacy_config_and_bad_images():
  # openai/clip-vit-base-patch32's preprocessor_config.json (integer sizes).
  legacy = {"crop_size": 224, "do_center_crop": True, "do_normalize": True,
            "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}
  cfg = preprocess.PreprocessConfig.from_transformers(legacy)
  assert cfg == preprocess.PreprocessConfig()
  with pytest.raises(UnsupportedConfigError, match="do_pad"):
    preprocess.PreprocessConfig.from_transformers({**legacy, "do_pad": True})
  with pytest.raises(UnsupportedConfigError, match="crop_pct"):
    preprocess.PreprocessConfig.from_transformers({**legacy, "crop_pct": 0.9})
  with pytest.raises(UnsupportedConfigError, match="crop_size"):
    preprocess.PreprocessConfig.from_transformers({**legacy, "crop_size": 256})
  with pytest.raises(ValueError, match="uint8 RGB"):
    preprocess.preprocess([np.zeros((8, 8, 3), np.float32)], cfg)
  with pytest.raises(ValueError, match="uint8 RGB"):
    preprocess.preprocess([np.zeros((8, 8, 4), np.uint8)], cfg)
  with pytest.raises(ValueError, match="batch"):
    preprocess.preprocess(np.zeros((8, 8, 3), np.uint8), cfg)


def test_config_refuses_what_is_not_implemented(reference):
  folder, _ = reference
  with open(os.path.join(folder, "config.json")) as f:
    full = json.load(f)
  cfg = clip_vision.CLIPConfig.from_transformers(full)
  assert (cfg.projection_dim, cfg.vision.patch_size, cfg.text.eos_token_id) == (16, 8, 999)
  vision = full["vision_config"]
  assert clip_vision.CLIPVisionConfig.from_transformers(vision).image_size == 32
  bad = lambda **v: {**full, "vision_config": {**vision, **v}}
  with pytest.raises(UnsupportedConfigError, match="hidden_act"):
    clip_vision.CLIPConfig.from_transformers(bad(hidden_act="gelu_new"))
  with pytest.raises(UnsupportedConfigError, match="image_size"):
    clip_vision.CLIPConfig.from_transformers(bad(image_size=[32, 48]))
  with pytest.raises(UnsupportedConfigError, match="use_rope"):
    clip_vision.CLIPConfig.from_transformers(bad(use_rope=True))
  with pytest.raises(UnsupportedConfigError, match="model_type"):
    clip_vision.CLIPVisionConfig.from_transformers(full["text_config"])
  with pytest.raises(UnsupportedConfigError, match="architectures"):
    clip_vision.CLIPConfig.from_transformers(
        {**full, "architectures": ["CLIPVisionModelWithProjection"]})
  with pytest.raises(UnsupportedConfigError, match="logit_bias"):
    clip_vision.CLIPConfig.from_transformers({**full, "logit_bias_init_value": -10})
  with pytest.raises(UnsupportedConfigError, match="model_type"):
    clip_vision.CLIPConfig.from_transformers(full["text_config"])


# The generic PretrainedConfig keys transformers 4.16 wrote into both towers of
# openai/clip-vit-base-patch32's config.json.
_LEGACY = {
    "_name_or_path": "", "add_cross_attention": False, "architectures": None,
    "attention_dropout": 0.0, "bad_words_ids": None, "chunk_size_feed_forward": 0,
    "cross_attention_hidden_size": None, "decoder_start_token_id": None,
    "diversity_penalty": 0.0, "do_sample": False, "dropout": 0.0, "early_stopping": False,
    "encoder_no_repeat_ngram_size": 0, "finetuning_task": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "initializer_factor": 1.0,
    "initializer_range": 0.02, "is_decoder": False, "is_encoder_decoder": False,
    "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "layer_norm_eps": 1e-05,
    "length_penalty": 1.0, "max_length": 20, "min_length": 0, "no_repeat_ngram_size": 0,
    "num_beam_groups": 1, "num_beams": 1, "num_return_sequences": 1,
    "output_attentions": False, "output_hidden_states": False, "output_scores": False,
    "prefix": None, "problem_type": None, "pruned_heads": {},
    "remove_invalid_values": False, "repetition_penalty": 1.0, "return_dict": True,
    "return_dict_in_generate": False, "sep_token_id": None, "task_specific_params": None,
    "temperature": 1.0, "tie_encoder_decoder": False, "tie_word_embeddings": True,
    "tokenizer_class": None, "top_k": 50, "top_p": 1.0, "torch_dtype": None,
    "torchscript": False, "transformers_version": "4.16.0.dev0", "use_bfloat16": False,
}
OPENAI_B32 = {
    "_name_or_path": "openai/clip-vit-base-patch32", "architectures": ["CLIPModel"],
    "initializer_factor": 1.0, "logit_scale_init_value": 2.6592, "model_type": "clip",
    "projection_dim": 512, "text_config_dict": None, "transformers_version": None,
    "vision_config_dict": None,
    "text_config": {**_LEGACY, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
                    "hidden_act": "quick_gelu", "hidden_size": 512,
                    "intermediate_size": 2048, "max_position_embeddings": 77,
                    "model_type": "clip_text_model", "num_attention_heads": 8,
                    "num_hidden_layers": 12, "projection_dim": 512, "vocab_size": 49408},
    "vision_config": {**_LEGACY, "bos_token_id": None, "eos_token_id": None,
                      "pad_token_id": None, "hidden_act": "quick_gelu", "hidden_size": 768,
                      "image_size": 224, "intermediate_size": 3072,
                      "model_type": "clip_vision_model", "num_attention_heads": 12,
                      "num_hidden_layers": 12, "patch_size": 32, "projection_dim": 512},
}


def test_openai_vit_b32_config_and_abstract_tree():
  cfg = clip_vision.CLIPConfig.from_transformers(OPENAI_B32)
  assert cfg.vision == clip_vision.CLIPVisionConfig()  # transformers' defaults: ViT-B/32
  assert (cfg.text.hidden_size, cfg.text.eos_token_id, cfg.projection_dim) == (512, 2, 512)
  shapes = clip_vision.abstract_params(cfg)  # shapes only: nothing is allocated
  v = shapes["vision_model"]
  assert v["embeddings"]["patch_embedding"]["kernel"].shape == (32, 32, 3, 768)
  assert v["embeddings"]["position_embedding"]["embedding"].shape == (50, 768)
  assert v["embeddings"]["class_embedding"].shape == (768,)
  assert shapes["visual_projection"]["kernel"].shape == (768, 512)
  assert shapes["text_projection"]["kernel"].shape == (512, 512)
  assert shapes["logit_scale"].shape == ()


def test_loader_errors(reference, tmp_path):
  folder, _ = reference
  with pytest.raises(WeightsNotFoundError, match="does not exist"):
    load_clip(str(tmp_path / "nowhere"))
  copy = str(tmp_path / "copy")
  shutil.copytree(folder, copy)
  weights = os.path.join(copy, "model.safetensors")
  state = dict(safetensors_io.load_file(weights))

  os.remove(os.path.join(copy, "preprocessor_config.json"))
  with pytest.raises(WeightsNotFoundError, match="preprocessor_config.json"):
    load_clip(copy)
  processor(size={"shortest_edge": 32}, crop_size={"height": 24, "width": 24}
            ).save_pretrained(copy)
  with pytest.raises(ValueError, match="crops to"):  # not the model's image_size
    load_clip(copy)
  shutil.copy(os.path.join(folder, "preprocessor_config.json"), copy)

  # Legacy position_ids buffers are ignored; bare parameters are strict both ways.
  safetensors_io.save_file(
      {**state, "vision_model.embeddings.position_ids": np.arange(17)[None]}, weights)
  _, params, _ = load_clip(copy)
  got = convert.flax_to_torch(params)  # the round trip gives back every tensor
  assert sorted(got) == sorted(state)
  for k, v in state.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  safetensors_io.save_file({**state, "vision_model.embeddings.cls_token": state[
      "vision_model.embeddings.class_embedding"]}, weights)
  with pytest.raises(WeightsMismatchError, match="cls_token"):
    load_clip(copy)
  safetensors_io.save_file(
      {k: v for k, v in state.items() if k != "vision_model.embeddings.class_embedding"},
      weights)
  with pytest.raises(WeightsMismatchError, match="class_embedding"):
    load_clip(copy)
  safetensors_io.save_file({k: v for k, v in state.items() if k != "logit_scale"},
                           weights)
  with pytest.raises(WeightsMismatchError, match="logit_scale"):
    load_clip(copy)
