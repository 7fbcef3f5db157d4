"""Lifelong sessions on the tiny config: the loop, DFKD, checkpoints, resume, sharding."""

import functools
import hashlib
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from lfs_jax import checkpoint, concepts
from lfs_jax import delta as delta_lib
from lfs_jax.train import kd, losses, session
from lfs_jax.train import step as step_lib
from lfs_jax.weights.convert import flatten, unflatten


def _copy(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


def _assert_trees_equal(a, b):
  fa, fb = flatten(a), flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


@pytest.mark.slow  # a whole loop (CI runs it)
def test_two_session_run_end_to_end(tmp_path, tiny_config, monkeypatch, capsys):
  traces = []
  real_step = step_lib.train_step
  monkeypatch.setattr(step_lib, "train_step", lambda *a, **k: (traces.append(1),
                                                               real_step(*a, **k))[1])
  run = str(tmp_path / "run")
  results = session.run(tiny_config(), run)
  assert [r["session"] for r in results] == [1, 2]
  # Compiled ahead of the first step, once for the whole run (sessions are padded):
  # traced once, or read back from the program store (an earlier test's run).
  out = capsys.readouterr().out
  assert out.count("train step compiled in") == 1
  assert len(traces) + out.count("program read back") == 1
  # The start's phases, once, in order, up to the first step.
  assert out.count("start to the first step: ") == 1
  line = next(l for l in out.splitlines() if l.startswith("start to the first step: "))
  assert [p.split(" ")[0] for p in line.split(" = ")[1].split(" + ")] == [
      "base", "inputs", "tracing", "compile", "first"], line
  assert all(np.isfinite(r["loss"]) and r["kd"] >= 0 for r in results)
  assert checkpoint.finished_sessions(run) == [1, 2]
  assert not os.path.exists(os.path.join(run, "progress"))
  s1, s2 = checkpoint.restore_session(run, 1), checkpoint.restore_session(run, 2)

  # Only the selection (attn2 to_k / to_v) is saved, never the frozen base.
  paths = ["/".join(p) for p in flatten(s2["delta"]["unet"])]
  assert paths and all("/attn2/to_k/" in p or "/attn2/to_v/" in p for p in paths)
  # Session 2 keeps <c1>'s row bit for bit and adds its own.
  assert s1["delta"]["tokens"].shape == (1, 32) and s2["delta"]["tokens"].shape == (2, 32)
  np.testing.assert_array_equal(s2["delta"]["tokens"][0], s1["delta"]["tokens"][0])
  changed = [not np.array_equal(a, b) for a, b in zip(
      flatten(s1["delta"]["unet"]).values(), flatten(s2["delta"]["unet"]).values())]
  assert all(changed)
  # The context bank holds session 2's concept only: 3 photos of 16x16x4 latents.
  assert set(s2["bank"]) == {"concept2"}
  assert s2["bank"]["concept2"]["mean"].shape == (3, 16, 16, 4)
  assert s2["meta"]["session"] == 2 and len(s2["meta"]["concepts"]) == 2

  reg = concepts.Registry.load(os.path.join(run, "concepts.json"))
  assert reg.tokens == ["<c1>", "<c2>"] and [c.class_word for c in reg.concepts] == ["dog"] * 2
  img = reg.concepts[1].images[0]
  assert img.sha256 == hashlib.sha256(open(img.path, "rb").read()).hexdigest()

  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(os.path.join(run, "logs"))
  acc.Reload()
  tags = acc.Tags()["scalars"]
  assert {"session_1/loss", "session_2/kd"} <= set(tags)
  assert [e.step for e in acc.Scalars("session_2/loss")] == [1, 2, 3, 4]


@pytest.mark.parametrize("mode,cache", [("trajectory", 0), ("noise", 4)])
def test_kd_is_zero_at_first_step_then_positive(tmp_path, tiny_config, mode, cache):
  ctx = session.prepare(tiny_config(kd__mode=mode, kd__cache_size=cache), str(tmp_path))
  base_unet, base_text = _copy(ctx.pipe.unet_params), _copy(ctx.pipe.text_encoder_params)
  su = session.setup_session(ctx, 1, session.base_delta(ctx))
  assert su.spec.kd_cached == bool(cache)
  assert isinstance(su.step_fn, jax.stages.Compiled)
  loss = jax.jit(lambda *a: losses.loss_fn(*a, models=su.models, spec=su.spec))
  key = jax.random.key(7)
  args = (su.frozen, su.teacher, su.data, ctx.schedule, key)
  _, aux = loss(su.state.trainable, *args)
  # The student is the teacher: zero up to rounding. Bit for bit only where XLA rounds
  # the teacher's and the student's UNet calls (two batch sizes; with the cache, two
  # programs) alike: its default CPU fusion emitters do, the older emitter the suite
  # compiles with (tests/conftest.py) puts them 1e-13 apart. Three steps on: 1e-7-1e-6.
  kd_first = float(aux["kd"])
  assert 0.0 <= kd_first < 1e-11, kd_first
  old_tokens = np.array(su.frozen["tokens"])
  state = su.state
  for _ in range(3):
    state, _ = su.step_fn(state, su.frozen, su.teacher, su.data, ctx.schedule, su.train_key)
  _, aux = loss(state.trainable, *args)
  assert float(aux["kd"]) > 1e-9
  # Frozen weights and the frozen token table are untouched by the steps.
  _assert_trees_equal(ctx.pipe.unet_params, base_unet)
  _assert_trees_equal(ctx.pipe.text_encoder_params, base_text)
  np.testing.assert_array_equal(np.asarray(su.frozen["tokens"]), old_tokens)


def test_loss_falls_when_overfitting_one_concept(tmp_path, tiny_config):
  cfg = tiny_config(method="custom_diffusion", data__sessions="dog", data__flip=False,
                    data__rescale=False, train__learning_rate=2e-3, train__scale_lr=False,
                    train__selection="attn")
  ctx = session.prepare(cfg, str(tmp_path))
  su = session.setup_session(ctx, 1, session.base_delta(ctx))
  loss = jax.jit(lambda tr, k: losses.loss_fn(tr, su.frozen, None, su.data, ctx.schedule, k,
                                              models=su.models, spec=su.spec)[0])
  keys = [jax.random.key(i) for i in range(16)]
  before = np.mean([float(loss(su.state.trainable, k)) for k in keys])
  state = su.state
  for _ in range(40):
    state, _ = su.step_fn(state, su.frozen, None, su.data, ctx.schedule, su.train_key)
  after = np.mean([float(loss(state.trainable, k)) for k in keys])
  assert after < 0.9 * before, (before, after)


def test_unet_selection_is_the_whole_unet_and_refuses_export():
  # train.selection=unet (the mini world's plasticity upper bound, docs/mini_world_history.md,
  # "Item 1 in the fine world"):
  # the delta is every UNet leaf, nothing of the UNet stays frozen, the merge is the base,
  # and diffusers' Custom Diffusion format refuses it by name. (A session trained with it
  # is the docs' measurement; a step compile here would cost over a minute on 2 cores.)
  from lfs_jax import config_base, interop  # pylint: disable=g-import-not-at-top

  block = ("down_blocks_1", "attentions_0", "transformer_blocks_0")
  unet = unflatten({p: np.full(s, i, np.float32) for i, (p, s) in enumerate([
      (("conv_in", "kernel"), (3, 3, 4, 8)), (("conv_in", "bias"), (8,)),
      (("down_blocks_0", "resnets_0", "conv1", "kernel"), (3, 3, 8, 8)),
      (block + ("attn1", "to_q", "kernel"), (8, 8)),
      (block + ("attn2", "to_k", "kernel"), (4, 8)), (block + ("attn2", "to_v", "kernel"), (4, 8))])})
  cfg = config_base.get_config()
  cfg.train.selection = "unet"
  sel = delta_lib.from_config(cfg.train)
  assert sel == delta_lib.Leaves("unet")
  start = sel.initial(unet)
  assert flatten(start).keys() == flatten(unet).keys()
  assert not flatten(sel.frozen(unet))
  _assert_trees_equal(sel.merge(start, sel.frozen(unet)), unet)
  sel.check(start, unet)
  with pytest.raises(delta_lib.DeltaError, match="lacks UNet weight conv_in"):
    sel.check({k: v for k, v in start.items() if k != "conv_in"}, unet)
  assert len(sel.kernels(start)) == 5 and len(delta_lib.Leaves("attn").kernels(
      delta_lib.Leaves("attn").initial(unet))) == 3
  with pytest.raises(interop.InteropError, match="conv_in/bias is not an attention layer"):
    interop.processor_tensors(start, interop.attention_modules(unet))


def _interrupt_at(monkeypatch, call: int, action):
  """Makes the run's compiled step do `action` instead of its `call`-th step."""
  real = step_lib.compile_step

  def patched(*args, **kwargs):
    fn, *rest = real(*args, **kwargs)
    count = {"n": 0}

    def step(*a):
      count["n"] += 1
      if count["n"] == call:
        action()
      return fn(*a)
    return (step, *rest)

  monkeypatch.setattr(step_lib, "compile_step", patched)


def _kill():
  raise KeyboardInterrupt("killed")


def _killed_during_step(cfg, workdir, monkeypatch, step):
  """`workdir` after session.run was killed (KeyboardInterrupt) during `step`."""
  with monkeypatch.context() as m:
    _interrupt_at(m, step, _kill)
    with pytest.raises(KeyboardInterrupt):
      session.run(cfg, workdir)
  return workdir


@pytest.mark.slow  # a whole loop (CI runs it)
def test_resume_after_kill_and_sigterm_matches_uninterrupted(tmp_path, tiny_config,
                                                             monkeypatch, capsys):
  cfg = tiny_config(data__sessions="dog", train__steps=6, train__progress_every=2)
  full = str(tmp_path / "full")
  session.run(cfg, full)
  want = checkpoint.restore_session(full, 1)["delta"]

  # Killed during step 5: progress from step 4 survives; resume finishes the session.
  killed = _killed_during_step(cfg, str(tmp_path / "killed"), monkeypatch, 5)
  assert checkpoint.finished_sessions(killed) == []
  assert checkpoint.progress_meta(killed) == {"session": 1}
  capsys.readouterr()
  session.run(cfg, killed, resume=True)
  _assert_trees_equal(checkpoint.restore_session(killed, 1)["delta"], want)
  # The restart read the step's program back (stored by the first run) and says how
  # long each phase took up to its first step.
  line = [l for l in capsys.readouterr().out.splitlines()
          if l.startswith("restart to the first step: ")]
  assert len(line) == 1 and "tracing " in line[0] and "(read back)" in line[0], line
  assert [p.split(" ")[0] for p in line[0].split(" = ")[1].split(" + ")] == [
      "base", "inputs", "tracing", "compile", "resume", "first"], line

  # SIGTERM (preemption) during step 3: saves step 3 and stops cleanly.
  term = str(tmp_path / "term")
  with monkeypatch.context() as m:
    _interrupt_at(m, 3, lambda: signal.raise_signal(signal.SIGTERM))
    with pytest.raises(session.Preempted):
      session.run(cfg, term)
  assert sorted(os.listdir(os.path.join(term, "progress"))) == ["3"]
  session.run(cfg, term, resume=True)
  _assert_trees_equal(checkpoint.restore_session(term, 1)["delta"], want)


@pytest.mark.slow  # whole loops (CI runs it)
def test_cosine_schedule_resumes_on_its_curve(tmp_path, tiny_config, monkeypatch):
  """train.lr_schedule=cosine: the schedule's step count is restored with the progress
  checkpoint, so a session killed at step 5 ends where an uninterrupted one does, and
  not where the constant rate does."""
  cfg = tiny_config(data__sessions="dog", train__steps=6, train__progress_every=2,
                    train__lr_schedule="cosine")
  full = str(tmp_path / "full")
  session.run(cfg, full)
  want = checkpoint.restore_session(full, 1)["delta"]
  killed = _killed_during_step(cfg, str(tmp_path / "killed"), monkeypatch, 5)
  session.run(cfg, killed, resume=True)
  _assert_trees_equal(checkpoint.restore_session(killed, 1)["delta"], want)
  constant = str(tmp_path / "constant")
  session.run(tiny_config(data__sessions="dog", train__steps=6), constant)
  got = checkpoint.restore_session(constant, 1)["delta"]
  assert not np.allclose(np.asarray(got["tokens"]), np.asarray(want["tokens"]))


def test_data_parallel_step_matches_one_device(tmp_path, tiny_config):
  assert jax.device_count() == 8
  cfg = tiny_config(data__sessions="dog", train__batch_size=8, kd__batch_size=8, mesh__data=-1)
  out = []
  for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
    ctx = session.prepare(cfg, str(tmp_path / name), devices=devices)
    su = session.setup_session(ctx, 1, session.base_delta(ctx))
    state = su.state
    for _ in range(2):
      state, metrics = su.step_fn(state, su.frozen, su.teacher, su.data, ctx.schedule,
                                   su.train_key)
    out.append((jax.device_get(state.trainable), jax.device_get(metrics)))
    assert len(state.trainable["tokens"].sharding.device_set) == len(devices)
  (t1, m1), (t8, m8) = out
  for k in m1:
    np.testing.assert_allclose(m8[k], m1[k], rtol=2e-5, atol=1e-7, err_msg=k)
  for (p, a), b in zip(flatten(t1).items(), flatten(t8).values()):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=str(p))


def _folder_dataset(root, files):
  from PIL import Image
  for rel, content in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if content == "image":
      Image.new("RGB", (40, 40), (200, 30, 30)).save(path)
    else:
      path.write_bytes(content)
  return str(root)


@pytest.mark.parametrize("files,overrides,needle", [
    ({"a/0.png": "image", "b/readme.md": b"no photos"}, {}, "of concept 'b' holds no"),
    ({"a/0.png": "image", "b/0.jpg": b"\xff\xd8\xff garbage"}, {}, "0.jpg"),
    ({"a/0.png": "image", "b/0.png": "image"},
     {"concepts__token_format": "<|endoftext|>"}, "<|endoftext|>"),
    ({"a/0.png": "image", "b/0.png": "image"}, {"data__sessions": "a;zebra"}, "zebra"),
    ({"a/0.png": "image", "b/0.png": "image"}, {"kd__prompts": "class,nonsense"}, "nonsense"),
    ({"a/0.png": "image", "b/0.png": "image"}, {"kd__from_base": "previous"}, "kd.from_base"),
    ({"a/0.png": "image", "b/0.png": "image"},
     {"kd__prompts": "class,previous", "kd__from_base": "empty"}, "kd.from_base"),
    ({"a/0.png": "image", "b/0.png": "image"}, {"kd__class_templates": ("a {} by {}",)},
     "kd.class_templates"),
    ({"a/0.png": "image", "b/0.png": "image"},
     {"model__source": "local", "model__path": "/nonexistent/sd"}, "/nonexistent/sd"),
    ({"a/0.png": "image", "b/0.png": "image"}, {"model__attention": "splash"},
     "model.attention"),  # a TPU kernel, on CPU
    ({"a/0.png": "image", "b/0.png": "image"}, {"model__remat": "everything"}, "model.remat"),
])
def test_bad_input_is_named_and_nothing_is_written(tmp_path, tiny_config, files, overrides,
                                                   needle):
  root = _folder_dataset(tmp_path / "data", files)
  cfg = tiny_config(**{"data__root": root, "data__classes": "a=dog,b=cat",
                       "data__sessions": "a;b", **overrides})
  work = tmp_path / "run"
  with pytest.raises((ValueError, FileNotFoundError)) as e:
    session.run(cfg, str(work))
  assert needle in str(e.value)
  assert not work.exists()


def test_kd_class_templates(tmp_path, tiny_config):
  cfg = tiny_config(kd__class_templates=("a {} in the snow", "a red {}"))
  ctx = session.prepare(cfg, str(tmp_path))
  second = ctx.registry.up_to(2)
  cls = second.in_session(2)[0].class_word
  prompts = kd.prompts(cfg, second, 2)
  # Every template for the session's class, then the earlier concept's prompt, then "".
  assert prompts[:2] == [f"a {cls} in the snow", f"a red {cls}"]
  assert len(prompts) == 4 and prompts[-1] == ""
  assert ctx.max_kd == 4  # the step is padded for them once per run
  plain = kd.prompts(tiny_config(), second, 2)
  assert plain[0] == tiny_config().concepts.templates[0].format(cls) and len(plain) == 3
  # past_classes: the class words of earlier sessions, with the same templates.
  past = tiny_config(kd__prompts="past_classes,empty", kd__class_templates=("a {} in snow",))
  old_cls = second.in_session(1)[0].class_word
  assert kd.prompts(past, second, 2) == [f"a {old_cls} in snow", ""]
  assert kd.prompts(past, second, 1) == [""]


def test_kd_from_base_distils_class_and_empty_from_the_base(tmp_path, tiny_config):
  # kd.kv_weight rides along (one compiled step serves both options): checked at the end.
  cfg = tiny_config(kd__from_base="class,empty", kd__mode="noise", kd__kv_weight=3.0)
  ctx = session.prepare(cfg, str(tmp_path))
  conds = kd.conditions(cfg, ctx.registry.up_to(2), 2)
  assert [b for _, b in conds] == [True, False, True] and conds[-1][0] == ""
  # The previous session differs from the base, as it does after any training.
  base = session.base_delta(ctx)
  rs = np.random.default_rng(0)
  prev = {"unet": jax.tree.map(lambda x: np.asarray(x) + 0.05 * rs.standard_normal(x.shape),
                               base["unet"]),
          "tokens": rs.standard_normal((1, 32)).astype(np.float32)}
  su = session.setup_session(ctx, 2, prev)
  assert su.spec.kd_from_base and set(su.teacher) == {"unet", "base"}
  np.testing.assert_array_equal(np.asarray(su.data.kd_base), [True, False, True])

  @jax.jit
  def predict(selected, x, t, cond):
    params = delta_lib.merge(selected, su.frozen["unet"])
    return su.models.unet.apply({"params": params}, x, t, su.data.kd_context[cond])

  # Each DFKD target is its own teacher's prediction: the base's for the class prompt
  # and "", the previous session's for the earlier concept.
  cache = jax.jit(functools.partial(
      kd.kd_cache, size=16, latent_shape=su.data.latent_mean.shape[1:], models=su.models,
      spec=su.spec))(su.teacher, su.frozen, su.data.kd_context, su.data.n_kd, ctx.schedule,
                     jax.random.key(3), kd_base=su.data.kd_base)
  cond = np.asarray(cache["cond"])
  assert set(cond) == {0, 1, 2}
  from_base = np.asarray(su.data.kd_base)[cond][:, None, None, None]
  want_base = np.asarray(predict(su.teacher["base"], cache["x"], cache["t"], cond))
  want_prev = np.asarray(predict(su.teacher["unet"], cache["x"], cache["t"], cond))
  np.testing.assert_allclose(np.asarray(cache["target"]),
                             np.where(from_base, want_base, want_prev), atol=1e-5)
  assert np.abs(want_base - want_prev).max() > 1e-3
  # The step's fresh (uncached) targets too: at the session's first step the student
  # is the previous session, so only the base's conditions can make the KD loss > 0.
  state, metrics = su.step_fn(su.state, su.frozen, su.teacher, su.data, ctx.schedule,
                               su.train_key)
  assert float(metrics["kd"]) > 0.0 and np.isfinite(float(metrics["loss"]))
  # kd.kv_weight: the anchor's second moment is that of the session's own DFKD
  # contexts; it reads 0 while the keys and values are the teacher's, and the
  # step's loss holds it at its weight once the first update has moved them.
  np.testing.assert_allclose(np.asarray(su.data.kv_gram),
                             np.asarray(kd.kv_gram(su.data.kd_context, 3)), rtol=1e-6)
  assert su.spec.kv_weight == 3.0 and float(metrics["kv"]) == 0.0
  moved = kd.kv_anchor(state.trainable["unet"], su.teacher["unet"], su.data.kv_gram)
  state, metrics = su.step_fn(state, su.frozen, su.teacher, su.data, ctx.schedule,
                               su.train_key)
  assert float(moved) > 0.0
  np.testing.assert_allclose(float(metrics["kv"]), float(moved), rtol=1e-5)


def test_kv_anchor_runs_without_dfkd_and_only_for_lfs(tmp_path, tiny_config):
  ctx = session.prepare(tiny_config(kd__weight=0.0, kd__kv_weight=2.0), str(tmp_path))
  assert not ctx.spec.use_kd and ctx.spec.kv_weight == 2.0  # the anchor alone
  cd = losses.make_spec(ctx.cfg, mesh=ctx.mesh, scaling_factor=1.0, scheduler=ctx.pipe.scheduler,
                        selection=ctx.selection, lfs=False)  # custom_diffusion
  assert not cd.use_kd and cd.kv_weight == 0.0
  with pytest.raises(ValueError, match="kd.kv_weight"):
    session.prepare(tiny_config(kd__kv_weight=-1.0), str(tmp_path / "bad"))
  assert not (tmp_path / "bad").exists()


def test_kv_anchor_is_the_mean_change_of_keys_and_values_on_the_contexts():
  from lfs_jax import tiny

  unet_params = tiny.pipeline(0).unet_params
  rs = np.random.default_rng(1)
  teacher, _ = delta_lib.split(unet_params, delta_lib.selection_predicate(
      "crossattn"))  # to_q and to_out too: the anchor must leave them out
  student = jax.tree.map(lambda x: np.asarray(x) + 0.1 * rs.standard_normal(x.shape), teacher)
  width = tiny.TEXT["hidden_size"]
  contexts = rs.standard_normal((3, 7, width)).astype(np.float32)
  contexts[2] = 1e3  # a padding row past n: ignored
  got = float(kd.kv_anchor(student, teacher, kd.kv_gram(contexts, 2)))
  tokens = contexts[:2].reshape(-1, width)
  want = []
  s_flat, t_flat = flatten(student), flatten(teacher)
  for path in sorted(s_flat):
    if path[-3:] in (("attn2", "to_k", "kernel"), ("attn2", "to_v", "kernel")):
      want.append(np.mean(np.square(tokens @ s_flat[path] - tokens @ t_flat[path])))
  assert len(want) == 8  # the tiny UNet's four transformer blocks, a key and a value each
  np.testing.assert_allclose(got, np.mean(want), rtol=1e-4)
  # Moving only what does not read the text (queries, outputs) costs nothing.
  only_q = {p: (s_flat[p] if p[-2] in ("to_q", "to_out_0") else t_flat[p]) for p in t_flat}
  assert float(kd.kv_anchor(unflatten(only_q), teacher,
                                kd.kv_gram(contexts, 2))) == 0.0


@pytest.mark.slow  # a whole loop (CI runs it)
def test_restart_rules(tmp_path, tiny_config):
  run = str(tmp_path / "run")
  session.run(tiny_config(data__sessions="dog", train__steps=2), run)
  with pytest.raises(ValueError, match="--resume"):
    session.run(tiny_config(data__sessions="dog", train__steps=2), run)
  with pytest.raises(ValueError, match="seed"):
    session.run(tiny_config(data__sessions="dog", train__steps=2, seed=1), run, resume=True)
  with pytest.raises(ValueError, match=r"model\.(path|source)"):
    session.run(tiny_config(data__sessions="dog", train__steps=2, model__source="local",
                            model__path=run), run, resume=True)
  # Appending a session is how a lifelong run goes on.
  results = session.run(tiny_config(data__sessions="dog;cat", train__steps=2), run,
                        resume=True)
  assert [r["session"] for r in results] == [2]
  assert checkpoint.finished_sessions(run) == [1, 2]


def test_cli_refuses_unknown_config_key(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "lfs_jax.main", f"--workdir={tmp_path / 'run'}",
       "--config.train.stepz=3"], capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "stepz" in proc.stderr
  assert not (tmp_path / "run").exists()


def test_remat_keeps_parameter_paths_loss_and_grads(tmp_path, tiny_config):
  ctx = session.prepare(tiny_config(data__sessions="dog", kd__mode="noise"), str(tmp_path))
  su = session.setup_session(ctx, 1, session.base_delta(ctx))
  unet = su.models.unet
  assert unet.remat == "none"
  args = (su.frozen, su.teacher, su.data, ctx.schedule, jax.random.key(3))
  init_args = [np.zeros((1, 8, 8, 4), np.float32), np.zeros((1,), np.int32),
               np.zeros((1, 7, 32), np.float32)]
  want_paths = jax.tree.structure(ctx.pipe.unet_params)
  out = {}
  for remat in ("none", "blocks", "dots"):
    models = su.models._replace(unet=unet.clone(remat=remat))
    # Checkpointing wraps modules without renaming them: the same weights load.
    shapes = jax.eval_shape(models.unet.init, jax.random.key(0), *init_args)["params"]
    assert jax.tree.structure(shapes) == want_paths, remat
    grad_fn = jax.jit(jax.value_and_grad(
        lambda tr, *a: losses.loss_fn(tr, *a, models=models, spec=su.spec), has_aux=True))
    (loss, aux), grads = grad_fn(su.state.trainable, *args)
    out[remat] = jax.device_get((loss, aux, grads))
  (loss0, aux0, g0) = out["none"]
  assert float(loss0) > 0
  for remat in ("blocks", "dots"):
    loss, aux, g = out[remat]
    np.testing.assert_allclose(loss, loss0, rtol=1e-6, err_msg=remat)
    np.testing.assert_allclose(aux["denoise"], aux0["denoise"], rtol=1e-6, err_msg=remat)
    # The same math in another fusion order: float32 rounding, nothing more.
    for (p, a), b in zip(flatten(g0).items(), flatten(g).values()):
      rel = np.linalg.norm(b - a) / np.linalg.norm(a)
      assert rel <= 1e-5, (remat, p, rel)
