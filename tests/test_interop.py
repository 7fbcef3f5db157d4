"""Export to / import from diffusers' Custom Diffusion format, with diffusers as the client.

One tiny random SD folder that lfs_jax and diffusers both load; a two-session
lfs_jax run on it; its export loaded by diffusers (PyTorch, CPU) must give the
UNet output lfs_jax gives for the same prompt, latents and timestep.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import diffusers
import pytest
import torch

from lfs_jax import checkpoint, concepts, config_base, interop
from lfs_jax import tiny
from lfs_jax import delta as params_lib
from lfs_jax.train import session
from lfs_jax.weights import files, loaders, safetensors_io
from lfs_jax.weights.convert import flatten, unflatten

# Module fixtures worth building once: keep this module on one xdist worker.
pytestmark = pytest.mark.xdist_group("interop")


def _config(folder, compile_cache, **overrides):
  c = config_base.get_config()
  c.model.source = "local"
  c.model.path = folder
  c.compile_cache = compile_cache
  c.data.sessions = "cat;dog"
  c.train.steps = 2
  c.train.log_every = 2
  c.train.progress_every = 0
  c.train.learning_rate = 1e-3  # moves the weights far enough to see a wrong load
  c.kd.mode = "noise"  # DFKD at one point: less to compile
  c.mesh.data = 1
  c.validation.every_session = False  # grids: tests/test_validation.py's job
  for key, value in overrides.items():
    c.update_from_flattened_dict({key: value})
  c.lock()
  return c


def make_world(tmp_path_factory, compile_cache, name="interop", **overrides):
  """The tiny SD folder, its lfs_jax pipeline and a finished two-session run on it."""
  root = tmp_path_factory.mktemp(name)
  folder = str(root / "sd")
  tiny.save_folder(tiny.random_params(3), folder)
  cfg = _config(folder, compile_cache, **overrides)
  run = str(root / "run")
  results = session.run(cfg, run)
  pipe = loaders.load_pipeline(folder)
  return {"root": root, "folder": folder, "cfg": cfg, "run": run, "pipe": pipe,
          "results": results,
          "text": jax.jit(pipe.text_encoder.apply), "unet": jax.jit(pipe.unet.apply)}


@pytest.fixture(scope="module")
def world(tmp_path_factory, compile_cache):
  return make_world(tmp_path_factory, compile_cache)


def _rel(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


_INPUTS = np.random.default_rng(0).standard_normal((2, 4, 16, 16)).astype(np.float32)
_TIMESTEPS = np.array([999, 10], np.int64)


def _lfs_eps(world, selection, delta, registry, prompt):
  """lfs_jax: base UNet with the delta merged, text encoder with the token rows."""
  pipe = world["pipe"]
  _, rest = params_lib.split(pipe.unet_params, params_lib.selection_predicate(selection))
  unet_params = params_lib.merge(jax.tree.map(jnp.asarray, delta["unet"]), rest)
  concepts.add_tokens(pipe.tokenizer, registry, pipe.text_encoder.config.vocab_size)
  ids = concepts.tokenize(pipe.tokenizer, [prompt] * 2, 77)
  ctx = world["text"]({"params": pipe.text_encoder_params}, jnp.asarray(ids),
                      extra_embeddings=jnp.asarray(delta["tokens"]))
  eps = world["unet"]({"params": unet_params}, jnp.asarray(_INPUTS.transpose(0, 2, 3, 1)),
                      jnp.asarray(_TIMESTEPS, jnp.int32), ctx)
  return np.asarray(eps).transpose(0, 3, 1, 2)


def _diffusers_eps(folder, export_dir, tokens, prompt, load=None):
  """diffusers: the base pipeline + the export, as the export's README says to load it.

  `load(pipe)` applies the UNet delta; by default the Custom Diffusion processors.
  """
  from diffusers.models.attention_processor import CustomDiffusionAttnProcessor
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
  for token in tokens:
    pipe.load_textual_inversion(export_dir, weight_name=f"{token}.safetensors")
  prompt = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)  # as pipe(prompt) does
  ids = pipe.tokenizer([prompt] * 2, padding="max_length", max_length=77, truncation=True,
                       return_tensors="pt").input_ids
  with torch.no_grad():
    ctx = pipe.text_encoder(ids)[0]
    before = pipe.unet(torch.from_numpy(_INPUTS), torch.from_numpy(_TIMESTEPS), ctx).sample
    if load is None:
      pipe.unet.load_attn_procs(export_dir, weight_name=interop.WEIGHTS_NAME, _pipeline=pipe)
      procs = pipe.unet.attn_processors
      assert all(isinstance(p, CustomDiffusionAttnProcessor) for p in procs.values()), procs
    else:
      load(pipe)
    after = pipe.unet(torch.from_numpy(_INPUTS), torch.from_numpy(_TIMESTEPS), ctx).sample
  return after.numpy(), before.numpy()


def test_diffusers_reproduces_an_exported_session(world, tmp_path):
  out = str(tmp_path / "export")
  got = interop.export_session(world["run"], out, session=2)
  assert got["tokens"] == ["<c1>", "<c2>"]
  assert sorted(os.listdir(out)) == sorted(
      ["README.md", "concepts.json", interop.WEIGHTS_NAME, "<c1>.safetensors", "<c2>.safetensors"])
  readme = open(os.path.join(out, "README.md")).read()
  assert os.path.abspath(world["folder"]) in readme and "load_attn_procs" in readme

  stored = checkpoint.restore_session(world["run"], 2)
  registry = concepts.Registry.from_json(json.dumps(stored["meta"]["concepts"]))
  prompt = "photo of a <c1> cat and a <c2> dog"
  want, base = _diffusers_eps(world["folder"], out, got["tokens"], prompt)
  mine = _lfs_eps(world, "crossattn_kv", stored["delta"], registry, prompt)
  assert _rel(mine, want) <= 1e-5
  assert _rel(base, want) > 1e-3  # the processors were really applied


@pytest.fixture(scope="module")
def world_vectors(tmp_path_factory, compile_cache):
  """The same two sessions, each token three embedding rows (concepts.vectors)."""
  return make_world(tmp_path_factory, compile_cache, name="vectors",
                    **{"concepts.vectors": 3, "sample.steps": 2})


def test_a_multi_vector_session_goes_to_diffusers_and_back(world_vectors, tmp_path):
  world = world_vectors
  stored = checkpoint.restore_session(world["run"], 2)
  registry = concepts.Registry.from_json(json.dumps(stored["meta"]["concepts"]))
  rows = np.asarray(stored["delta"]["tokens"])
  assert registry.tokens == ["<c1>", "<c1>_1", "<c1>_2", "<c2>", "<c2>_1", "<c2>_2"]
  assert rows.shape == (6, 32)
  assert np.abs(rows[0] - rows[1]).max() > 1e-5  # one start, trained apart

  out = str(tmp_path / "export")
  got = interop.export_session(world["run"], out, session=2)
  assert got["tokens"] == ["<c1>", "<c2>"]
  c2 = safetensors_io.load_file(os.path.join(out, "<c2>.safetensors"))
  np.testing.assert_array_equal(c2["<c2>"], rows[3:6])
  assert "<c2> dog" in open(os.path.join(out, "README.md")).read()
  assert [e["vectors"] for e in json.load(open(os.path.join(out, "concepts.json")))] == [3, 3]

  prompt = "photo of a <c1> cat and a <c2> dog"
  want, base = _diffusers_eps(world["folder"], out, got["tokens"], prompt)
  mine = _lfs_eps(world, "crossattn_kv", stored["delta"], registry, registry.expand(prompt))
  assert _rel(mine, want) <= 1e-5
  short = _lfs_eps(world, "crossattn_kv", stored["delta"], registry, prompt)
  assert _rel(short, want) > 1e-3  # the other rows are read, not just the first

  run = str(tmp_path / "imported")
  assert interop.import_delta(out, run, world["cfg"])["tokens"] == ["<c1>", "<c2>"]
  have = checkpoint.restore_session(run, 1)["delta"]
  np.testing.assert_array_equal(have["tokens"], rows)
  assert concepts.Registry.load(os.path.join(run, "concepts.json")).tokens == registry.tokens


def test_sampling_a_multi_vector_run_writes_the_other_rows_into_prompts(world_vectors):
  import dataclasses
  from lfs_jax import runs, sample
  run = runs.load_run(world_vectors["run"])
  assert run.token_rows.shape == (6, 32)
  st = dataclasses.replace(sample.SampleSettings.from_config(run.cfg), strength=1.0)
  images, records = sample.generate(
      run, ["a <c2> dog", "a <c2> <c2>_1 <c2>_2 dog", "a <c2> <c2>_1 dog"], [0, 0, 0], st)
  np.testing.assert_array_equal(images[0], images[1])
  assert records[0]["prompt"] == "a <c2> dog" and records[0]["concept"] == "<c2>"
  assert np.abs(images[0].astype(int) - images[2]).max() > 0  # a row left out is read as such


@pytest.mark.parametrize("selection", ["crossattn", "attn"])
def test_every_selection_exports_to_diffusers(world, tmp_path, selection):
  """to_q/to_out (train_q_out) and self-attention layers too, on a perturbed delta."""
  pipe = world["pipe"]
  selected, _ = params_lib.split(pipe.unet_params, params_lib.selection_predicate(selection))
  rng = np.random.default_rng(1)
  delta = {"unet": jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(
      x.shape).astype(np.float32), selected),
           "tokens": 0.02 * rng.standard_normal((1, 32)).astype(np.float32)}
  run = str(tmp_path / "run")
  cfg = _config(world["folder"], world["cfg"].compile_cache, **{"train.selection": selection})
  _fake_session(run, cfg, delta, [("<c1>", "cat")])
  out = str(tmp_path / "export")
  interop.export_session(run, out)
  registry = concepts.Registry.from_json(json.dumps(checkpoint.session_meta(run, 1)["concepts"]))
  want, base = _diffusers_eps(world["folder"], out, ["<c1>"], "a <c1> cat")
  assert _rel(_lfs_eps(world, selection, delta, registry, "a <c1> cat"), want) <= 1e-5
  assert _rel(base, want) > 1e-3


def _fake_session(run, cfg, delta, tokens):
  """A run directory with one finished session holding `delta` (no training)."""
  os.makedirs(run)
  checkpoint.write_json_atomic(os.path.join(run, "config.json"), cfg.to_dict())
  registry = concepts.Registry(tuple(
      concepts.Concept(name=t.strip("<>"), token=t, class_word=c, initializer=c, session=1,
                       images=()) for t, c in tokens))
  checkpoint.save_session(run, 1, delta=delta, bank={}, opt_state={"count": np.zeros(())},
                          meta={"session": 1, "concepts": json.loads(registry.to_json())})


def test_import_of_an_export_gives_the_same_parameters(world, tmp_path):
  out = str(tmp_path / "export")
  interop.export_session(world["run"], out, session=2)
  run = str(tmp_path / "imported")
  got = interop.import_delta(out, run, world["cfg"])
  assert got["tokens"] == ["<c1>", "<c2>"] and got["from_base"] == 0

  want = checkpoint.restore_session(world["run"], 2)["delta"]
  have = checkpoint.restore_session(run, 1)
  assert flatten(have["delta"]).keys() == flatten(want).keys()
  for k, v in flatten(want).items():
    np.testing.assert_array_equal(flatten(have["delta"])[k], v, err_msg=str(k))
    assert flatten(have["delta"])[k].dtype == v.dtype
  assert have["bank"] == {}
  registry = concepts.Registry.load(os.path.join(run, "concepts.json"))
  assert [(c.token, c.class_word, c.name, c.session) for c in registry.concepts] == [
      ("<c1>", "cat", "cat", 1), ("<c2>", "dog", "dog", 1)]
  with pytest.raises(interop.InteropError, match="not empty"):
    interop.import_delta(out, run, world["cfg"])


@pytest.mark.slow  # a whole loop (CI runs it)
def test_a_run_continues_from_an_imported_session(world, tmp_path):
  """Import session 1, train session 2: the same weights as the run that never left."""
  out = str(tmp_path / "export")
  interop.export_session(world["run"], out, session=1)
  run = str(tmp_path / "continued")
  interop.import_delta(out, run, world["cfg"])
  with open(os.path.join(run, "config.json")) as f:
    assert json.load(f)["data"]["sessions"] == ""
  cfg = _config(world["folder"], world["cfg"].compile_cache, **{"data.sessions": "dog"})
  results = session.run(cfg, run, resume=True)
  assert [r["session"] for r in results] == [2]
  assert checkpoint.finished_sessions(run) == [1, 2]
  have, want = checkpoint.restore_session(run, 2), checkpoint.restore_session(world["run"], 2)
  assert have["meta"]["concepts"][0]["token"] == "<c1>"
  for k, v in flatten(want["delta"]).items():
    np.testing.assert_array_equal(flatten(have["delta"])[k], v, err_msg=str(k))


def test_selections_diffusers_cannot_express_are_refused(world):
  modules = interop.attention_modules(world["pipe"].unet_params)
  assert len(modules) == 8  # attn1 + attn2 of the 4 transformer blocks
  module = modules[0]
  k_only = unflatten({module + ("to_k", "kernel"): np.zeros((32, 32), np.float32)})
  with pytest.raises(interop.InteropError, match="to_k and to_v"):
    interop.processor_tensors(k_only, modules)
  norm = unflatten({("down_blocks_0", "resnets_0", "norm1", "scale"): np.ones(32, np.float32)})
  with pytest.raises(interop.InteropError, match="cannot hold"):
    interop.processor_tensors(norm, modules)


def test_bad_imports_are_refused_by_name(world, tmp_path):
  cfg = world["cfg"]
  pipe = world["pipe"]
  selected, _ = params_lib.split(pipe.unet_params, params_lib.selection_predicate("crossattn"))
  src = str(tmp_path / "cd")
  os.makedirs(src)
  tensors = interop.processor_tensors(selected, interop.attention_modules(pipe.unet_params))
  safetensors_io.save_file(tensors, os.path.join(src, interop.WEIGHTS_NAME))
  # diffusers' training script writes safetensors under a .bin name: accepted.
  safetensors_io.save_file({"<new1>": np.zeros(32, np.float32)}, os.path.join(src, "<new1>.bin"))

  with pytest.raises(interop.InteropError, match="no concepts.json"):
    interop.import_delta(src, str(tmp_path / "a"), cfg)
  with open(os.path.join(src, "concepts.json"), "w") as f:
    json.dump([{"token": "<new1>", "class_word": "cat"}], f)
  with pytest.raises(interop.InteropError, match="does not select"):
    interop.import_delta(src, str(tmp_path / "b"), cfg)  # to_q/to_out into crossattn_kv
  attn = _config(world["folder"], cfg.compile_cache, **{"train.selection": "attn"})
  got = interop.import_delta(src, str(tmp_path / "c"), attn)
  assert got["from_base"] == 20 and got["tokens"] == ["<new1>"]  # attn1 from the base

  with open(os.path.join(src, "<new2>.bin"), "wb") as f:
    f.write(b"PK\x03\x04" + bytes(64))  # a torch.save zip
  with pytest.raises(files.PickleRefusedError, match="never unpickles"):
    interop.import_delta(src, str(tmp_path / "d"), attn)
  assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "d")


def test_command_line_export_and_flag_checks(world, tmp_path):
  out = str(tmp_path / "cli")
  cmd = [sys.executable, "-m", "lfs_jax.main", f"--workdir={world['run']}"]
  done = subprocess.run(cmd + ["--mode=export", f"--out={out}"], capture_output=True, text=True,
                        check=False)
  assert done.returncode == 0, done.stderr
  assert "session 2 exported" in done.stdout
  assert os.path.isfile(os.path.join(out, "<c2>.safetensors"))
  for args, message in ((["--mode=train", f"--out={out}"], "--out is for --mode=export"),
                        (["--mode=import", "--session=1", "--from=x"], "--session is for")):
    done = subprocess.run(cmd + args, capture_output=True, text=True, check=False)
    assert done.returncode != 0 and message in done.stderr + done.stdout, (args, done.stderr)
  with pytest.raises(interop.InteropError, match="not an empty folder"):
    interop.export_session(world["run"], out)
