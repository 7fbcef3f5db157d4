"""Meshes and several processes: FSDP and the sampler on 8 fake devices, two real processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from lfs_jax import checkpoint, config_base, datasets, parallel, paths, runs, sample
from lfs_jax import concepts as concepts_lib
from lfs_jax.errors import ConfigError
from lfs_jax import tiny
from lfs_jax.train import session
from lfs_jax.weights.convert import flatten
from conftest import BUCKET, free_port, upload

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


def _start_two(workdir, cache, *flags):
  """`python -m lfs_jax.main` as 2 processes of one job (1 CPU device each, gloo): the
  training fields of conftest's TINY_RUN (the suite's shared tiny run), its photos in
  the bucket, FSDP across the processes (each holds half of every frozen and trained
  weight and of the optimizer state: the checkpoints gather them)."""
  port = free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
         "XLA_FLAGS": "--xla_backend_optimization_level=0",  # one device per process
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # every program cached
  return [subprocess.Popen(
      [sys.executable, "-m", "lfs_jax.main", f"--workdir={workdir}",
       f"--config.compile_cache={cache}", "--config.train.steps=2",
       "--config.train.log_every=2", "--config.train.progress_every=0",
       "--config.data.sessions=dog;cat", f"--config.data.root=gs://{BUCKET}/photos",
       "--config.data.classes=dog=dog,cat=cat",
       f"--config.distributed.coordinator=127.0.0.1:{port}",
       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
       "--config.mesh.fsdp=2", "--config.mesh.frozen=fsdp", "--config.mesh.trainable=fsdp",
       "--config.validation.seeds=1", "--config.sample.steps=4",  # a cheaper grid
       *flags], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]


def _preempt_after(procs, marker):
  """A thread that reads process 0's output up to the line with `marker`, then sends
  SIGTERM to every process (a preemption reaches all hosts); `.lines` holds what it
  read (the rest stays in the pipe)."""
  def run():
    for line in procs[0].stdout:
      reader.lines.append(line)
      if marker in line:
        break
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
  reader = threading.Thread(target=run, daemon=True)
  reader.lines = []
  reader.start()
  return reader


def _wait_two(procs, timeout=400):
  """Both outputs; fails (killing what is left, showing its output) unless both exit
  0 within `timeout` seconds of the call."""
  deadline = time.monotonic() + timeout
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      outs.append(p.communicate()[0])
  for i, (p, o) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{o[-3000:]}"
  return outs


def _pids(logs):
  """The process ids in TensorBoard events files' names (`...<host>.<pid>[.n]`)."""
  return {int(n.split(f".{socket.gethostname()}.", 1)[1].split(".")[0])
          for n in paths.listdir(logs)}


@pytest.mark.slow  # a whole loop (CI runs it)
def test_two_processes_preempted_in_a_bucket_resume_and_match_one_process(emulator, tiny_run,
                                                                          compile_cache):
  """Two processes of one job on one bucket URL, as on a pod: the workdir and the
  photos are in the (emulated) bucket. Both get SIGTERM in session 1 (a preemption);
  `--resume` finishes the run, its train step read back (traced program and
  executable); both sessions equal the one-process run.

  [choice] The bucket, not a shared local folder: a pod's hosts share nothing else,
  and a local multi-process workdir is the same code with `os` in place of fsspec
  (paths.py), which every one-process test runs. The reference is the suite's shared
  tiny run (trained once for many tests; one device, the base replicated), not a run
  of its own. The compilation cache stays the suite's local one (a URL cache has its
  own test in test_gcs.py): with it the restart skips tracing too.
  """
  for name in ("dog", "cat"):
    upload(os.path.join(datasets.bundled_root(), name), f"gs://{BUCKET}/photos/{name}")
  work, cache = f"gs://{BUCKET}/run2p", compile_cache
  procs = _start_two(work, cache)
  reader = _preempt_after(procs, "train step compiled")  # when session 1 is set up
  try:  # meanwhile, in this process: the reference (or the suite's copy of it)
    ref = tiny_run("two_process_ref")
  finally:
    reader.join(timeout=240)
    outs = _wait_two(procs)
  assert "preempted: " in "".join(reader.lines) + outs[0], outs[0][-3000:]
  assert checkpoint.finished_sessions(work) != [1, 2]
  assert json.loads(paths.read_text(f"{work}/config.json"))["distributed"][
      "num_processes"] == 2
  assert not paths.exists(f"{work}/lock")  # SIGTERM released the lease at once

  restart = _start_two(work, cache, "--resume")
  outs = _wait_two(restart)
  assert all("session=2" in o for o in outs)
  assert "(program read back in" in outs[0], outs[0][-3000:]
  assert "from the persistent compilation cache" in outs[0], outs[0][-3000:]
  assert checkpoint.finished_sessions(work) == [1, 2]
  assert paths.listdir(work) == ["concepts.json", "config.json", "logs", "samples",
                                 "sessions"]  # no lock, no progress, nothing half-written
  # Only process 0 writes TensorBoard events and the grids (every process samples).
  assert _pids(f"{work}/logs") <= {procs[0].pid, restart[0].pid}
  assert paths.listdir(f"{work}/samples/validation") == [
      "session_001.json", "session_001.png", "session_002.json", "session_002.png"]
  registry = concepts_lib.Registry.load(f"{work}/concepts.json")
  assert registry.tokens == ["<c1>", "<c2>"]
  assert registry.concepts[0].images[0].path == f"gs://{BUCKET}/photos/dog/00.jpg"

  for k in (1, 2):
    got, want = (flatten(checkpoint.restore_session(w, k)["delta"]) for w in (work, ref))
    assert got.keys() == want.keys()
    for p in want:
      assert np.all(np.isfinite(got[p]))
      np.testing.assert_allclose(got[p], want[p], rtol=1e-5, atol=1e-6, err_msg=f"{k} {p}")
