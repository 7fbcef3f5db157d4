"""The stored train-step program (train/programs.py): reused only when its key matches.

A toy step stands in for the train step (same calling convention, same
`step.compile_step`), so each case costs a tiny trace and compile.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lfs_jax import console
from lfs_jax.train import programs, session
from lfs_jax.train import step as step_lib


def _toy_step(state, x, *, scale):
  """(state, batch) -> (state, metrics), like train_step; `scale` is closed over."""
  new = {"w": state["w"] + scale * jnp.tanh(x).sum(0), "n": state["n"] + 1}
  return new, {"loss": jnp.sum(new["w"] ** 2)}


def _compile(tmp_path, scale, static, x_shape=(4, 3)):
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("data",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  fn = jax.jit(functools.partial(_toy_step, scale=scale), in_shardings=(rep, split),
               out_shardings=(rep, rep), donate_argnums=(0,))
  state = jax.device_put({"w": np.arange(3, dtype=np.float32), "n": np.int32(0)}, rep)
  x = jax.device_put(np.linspace(-1, 1, np.prod(x_shape), dtype=np.float32)
                     .reshape(x_shape), split)
  store = programs.Store(str(tmp_path / "programs"), static)
  exe, _, _, info = step_lib.compile_step(fn, mesh, state, x, store=store)
  new, metrics = exe(state, x)
  want = _toy_step({"w": np.arange(3, dtype=np.float32), "n": 0}, np.asarray(x), scale=scale)
  return info.program, (np.asarray(new["w"]), float(metrics["loss"])), (
      np.asarray(want[0]["w"]), float(want[1]["loss"]))


def _entries(tmp_path):
  return sorted(f for f in os.listdir(tmp_path / "programs") if f.endswith(programs.SUFFIX))


def test_stored_program_is_reused_only_under_its_key(tmp_path):
  how, got, want = _compile(tmp_path, 1.0, "toy scale=1")
  assert how == "traced, stored" and len(_entries(tmp_path)) == 1
  np.testing.assert_array_equal(got[0], want[0])
  how, again, _ = _compile(tmp_path, 1.0, "toy scale=1")
  assert how == "stored"
  np.testing.assert_array_equal(again[0], got[0])  # the same program, the same bits
  assert again[1] == got[1]
  # What the step closes over changed (here the scale, as a config field would):
  # another key, traced anew; the stale program (scale 1) is never run.
  how, got2, want2 = _compile(tmp_path, 3.0, "toy scale=3")
  assert how == "traced, stored" and len(_entries(tmp_path)) == 2
  np.testing.assert_allclose(got2[0], want2[0], rtol=1e-6)
  assert not np.allclose(got2[0], got[0])
  # Other argument shapes: another key as well.
  how, _, _ = _compile(tmp_path, 3.0, "toy scale=3", x_shape=(6, 3))
  assert how == "traced, stored" and len(_entries(tmp_path)) == 3


def test_unreadable_program_is_said_and_traced_again(tmp_path, capsys):
  _compile(tmp_path, 1.0, "toy")
  (entry,) = _entries(tmp_path)
  path = tmp_path / "programs" / entry
  whole = path.read_bytes()
  for damaged in (whole[:100],  # truncated, as by a full disk
                  whole[:500] + bytes([whole[500] ^ 1]) + whole[501:]):  # one bit flipped
    path.write_bytes(damaged)
    how, got, want = _compile(tmp_path, 1.0, "toy")
    assert how == "traced, stored"
    assert "unreadable" in capsys.readouterr().out
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    assert _compile(tmp_path, 1.0, "toy")[0] == "stored"  # rewritten whole


def test_program_key_follows_the_fields_that_reach_the_step(tiny_config):
  def static(**overrides):
    return session.program_store(tiny_config(**overrides), "models", "spec").static

  base = static()
  assert static(train__log_every=7, sample__steps=3, checkpoint__keep_progress=3) == base
  for field in ({"train__learning_rate": 2e-5}, {"kd__steps": 2}, {"model__attention": "cudnn"},
                {"mesh__fsdp": 2}):
    assert static(**field) != base, field
  no_cache = tiny_config()
  with no_cache.unlocked():
    no_cache.compile_cache = ""
  assert session.program_store(no_cache, "m", "s") is None


def test_clock_line_sums_the_phases():
  clock = console.Clock(start=0.0)
  clock.mark("imports", 1.0)
  clock.mark("tracing", 2.5, "read back")
  assert clock.line("restart") == "restart: 3.5 s = imports 1.0 + tracing 2.5 (read back)"


def test_cpu_step_is_compiled_without_ynnpack_fusions():
  # XLA:CPU reads a YNNPACK fusion back from the persistent cache by scanning the whole
  # module (step.CPU_OPTIONS): the train step is compiled without them on a CPU.
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  fn = jax.jit(lambda w, x: (w, {"loss": jnp.sum(jnp.tanh(x @ w) @ w)}))
  w = x = jnp.ones((64, 64), jnp.float32)
  exe, _, _, _ = step_lib.compile_step(fn, mesh, w, x)
  assert "ynn_fusion" not in exe.as_text()
  assert "ynn_fusion" in fn.lower(w, x).compile().as_text()  # XLA's default has them
  assert step_lib.xla_options(mesh, {"xla_backend_optimization_level": 0}) == {
      **step_lib.CPU_OPTIONS, "xla_backend_optimization_level": 0}


def test_the_step_is_traced_with_the_garbage_collector_paused():
  # Its passes were ~10 % of tracing the SD-1.5 step (docs/benchmarks.md): off while
  # compile_step traces, back as it was after (also after a failure).
  import gc  # pylint: disable=g-import-not-at-top
  seen = []
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))

  def step(w):
    seen.append(gc.isenabled())
    return w, {"loss": jnp.sum(w)}

  assert gc.isenabled()
  step_lib.compile_step(jax.jit(step), mesh, jnp.ones((2,)))
  assert seen == [False] and gc.isenabled()
  with pytest.raises(ZeroDivisionError):
    with step_lib.gc_paused():
      raise ZeroDivisionError
  assert gc.isenabled()
  gc.disable()
  try:
    with step_lib.gc_paused():
      pass
    assert not gc.isenabled()
  finally:
    gc.enable()
