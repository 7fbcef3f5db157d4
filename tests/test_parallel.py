"""Meshes and several processes: FSDP and the sampler on 8 fake devices, two real processes."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from lfs_jax import checkpoint, config_base, parallel, runs, sample
from lfs_jax import concepts as concepts_lib
from lfs_jax.errors import ConfigError
from lfs_jax import tiny
from lfs_jax.train import session
from lfs_jax.weights.convert import flatten

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mesh_cfg(data, fsdp, frozen="replicated"):
  c = config_base.get_config().mesh
  c.data, c.fsdp, c.frozen = data, fsdp, frozen
  return c


def test_fsdp_rule_and_mesh_checks():
  assert parallel.fsdp_spec((32, 320), 4) == jax.sharding.PartitionSpec(None, "fsdp")
  assert parallel.fsdp_spec((3, 3, 8, 8), 4) == jax.sharding.PartitionSpec(None, None, "fsdp")
  assert parallel.fsdp_spec((6, 5), 4) == jax.sharding.PartitionSpec()  # nothing divisible
  assert parallel.fsdp_spec((), 4) == jax.sharding.PartitionSpec()
  assert parallel.fsdp_spec((64,), 1) == jax.sharding.PartitionSpec()
  mesh = parallel.make_mesh(_mesh_cfg(-1, 4))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  with pytest.raises(ConfigError, match="fsdp=3"):
    parallel.make_mesh(_mesh_cfg(-1, 3))
  with pytest.raises(ConfigError, match="does not fit"):
    parallel.make_mesh(_mesh_cfg(4, 4))
  with pytest.raises(ConfigError, match="mesh.frozen"):
    parallel.check_frozen_mode("zero3")


def test_cluster_detection_and_explicit_fields():
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0",
           "SLURM_LOCALID": "0"}
  assert parallel.detect_cluster({**slurm, "SLURM_NTASKS": "8"}) == "slurm"
  assert parallel.detect_cluster({**slurm, "SLURM_NTASKS": "1"}) == ""  # one task: no job
  assert parallel.detect_cluster({"SLURM_NTASKS": "8"}) == ""  # sbatch shell, not srun
  assert parallel.detect_cluster({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}) == "tpu"
  assert parallel.detect_cluster({"TPU_WORKER_HOSTNAMES": "h0"}) == ""
  assert parallel.detect_cluster({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "2"}) \
      == "ompi"
  assert parallel.detect_cluster({}) == ""
  d = config_base.get_config().distributed
  d.coordinator = "127.0.0.1:1234"  # without num_processes / process_id
  with pytest.raises(ConfigError, match="num_processes"):
    parallel.initialize(d)
  d.num_processes, d.process_id = 2, 2
  with pytest.raises(ConfigError, match="process_id=2"):
    parallel.initialize(d)
  d = config_base.get_config().distributed
  d.cluster = "none"
  assert parallel.initialize(d) == 1  # one process, nothing started


def test_fsdp_step_matches_one_device(tmp_path, tiny_config):
  assert jax.device_count() == 8
  common = dict(data__sessions="dog", train__batch_size=8, kd__batch_size=8,
                kd__mode="noise")
  out = []
  for name, devices, mesh in (
      ("one", jax.devices()[:1], dict(mesh__data=1)),
      ("fsdp", jax.devices(), dict(mesh__data=2, mesh__fsdp=4, mesh__frozen="fsdp",
                                   mesh__trainable="fsdp"))):
    ctx = session.prepare(tiny_config(**common, **mesh), str(tmp_path / name),
                          devices=devices)
    su = session.setup_session(ctx, 1, session.base_delta(ctx))
    state = su.state
    for _ in range(2):
      state, metrics = su.step_fn(state, su.frozen, su.teacher, su.data, ctx.schedule,
                                   su.train_key)
    out.append((parallel.to_host(state.trainable), parallel.to_host(metrics)))
  # The base came from host memory straight into its shardings (never whole on a device).
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(ctx.pipe.unet_params))
  frozen = flatten(su.frozen)
  # The frozen base really is split: every big leaf over fsdp, by the largest dimension.
  big = {k: v for k, v in frozen.items() if v.size >= 1024}
  assert big and all("fsdp" in v.sharding.spec for v in big.values())
  for k, v in big.items():
    assert v.addressable_shards[0].data.size == v.size // 4, k
  # mesh.trainable=fsdp: the delta, both Adam moments and the teacher are split too.
  for name, tree in (("trainable", state.trainable), ("opt_state", state.opt_state),
                     ("teacher", su.teacher)):
    big = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)
           if v.size >= 1024}
    assert big, name
    for k, v in big.items():
      assert "fsdp" in v.sharding.spec, (name, k)
      assert v.addressable_shards[0].data.size == v.size // 4, (name, k)
  (t1, m1), (t8, m8) = out
  for k in m1:
    np.testing.assert_allclose(m8[k], m1[k], rtol=2e-5, atol=1e-7, err_msg=k)
  for (p, a), b in zip(flatten(t1).items(), flatten(t8).values()):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=str(p))


def _tiny_run(mesh_overrides) -> runs.RunModel:
  """A RunModel of the random tiny base (no training): enough to sample plain prompts."""
  c = config_base.get_config()
  c.sample.steps, c.sample.batch_size = 3, 8
  for k, v in mesh_overrides.items():
    c.mesh[k] = v
  c.lock()
  pipe = tiny.pipeline(0)
  d = pipe.text_encoder.config.hidden_size
  return runs.RunModel(c, "", 0, [], pipe, np.zeros((1, d), np.float32),
                       concepts_lib.Registry(), {})


def test_sampler_on_eight_devices_matches_one(tmp_path):
  one = _tiny_run({"data": 1})
  eight = _tiny_run({"data": 2, "fsdp": 4, "frozen": "fsdp"})
  prompts = ["a dog", "a cat", "", "a red dog"] * 2
  seeds = list(range(8))
  a, _ = sample.generate(one, prompts, seeds)
  b, _ = sample.generate(eight, prompts, seeds)
  assert sample._sampler(one) is sample.sampler_lib.sample_jit
  placed = flatten(sample._sampler(eight)._placed[1])  # the UNet, laid out by mesh.frozen
  assert any("fsdp" in v.sharding.spec for v in placed.values())
  # The same images up to float rounding (a rounding flip moves a uint8 by one).
  assert np.abs(a.astype(int) - b).max() <= 1
  assert (a != b).mean() < 0.01


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_two(workdir, cache, *flags):
  """`python -m lfs_jax.main` as 2 processes of one job (1 CPU device each, gloo)."""
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_backend_optimization_level=0"}  # one device per process
  return [subprocess.Popen(
      [sys.executable, "-m", "lfs_jax.main", f"--workdir={workdir}",
       f"--config.compile_cache={cache}", "--config.train.steps=2",
       "--config.train.log_every=2", "--config.train.progress_every=0",
       f"--config.distributed.coordinator=127.0.0.1:{port}",
       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
       *flags], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]


def _wait_two(procs, timeout=240):
  """Both outputs; fails (killing what is left) unless both exit 0 in time."""
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, o) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{o[-3000:]}"
  return outs


@pytest.mark.slow  # a whole loop (CI runs it)
def test_two_processes_train_resume_and_match_one_process(tmp_path, tiny_config,
                                                          compile_cache):
  work, ref = tmp_path / "run", str(tmp_path / "ref")
  # FSDP across the processes: each holds half of every frozen and trained weight
  # (and of the optimizer state): the checkpoints gather them.
  procs = _start_two(work, compile_cache, "--config.data.sessions=dog;cat",
                     "--config.mesh.fsdp=2", "--config.mesh.frozen=fsdp",
                     "--config.mesh.trainable=fsdp", "--config.validation.seeds=1")
  try:  # meanwhile, the same run in this process, 2 of its devices, replicated base
    session.run(tiny_config(train__steps=2, data__sessions="dog;cat", mesh__data=-1), ref,
                devices=jax.devices()[:2])
  finally:
    outs = _wait_two(procs)
  assert all("session=2" in o for o in outs)
  assert sorted(os.listdir(work / "sessions")) == ["1", "2"]
  assert sorted(p.name for p in work.rglob("config.json*")) == ["config.json"]
  assert json.loads((work / "config.json").read_text())["distributed"]["num_processes"] == 2
  # Only process 0 logs: TensorBoard event files (one a run) of a single process id.
  assert len({p.name.rsplit(".", 1)[-1] for p in (work / "logs").iterdir()}) == 1
  # The validation grids (on by default) sampled by both processes, written by one.
  assert sorted(p.name for p in (work / "samples" / "validation").iterdir()) == [
      "session_001.json", "session_001.png", "session_002.json", "session_002.png"]

  # The one-process run over 2 devices has the same deltas.
  for k in (1, 2):
    got, want = (flatten(checkpoint.restore_session(w, k)["delta"]) for w in (str(work), ref))
    assert got.keys() == want.keys()
    for p in want:
      assert np.all(np.isfinite(got[p]))
      np.testing.assert_allclose(got[p], want[p], rtol=1e-5, atol=1e-6, err_msg=f"{k} {p}")

  # --resume with one more session (and the base replicated now: a machine setting):
  # the two processes train session 3 only.
  outs = _wait_two(_start_two(work, compile_cache, "--resume",
                             "--config.data.sessions=dog;cat;dog2",
                             "--config.validation.every_session=False"))
  assert all("session=3" in o and "session=1" not in o for o in outs)
  assert checkpoint.finished_sessions(str(work)) == [1, 2, 3]
  registry = concepts_lib.Registry.load(str(work / "concepts.json"))
  assert registry.tokens == ["<c1>", "<c2>", "<c3>"]
