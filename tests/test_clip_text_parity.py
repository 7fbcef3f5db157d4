"""lfs_jax.models.clip.CLIPTextModel against transformers' CLIPTextModel (float32)."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lfs_jax.errors import UnsupportedConfigError
from lfs_jax.models import clip
from lfs_jax.weights import load_text_encoder, safetensors_io

VOCAB = 1000
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
            max_position_embeddings=77, pad_token_id=1, bos_token_id=998)
VARIANTS = {
    # eos 999: pooled output at the first eos (transformers' current rule).
    "quick_gelu": dict(hidden_act="quick_gelu", num_hidden_layers=2, eos_token_id=999),
    # eos 2: the legacy argmax rule of the SD 1.x/2.x configs; gelu as in SD 2.x.
    "gelu": dict(hidden_act="gelu", num_hidden_layers=3, eos_token_id=2),
}
EOS_AT = (10, 40)  # the end-of-text position of each prompt in the batch


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def save_reference(folder, variant, layout):
  """A random tiny transformers CLIPTextModel saved as safetensors in `folder`."""
  torch.manual_seed(0)
  model = transformers.CLIPTextModel(
      transformers.CLIPTextConfig(**TINY, **VARIANTS[variant])).eval()
  with torch.no_grad():  # CLIP initialises biases to 0 and norms to 1: perturb them
    for name, p in model.named_parameters():
      if name.endswith("bias") or "layer_norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(folder, safe_serialization=True)
  path = os.path.join(folder, "model.safetensors")
  state = safetensors_io.load_file(path)
  if layout == "hub":  # transformers 4.x checkpoints (every SD text encoder on the Hub)
    state = {k if k.startswith("text_model.") else "text_model." + k: v
             for k, v in state.items()}
  else:
    assert not any(k.startswith("text_model.") for k in state)  # transformers 5 layout
  safetensors_io.save_file(state, path)
  return model


def prompts(batch=2):
  """Random ids with bos first and eos (also used as padding) from EOS_AT on."""
  ids = np.random.default_rng(0).integers(2, 998, size=(batch, 77))
  ids[:, 0] = 998
  for b, p in enumerate(EOS_AT[:batch]):
    ids[b, p:] = 999
  return ids


@pytest.mark.parametrize("variant,layout", [("quick_gelu", "hub"), ("gelu", "hub"),
                                            ("quick_gelu", "transformers5")])
def test_parity_with_transformers(tmp_path, variant, layout):
  ref = save_reference(str(tmp_path), variant, layout)
  module, params = load_text_encoder(str(tmp_path))
  assert module.config.hidden_act == VARIANTS[variant]["hidden_act"]
  ids = prompts()

  with torch.no_grad():
    out = ref(torch.from_numpy(ids), output_hidden_states=True)
    text_model = getattr(ref, "text_model", ref)  # transformers 4 nests, 5 does not
    want = {
        "last": out.last_hidden_state.numpy(),
        "penultimate_raw": out.hidden_states[-2].numpy(),
        "penultimate_ln": text_model.final_layer_norm(out.hidden_states[-2]).numpy(),
        "pooled": out.pooler_output.numpy(),
    }

  @jax.jit
  def run(params, ids):
    apply = lambda **kw: module.apply({"params": params}, ids, **kw)
    last = apply()
    return {
        "last": last,
        "penultimate_raw": apply(hidden_layer=-2, final_layer_norm=False),
        "penultimate_ln": apply(hidden_layer=-2),
        "pooled": clip.pooled(last, ids, module.config.eos_token_id),
    }

  got = run(params, jnp.asarray(ids, jnp.int32))
  for name, w in want.items():
    assert got[name].shape == w.shape, name
    err = rel_err(got[name], w)
    assert err <= 1e-5, f"{name}: relative error {err:.2e}"


def test_extra_embeddings_extend_the_token_table():
  cfg = clip.CLIPTextConfig(**TINY, **VARIANTS["quick_gelu"])
  module = clip.CLIPTextModel(cfg)
  rng = np.random.default_rng(0)  # numpy, not module.init: no init compilation
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32),
                        clip.abstract_params(cfg))
  extra = jnp.asarray(rng.normal(size=(3, cfg.hidden_size)), jnp.float32)
  ids = jnp.array([[998, 5, VOCAB, 7, VOCAB + 2, 999, 999, 999],
                   [998, VOCAB + 2, 3, 4, 999, 999, 999, 999]], jnp.int32)

  # Reference: a model whose table was extended by hand.
  big = clip.CLIPTextModel(dataclasses.replace(cfg, vocab_size=VOCAB + 3))
  emb = params["text_model"]["embeddings"]["token_embedding"]["embedding"]
  big_params = jax.tree.map(lambda x: x, params)
  big_params["text_model"]["embeddings"]["token_embedding"] = {
      "embedding": jnp.concatenate([emb, extra])}

  @jax.jit  # one compilation: op-by-op dispatch is slow on a shared CPU
  def run(params, big_params, extra):
    apply = lambda ids, e: module.apply({"params": params}, ids, extra_embeddings=e)
    grad = jax.grad(lambda e: jnp.sum(apply(ids, e) ** 2))(extra)
    return {
        "got": apply(ids, extra),
        "want": big.apply({"params": big_params}, ids),
        "other": apply(ids, extra + 1.0),
        "grad": grad,
        "bad": apply(ids.at[0, 1].set(VOCAB + 3), extra),
    }

  r = jax.device_get(run(params, big_params, extra))
  np.testing.assert_allclose(r["got"], r["want"], rtol=0, atol=1e-6)
  # Different extra rows change the output: they really are read.
  assert not np.allclose(r["other"], r["got"])
  # Only the rows a prompt uses receive gradient (row VOCAB + 1 is never used).
  assert np.all(np.abs(r["grad"][[0, 2]]).sum(-1) > 0)
  np.testing.assert_array_equal(r["grad"][1], 0.0)
  # An id past the extended table is loud (NaN), never a silently clamped row.
  assert np.isnan(r["bad"][0]).any()
  with pytest.raises(ValueError, match="hidden_layer"):
    module.apply({"params": params}, ids, hidden_layer=cfg.num_hidden_layers + 1)


def test_config_refuses_what_is_not_implemented():
  base = transformers.CLIPTextConfig(**TINY, **VARIANTS["quick_gelu"]).to_dict()
  assert clip.CLIPTextConfig.from_transformers(base).hidden_act == "quick_gelu"
  with pytest.raises(UnsupportedConfigError, match="hidden_act"):
    clip.CLIPTextConfig.from_transformers({**base, "hidden_act": "gelu_new"})
  with pytest.raises(UnsupportedConfigError, match="model_type"):
    clip.CLIPTextConfig.from_transformers({**base, "model_type": "clip_vision_model"})
  with pytest.raises(UnsupportedConfigError, match="architectures"):
    clip.CLIPTextConfig.from_transformers(
        {**base, "architectures": ["CLIPTextModelWithProjection"]})
  with pytest.raises(UnsupportedConfigError, match="rotary_base"):
    clip.CLIPTextConfig.from_transformers({**base, "rotary_base": 10000})
  with pytest.raises(UnsupportedConfigError, match="num_attention_heads"):
    clip.CLIPTextConfig.from_transformers({**base, "num_attention_heads": 5})


def test_config_accepts_clip_model_and_legacy_files():
  text = transformers.CLIPTextConfig(**TINY, **VARIANTS["gelu"])
  full = transformers.CLIPConfig(text_config=text.to_dict(), projection_dim=16).to_dict()
  cfg = clip.CLIPTextConfig.from_transformers(full)
  assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.hidden_act, cfg.eos_token_id,
          cfg.projection_dim) == (32, 3, "gelu", 2, 16)
  # runwayml/stable-diffusion-v1-5 text_encoder/config.json (transformers 4.22).
  sd15 = {
      "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
      "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
      "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
      "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
      "max_position_embeddings": 77, "model_type": "clip_text_model",
      "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
      "projection_dim": 768, "torch_dtype": "float32",
      "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
  }
  cfg = clip.CLIPTextConfig.from_transformers(sd15)
  assert (cfg.hidden_size, cfg.head_dim, cfg.eos_token_id) == (768, 64, 2)
  # Shapes only: eval_shape allocates nothing even at full size.
  shapes = clip.abstract_params(cfg)
  assert shapes["text_model"]["encoder"]["layers_11"]["mlp"]["fc1"]["kernel"].shape == (
      768, 3072)


# Real prompts, as a pipeline encodes them: SD 1.x's padding, truncation and two
# modifier tokens past the vocabulary.
REAL_PROMPTS = [
    "a photo of a dog",
    "a <c1> dog swimming in a pool",
    "A <c2> cat, in the JUNGLE!! next to a <c1> dog",
    "",
    "naïve café résumé, 3.5x zoom (watercolor)",
    "a big red " * 30 + "<c2> teapot at the very end, cut off",
]


def test_real_prompts_through_our_tokenizer_match_transformers(tmp_path):
  from lfs_jax import concepts as concepts_lib
  from lfs_jax.diffusion import sampler
  from lfs_jax import tiny
  from lfs_jax.weights import load_tokenizer

  vocab = 49408
  ours = load_tokenizer(tiny.TOKENIZER_DIR)
  registry = concepts_lib.Registry(tuple(
      concepts_lib.Concept(f"x{i}", f"<c{i}>", "dog", "dog", i, ()) for i in (1, 2)))
  concepts_lib.add_tokens(ours, registry, vocab)
  ids = concepts_lib.tokenize(ours, REAL_PROMPTS, 77)

  # transformers' tokenizer as diffusers' StableDiffusionPipeline calls it.
  ref_tok = transformers.CLIPTokenizerFast.from_pretrained(tiny.TOKENIZER_DIR,
                                                           local_files_only=True)
  ref_tok.add_tokens(["<c1>", "<c2>"])
  want_ids = ref_tok(REAL_PROMPTS, padding="max_length", max_length=ref_tok.model_max_length,
                     truncation=True, return_tensors="np").input_ids
  np.testing.assert_array_equal(ids, want_ids)
  # The BPE itself, by known CLIP ids ("a" 320, "photo" 1125, "of" 539, "dog" 1929),
  # bos 49406, eos 49407 also as padding, the modifier tokens right after the vocab.
  np.testing.assert_array_equal(ids[0, :8], [49406, 320, 1125, 539, 320, 1929, 49407, 49407])
  assert ids.shape == (6, 77) and ids.dtype == np.int32
  assert ids[1, 2] == vocab and ids[2, 2] == vocab + 1 and list(ids[2]).count(vocab) == 1
  np.testing.assert_array_equal(ids[3, :2], [49406, 49407])
  assert ids[5, 76] == 49407 and vocab + 1 not in ids[5]  # truncated to 77, eos kept

  # Features: a tiny random CLIPTextModel over the real vocabulary, its table grown
  # by the two modifier rows in transformers against ours reading them as extra rows.
  torch.manual_seed(0)
  config = transformers.CLIPTextConfig(
      vocab_size=vocab, hidden_size=32, intermediate_size=64, num_attention_heads=4,
      num_hidden_layers=2, max_position_embeddings=77, hidden_act="quick_gelu",
      bos_token_id=0, eos_token_id=2, pad_token_id=1)  # SD 1.5's (legacy) special ids
  ref = transformers.CLIPTextModel(config).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if name.endswith("bias") or "layer_norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  ref.save_pretrained(str(tmp_path), safe_serialization=True)
  rows = np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)
  ref.resize_token_embeddings(vocab + 2)
  with torch.no_grad():
    ref.get_input_embeddings().weight[vocab:] = torch.from_numpy(rows)
    want = ref(torch.from_numpy(want_ids.astype(np.int64))).last_hidden_state.numpy()

  module, params = load_text_encoder(str(tmp_path))
  got = np.asarray(sampler.encode_text_jit(params, jnp.asarray(rows), jnp.asarray(ids),
                                           text=module))
  assert got.shape == want.shape == (6, 77, 32)
  for i, prompt in enumerate(REAL_PROMPTS):
    assert rel_err(got[i], want[i]) <= 1e-5, (prompt, rel_err(got[i], want[i]))
  # The modifier rows are read: other rows, other features for the prompts using them.
  other = np.asarray(sampler.encode_text_jit(params, jnp.asarray(rows + 1), jnp.asarray(ids),
                                             text=module))
  changed = [not np.allclose(other[i], got[i]) for i in range(6)]
  assert changed == [False, True, True, False, False, False]
