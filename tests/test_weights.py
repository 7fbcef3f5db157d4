"""Torch-free loading of diffusers folders: round trip, variants, shards, strictness.

The fixture is the tiny random model written by `tiny.save_folder` (a whole
diffusers Stable Diffusion folder); each bad-input test edits a copy of one
component folder. The full-size SD 1.5 / 2.1 trees are only built abstractly.
"""

import builtins
import json
import os
import pickle
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from lfs_jax.errors import UnsupportedConfigError
from lfs_jax import tiny
from lfs_jax.models import clip, unet, vae
from lfs_jax.weights import (PickleRefusedError, SafetensorsError, WeightsMismatchError,
                             WeightsNotFoundError, convert, files, load_pipeline,
                             load_scheduler_config, load_text_encoder, load_unet, load_vae,
                             safetensors_io)

# Module fixtures worth building once: keep this module on one xdist worker.
pytestmark = pytest.mark.xdist_group("weights")

SEED = 3
UNET_FILE = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def params():
  return tiny.random_params(SEED)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, params):
  folder = str(tmp_path_factory.mktemp("tiny_sd"))
  tiny.save_folder(params, folder)
  return folder


def _copy(model_dir, component, dst):
  """A private copy of one component folder (tests edit it)."""
  out = os.path.join(str(dst), component)
  shutil.copytree(os.path.join(model_dir, component), out)
  return out


def _assert_identical(got, want):
  got, want = convert.flatten(got), convert.flatten(want)
  assert sorted(got) == sorted(want)
  for path, w in want.items():
    g = got[path]
    assert g.dtype == w.dtype, path
    assert g.shape == w.shape, path
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg="/".join(path))


def _rewrite(folder, name, edit):
  """Reads `folder/name`, applies edit(state) -> state, writes it back."""
  path = os.path.join(folder, name)
  state = dict(safetensors_io.load_file(path))
  safetensors_io.save_file(edit(state), path)


# ---------------------------------------------------------------- round trip


def test_pipeline_round_trip(model_dir, params):
  p = load_pipeline(model_dir)
  _assert_identical(p.unet_params, params["unet"])
  _assert_identical(p.vae_params, params["vae"])
  _assert_identical(p.text_encoder_params, params["text_encoder"])
  assert isinstance(p.unet, unet.UNet2DConditionModel)
  assert isinstance(p.vae, vae.AutoencoderKL)
  assert isinstance(p.text_encoder, clip.CLIPTextModel)
  assert p.unet.config == unet.UNetConfig.from_diffusers(tiny.UNET)
  assert p.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
  assert p.scheduler.num_train_timesteps == 1000
  assert p.scheduler.beta_schedule == "scaled_linear"
  assert p.scheduler.beta_start == 0.00085 and p.scheduler.beta_end == 0.012
  assert p.scheduler.steps_offset == 1 and p.scheduler.set_alpha_to_one is False


def test_unet_from_model_or_component_folder(model_dir, params):
  _, whole = load_unet(model_dir)
  _, comp = load_unet(os.path.join(model_dir, "unet"))
  _assert_identical(whole, params["unet"])
  _assert_identical(comp, params["unet"])


def test_bfloat16_on_request(model_dir, params):
  module, p = load_unet(model_dir, dtype=jnp.bfloat16)
  assert module.dtype == jnp.bfloat16
  want = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params["unet"])
  _assert_identical(p, want)
  _, t = load_text_encoder(model_dir, dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(t)} == {jnp.dtype(jnp.bfloat16)}


def test_scheduler_config_sd21(tmp_path):
  os.makedirs(tmp_path / "scheduler")
  with open(tmp_path / "scheduler" / "scheduler_config.json", "w") as f:
    json.dump(SD21["scheduler"], f)
  s = load_scheduler_config(str(tmp_path))
  assert s.prediction_type == "v_prediction"
  os.makedirs(tmp_path / "empty")
  with pytest.raises(WeightsNotFoundError, match="scheduler_config.json"):
    load_scheduler_config(str(tmp_path / "empty"))


# ---------------------------------------------------------------- fp16 / bf16 variants


def test_fp16_variant(model_dir, params, tmp_path):
  folder = _copy(model_dir, "vae", tmp_path)
  os.remove(os.path.join(folder, UNET_FILE))
  state = {k: v.astype(np.float16) for k, v in convert.flax_to_torch(params["vae"]).items()}
  safetensors_io.save_file(state, os.path.join(folder, "diffusion_pytorch_model.fp16.safetensors"))
  want = jax.tree.map(lambda x: np.asarray(x).astype(np.float16).astype(np.float32), params["vae"])
  _, only = load_vae(str(tmp_path))  # the only variant present, from the model folder
  _, named = load_vae(folder, variant="fp16")
  _assert_identical(only, want)
  _assert_identical(named, want)
  assert not np.array_equal(np.asarray(only["encoder"]["conv_in"]["kernel"]),
                            np.asarray(params["vae"]["encoder"]["conv_in"]["kernel"]))
  with pytest.raises(WeightsNotFoundError, match="bf16"):
    load_vae(folder, variant="bf16")


def test_plain_file_preferred_and_missing_variant(model_dir, tmp_path):
  folder = _copy(model_dir, "vae", tmp_path)
  with pytest.raises(WeightsNotFoundError, match="'fp16'"):
    load_vae(folder, variant="fp16")
  shutil.copy(os.path.join(folder, UNET_FILE),
              os.path.join(folder, "diffusion_pytorch_model.fp16.safetensors"))
  assert files.weight_files(folder) == [os.path.join(folder, UNET_FILE)]


def test_bfloat16_stored_file(model_dir, params, tmp_path):
  folder = _copy(model_dir, "vae", tmp_path)
  _rewrite(folder, UNET_FILE,
           lambda s: {k: v.astype(ml_dtypes.bfloat16) for k, v in s.items()})
  assert {h["dtype"] for h in safetensors_io.read_header(
      os.path.join(folder, UNET_FILE)).values()} == {"BF16"}
  want = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params["vae"])
  _, p = load_vae(folder, dtype=jnp.bfloat16)
  _assert_identical(p, want)
  _, p32 = load_vae(folder)
  _assert_identical(p32, jax.tree.map(lambda x: x.astype(jnp.float32), want))


# ---------------------------------------------------------------- sharded


def _shard(folder, state, names, index_name):
  """Writes `state` as len(names) shards plus an index json."""
  keys = sorted(state)
  chunks = np.array_split(np.arange(len(keys)), len(names))
  weight_map = {}
  for name, idx in zip(names, chunks):
    part = {keys[i]: state[keys[i]] for i in idx}
    safetensors_io.save_file(part, os.path.join(folder, name))
    weight_map.update({k: name for k in part})
  with open(os.path.join(folder, index_name), "w") as f:
    json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def test_sharded(model_dir, params, tmp_path):
  folder = _copy(model_dir, "unet", tmp_path)
  path = os.path.join(folder, UNET_FILE)
  state = safetensors_io.load_file(path)
  os.remove(path)
  shards = [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
  _shard(folder, state, shards, "diffusion_pytorch_model.safetensors.index.json")
  assert files.weight_files(folder) == [os.path.join(folder, s) for s in shards]
  _, p = load_unet(folder)
  _assert_identical(p, params["unet"])
  os.remove(os.path.join(folder, shards[1]))
  with pytest.raises(WeightsNotFoundError, match=shards[1]):
    load_unet(folder)


def test_sharded_fp16_variant(model_dir, params, tmp_path):
  """diffusers' names: `*.fp16-00001-of-00002.safetensors`, `*.safetensors.index.fp16.json`."""
  folder = _copy(model_dir, "vae", tmp_path)
  os.remove(os.path.join(folder, UNET_FILE))
  state = {k: v.astype(np.float16) for k, v in convert.flax_to_torch(params["vae"]).items()}
  _shard(folder, state,
         [f"diffusion_pytorch_model.fp16-0000{i}-of-00002.safetensors" for i in (1, 2)],
         "diffusion_pytorch_model.safetensors.index.fp16.json")
  want = jax.tree.map(lambda x: np.asarray(x).astype(np.float16).astype(np.float32), params["vae"])
  _, named = load_vae(folder, variant="fp16")
  _assert_identical(named, want)
  _, only = load_vae(folder)  # the only variant present
  _assert_identical(only, want)


def test_tensor_in_two_shards(model_dir, tmp_path):
  folder = _copy(model_dir, "vae", tmp_path)
  path = os.path.join(folder, UNET_FILE)
  state = safetensors_io.load_file(path)
  os.remove(path)
  shards = [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
  _shard(folder, state, shards, "diffusion_pytorch_model.safetensors.index.json")
  dup = sorted(state)[0]
  _rewrite(folder, shards[1], lambda s: {**s, dup: state[dup]})
  with pytest.raises(ValueError, match=dup):
    load_vae(folder)


# ---------------------------------------------------------------- bad inputs


def test_missing_folder(tmp_path):
  gone = str(tmp_path / "no_such_model")
  for load in (load_pipeline, load_unet, load_vae, load_text_encoder):
    with pytest.raises(WeightsNotFoundError, match="no_such_model"):
      load(gone)


def test_missing_config(model_dir, tmp_path):
  folder = _copy(model_dir, "unet", tmp_path)
  os.remove(os.path.join(folder, "config.json"))
  with pytest.raises(WeightsNotFoundError, match="config.json"):
    load_unet(folder)


def test_not_a_pipeline_folder(model_dir):
  with pytest.raises(WeightsNotFoundError, match="unet/"):
    load_pipeline(os.path.join(model_dir, "vae"))


def test_pickle_only_folder_refused_unopened(model_dir, tmp_path, monkeypatch):
  folder = _copy(model_dir, "unet", tmp_path)
  os.remove(os.path.join(folder, UNET_FILE))
  junk = b"\x80\x05\x95 this is not a pickle \xff\x00"
  with pytest.raises(Exception):  # the bytes would crash an unpickler
    pickle.loads(junk)
  bin_path = os.path.join(folder, "diffusion_pytorch_model.bin")
  with open(bin_path, "wb") as f:
    f.write(junk)
  opened = []
  real_open = builtins.open

  def spy_open(file, *args, **kwargs):
    opened.append(os.path.abspath(str(file)) if isinstance(file, (str, os.PathLike)) else file)
    return real_open(file, *args, **kwargs)

  def no_unpickling(*args, **kwargs):
    raise AssertionError("the loader tried to unpickle")

  monkeypatch.setattr(builtins, "open", spy_open)
  monkeypatch.setattr(pickle, "load", no_unpickling)
  monkeypatch.setattr(pickle, "loads", no_unpickling)
  with pytest.raises(PickleRefusedError) as e:
    load_unet(folder)
  assert os.path.abspath(bin_path) not in opened
  msg = str(e.value)
  assert "diffusion_pytorch_model.bin" in msg
  assert "safe_serialization=True" in msg and "never unpickles" in msg


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt"])
def test_other_pickles_refused(model_dir, tmp_path, name):
  folder = _copy(model_dir, "text_encoder", tmp_path)
  os.remove(os.path.join(folder, "model.safetensors"))
  with open(os.path.join(folder, name), "wb") as f:
    f.write(b"\x80\x05junk")
  with pytest.raises(PickleRefusedError, match=name):
    load_text_encoder(folder)


def test_safetensors_preferred_over_pickle(model_dir, params, tmp_path):
  folder = _copy(model_dir, "vae", tmp_path)
  with open(os.path.join(folder, "diffusion_pytorch_model.bin"), "wb") as f:
    f.write(b"\x80\x05junk")
  _, p = load_vae(folder)
  _assert_identical(p, params["vae"])


def test_no_weights_at_all(model_dir, tmp_path):
  folder = _copy(model_dir, "vae", tmp_path)
  os.remove(os.path.join(folder, UNET_FILE))
  with pytest.raises(WeightsNotFoundError, match="no safetensors weights"):
    load_vae(folder)


@pytest.mark.parametrize("keep", ["data", "header"])
def test_truncated_safetensors(model_dir, tmp_path, keep):
  folder = _copy(model_dir, "vae", tmp_path)
  path = os.path.join(folder, UNET_FILE)
  with open(path, "rb") as f:
    blob = f.read()
  with open(path, "wb") as f:
    f.write(blob[:len(blob) - 1000] if keep == "data" else blob[:64])
  with pytest.raises(SafetensorsError, match="truncated") as e:
    load_vae(folder)
  assert UNET_FILE in str(e.value)


def test_not_safetensors_at_all(model_dir, tmp_path):
  folder = _copy(model_dir, "vae", tmp_path)
  with open(os.path.join(folder, UNET_FILE), "wb") as f:
    f.write(b"abc")
  with pytest.raises(SafetensorsError, match=UNET_FILE):
    load_vae(folder)


@pytest.mark.parametrize("key", [
    "time_embedding.linear_1.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight",
    "conv_norm_out.bias",
])
def test_missing_tensor(model_dir, tmp_path, key):
  folder = _copy(model_dir, "unet", tmp_path)
  _rewrite(folder, UNET_FILE, lambda s: {k: v for k, v in s.items() if k != key})
  with pytest.raises(WeightsMismatchError, match="missing 1 tensor") as e:
    load_unet(folder)
  assert repr(key) in str(e.value)


@pytest.mark.parametrize("key", ["down_blocks.0.extra.weight", "conv_in.extra", "extra.bias"])
def test_extra_tensor(model_dir, tmp_path, key):
  folder = _copy(model_dir, "vae", tmp_path)
  _rewrite(folder, UNET_FILE, lambda s: {**s, key: np.zeros((4,), np.float32)})
  with pytest.raises(WeightsMismatchError, match="unexpected tensor") as e:
    load_vae(folder)
  assert repr(key) in str(e.value)


def test_first_offender_named(model_dir, tmp_path):
  folder = _copy(model_dir, "vae", tmp_path)
  extra = {"zz.weight": np.zeros(2, np.float32), "aa.bias": np.zeros(2, np.float32)}
  _rewrite(folder, UNET_FILE, lambda s: {**s, **extra})
  with pytest.raises(WeightsMismatchError, match="'aa.bias'"):
    load_vae(folder)


def test_wrong_shape(model_dir, tmp_path):
  folder = _copy(model_dir, "unet", tmp_path)
  key = "conv_in.weight"  # torch [32, 4, 3, 3] -> Flax kernel (3, 3, 4, 32)
  _rewrite(folder, UNET_FILE, lambda s: {**s, key: np.zeros((16, 4, 3, 3), np.float32)})
  with pytest.raises(WeightsMismatchError) as e:
    load_unet(folder)
  msg = str(e.value)
  assert repr(key) in msg and "(16, 4, 3, 3)" in msg and "(3, 3, 4, 32)" in msg


def test_wrong_shape_linear(model_dir, tmp_path, params):
  folder = _copy(model_dir, "text_encoder", tmp_path)
  key = "text_model.encoder.layers.1.mlp.fc1.weight"  # torch [64, 32]
  _rewrite(folder, "model.safetensors", lambda s: {**s, key: np.zeros((64, 33), np.float32)})
  with pytest.raises(WeightsMismatchError) as e:
    load_text_encoder(folder)
  msg = str(e.value)
  assert repr(key) in msg and "(64, 33)" in msg and "(32, 64)" in msg


def test_unsupported_config_field(model_dir, tmp_path):
  folder = _copy(model_dir, "unet", tmp_path)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(dict(tiny.UNET, addition_embed_type="text_time"), f)
  with pytest.raises(UnsupportedConfigError, match="addition_embed_type"):
    load_unet(folder)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(dict(tiny.UNET, fancy_new_option=1), f)
  with pytest.raises(UnsupportedConfigError, match="fancy_new_option"):
    load_unet(folder)


def test_component_mixup(model_dir):
  with pytest.raises(ValueError, match="AutoencoderKL") as e:
    load_unet(os.path.join(model_dir, "vae"))
  assert "UNet2DConditionModel" in str(e.value)
  with pytest.raises(ValueError, match="UNet2DConditionModel"):
    load_vae(os.path.join(model_dir, "unet"))


def test_invalid_config_json(model_dir, tmp_path):
  folder = _copy(model_dir, "vae", tmp_path)
  with open(os.path.join(folder, "config.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="config.json"):
    load_vae(folder)


# ---------------------------------------------------------------- checkpoint naming variants


def test_position_ids_buffer_ignored(model_dir, params, tmp_path):
  folder = _copy(model_dir, "text_encoder", tmp_path)
  _rewrite(folder, "model.safetensors", lambda s: {
      **s, "text_model.embeddings.position_ids": np.arange(77, dtype=np.int64)[None]})
  _, p = load_text_encoder(folder)
  _assert_identical(p, params["text_encoder"])


def test_text_encoder_without_text_model_prefix(model_dir, params, tmp_path):
  """transformers >= 5 saves a CLIPTextModel without the `text_model.` prefix."""
  folder = _copy(model_dir, "text_encoder", tmp_path)
  _rewrite(folder, "model.safetensors",
           lambda s: {k.removeprefix("text_model."): v for k, v in s.items()})
  _, p = load_text_encoder(folder)
  _assert_identical(p, params["text_encoder"])


def test_vae_legacy_attention_names(model_dir, params, tmp_path):
  folder = _copy(model_dir, "vae", tmp_path)
  old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  renamed = []

  def edit(state):
    out = {}
    for k, v in state.items():
      for new, legacy in old.items():
        if f".attentions.0.{new}." in k:
          k = k.replace(f".{new}.", f".{legacy}.")
          renamed.append(k)
      out[k] = v
    return out

  _rewrite(folder, UNET_FILE, edit)
  assert len(renamed) == 16  # encoder + decoder mid attention, 4 linears x (weight, bias)
  _, p = load_vae(folder)
  _assert_identical(p, params["vae"])


# ---------------------------------------------------------------- convert


@pytest.mark.parametrize("key,path", [
    ("time_embedding.linear_1.weight", ("time_embedding", "linear_1", "weight")),
    ("time_embedding.linear_2.bias", ("time_embedding", "linear_2", "bias")),
    ("down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.weight",
     ("down_blocks_0", "attentions_1", "transformer_blocks_0", "attn1", "to_out_0", "weight")),
    ("text_model.encoder.layers.11.mlp.fc1.bias",
     ("text_model", "encoder", "layers_11", "mlp", "fc1", "bias")),
    ("conv_in.weight", ("conv_in", "weight")),
])
def test_key_path_round_trip(key, path):
  assert convert.torch_key_to_path(key) == path
  assert convert.path_to_torch_key(path) == key


def test_every_tiny_key_round_trips(params):
  for comp in ("unet", "vae", "text_encoder"):
    for key in convert.flax_to_torch(params[comp]):
      assert convert.path_to_torch_key(convert.torch_key_to_path(key)) == key


def _abstract(tree):
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), tree,
                      is_leaf=lambda x: isinstance(x, tuple))


def test_conv_kernel_oihw_to_hwio():
  o, i, kh, kw = 4, 2, 3, 5
  w = np.arange(o * i * kh * kw, dtype=np.float32).reshape(o, i, kh, kw)
  b = np.arange(o, dtype=np.float32)
  target = _abstract({"blocks_0": {"conv": {"kernel": (kh, kw, i, o), "bias": (o,)}}})
  out = convert.torch_to_flax({"blocks.0.conv.weight": w, "blocks.0.conv.bias": b}, target)
  k = np.asarray(out["blocks_0"]["conv"]["kernel"])
  assert k.shape == (kh, kw, i, o)
  for oo, ii, hh, ww in [(0, 0, 0, 0), (3, 1, 2, 4), (1, 0, 2, 1), (2, 1, 0, 3)]:
    assert k[hh, ww, ii, oo] == w[oo, ii, hh, ww]
  np.testing.assert_array_equal(np.asarray(out["blocks_0"]["conv"]["bias"]), b)
  back = convert.flax_to_torch(out)
  np.testing.assert_array_equal(back["blocks.0.conv.weight"], w)


def test_scalar_leaf_round_trip():
  tree = {"gate": {"bias": jnp.float32(0.5)}}
  state = convert.flax_to_torch(tree)
  assert state["gate.bias"].shape == ()
  out = convert.torch_to_flax(state, _abstract({"gate": {"bias": ()}}))
  assert out["gate"]["bias"].shape == () and float(out["gate"]["bias"]) == 0.5


def test_one_by_one_conv_fills_dense():
  w = np.random.default_rng(0).standard_normal((6, 3, 1, 1)).astype(np.float32)
  target = _abstract({"proj_in": {"kernel": (3, 6), "bias": (6,)}})
  out = convert.torch_to_flax({"proj_in.weight": w, "proj_in.bias": np.zeros(6, np.float32)},
                              target)
  np.testing.assert_array_equal(np.asarray(out["proj_in"]["kernel"]), w[:, :, 0, 0].T)
  # A 3x3 conv is no Dense kernel: refused with both shapes.
  with pytest.raises(WeightsMismatchError, match=r"'proj_in.weight'.*\(6, 3, 3, 3\)"):
    convert.torch_to_flax({"proj_in.weight": np.zeros((6, 3, 3, 3), np.float32),
                           "proj_in.bias": np.zeros(6, np.float32)}, target)


def test_linear_norm_embedding_layouts():
  rng = np.random.default_rng(1)
  lin, norm, emb = (rng.standard_normal(s).astype(np.float32) for s in ((5, 3), (5,), (7, 5)))
  target = _abstract({"fc": {"kernel": (3, 5)}, "norm": {"scale": (5,)},
                      "tok": {"embedding": (7, 5)}})
  state = {"fc.weight": lin, "norm.weight": norm, "tok.weight": emb,
           "tok.position_ids": np.arange(7)}
  out = convert.torch_to_flax(state, target, ignore=[r".*position_ids"], dtype=jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(out["fc"]["kernel"], np.float32),
                                lin.T.astype(ml_dtypes.bfloat16).astype(np.float32))
  assert out["norm"]["scale"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out["tok"]["embedding"], np.float32),
                                emb.astype(ml_dtypes.bfloat16).astype(np.float32))
  with pytest.raises(WeightsMismatchError, match="position_ids"):
    convert.torch_to_flax(state, target)  # not ignored: an unexpected tensor


def test_safetensors_io_round_trip(tmp_path):
  arrays = {"f32": np.arange(6, dtype=np.float32).reshape(2, 3),
            "f16": np.array([1.5, -2], np.float16),
            "bf16": np.array([0.1, 3], ml_dtypes.bfloat16),
            "i64": np.arange(3, dtype=np.int64), "b": np.array([True, False]),
            "scalar": np.array(2.0, np.float32), "empty": np.zeros((0, 4), np.float32)}
  path = str(tmp_path / "x.safetensors")
  safetensors_io.save_file(arrays, path, metadata={"format": "pt"})
  got = safetensors_io.load_file(path)
  assert sorted(got) == sorted(arrays)
  for k, v in arrays.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
    np.testing.assert_array_equal(got[k], v)
  assert safetensors_io.load_file(path, ["f16"]).keys() == {"f16"}
  with pytest.raises(SafetensorsError, match="complex"):
    safetensors_io.save_file({"c": np.zeros(2, np.complex64)}, path)


# ---------------------------------------------------------------- full-size SD trees (abstract)

# config.json contents of the public SD 1.5 / 2.1 model cards, as literals (the files
# in tests/data/sd_configs/ must agree: test_literals_match_shipped_configs).
_SD_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu",
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "out_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32,
}
_SD_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "scaling_factor": 0.18215,
}
_SD_TEXT = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
    "max_position_embeddings": 77, "layer_norm_eps": 1e-05,
}
_SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False,
    "steps_offset": 1,
}
SD15 = {
    "unet": dict(_SD_UNET, attention_head_dim=8, cross_attention_dim=768, sample_size=64),
    "vae": dict(_SD_VAE, sample_size=512),
    "text_encoder": dict(_SD_TEXT, hidden_size=768, intermediate_size=3072,
                         num_hidden_layers=12, num_attention_heads=12,
                         hidden_act="quick_gelu", projection_dim=768),
    "scheduler": dict(_SCHEDULER, _class_name="PNDMScheduler", skip_prk_steps=True,
                      prediction_type="epsilon"),
}
SD21 = {
    "unet": dict(_SD_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                 use_linear_projection=True, upcast_attention=True, sample_size=96),
    "vae": dict(_SD_VAE, sample_size=768),
    "text_encoder": dict(_SD_TEXT, hidden_size=1024, intermediate_size=4096,
                         num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu",
                         projection_dim=512),
    "scheduler": dict(_SCHEDULER, _class_name="DDIMScheduler", prediction_type="v_prediction"),
}
SD_CONFIGS = {"sd15": SD15, "sd21": SD21}
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sd_configs")

# Parameter counts (diffusers / transformers: SD 1.5 UNet 859,520,964, VAE 83,653,863,
# CLIP ViT-L/14 text 123,060,480; SD 2.1 UNet 865,910,724, OpenCLIP ViT-H text 340,387,840).
COUNTS = {
    ("sd15", "unet"): 859_520_964, ("sd15", "vae"): 83_653_863,
    ("sd15", "text_encoder"): 123_060_480,
    ("sd21", "unet"): 865_910_724, ("sd21", "vae"): 83_653_863,
    ("sd21", "text_encoder"): 340_387_840,
}
BUILD = {
    "unet": lambda c: unet.abstract_params(unet.UNetConfig.from_diffusers(c)),
    "vae": lambda c: vae.abstract_params(vae.VAEConfig.from_diffusers(c)),
    "text_encoder": lambda c: clip.abstract_params(clip.CLIPTextConfig.from_transformers(c)),
}


@pytest.mark.parametrize("model,component", sorted(COUNTS))
def test_full_size_trees_are_abstract(model, component):
  tree = BUILD[component](SD_CONFIGS[model][component])
  leaves = jax.tree.leaves(tree)
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert {x.dtype for x in leaves} == {jnp.dtype(jnp.float32)}
  assert sum(int(np.prod(x.shape)) for x in leaves) == COUNTS[model, component]
  if component == "unet":  # SD 2.x projects attention in/out with linears, SD 1.x with 1x1 convs
    proj = tree["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"]
    assert len(proj.shape) == (2 if model == "sd21" else 4)


@pytest.mark.parametrize("model", sorted(SD_CONFIGS))
def test_literals_match_shipped_configs(model):
  for component, want in SD_CONFIGS[model].items():
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    with open(os.path.join(SHIPPED, model, component, name)) as f:
      assert json.load(f) == want, (model, component)
