"""train.selection=lora: the factors, their merge, training, sampling, and diffusers' LoRA files.

The round trip mirrors tests/test_interop.py's Custom Diffusion one: a tiny random SD
folder that lfs_jax and diffusers both load, a two-session LoRA run on it, its export
loaded with `pipe.load_lora_weights` (PyTorch, CPU) must give the UNet output that
lfs_jax gives, and differ from the base model's (so a load that did nothing fails).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft  # noqa: F401  (diffusers' load_lora_weights needs it)
import pytest

from lfs_jax import checkpoint, concepts, config_base, interop, lora_format, parallel, runs, tiny
from lfs_jax import delta as delta_lib
from lfs_jax.errors import ConfigError
from lfs_jax.train import kd, losses
from lfs_jax.weights import safetensors_io
from lfs_jax.weights.convert import flatten
from test_interop import (_INPUTS, _TIMESTEPS, _config as interop_config,  # the same tiny run
                          _diffusers_eps as diffusers_eps, _rel, make_world)

# Module fixtures worth building once: keep this module on one xdist worker.
pytestmark = pytest.mark.xdist_group("lora")


RANK, ALPHA = 4, 8.0  # scale 2: a power of two, so folding it into B round-trips exactly
LORA = {"train.selection": "lora", "train.lora_rank": RANK, "train.lora_alpha": ALPHA,
        "train.lora_targets": "attn*/to_*", "kd.kv_weight": 1.0}


def _config(folder, compile_cache, **overrides):
  """test_interop's two-session run config, training LoRA factors with the K/V anchor."""
  return interop_config(folder, compile_cache, **{**LORA, **overrides})


@pytest.fixture(scope="module")
def world(tmp_path_factory, compile_cache):
  got = make_world(tmp_path_factory, compile_cache, "lora", **LORA)
  return {**got, "selection": delta_lib.from_config(got["cfg"].train)}


# ------------------------------------------------------------------ the entry itself


def test_lora_merge_is_the_base_plus_the_scaled_product():
  unet = tiny.random_params(0)["unet"]
  sel = delta_lib.LoRA(RANK, ALPHA, ("attn2/to_k", "attn2/to_v"))
  start = sel.initial(unet, 0)
  assert all(p[-1] in ("lora_A", "lora_B") for p in flatten(start))
  assert len(flatten(start)) == 2 * 2 * 4  # A and B, to_k and to_v, 4 transformer blocks
  # B = 0 at the start: merging gives the base model back exactly.
  merged = sel.merge(start, sel.frozen(unet))
  for p, w in flatten(unet).items():
    np.testing.assert_array_equal(np.asarray(flatten(merged)[p]), np.asarray(w), err_msg=str(p))

  rng = np.random.default_rng(1)
  moved = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), start)
  merged, flat_m = sel.merge(moved, unet), flatten(moved)
  for module in {p[:-1] for p in flat_m}:
    want = (np.asarray(flatten(unet)[module + ("kernel",)], np.float64)
            + ALPHA / RANK * flat_m[module + ("lora_A",)].astype(np.float64)
            @ flat_m[module + ("lora_B",)].astype(np.float64))
    np.testing.assert_allclose(np.asarray(flatten(merged)[module + ("kernel",)]), want,
                               rtol=1e-5, atol=1e-6)
  untouched = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn2", "to_q", "kernel")
  np.testing.assert_array_equal(np.asarray(flatten(merged)[untouched]),
                                np.asarray(flatten(unet)[untouched]))


def test_lora_config_errors_name_the_field():
  cfg = config_base.get_config()
  cfg.kd.kv_weight = 1.0
  cfg.train.selection = "lora"
  cfg.train.lora_rank = 0
  with pytest.raises(ConfigError, match="train.lora_rank"):
    delta_lib.from_config(cfg.train)
  cfg.train.lora_rank = 2
  cfg.train.lora_targets = "to_k"
  with pytest.raises(ConfigError, match="train.lora_targets"):
    delta_lib.from_config(cfg.train)
  cfg.train.lora_targets = "attn3/to_k"
  with pytest.raises(ConfigError, match="matches no attention projection"):
    delta_lib.from_config(cfg.train).initial(tiny.random_params(0)["unet"])
  cfg.train.lora_targets = "attn1/to_*"  # no cross-attention key or value to anchor
  mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
  with pytest.raises(ConfigError, match="kd.kv_weight=1.0 anchors the attn2"):
    losses.make_spec(cfg, mesh=mesh, scaling_factor=1.0, scheduler=None, lfs=True,
                     selection=delta_lib.from_config(cfg.train))
  cfg.train.selection = "everything"
  with pytest.raises(ConfigError, match="lora"):
    delta_lib.from_config(cfg.train)


def test_kv_anchor_reads_the_lora_product():
  """D = scale (A B - A0 B0) on attn2 to_k/to_v only; other projections do not count."""
  unet = tiny.random_params(0)["unet"]
  sel = delta_lib.LoRA(RANK, ALPHA, ("attn*/to_*",))
  rng = np.random.default_rng(2)
  rand = lambda tree: jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                                   tree)
  student, teacher = rand(sel.initial(unet)), rand(sel.initial(unet))
  contexts = rng.standard_normal((3, 5, 32)).astype(np.float32)
  got = float(kd.kv_anchor(student, teacher, kd.kv_gram(contexts, 2), sel))
  c = contexts[:2].reshape(-1, 32).astype(np.float64)
  fs, ft = flatten(student), flatten(teacher)
  terms = []
  for p in sorted(fs):
    if p[-1] == "lora_A" and p[-2] in ("to_k", "to_v") and p[-3] == "attn2":
      m = p[:-1]
      d = ALPHA / RANK * (fs[m + ("lora_A",)].astype(np.float64) @ fs[m + ("lora_B",)]
                          - ft[m + ("lora_A",)].astype(np.float64) @ ft[m + ("lora_B",)])
      terms.append(np.mean(np.sum((c @ d) ** 2, axis=1)) / d.shape[1])
  assert len(terms) == 8
  np.testing.assert_allclose(got, np.mean(terms), rtol=1e-4)


# ------------------------------------------------------------------ a trained LoRA run


def test_lora_run_trains_and_stores_only_the_factors(world):
  sel = world["selection"]
  targets = sel.modules(world["pipe"].unet_params)
  assert len(targets) == 32  # 4 projections x attn1/attn2 x 4 transformer blocks
  for k in (1, 2):
    stored = checkpoint.restore_session(world["run"], k)["delta"]["unet"]
    assert set(flatten(stored)) == {m + (f,) for m in targets for f in ("lora_A", "lora_B")}
  # Both sessions ran DFKD (session 2 against session 1's merged model) and the anchor.
  for r in world["results"]:
    assert {"kd", "kv", "denoise"} <= set(r) and all(np.isfinite(v) for v in r.values())
  assert world["results"][0]["kv"] > 0  # the product moved away from the teacher's (zero)


def test_sampling_merges_the_factors_into_the_base(world):
  model = runs.load_run(world["run"], 2)
  stored = flatten(checkpoint.restore_session(world["run"], 2)["delta"]["unet"])
  base, merged = flatten(world["pipe"].unet_params), flatten(model.pipe.unet_params)
  assert merged.keys() == base.keys()
  m = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn2", "to_v")
  want = (np.asarray(base[m + ("kernel",)], np.float64)
          + ALPHA / RANK * np.asarray(stored[m + ("lora_A",)], np.float64)
          @ np.asarray(stored[m + ("lora_B",)], np.float64))
  np.testing.assert_allclose(np.asarray(merged[m + ("kernel",)]), want, rtol=1e-5, atol=1e-7)
  assert np.abs(want - np.asarray(base[m + ("kernel",)])).max() > 1e-4


def test_diffusers_load_lora_weights_reproduces_an_exported_session(world, tmp_path):
  out = str(tmp_path / "export")
  got = interop.export_session(world["run"], out, session=2)
  assert sorted(os.listdir(out)) == sorted(
      ["README.md", "concepts.json", lora_format.WEIGHTS_NAME, "<c1>.safetensors",
       "<c2>.safetensors"])
  assert "load_lora_weights" in open(os.path.join(out, "README.md")).read()

  prompt = "photo of a <c1> cat and a <c2> dog"
  # lfs_jax: the run's own merged model, as sampling builds it.
  model = runs.load_run(world["run"], 2)
  pipe = model.pipe
  ids = concepts.tokenize(pipe.tokenizer, [prompt] * 2, 77)
  ctx = world["text"]({"params": pipe.text_encoder_params}, jnp.asarray(ids),
                      extra_embeddings=jnp.asarray(model.token_rows))
  mine = np.asarray(world["unet"]({"params": pipe.unet_params},
                                  jnp.asarray(_INPUTS.transpose(0, 2, 3, 1)),
                                  jnp.asarray(_TIMESTEPS, jnp.int32), ctx)).transpose(0, 3, 1, 2)
  want, base = diffusers_eps(
      world["folder"], out, got["tokens"], prompt,
      load=lambda p: p.load_lora_weights(out, weight_name=lora_format.WEIGHTS_NAME))
  assert _rel(mine, want) <= 1e-5
  assert _rel(base, want) > 1e-3  # the LoRA was really applied


def test_import_of_a_lora_export_gives_the_same_factors(world, tmp_path):
  out = str(tmp_path / "export")
  interop.export_session(world["run"], out, session=2)
  run = str(tmp_path / "imported")
  got = interop.import_delta(out, run, world["cfg"])
  assert got["tokens"] == ["<c1>", "<c2>"] and got["from_export"] == 32 and got["from_base"] == 0
  want = checkpoint.restore_session(world["run"], 2)["delta"]
  have = checkpoint.restore_session(run, 1)["delta"]
  assert flatten(have).keys() == flatten(want).keys()
  for k, v in flatten(want).items():
    np.testing.assert_array_equal(flatten(have)[k], v, err_msg=str(k))

  # A Custom Diffusion run cannot take it, and says which run can.
  leaf = _config(world["folder"], world["cfg"].compile_cache, **{"train.selection": "crossattn_kv"})
  with pytest.raises(interop.InteropError, match="train.selection=lora"):
    interop.import_delta(out, str(tmp_path / "cd"), leaf)
  # A LoRA run whose targets miss the file's layers, or of another rank, refuses by name.
  kv = _config(world["folder"], world["cfg"].compile_cache,
               **{"train.lora_targets": "attn2/to_k,attn2/to_v"})
  with pytest.raises(interop.InteropError, match="does not target"):
    interop.import_delta(out, str(tmp_path / "kv"), kv)
  r8 = _config(world["folder"], world["cfg"].compile_cache, **{"train.lora_rank": 8})
  with pytest.raises(interop.InteropError, match="rank 4"):
    interop.import_delta(out, str(tmp_path / "r8"), r8)
  assert not os.path.exists(tmp_path / "kv") and not os.path.exists(tmp_path / "r8")


def test_lora_file_metadata_alpha_is_honoured(tmp_path):
  """A file with diffusers' lora_adapter_metadata (alpha != rank) reads with its scale."""
  a = np.arange(6, dtype=np.float32).reshape(2, 3)   # lora_A [r=2, in=3]
  b = np.ones((4, 2), np.float32)                    # lora_B [out=4, r=2]
  key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
  path = str(tmp_path / lora_format.WEIGHTS_NAME)
  state = {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}
  safetensors_io.save_file(state, path, metadata={
      "format": "pt", "lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 8})})
  (got_a, got_b), = lora_format.from_diffusers(path, state).values()
  np.testing.assert_array_equal(got_a @ got_b, 4.0 * (b @ a).T)
  with pytest.raises(lora_format.LoraFormatError, match="text_encoder"):
    lora_format.from_diffusers(path, {**state, "text_encoder.x.lora_A.weight": a})
