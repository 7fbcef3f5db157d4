"""Where every array of a run lives: the mesh, sharding rules and the multi-host start.

The mesh has two named axes, ("data", "fsdp"). Both split the batch: FSDP is data
parallelism whose replicas also share the frozen base instead of each holding it
whole. What lives where:

  | tree                                  | sharding                                  |
  |---------------------------------------|-------------------------------------------|
  | the UNet batch inside the step, the   | split over ("data", "fsdp") jointly       |
  | sampler's batch                       |                                           |
  | frozen base (UNet rest, text encoder, | mesh.frozen="replicated": every device    |
  | token table)                          | mesh.frozen="fsdp": `fsdp_spec` below     |
  | trainable delta, its optimizer state, | mesh.trainable="replicated": every device |
  | the teacher                           | mesh.trainable="fsdp": `fsdp_spec` below  |
  | session data, schedule, keys          | replicated                                |

The FSDP rule (`fsdp_spec`): a leaf is split along its largest dimension whose size
the fsdp axis divides (the first such on a tie); a leaf with no such dimension (a
scalar, an odd size), or with fewer than `mesh.fsdp_min_size` elements (biases, norm
scales: splitting them saves little memory and costs an all-gather each), is
replicated. XLA all-gathers each weight where the step
uses it, so the numbers are those of the replicated layout up to float rounding.

Several processes (TPU pod hosts, Slurm tasks, or `--config.distributed.*` by
hand) run the same program: `initialize` joins them before any other JAX call,
`put` places host values as global arrays, `to_host` brings them back without
touching another process's memory, and `barrier` orders file-system steps.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import Any, Mapping, NamedTuple, Optional

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from lfs_jax.errors import ConfigError

DATA, FSDP = "data", "fsdp"
BATCH = (DATA, FSDP)            # the batch axis is split over both mesh axes
FROZEN_MODES = ("replicated", "fsdp")
CLUSTERS = ("auto", "none")
_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
          "SLURM_LOCALID")      # what jax's Slurm detection reads (set inside `srun`)


# ---------------------------------------------------------------------------- mesh

def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp) mesh over the first data*fsdp devices; data=-1 takes all of them.

  Over all devices of the job the layout comes from `mesh_utils` (TPU topology
  aware; fsdp neighbours stay on one host where they fit); an explicit device list
  (tests) is reshaped in order.

  Raises:
    ConfigError: the axes do not fit the devices, or leave some process out.
  """
  given = devices is not None
  devices = list(jax.devices() if devices is None else devices)
  fsdp = mesh_cfg.fsdp
  if fsdp < 1 or (mesh_cfg.data <= 0 and len(devices) % fsdp):
    raise ConfigError(f"mesh.fsdp={fsdp} does not divide the {len(devices)} devices")
  data = mesh_cfg.data if mesh_cfg.data > 0 else len(devices) // fsdp
  if data < 1 or data * fsdp > len(devices):
    raise ConfigError(
        f"mesh data={mesh_cfg.data} x fsdp={fsdp} does not fit {len(devices)} devices")
  if jax.process_count() > 1 and data * fsdp != len(devices):
    raise ConfigError(
        f"mesh data={data} x fsdp={fsdp} must use all {len(devices)} devices of a "
        f"{jax.process_count()}-process job (use mesh.data=-1)")
  if data * fsdp == len(devices) and not given:
    grid = mesh_utils.create_device_mesh((data, fsdp), devices)
  else:
    grid = np.asarray(devices[:data * fsdp]).reshape(data, fsdp)
  return jax.sharding.Mesh(grid, (DATA, FSDP))


def check_frozen_mode(mode: str, field: str = "mesh.frozen") -> str:
  if mode not in FROZEN_MODES:
    raise ConfigError(f"{field} must be one of {list(FROZEN_MODES)}, got {mode!r}")
  return mode


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH))


def fsdp_spec(shape, n_fsdp: int, min_size: int = 0) -> P:
  """The FSDP rule: split the largest dimension that `n_fsdp` divides, else replicate.

  A leaf of fewer than `min_size` elements stays whole (replicated).
  """
  if n_fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  fits = [(size, -i) for i, size in enumerate(shape) if size % n_fsdp == 0 and size > 0]
  if not fits:
    return P()
  axis = -max(fits)[1]
  return P(*([None] * axis + [FSDP]))


def frozen_shardings(tree, mesh, mode: str, min_size: int):
  """Shardings for the frozen base trees (leaves: arrays or ShapeDtypeStructs).

  `min_size`: mesh.fsdp_min_size, the fewest elements a leaf needs to be split.
  """
  check_frozen_mode(mode)
  if mode == "replicated":
    return jax.tree.map(lambda _: replicated(mesh), tree)
  n = mesh.shape[FSDP]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), n, min_size)),
                      tree)


class TrainShardings(NamedTuple):
  """In/out shardings of `train_step(state, frozen, teacher, data, schedule, rng)`.

  Each field is a sharding tree or a single sharding (a prefix for its whole tree).
  """
  state: Any
  frozen: Any
  teacher: Any
  data: Any
  schedule: Any
  rng: Any
  metrics: Any


def train_shardings(mesh, frozen, mode: str, state=None, teacher=None,
                    trainable_mode: str = "replicated", *, min_size: int) -> TrainShardings:
  """The layout of the table above for trees of these structures.

  `state` and `teacher` (arrays or ShapeDtypeStructs; teacher None without DFKD)
  are only read with trainable_mode="fsdp", which lays them out leaf by leaf as the
  frozen base (the optimizer's moments like the weights they belong to).
  """
  check_frozen_mode(trainable_mode, "mesh.trainable")
  rep = replicated(mesh)
  state_sh = teacher_sh = rep
  if trainable_mode == "fsdp":
    if state is None:
      raise ValueError("mesh.trainable=fsdp needs the train state's structure")
    state_sh = frozen_shardings(state, mesh, "fsdp", min_size)
    if teacher is not None:
      teacher_sh = frozen_shardings(teacher, mesh, "fsdp", min_size)
  return TrainShardings(state=state_sh, frozen=frozen_shardings(frozen, mesh, mode, min_size),
                        teacher=teacher_sh, data=rep, schedule=rep, rng=rep, metrics=rep)


# ------------------------------------------------------------------ host <-> mesh

def put(tree, shardings):
  """Host values (numpy, local or global arrays) -> global arrays with `shardings`.

  Every process passes the same values (everything derives from the seed); each
  fills its own devices' shards. `jax.device_put` with a global sharding does this
  across processes in jax 0.10 (checked with two CPU processes over gloo, as does
  `jax.make_array_from_callback`), except for typed PRNG keys, which go as their
  uint32 data and are wrapped again. `shardings` is a tree or one sharding for all.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: _put_one(x, shardings), tree)
  return jax.tree.map(_put_one, tree, shardings)


def _put_one(x, sharding):
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    data = jax.device_put(jax.random.key_data(x), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  return jax.device_put(x, sharding)


def _one_to_host(x):
  if not isinstance(x, jax.Array):
    return np.asarray(x)
  if x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)  # a replicated array: this process holds a full copy
  # A collective: every process calls this at the same point of the program.
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def to_host(tree):
  """Global (or local) arrays -> numpy, in any process, without `jax.device_get`.

  `jax.device_get` refuses arrays with shards on other processes; replicated ones
  are read from a local copy, sharded ones gathered (all processes must call).
  """
  return jax.tree.map(_one_to_host, tree)


def barrier(name: str) -> None:
  """All processes reach this point before any goes on (no-op for one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def agree_any(flag: bool) -> bool:
  """True on every process if `flag` is True on any (one process: `flag`)."""
  if jax.process_count() == 1:
    return bool(flag)
  got = multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))
  return bool(np.asarray(got).any())


# ------------------------------------------------------------- multi-host start

def detect_cluster(environ: Optional[Mapping[str, str]] = None) -> str:
  """Which multi-process launcher started this process ("" = none found).

  "slurm": inside `srun` with more than one task (the variables jax's Slurm
  detection reads); "ompi": `mpirun` of Open MPI with more than one rank; "tpu":
  TPU hosts (GKE's TPU_WORKER_HOSTNAMES, a multislice coordinator, or a Cloud TPU
  VM: libtpu installed and TPU chips present; one host is a one-process job).
  """
  env = os.environ if environ is None else environ
  if all(k in env for k in _SLURM) and int(env["SLURM_NTASKS"] or 1) > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "2")) > 1:
    return "ompi"
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  if environ is None and importlib.util.find_spec("libtpu") is not None and (
      glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")):
    return "tpu"
  return ""


def initialize(dist_cfg) -> int:
  """Joins this process to its job; call before any other JAX use. Idempotent.

  An explicit `distributed.coordinator` ("host:port" of process 0) with
  `num_processes` and `process_id` wins; otherwise, with `cluster="auto"`, a
  launcher found by `detect_cluster` lets `jax.distributed.initialize()` read
  everything from its environment. CPU processes talk over `cpu_collectives`
  (gloo by default). Returns the number of processes.

  Raises:
    ConfigError: inconsistent distributed fields (nothing started).
  """
  d = dist_cfg
  if d.cluster not in CLUSTERS:
    raise ConfigError(f"distributed.cluster must be one of {list(CLUSTERS)}, got {d.cluster!r}")
  if d.cpu_collectives not in ("gloo", "mpi", "none"):
    raise ConfigError("distributed.cpu_collectives must be gloo, mpi or none, got "
                      f"{d.cpu_collectives!r}")
  explicit = (d.coordinator, d.num_processes > 0, d.process_id >= 0)
  if any(explicit) and not all(explicit):
    raise ConfigError(
        "an explicit multi-process start needs all of distributed.coordinator (host:port "
        "of process 0), distributed.num_processes (> 0) and distributed.process_id (>= 0); "
        f"got {d.coordinator!r}, {d.num_processes}, {d.process_id}")
  if all(explicit) and d.process_id >= d.num_processes:
    raise ConfigError(f"distributed.process_id={d.process_id} must be < "
                      f"distributed.num_processes={d.num_processes}")
  if jax.distributed.is_initialized():
    return jax.process_count()
  # Read by the CPU client when it is created (after initialize), ignored by GPU/TPU.
  jax.config.update("jax_cpu_collectives_implementation",
                    None if d.cpu_collectives == "none" else d.cpu_collectives)
  if all(explicit):
    jax.distributed.initialize(d.coordinator, d.num_processes, d.process_id)
  elif d.cluster == "auto" and (found := detect_cluster()):
    try:
      jax.distributed.initialize()
    except (ValueError, RuntimeError) as e:
      raise ConfigError(
          f"found a {found} environment but jax.distributed.initialize() failed ({e}); "
          "set --config.distributed.cluster=none for a single process, or the "
          "explicit distributed.coordinator / num_processes / process_id") from e
  else:
    return 1
  return jax.process_count()
