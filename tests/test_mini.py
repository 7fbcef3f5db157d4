"""The mini world: renderer, shipped oracle and base, and a smoke run of the benchmark."""

import dataclasses
import glob
import json
import os

import numpy as np
import pytest

from lfs_jax.mini import world

ASSETS = os.path.join(os.path.dirname(world.__file__), os.pardir, "assets")


def test_renderer_is_deterministic_and_seed_dependent():
  a = world.render_all(world.scenes(3, 12, patterns=True))
  b = world.render_all(world.scenes(3, 12, patterns=True))
  c = world.render_all(world.scenes(4, 12, patterns=True))
  assert a.shape == (12, 32, 32, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert np.abs(a.astype(int) - c).mean() > 10
  photos = [world.render_all(world.concept_scenes(world.CONCEPTS[0], 4, 0)) for _ in range(2)]
  np.testing.assert_array_equal(*photos)


def test_render_draws_what_the_scene_says():
  s = world.Scene("square", "red", "blue", radius=0.35)
  img = world.render(s)
  assert tuple(img[16, 16]) == world.RGB["red"]      # centre: the shape
  assert tuple(img[1, 1]) == world.RGB["blue"]       # corner: the background
  striped = world.render(world.Scene("square", "red", "blue", "stripes", "white", radius=0.4))
  column = {tuple(p) for p in striped[8:24, 16]}
  assert world.RGB["red"] in column and world.RGB["white"] in column
  assert world.render(s, size=64).shape == (64, 64, 3)


def test_captions_and_held_out_split():
  s = world.Scene("circle", "red", "blue")
  assert world.caption(s) == "a red circle on a blue background"
  assert world.caption(s, colour=False, background=False) == "a circle"
  train, held = world.caption_triples("train"), world.caption_triples("heldout")
  assert not set(train) & set(held)
  assert 0.05 < len(held) / (len(train) + len(held)) < 0.2
  # every shape and colour is still seen in training, so held-out captions test composition
  assert {t[0] for t in train} == set(world.SHAPES) and {t[1] for t in train} == set(world.COLOURS)
  assert all(not world.is_held_out(x.shape, x.colour, x.background)
             for x in world.scenes(0, 200, split="train"))
  with pytest.raises(ValueError, match="unknown mini concept"):
    world.concept("nope")
  # A patterned scene's caption names its pattern and second colour (so a concept's
  # design is reachable from words); a solid scene's and the held-out captions never do.
  striped = world.Scene("star", "blue", "black", "stripes", "yellow")
  assert world.caption(striped) == "a blue star with yellow stripes on a black background"
  assert world.caption(striped, pattern=False) == "a blue star on a black background"
  # distinct wording: the second colour in a word no shape or background colour uses
  assert (world.caption(striped, pattern_words="distinct")
          == "a blue star with gold stripes on a black background")
  words = set(world.PATTERN_COLOUR_WORDS.values())
  assert len(words) == len(world.BACKGROUNDS) and not words & set(world.BACKGROUNDS)
  assert set(world.PATTERN_COLOUR_WORDS) == set(world.BACKGROUNDS)
  with pytest.raises(ValueError, match="pattern_words"):
    world.caption(striped, pattern_words="fancy")
  assert world.caption(world.Scene("star", "blue", "black", "ring", "gray"),
                       background=False) == "a blue star with a gray ring"
  from lfs_jax.mini import ceiling
  assert ceiling.named_design(world.concept("striped_star")) == "a blue star with yellow stripes"
  # DFKD class templates in the caption form: "a {}" first, distinct, seeded.
  t = world.class_templates(8, seed=0)
  assert t[0] == "a {}" and len(set(t)) == 8 and t == world.class_templates(8, seed=0)
  assert t != world.class_templates(8, seed=1)
  for x in t[1:]:
    colour, shape, background = x.split()[1], "{}", x.split()[-2]
    assert x == world.caption(world.Scene(shape, colour, background))


def test_caption_variants_name_each_attribute_half_the_time():
  from lfs_jax.mini import train_base

  striped = world.Scene("star", "blue", "black", "stripes", "yellow")
  named = train_base.caption_variants(striped, name_patterns=True)
  assert len(named) == 8 and len(set(named)) == 8
  for word in ("blue", "black", "stripes"):
    assert sum(word in c for c in named) == 4, word
  # Without --name_patterns (every stage shipped before it): the pattern is never named,
  # in the order the recorded commands drew from.
  assert train_base.caption_variants(striped) == [
      "a blue star on a black background", "a star on a black background", "a blue star",
      "a star"]
  solid = train_base.caption_variants(world.Scene("star", "blue", "black"), name_patterns=True)
  assert solid[:4] == solid[4:] == train_base.caption_variants(world.Scene("star", "blue", "black"))
  # The judged prompts are never training captions: no held-out triple, and a concept
  # prompt names a token no caption contains.
  caps = {c for s in world.scenes(0, 2000, patterns=True)
          for c in train_base.caption_variants(s, name_patterns=True)}
  held = {world.caption(world.Scene(*t)) for t in world.caption_triples("heldout")}
  assert caps and not caps & held and not any("<" in c for c in caps)


def test_drawn_pattern_shares_and_training_captions():
  # `ceiling --drawn`'s arithmetic: shares of the oracle's pattern predictions, and
  # training captions drawn as the base saw them (a pattern on ~30 %, never named).
  from lfs_jax.mini import ceiling, train_base

  got = ceiling.pattern_shares(np.array([0, 0, 1, 3, 3, 5, 0, 0]))
  assert got == {"patterned": 0.5, "stripes": 0.125, "checks": 0.0, "dots": 0.25,
                 "split": 0.0, "ring": 0.125}
  with pytest.raises(ValueError, match="no predictions"):
    ceiling.pattern_shares(np.zeros((0,), np.int32))
  scenes, caps = ceiling.training_captions(600, seed=5)
  assert (scenes, caps) == ceiling.training_captions(600, seed=5)
  assert len(caps) == 600 and len(set(caps)) > 50
  assert all(c in train_base.caption_variants(s) for s, c in zip(scenes, caps))
  assert not any(w in c for c in caps for w in ("with", "stripes", "dots", "checks"))
  share = np.mean([s.pattern != "solid" for s in scenes])
  assert abs(share - train_base.TRAIN_PATTERN_SHARE) < 0.06, share
  with pytest.raises(SystemExit, match="--guidance must be"):
    ceiling.main(["--drawn", "--guidance=4,x"])


def test_named_designs_on_each_background(monkeypatch):
  # `ceiling --named --backgrounds`: each design asked on each background, each cell
  # scored on its own samples, the mean over the backgrounds a photo can have (never
  # the design's own two colours). A stand-in sampler draws the asked design only on
  # green and a solid shape elsewhere, so the cells must read 1 on green and 0 off it.
  from lfs_jax.mini import bench, ceiling, oracle

  c = world.concept("striped_star")
  assert (ceiling.named_design(c, "distinct", "green")
          == "a blue star with gold stripes on a green background")
  assert ceiling.named_design(c) == "a blue star with yellow stripes"
  with pytest.raises(ValueError, match="background must be one of"):
    ceiling.named_design(c, background="teal")
  with pytest.raises(SystemExit, match="--backgrounds goes with --named"):
    ceiling.main(["--backgrounds"])

  asked = {ceiling.named_design(c, "distinct", b): b for b in world.BACKGROUNDS}

  def fake_generate(run_model, prompts, seeds, strength, cfg):
    del run_model, strength, cfg
    out = []
    for p, seed in zip(prompts, seeds):
      b = asked[p]
      scene = c.scene(np.random.default_rng(seed))
      scene = dataclasses.replace(scene, background=b, pattern=(
          c.pattern if b == "green" else "solid"))
      out.append(world.render(scene))
    return np.stack(out)

  monkeypatch.setattr(bench, "_generate", fake_generate)
  monkeypatch.setattr(bench, "base_run_model", lambda cfg: None)
  params = oracle.load()
  params = params[0] if isinstance(params, tuple) else params
  rows = ceiling.reachability_by_background(None, params, n=3, pattern_words="distinct",
                                            concepts=[c])
  assert set(rows) == {"striped_star"}
  row = rows["striped_star"]
  assert row["green"] == 1.0
  assert all(row[b] == 0.0 for b in world.BACKGROUNDS if b != "green"), row
  # blue and yellow (the design's colours) are no photo's background: 1 of 7 cells.
  assert row["mean"] == pytest.approx(1 / 7)

  # `--misses`: off green only the pattern head misses, and it reads the solid shape.
  with pytest.raises(SystemExit, match="--misses goes with --named --backgrounds"):
    ceiling.main(["--named", "--misses"])
  cells = ceiling.misses_by_background(None, params, n=3, pattern_words="distinct",
                                       concepts=[c])
  assert list(cells) == [f"striped_star on {b}" for b in world.BACKGROUNDS
                         if b not in ("blue", "yellow")]
  assert cells["striped_star on green"]["right"] == 1.0
  assert cells["striped_star on green"]["read as"] == ""
  red = cells["striped_star on red"]
  assert (red["right"], red["pattern"], red["shape"], red["colour"]) == (0.0, 0.0, 1.0, 1.0)
  assert red["read as"].startswith("pattern solid 3"), red
  table = ceiling.misses_table(cells)
  assert table.count("\n") == len(cells) + 1 and "| striped_star on red | 0.00 |" in table


def test_shipped_oracle_reads_fresh_renders():
  from lfs_jax.mini import oracle

  params = oracle.load()
  fresh = world.scenes(12345, 300, split="all", patterns=True)  # a seed never trained on
  images, y = world.render_all(fresh), oracle.labels(fresh)
  acc = oracle.accuracy(params, images, y)
  # Floors a little under what training measured on 1,000 fresh renders (shape 0.994,
  # colour 0.999, background 1.0, pattern 0.982, second colour 0.990; on these 300:
  # 0.977, 0.993, 1.0, 0.980, 0.990); pattern and second colour at issue 17's 0.95. The
  # pattern head is the weakest: it still takes a few checks for dots or rings.
  for head, floor in (("shape", 0.97), ("colour", 0.98), ("background", 0.98),
                      ("pattern", 0.95), ("colour2", 0.95)):
    assert acc[head] >= floor, (head, acc)
  # The confusion matrix the oracle's record keeps: rows are the true labels.
  conf = oracle.confusion(params, images, y, "pattern")
  assert conf.shape == (len(world.PATTERNS),) * 2
  np.testing.assert_array_equal(conf.sum(1),
                                np.bincount(y["pattern"], minlength=len(world.PATTERNS)))
  assert np.trace(conf) / len(fresh) == pytest.approx(acc["pattern"])


def test_shipped_assets_fit_and_load_through_the_standard_loader():
  from lfs_jax.weights import loaders

  total = sum(os.path.getsize(os.path.join(d, f)) for name in ("mini_base", "mini_oracle")
              for d, _, fs in os.walk(os.path.join(ASSETS, name)) for f in fs)
  assert total <= 20 * 2 ** 20, total
  pipe = loaders.load_pipeline(os.path.join(ASSETS, "mini_base"))
  assert pipe.vae.config.downsample_factor == 2
  assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
  with open(os.path.join(ASSETS, "mini_base", "TRAINING.json")) as f:
    record = json.load(f)
  assert record["command"].startswith("python -m lfs_jax.mini.train_base")


def test_train_base_torch_backend_writes_loadable_folders(tmp_path):
  """The CPU training loop (PyTorch) hands back weights the project's loaders read."""
  import jax

  from lfs_jax.mini import train_base
  from lfs_jax.weights import loaders

  out = tmp_path / "base"
  shipped = os.path.join(ASSETS, "mini_base")
  assert train_base.main([f"--out={out}", "--backend=torch", "--images=64", "--seed=1",
                          "--unet_steps=4", "--unet_batch=4", "--snapshot_every=2",
                          f"--vae_from={shipped}", f"--unet_from={shipped}"]) == 0
  record = json.loads((out / "TRAINING.json").read_text())
  assert record["backend"] == "torch" and np.isfinite(record["unet_loss"])
  assert record["vae_record"]["command"].startswith("python -m lfs_jax.mini.train_base")
  assert record["steps_done"] == 4
  assert record["unet_record"][0]["command"].startswith("python -m lfs_jax.mini.train_base")
  final = loaders.load_pipeline(str(out))
  snap = loaders.load_pipeline(str(tmp_path / "base_step2"))  # the EMA after 2 steps
  a, b = (np.asarray(p.unet_params["conv_in"]["kernel"]) for p in (final, snap))
  assert np.all(np.isfinite(a)) and not np.allclose(a, b)
  assert not os.path.exists(tmp_path / "base_step4")  # the last step is the folder itself
  # --unet_from: training went on from the shipped weights (4 small steps stay close).
  start = loaders.load_unet(shipped)[1]["conv_in"]["kernel"]
  assert np.abs(a - np.asarray(start)).max() < 0.05
  # ... and kept what that UNet learned to read, though --seed drew other renders: the
  # frozen text encoder and the latents' scaling factor.
  for got, want in zip(jax.tree.leaves(final.text_encoder_params),
                       jax.tree.leaves(loaders.load_text_encoder(shipped)[1])):
    np.testing.assert_array_equal(got, want)
  assert final.vae.config.scaling_factor == loaders.load_vae(shipped)[0].config.scaling_factor


def test_train_text_encoder_starts_from_the_frozen_table_and_keeps_token_rows():
  """--train_text_encoder: the torch encoder computes what the frozen table held, and
  training moves its layers, not the token embedding rows."""
  import jax

  from lfs_jax import tiny
  from lfs_jax import concepts as concepts_lib
  from lfs_jax.mini import train_base, train_torch
  from lfs_jax.models import clip
  from lfs_jax.weights import convert, loaders

  shipped = os.path.join(ASSETS, "mini_base")
  text_params = loaders.load_text_encoder(shipped, on_host=True)[1]
  tokenizer = loaders.load_tokenizer(tiny.TOKENIZER_DIR)
  captions = ["", "a blue star with yellow stripes", "a red square on a black background"]
  table = train_base.encode_captions(clip.CLIPTextModel(clip.CLIPTextConfig.from_transformers(
      train_base.TEXT)), text_params, tokenizer, captions)
  ids = concepts_lib.tokenize(tokenizer, captions, 77)
  import torch
  with torch.no_grad():
    got = train_torch._text_encoder(train_base.TEXT, text_params)(  # pylint: disable=protected-access
        input_ids=torch.from_numpy(np.asarray(ids))).last_hidden_state.numpy()
  np.testing.assert_allclose(got, table, atol=2e-5)

  rng = np.random.default_rng(0)
  _, _, trained = train_torch.train_unet(
      train_base.UNET, np.linspace(0.999, 0.01, 1000), "v_prediction",
      rng.standard_normal((3, 16, 16, 4)).astype(np.float32), np.arange(3)[:, None],
      None, 0, 2, 3, 0, 1e-3, 0.9, 0.0, lambda _: None, threads=1,
      text=(train_base.TEXT, text_params, ids))
  before, after = convert.flatten(text_params), convert.flatten(trained)
  assert before.keys() == after.keys()
  moved = {"/".join(k): np.abs(np.asarray(after[k]) - np.asarray(v)).max()
           for k, v in before.items()}
  rows = [k for k in moved if k.endswith("token_embedding/embedding")]
  assert rows and all(moved[k] == 0.0 for k in rows)
  assert max(v for k, v in moved.items() if "layers" in k) > 1e-4
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(trained))
  # The flag without a UNet to train with, or with the JAX loop: an error before any work.
  for bad in (["--backend=torch", "--unet_steps=0"], ["--backend=jax"]):
    with pytest.raises(SystemExit):
      train_base.main(["--out=unused", "--train_text_encoder"] + bad)


def test_train_base_same_command_same_weights(tmp_path):
  """Rerunning a recorded train_base command reproduces its UNet bit for bit."""
  from lfs_jax.mini import train_base

  shipped = os.path.join(ASSETS, "mini_base")
  args = ["--backend=torch", "--images=16", "--unet_steps=2", "--unet_batch=2",
          f"--vae_from={shipped}", f"--unet_from={shipped}"]
  unet_file = os.path.join("unet", "diffusion_pytorch_model.safetensors")
  for name in ("a", "b"):
    assert train_base.main([f"--out={tmp_path / name}", "--seed=5"] + args) == 0
  a, b = ((tmp_path / name / unet_file).read_bytes() for name in ("a", "b"))
  assert a == b
  # ... and the two steps did move the weights they started from.
  from safetensors.numpy import load_file
  start, trained = load_file(os.path.join(shipped, unet_file)), load_file(tmp_path / "a" / unet_file)
  assert start.keys() == trained.keys()
  assert any(not np.array_equal(start[k], trained[k]) for k in start)


def test_train_base_stopped_and_rerun_gives_the_uninterrupted_weights(tmp_path, capsys):
  """--stop_after writes the whole training state and no model; rerunning the command
  continues it to the weights (UNet and text encoder), loss and EMA of one run without
  a stop, and removes the state. Another command is refused before it trains."""
  from lfs_jax.mini import train_base

  shipped = os.path.join(ASSETS, "mini_base")
  args = ["--backend=torch", "--images=16", "--unet_steps=5", "--unet_batch=2", "--seed=5",
          "--train_text_encoder", f"--vae_from={shipped}", f"--unet_from={shipped}"]
  whole, split = tmp_path / "whole", tmp_path / "split"
  state = tmp_path / "split.resume"
  assert train_base.main([f"--out={whole}"] + args) == 0
  assert train_base.main([f"--out={split}", "--stop_after=2"] + args) == 0
  assert not split.exists() and (state / "state.json").exists()
  assert json.loads((state / "state.json").read_text())["step"] == 2
  # Another command (here another seed) must not continue this state.
  with pytest.raises(SystemExit):
    train_base.main([f"--out={split}"] + [a for a in args if a != "--seed=5"] + ["--seed=6"])
  err = capsys.readouterr().err
  assert "--seed=5 there, 6 here" in err and str(state) in err, err
  # A second stop, then the rest with a state written every step on the way.
  assert train_base.main([f"--out={split}", "--stop_after=3"] + args) == 0
  assert train_base.main([f"--out={split}", "--resume_every=1"] + args) == 0
  assert not state.exists()
  for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
    assert (whole / part).read_bytes() == (split / part).read_bytes(), part
  a, b = (json.loads((d / "TRAINING.json").read_text()) for d in (whole, split))
  assert a["unet_loss"] == b["unet_loss"]
  assert [h["resumed_at"] for h in b["resumed"]] == [2, 3] and "resumed" not in a


def test_train_base_refuses_resume_flags_it_cannot_honour(tmp_path, capsys):
  """--stop_after at or past the schedule's end, or either flag on the JAX loop, is an
  error naming the flag before anything is rendered or written."""
  from lfs_jax.mini import train_base

  shipped = os.path.join(ASSETS, "mini_base")
  for flags, words in ((["--backend=torch", "--stop_after=4"], "--stop_after=4 is not before"),
                       (["--backend=jax", "--resume_every=2"], "--backend=torch"),
                       (["--backend=torch", "--resume_every=-1"], "must be >= 0")):
    with pytest.raises(SystemExit):
      train_base.main([f"--out={tmp_path / 'bad'}", "--images=4", "--unet_steps=4",
                       f"--vae_from={shipped}", f"--unet_from={shipped}"] + flags)
    err = capsys.readouterr().err
    assert words in err, err
  assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.resume").exists()


def test_train_base_refuses_a_torch_device_it_cannot_use(tmp_path, capsys):
  """--torch_device: a device PyTorch lacks here, a misspelt one, or one given to the
  JAX loop is an error naming the flag before anything is rendered or written."""
  import torch

  from lfs_jax.mini import train_base

  shipped = os.path.join(ASSETS, "mini_base")
  missing = "cuda" if not torch.cuda.is_available() else "cuda:99"
  for device, backend, words in ((missing, "torch", "no such device"),
                                 ("gpu0", "torch", "not a PyTorch device"),
                                 ("meta", "torch", "holds no values"),
                                 ("cpu:0", "jax", "--backend=torch")):
    with pytest.raises(SystemExit):
      train_base.main([f"--out={tmp_path / 'bad'}", "--images=4", "--unet_steps=2",
                       f"--backend={backend}", f"--torch_device={device}",
                       f"--vae_from={shipped}", f"--unet_from={shipped}"])
    err = capsys.readouterr().err
    assert f"--torch_device={device}" in err and words in err, err
  assert not (tmp_path / "bad").exists()


def _has_cuda() -> bool:
  import torch
  return torch.cuda.is_available()


@pytest.mark.skipif(not _has_cuda(),
                    reason="needs an accelerator: a CUDA GPU (bench/gpu_bases.sh runs it)")
def test_train_torch_on_cuda_follows_the_cpu_run():
  """The UNet loop on a GPU draws what the CPU run draws: the same few steps from the
  same start end at nearly the same weights (only the arithmetic differs)."""
  from lfs_jax.mini import train_base, train_torch
  from lfs_jax.weights import convert, loaders

  shipped = os.path.join(ASSETS, "mini_base")
  init = loaders.load_unet(shipped, on_host=True)[1]
  text = loaders.load_text_encoder(shipped, on_host=True)[1]
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((6, 16, 16, 4)).astype(np.float32)
  ids = rng.integers(1, 300, (3, 77))
  runs = [train_torch.train_unet(
      train_base.UNET, np.linspace(0.999, 0.01, 1000), "v_prediction", latents,
      np.arange(6)[:, None] % 3, None, 0, 3, 4, 0, 1e-3, 0.9, 0.1, lambda _: None,
      init=init, threads=1, text=(train_base.TEXT, text, ids), device=device)
      for device in ("cpu", "cuda")]
  (cpu_unet, cpu_loss, cpu_text), (gpu_unet, gpu_loss, gpu_text) = runs
  assert abs(cpu_loss - gpu_loss) < 1e-2 * max(1.0, abs(cpu_loss))

  def update(trained, start):  # every weight's move from the start, as one vector
    fa, fs = convert.flatten(trained), convert.flatten(start)
    assert fa.keys() == fs.keys()
    return np.concatenate([(np.asarray(fa[k], np.float64) - np.asarray(fs[k])).ravel()
                           for k in sorted(fa)])

  # Adam moves every weight by about the rate whatever its gradient's size, so a weight
  # whose gradient is nearly zero may move either way on either device (TF32 on the
  # GPU): the whole update is compared. On the CPU, 1 against 2 threads differ by 0.002
  # of it; another seed's batches and noise by 113 % (UNet) and 124 % (encoder).
  for (c, g), start in (((cpu_unet, gpu_unet), init), ((cpu_text, gpu_text), text)):
    du_cpu, du_gpu = update(c, start), update(g, start)
    assert np.linalg.norm(du_cpu) > 0
    assert np.linalg.norm(du_gpu - du_cpu) < 0.2 * np.linalg.norm(du_cpu)


def test_train_base_decoder_stage_keeps_encoder_and_unet(tmp_path):
  """--decoder_steps: only the decoder moves, so the shipped UNet's latent space stays."""
  import jax

  from lfs_jax.mini import train_base
  from lfs_jax.weights import loaders

  shipped = os.path.join(ASSETS, "mini_base")
  out = tmp_path / "dec"
  assert train_base.main([f"--out={out}", "--images=16", "--seed=4", "--decoder_steps=2",
                          "--decoder_batch=4", "--unet_steps=0", f"--vae_from={shipped}",
                          f"--unet_from={shipped}", "--torch_threads=1"]) == 0
  (before_m, before), (after_m, after) = loaders.load_vae(shipped), loaders.load_vae(str(out))
  assert after_m.config.scaling_factor == before_m.config.scaling_factor
  for part in ("encoder", "quant_conv"):
    for a, b in zip(jax.tree.leaves(after[part]), jax.tree.leaves(before[part])):
      np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after["decoder"]),
                                                      jax.tree.leaves(before["decoder"])))
  unet_file = os.path.join("unet", "diffusion_pytorch_model.safetensors")
  assert (out / unet_file).read_bytes() == open(os.path.join(shipped, unet_file), "rb").read()
  record = json.loads((out / "TRAINING.json").read_text())
  assert "--decoder_steps=2" in record["vae_record"]["command"]
  assert record["vae_record"]["encoder_from"]["command"].startswith(
      "python -m lfs_jax.mini.train_base")
  assert record["unet_record"][0]["command"].startswith("python -m lfs_jax.mini.train_base")
  for bad in (["--decoder_steps=2", f"--unet_from={shipped}", "--unet_steps=0"],  # no VAE
              [f"--vae_from={shipped}", "--unet_steps=0"]):  # no UNet to keep
    with pytest.raises(SystemExit):
      train_base.main([f"--out={tmp_path / 'bad'}"] + bad)
  assert not (tmp_path / "bad").exists()


def test_train_base_wide_unet_trains_from_scratch_and_refuses_a_graft(tmp_path, capsys):
  """--unet_arch=wide: the base's blocks twice as wide, trained from scratch (two torch
  steps here); the folder reads back at that width, and a narrow base is no graft."""
  from lfs_jax.mini import train_base
  from lfs_jax.weights import loaders

  shipped = os.path.join(ASSETS, "mini_base")
  out = tmp_path / "wide"
  assert train_base.main([f"--out={out}", "--images=8", "--seed=3", "--unet_steps=2",
                          "--unet_batch=4", "--backend=torch", "--torch_threads=1",
                          "--unet_arch=wide", f"--vae_from={shipped}"]) == 0
  module, params = loaders.load_unet(str(out))
  assert module.config.block_out_channels == (64, 128)
  assert params["conv_in"]["kernel"].shape == (3, 3, 4, 64)
  narrow = loaders.load_unet(shipped)[1]
  assert train_base.unet.num_params(params) > 3 * train_base.unet.num_params(narrow)
  with pytest.raises(SystemExit):
    train_base.main([f"--out={tmp_path / 'bad'}", "--images=4", "--unet_steps=0",
                     "--unet_arch=wide", f"--unet_from={shipped}", f"--vae_from={shipped}"])
  assert "--unet_arch=wide" in capsys.readouterr().err
  assert not (tmp_path / "bad").exists()


def test_train_base_text_width_sets_the_encoder_and_the_unets_cross_attention(tmp_path,
                                                                              capsys):
  """--text_width=48: a new encoder 48 wide (MLP 96, 3 heads), the UNet's cross-attention
  reading it; the folder loads and its encoder's output feeds its UNet. A UNet continued
  with --unet_from keeps its folder's width, and a width that is not one refused."""
  from lfs_jax.mini import train_base
  from lfs_jax.weights import loaders

  shipped = os.path.join(ASSETS, "mini_base")
  out = tmp_path / "t48"
  assert train_base.main([f"--out={out}", "--images=8", "--seed=3", "--unet_steps=2",
                          "--unet_batch=4", "--backend=torch", "--torch_threads=1",
                          "--train_text_encoder", "--text_width=48",
                          f"--vae_from={shipped}"]) == 0
  text, text_params = loaders.load_text_encoder(str(out))
  unet_module, unet_params = loaders.load_unet(str(out))
  assert (text.config.hidden_size, text.config.intermediate_size,
          text.config.num_attention_heads) == (48, 96, 3)
  assert unet_module.config.cross_attention_dim == 48
  ids = np.zeros((2, 77), np.int32)
  context = text.apply({"params": text_params}, ids)
  assert context.shape == (2, 77, 48)
  x = np.zeros((2, 16, 16, 4), np.float32)
  eps = unet_module.apply({"params": unet_params}, x, np.array([10, 500]), context)
  assert eps.shape == x.shape and np.isfinite(np.asarray(eps)).all()
  # Continued: the folder's 48-wide encoder is kept (and written back).
  more = tmp_path / "t48b"
  assert train_base.main([f"--out={more}", "--images=8", "--seed=4", "--unet_steps=1",
                          "--unet_batch=4", "--backend=torch", "--torch_threads=1",
                          f"--unet_from={out}", f"--vae_from={shipped}"]) == 0
  assert loaders.load_text_encoder(str(more))[0].config.hidden_size == 48
  for bad, says in [(["--text_width=40"], "multiple of 16"),
                    ([f"--unet_from={shipped}", "--text_width=48"], "32-wide")]:
    with pytest.raises(SystemExit):
      train_base.main([f"--out={tmp_path / 'bad'}", "--images=4", "--unet_steps=1",
                       "--backend=torch", f"--vae_from={shipped}"] + bad)
    assert says in capsys.readouterr().err
  assert not (tmp_path / "bad").exists()


def test_train_base_grafts_attention_at_16x16_without_changing_the_unet(tmp_path, capsys):
  """--unet_arch=cross16: the shipped UNet plus attention at 16x16, the same function."""
  import diffusers
  import torch

  from lfs_jax.mini import train_base
  from lfs_jax.weights import convert, loaders

  shipped = os.path.join(ASSETS, "mini_base")
  out = tmp_path / "cross16"
  assert train_base.main([f"--out={out}", "--images=4", "--seed=3", "--unet_steps=0",
                          "--unet_arch=cross16", f"--unet_from={shipped}",
                          f"--vae_from={shipped}"]) == 0
  # The folder reads back with the project's loader (every key and shape validated
  # against the Flax UNet of the new architecture) and with diffusers.
  module, params = loaders.load_unet(str(out))
  assert module.config.down_block_types == tuple(train_base.UNET_CROSS16["down_block_types"])
  attn = params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]
  assert np.abs(np.asarray(attn["attn2"]["to_k"]["kernel"])).max() > 0  # a seeded init
  assert not np.any(np.asarray(params["down_blocks_0"]["attentions_0"]["proj_out"]["kernel"]))
  assert json.loads((out / "TRAINING.json").read_text())["graft"]["arch"] == "cross16"
  old = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(shipped, "unet"))
  new = diffusers.UNet2DConditionModel.from_pretrained(str(out / "unet"))
  assert sum(p.numel() for p in new.parameters()) > sum(p.numel() for p in old.parameters())
  g = torch.Generator().manual_seed(0)
  x = torch.randn((2, 4, 16, 16), generator=g)
  ctx = torch.randn((2, 77, 32), generator=g)
  with torch.no_grad():
    want, got = (m(x, torch.tensor([999, 300]), ctx).sample for m in (old, new))
  np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-6)
  # Removing blocks is no graft: the error names the weight that has no place, and
  # nothing is written.
  with pytest.raises(SystemExit):
    train_base.main([f"--out={tmp_path / 'bad'}", "--images=4", "--unet_steps=0",
                     "--unet_arch=base", f"--unet_from={out}", f"--vae_from={shipped}"])
  assert "down_blocks_0/attentions_0" in capsys.readouterr().err
  assert not (tmp_path / "bad").exists()
  # --graft_lr_scale: the added blocks train at that multiple of the rate. One AdamW
  # step moves a weight with a gradient by the rate (|m / sqrt(v)| = 1), so the new
  # proj_out (the only new weight with a gradient at a zero output) moves 10x as far.
  from lfs_jax.mini import train_torch

  source = loaders.load_unet(shipped, on_host=True)[1]
  added = train_base.new_paths(params, source)
  assert added and all("attentions_" in p for p in added)
  rng = np.random.default_rng(0)
  trained, _, _ = train_torch.train_unet(
      train_base.UNET_CROSS16, np.linspace(0.999, 0.01, 1000), "v_prediction",
      rng.standard_normal((4, 16, 16, 4)).astype(np.float32), np.zeros((4, 1), int),
      rng.standard_normal((1, 77, 32)).astype(np.float32), 0, 1, 2, 0, 1e-4, 0.999, 0.0,
      lambda _: None, init=params, threads=1, fast=added, fast_scale=10.0)
  moved = {"/".join(k): np.abs(np.asarray(v) - np.asarray(convert.flatten(params)[k])).max()
           for k, v in convert.flatten(trained).items()}
  new_out = max(moved[p] for p in added if "proj_out" in p)
  old = max(v for p, v in moved.items() if p not in added)
  assert 9.0 < new_out / old < 11.0


def test_train_base_eight_latent_channels_from_a_torch_vae(tmp_path, capsys, mini_config):
  """--vae_latent_channels=8 --vae_backend=torch: a VAE trained in PyTorch comes back
  as the same function in Flax, the UNet reads 8 channels, and the sampler draws from it."""
  import dataclasses

  import diffusers
  import torch

  from lfs_jax import sample
  from lfs_jax.mini import bench, train_base
  from lfs_jax.weights import loaders

  out = tmp_path / "l8"
  assert train_base.main([f"--out={out}", "--images=32", "--seed=2", "--backend=torch",
                          "--vae_backend=torch", "--vae_latent_channels=8", "--vae_steps=3",
                          "--vae_batch=4", "--unet_steps=2", "--unet_batch=2",
                          "--torch_threads=1"]) == 0
  vae_module, vae_params = loaders.load_vae(str(out))
  unet_module, unet_params = loaders.load_unet(str(out))
  assert vae_module.config.latent_channels == 8
  assert unet_module.config.in_channels == unet_module.config.out_channels == 8
  assert np.asarray(unet_params["conv_in"]["kernel"]).shape[2] == 8
  record = json.loads((out / "TRAINING.json").read_text())
  assert record["args"]["vae_backend"] == "torch" and np.isfinite(record["vae_mse"])
  # The trained torch weights, written and read back, are diffusers' function in Flax.
  x = world.render_all(world.concept_scenes(world.CONCEPTS[0], 2, 0))
  x = (x.astype(np.float32) / 127.5 - 1.0)
  ref = diffusers.AutoencoderKL.from_pretrained(str(out / "vae"))
  with torch.no_grad():
    want = ref.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist.mean.numpy()
  got, _ = vae_module.apply({"params": vae_params}, x, method="encode")
  np.testing.assert_allclose(np.asarray(got), want.transpose(0, 2, 3, 1), atol=2e-4)
  # The project's sampler draws 32 px images from the 8-channel model.
  cfg = mini_config("smoke", **{"model.path": str(out)})
  settings = dataclasses.replace(sample.SampleSettings.from_config(cfg), steps=2)
  images, _ = sample.generate(bench.base_run_model(cfg), ["a star"], [0], settings)
  assert images.shape == (1, 32, 32, 3)
  # --vae_only (tuning): the reconstructions and the ceiling they set, nothing else.
  tune = tmp_path / "tune"
  assert train_base.main([f"--out={tune}", "--images=16", "--seed=2", "--vae_only",
                          "--vae_backend=torch", "--vae_latent_channels=8", "--vae_steps=2",
                          "--vae_batch=4", "--torch_threads=1"]) == 0
  ceiling = json.loads((tune / "ceiling.json").read_text())
  assert set(ceiling["rows"]) == {c.name for c in world.CONCEPTS}
  assert "--vae_latent_channels=8" in ceiling["command"]
  assert sorted(os.listdir(tune)) == ["ceiling.json", "reconstructions.png"]
  assert "| **mean** |" in capsys.readouterr().out
  # Channels that do not match, and a VAE both trained and reused, stop before any work.
  shipped = os.path.join(ASSETS, "mini_base")
  for bad, says in (
      ([f"--vae_from={shipped}", "--vae_latent_channels=8"], "4 latent channels"),
      (["--vae_latent_channels=8", f"--unet_from={shipped}"], "4-channel latents"),
      ([f"--vae_from={shipped}", "--vae_backend=torch"], "--vae_backend"),
      (["--vae_latent_channels=0"], "--vae_latent_channels")):
    with pytest.raises(SystemExit):
      train_base.main([f"--out={tmp_path / 'bad'}", "--images=4"] + bad)
    assert says in capsys.readouterr().err, bad
  assert not (tmp_path / "bad").exists()


def test_training_timesteps_favour_high_noise():
  from lfs_jax.mini import train_base

  u = np.random.default_rng(0).random((2, 20000))
  t = train_base.draw_timesteps(u[0], u[1], 0.5)
  assert t.min() >= 0 and t.max() <= 999
  # half the batch in [HIGH_T, 1000), the other half uniform over [0, 1000)
  want = 0.5 + 0.5 * (1000 - train_base.HIGH_T) / 1000
  assert abs((t >= train_base.HIGH_T).mean() - want) < 0.02
  assert abs((train_base.draw_timesteps(u[0], u[1], 0.0) >= 500).mean() - 0.5) < 0.02


@pytest.mark.slow  # a whole loop (CI runs it)
def test_base_follows_held_out_captions(mini_config):
  from lfs_jax.mini import bench, oracle

  # 8 seeds of each of the 32 held-out captions: with fewer, one caption's luck moves
  # the share by several points (seed 0 alone gives 94% on the same base).
  got = bench.heldout_accuracy(mini_config("short"), oracle.load(), per_caption=8)
  assert got["shape_and_colour"] >= 0.9, got


@pytest.mark.slow  # a whole loop (CI runs it)
def test_benchmark_smoke_run(tmp_path, mini_config):
  from lfs_jax.mini import bench

  # dfkd is lfs's run sampled without ICGen: the two are drawn in one sampler call.
  cfg = mini_config("smoke", **{"mini.variants": "custom_diffusion+prior,dfkd,lfs,separate"})
  work = str(tmp_path / "mini")
  got = bench.run(cfg, work)
  assert set(got["variants"]) == {"custom_diffusion+prior", "dfkd", "lfs", "separate"}
  # Their samples are those that one sample.generate call per variant draws (an
  # image depends only on its prompt, seed and start), and they share the class prompts.
  from lfs_jax import runs

  model = runs.load_run(os.path.join(work, "runs", "lfs"), 2)
  n, prompt = cfg.mini.eval_images, "a <c1> star"
  stored = {v: np.load(os.path.join(work, "eval", f"{v}_session2.npz")) for v in ("dfkd", "lfs")}
  for v, strength in (("dfkd", 1.0), ("lfs", cfg.icgen.strength)):
    with open(os.path.join(work, "eval", f"{v}_session2.json")) as f:
      assert json.load(f)["concepts"]["striped_star"]["prompt"] == prompt
    alone = bench._generate(model, [prompt] * n, list(range(n)), strength, cfg)  # pylint: disable=protected-access
    np.testing.assert_array_equal(stored[v]["striped_star"], alone[:4])
  np.testing.assert_array_equal(stored["dfkd"]["class"], stored["lfs"]["class"])
  assert not np.array_equal(stored["dfkd"]["striped_star"], stored["lfs"]["striped_star"])
  # prior preservation: the base drew cfg.prior.count class images of "a star" once
  star = os.path.join(work, "runs", "cd_prior", "prior", "star")
  assert sorted(os.listdir(star)) == [f"{i}.png" for i in range(cfg.prior.count)] + ["class.json"]
  bounds = got["ia_bounds"]
  for v in got["variants"].values():
    assert set(v["ia_matrix"]) == {"striped_star", "dotted_star"}
    assert set(v["ia_matrix"]["striped_star"]) == {1, 2}   # learned in 1, seen after 1 and 2
    assert set(v["ia_matrix"]["dotted_star"]) == {2}
    # IAD: the drop of the one concept learned before the last session, 1 -> 2.
    ia = v["ia_matrix"]["striped_star"]
    assert v["iad"] == {"striped_star": pytest.approx(ia[1] - ia[2], abs=1e-12)}
    assert v["iad_mean"] == pytest.approx(ia[1] - ia[2], abs=1e-12)
    assert all(-1.0 <= x <= 1.0 for m in v["ia_matrix"].values() for x in m.values())
    assert set(v["ia_photos_matrix"]["striped_star"]) == {1, 2}  # both references reported
    for n, row in v["nia_matrix"].items():
      b = bounds[n]
      for k, nia in row.items():
        ia = v["ia_matrix"][n][k]
        np.testing.assert_allclose(nia * (b["ceiling"] - b["floor"]) + b["floor"], ia, rtol=1e-6)
    # A concept is right only with all four heads right: never above any head's share.
    from lfs_jax.mini import report
    assert set(v["heads_own"]) == set(report.CONCEPT_HEADS)
    assert v["concept_accuracy_own"] <= min(v["heads_own"].values()) + 1e-9
    # Class accuracy needs shape and colour right: never above either share alone.
    for k, acc in v["class_accuracy"].items():
      assert acc <= min(v["class_shape"][k], v["class_colour"][k]) + 1e-9
  # separate: every concept keeps its own delta, so nothing is forgotten by construction
  assert got["variants"]["separate"]["iad"] == {"striped_star": 0.0}
  assert os.path.isdir(os.path.join(work, "runs", "separate_dotted_star"))
  for name in ("results.json", "report.md", "plots.png", "samples_session1.png",
               "samples_session2.png"):
    assert os.path.getsize(os.path.join(work, name)) > 0
  assert "custom_diffusion+prior" in got["table"] and "base model" in got["table"]
  assert "lfs keeps:" in got["table"]  # the goal line, judged per variant
  with open(os.path.join(work, "report.md")) as f:
    assert "| lfs | " in f.read().split("each oracle head reads right")[1]  # per-head table
  # A rerun reuses the finished runs and the stored evaluations: same numbers, and
  # neither a train step nor an evaluation runs again.
  from lfs_jax.train import step as step_lib

  def refuse(*a, **k):
    raise AssertionError("the rerun recomputed instead of reusing")

  with pytest.MonkeyPatch.context() as m:
    m.setattr(step_lib, "compile_step", refuse)
    m.setattr(bench, "run_jobs", refuse)
    again = bench.run(cfg, work)
    assert again["variants"] == got["variants"]
    # An evaluation stored before a sample.* field existed (here guidance_rescale) was
    # drawn at its default: still reused; the field at another value is not.
    for name in glob.glob(os.path.join(work, "eval", "*.json")):
      with open(name) as f:
        ev = json.load(f)
      del ev["stamp"]["sample"]["guidance_rescale"]
      with open(name, "w") as f:
        json.dump(ev, f)
    assert bench.run(cfg, work)["variants"] == got["variants"]
    with pytest.raises(AssertionError, match="recomputed"):
      bench.run(mini_config("smoke", **{"mini.variants": cfg.mini.variants,
                                        "sample.guidance_rescale": 0.5}), work)
  # Stored evaluations are keyed by how their model was trained, not only by sampling.
  with open(os.path.join(work, "eval", "lfs_session1.json")) as f:
    trained_by = json.load(f)["stamp"]["trained_by"]
  assert trained_by["method"] == "lfs" and trained_by["kd"]["weight"] == cfg.kd.weight
  assert trained_by["kd"]["kv_weight"] == 0.0 and trained_by["prior"]["weight"] == 0.0  # the paper's


def test_bad_variant_names_fail_before_training(tmp_path, mini_config):
  from lfs_jax.mini import bench

  for variants, needle in (("lfs,nonsense", "nonsense"), ("", "empty")):
    with pytest.raises(ValueError, match="mini.variants") as e:
      bench.run(mini_config("smoke", **{"mini.variants": variants}), str(tmp_path / "a"))
    assert needle in str(e.value)
  with pytest.raises(ValueError, match="kd.kv_weight"):  # the anchor alone, with no anchor
    bench.run(mini_config("smoke", **{"mini.variants": "anchor", "kd.kv_weight": 0.0}),
              str(tmp_path / "a"))
  assert not (tmp_path / "a").exists()


def test_normalised_ia_maps_floor_to_zero_and_ceiling_to_one():
  from lfs_jax.mini import bench

  b = {"floor": 0.6, "ceiling": 0.95}
  assert bench.normalised_ia(0.6, b) == 0.0 and abs(bench.normalised_ia(0.95, b) - 1) < 1e-12
  assert abs(bench.normalised_ia(0.7, b) - 0.1 / 0.35) < 1e-12
