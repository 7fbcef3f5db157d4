"""The Flax AutoencoderKL matches diffusers' on tiny random weights (float32, rel err <= 1e-5)."""

import json
import os

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lfs_jax.errors import UnsupportedConfigError
from lfs_jax.models import vae
from lfs_jax.weights import convert, load_vae, safetensors_io

TOL = 1e-5
SD15_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sd_configs",
                           "sd15", "vae", "config.json")

TINY = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
            norm_num_groups=8, latent_channels=4, sample_size=32)
# The switches diffusers offers besides the SD default: no quant convs, no attention.
BARE = dict(TINY, block_out_channels=(16, 32), norm_num_groups=4, use_quant_conv=False,
            use_post_quant_conv=False, mid_block_add_attention=False)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _nhwc(t):
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def _save_reference(path, kwargs, seed):
  """A tiny diffusers VAE with every parameter perturbed, saved as safetensors."""
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(**kwargs).eval()
  with torch.no_grad():
    for p in model.parameters():  # break symmetric inits (norm scale 1, bias 0)
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(path, safe_serialization=True)
  return model


def _load(path):
  """(module, params) through the package's loader."""
  return load_vae(str(path))


@pytest.mark.parametrize("kwargs", [TINY, BARE], ids=["sd", "bare"])
def test_encode_decode_match_diffusers(tmp_path, kwargs):
  model = _save_reference(tmp_path, kwargs, seed=0)
  module, params = _load(tmp_path)
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
  latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
  with torch.no_grad():
    dist = model.encode(torch.from_numpy(images)).latent_dist
    ref_mean, ref_logvar = _nhwc(dist.mean), _nhwc(dist.logvar)
    ref_images = _nhwc(model.decode(torch.from_numpy(latents)).sample)

  encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method=vae.AutoencoderKL.encode))
  decode = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"))
  mean, logvar = encode(params, jnp.asarray(np.transpose(images, (0, 2, 3, 1))))
  out = decode(params, jnp.asarray(np.transpose(latents, (0, 2, 3, 1))))

  assert mean.shape == ref_mean.shape == (2, 8, 8, 4)
  assert out.shape == ref_images.shape == (2, 16, 16, 3)
  assert _rel(mean, ref_mean) <= TOL
  assert _rel(logvar, ref_logvar) <= TOL
  assert _rel(out, ref_images) <= TOL


def test_legacy_attention_names_convert(tmp_path):
  """query/key/value/proj_attn with 1x1-conv-shaped weights land on to_q/.../to_out_0."""
  _save_reference(tmp_path, TINY, seed=1)
  with open(tmp_path / "config.json") as f:
    cfg = vae.VAEConfig.from_diffusers(json.load(f))
  state = safetensors_io.load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
  old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  legacy = {}
  for key, arr in state.items():
    for new, old in old_names.items():
      if f".attentions.0.{new}." in key:
        key = key.replace(f".{new}.", f".{old}.")
        if arr.ndim == 2:
          arr = arr[:, :, None, None]
    legacy[key] = arr
  assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
  assert legacy["decoder.mid_block.attentions.0.query.weight"].ndim == 4

  target = vae.abstract_params(cfg)
  want = convert.torch_to_flax(state, target)
  got = convert.torch_to_flax(legacy, target, rename=vae.legacy_rename)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert vae.legacy_rename("encoder.mid_block.attentions.0.to_q.weight") == (
      "encoder.mid_block.attentions.0.to_q.weight")
  assert vae.legacy_rename("decoder.conv_in.weight") == "decoder.conv_in.weight"


def test_sd15_config_builds_abstractly():
  with open(SD15_CONFIG) as f:
    cfg = vae.VAEConfig.from_diffusers(json.load(f))
  assert cfg.block_out_channels == (128, 256, 512, 512) and cfg.force_upcast
  params = vae.abstract_params(cfg, dtype=jnp.bfloat16)
  leaves = jax.tree.leaves(params)
  assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.bfloat16)}
  assert sum(np.prod(leaf.shape) for leaf in leaves) == 83_653_863  # diffusers' count
  k = params["decoder"]["mid_block"]["attentions_0"]["to_out_0"]["kernel"]
  assert k.shape == (512, 512)
  hash(cfg)


@pytest.mark.parametrize("field, value", [
    ("shift_factor", 0.1159),
    ("latents_mean", [0.0] * 4),
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]),
    ("act_fn", "gelu"),
    ("_class_name", "AsymmetricAutoencoderKL"),
    ("norm_type", "spatial"),  # not an AutoencoderKL key at all
])
def test_unsupported_config_is_refused_naming_the_field(field, value):
  config = dict(TINY, **{field: value})
  with pytest.raises(UnsupportedConfigError, match=field):
    vae.VAEConfig.from_diffusers(config)
