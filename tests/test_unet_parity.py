"""UNet parity with diffusers' UNet2DConditionModel (float32) and config strictness."""

import inspect
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import diffusers

from lfs_jax.errors import UnsupportedConfigError
from lfs_jax.models import unet as unet_lib
from lfs_jax.models.unet import UNetConfig, abstract_params, num_params
from lfs_jax.models.unet_blocks import timestep_embedding
from lfs_jax.weights import load_unet

SD_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sd_configs")

# SD-1-like: conv projections, one head count for every block.
TINY_SD1 = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2, attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8)
# SD-2-like: linear projections, per-block head counts, upcast attention, a plain
# DownBlock2D/UpBlock2D at the bottom, two transformer layers in the first block,
# head width 20 and 20 timestep frequencies (not a power of two, as SD's 160).
TINY_SD2 = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(40, 80, 80),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1, attention_head_dim=(2, 4, 4), cross_attention_dim=48,
    norm_num_groups=8, use_linear_projection=True, upcast_attention=True,
    transformer_layers_per_block=(2, 1, 1))


def _torch_unet(kwargs, seed):
  torch.manual_seed(seed)
  model = diffusers.UNet2DConditionModel(**kwargs).eval()
  with torch.no_grad():  # move every weight off its init (norms off 1/0, no zero layers)
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.mark.parametrize("kwargs,hw,remat", [(TINY_SD1, (8, 8), "none"),
                                             (TINY_SD2, (12, 10), "none"),
                                             (TINY_SD2, (12, 10), "blocks")],
                         ids=["sd1_like", "sd2_like_odd_size", "sd2_like_remat"])
def test_unet_matches_diffusers(tmp_path, kwargs, hw, remat):
  ref = _torch_unet(kwargs, seed=0)
  ref.save_pretrained(tmp_path, safe_serialization=True)
  module, params = load_unet(str(tmp_path))
  module = module.clone(remat=remat)  # checkpointed blocks keep their weights' names

  rng = np.random.default_rng(0)
  sample = rng.standard_normal((2, kwargs["in_channels"], *hw)).astype(np.float32)
  context = rng.standard_normal((2, 7, kwargs["cross_attention_dim"])).astype(np.float32)
  timesteps = np.array([999, 10], np.int64)
  with torch.no_grad():
    want = ref(torch.from_numpy(sample), torch.from_numpy(timesteps),
               torch.from_numpy(context)).sample.numpy()

  args = ({"params": params}, jnp.asarray(sample.transpose(0, 2, 3, 1)),
          jnp.asarray(timesteps, jnp.int32), jnp.asarray(context))
  # LLVM's optimisation level changes speed, not IEEE results: halves the compile.
  apply = jax.jit(module.apply).lower(*args).compile(
      compiler_options={"xla_backend_optimization_level": 0})
  got = apply(*args)
  got = np.asarray(got).transpose(0, 3, 1, 2)
  assert got.shape == want.shape
  rel = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert rel <= 1e-5, rel


@pytest.mark.parametrize("flip,shift,dim", [(True, 0, 32), (False, 1, 33)])
def test_timestep_embedding_matches_diffusers(flip, shift, dim):
  from diffusers.models.embeddings import get_timestep_embedding
  t = np.array([0, 1, 250, 999], np.int64)
  want = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip,
                                downscale_freq_shift=shift).numpy()
  got = timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, freq_shift=shift)
  # float32 frequencies one ulp apart (torch's exp is not correctly rounded) move
  # sin(t * f) by up to t * 1.2e-7 ~ 1.2e-4 at t = 999; small t must agree closely.
  np.testing.assert_allclose(np.asarray(got), want, atol=1.5e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(got)[:2], want[:2], atol=1e-6, rtol=0)


def _sd_config(name):
  with open(os.path.join(SD_CONFIGS, name, "unet", "config.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("name,count", [("sd15", 859_520_964), ("sd21", 865_910_724)])
def test_sd_param_count(name, count):
  cfg = UNetConfig.from_diffusers(_sd_config(name))
  assert num_params(abstract_params(cfg)) == count


def test_known_keys_are_diffusers_signature():
  sig = set(inspect.signature(diffusers.UNet2DConditionModel.__init__).parameters) - {"self"}
  assert unet_lib.DIFFUSERS_KEYS == sig


def test_saved_default_config_is_accepted(tmp_path):
  """Every key save_pretrained writes, at diffusers' defaults, parses."""
  diffusers.UNet2DConditionModel(**TINY_SD1).save_config(tmp_path)
  with open(tmp_path / "config.json") as f:
    saved = json.load(f)
  assert set(k for k in saved if not k.startswith("_")) == unet_lib.DIFFUSERS_KEYS
  cfg = UNetConfig.from_diffusers(saved)
  assert cfg.block_out_channels == (32, 64) and cfg.heads == (2, 2)
  hash(cfg)


@pytest.mark.parametrize("key,value", [
    ("addition_embed_type", "text_time"),
    ("class_embed_type", "timestep"),
    ("num_class_embeds", 10),
    ("time_cond_proj_dim", 256),
    ("encoder_hid_dim", 768),
    ("attention_type", "gated"),
    ("act_fn", "gelu"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("transformer_layers_per_block", [[1, 2], [2, 3], [1, 1], [1, 1]]),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("only_cross_attention", True),
    ("num_attention_heads", 8),
    ("not_a_diffusers_key", 1),
])
def test_unsupported_config_is_refused(key, value):
  config = dict(_sd_config("sd15"), **{key: value})
  with pytest.raises(UnsupportedConfigError, match=key):
    UNetConfig.from_diffusers(config)
