"""Command line: `python -m lfs_jax.main --config=configs/tiny.py --workdir=DIR`.

Modes:
  train (default)  runs every session of the config that the run directory has not
                   finished yet.
  sample           `--prompt=... [--prompt=...] [--session=K]`: images from a
                   finished session (the latest by default) into DIR/samples/. The
                   run's own config.json is the config; only --config.sample.* and
                   --config.icgen.* (and machine settings) may be overridden.
  export           `--out=DIR [--session=K]`: a finished session (the latest by
                   default) as diffusers' Custom Diffusion files (attention
                   processors + one embedding per token) with a README.
  import           `--from=DIR`: a Custom Diffusion delta (safetensors) becomes
                   session 1 of the new run --workdir, under --config (base model,
                   train.selection); continue it with --mode=train --resume.
  evaluate         `--clip=DIR`: CLIP TA / IA of every concept after every finished
                   session, with and without ICGen, into DIR/metrics/ (metrics.json,
                   metrics.csv, report.md, forgetting.png, grids); resumable. Like
                   sample, only --config.sample.*, icgen.* and eval.* may be overridden.
  compare          `--workdir=A --workdir=B [--out=DIR]`: evaluated runs side by side
                   (compare.md, .csv, .json, .png; default DIR: A/metrics/compare/).
"""

import time

_START = time.perf_counter()  # the restart phases count from here (session.run's clock)

import os  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app
from absl import flags
from ml_collections import config_flags

from lfs_jax import paths

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "tiny.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "ml_collections config file (configs/*.py[:arg]).",
    lock_config=True)
_WORKDIRS = flags.DEFINE_multi_string(
    "workdir", None, "Run directory (created); --mode=compare takes it twice or more.")
_MODE = flags.DEFINE_enum("mode", "train",
                          ["train", "sample", "export", "import", "evaluate", "compare"],
                          "What to do.")
_RESUME = flags.DEFINE_bool("resume", False, "Continue the run in --workdir.")
_SESSION = flags.DEFINE_integer("session", None,
                                "sample/export: session to use (default: the latest finished).")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "sample: a prompt (repeat the flag for more).")
_OUT = flags.DEFINE_string("out", None, "export: the folder to write (new or empty); "
                           "compare: where to write (default: A/metrics/compare).")
_FROM = flags.DEFINE_string("from", None, "import: a folder with a Custom Diffusion delta.")
_CLIP = flags.DEFINE_string("clip", None,
                            "evaluate: a local CLIP model folder (overrides eval.clip).")


def _workdir() -> str:
  """The one --workdir of every mode but compare."""
  return _WORKDIRS.value[0]


def _train():
  from lfs_jax import console  # pylint: disable=g-import-not-at-top
  from lfs_jax.train import session  # pylint: disable=g-import-not-at-top

  clock = console.Clock(_START)
  clock.mark("imports")
  try:
    results = session.run(_CONFIG.value, _workdir(), resume=_RESUME.value, clock=clock)
  except session.Preempted as e:
    print(f"preempted: {e}; continue with --resume", file=sys.stderr)
    return 0
  for r in results:
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in r.items()))
  print(f"run directory: {paths.abspath(_workdir())}")
  return 0


def _sample():
  from lfs_jax import sample  # pylint: disable=g-import-not-at-top

  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  run, written = sample.sample_run(_workdir(), _PROMPT.value, session=_SESSION.value,
                                   overrides=overrides)
  print(f"session {run.session}: {len(written)} files in "
        f"{os.path.dirname(paths.abspath(written[0])) if written else '-'}")
  return 0


def _export():
  from lfs_jax import interop  # pylint: disable=g-import-not-at-top

  got = interop.export_session(_workdir(), _OUT.value, session=_SESSION.value)
  print(f"session {got['session']} exported to {got['out_dir']} (tokens "
        f"{' '.join(got['tokens'])}); see its README.md")
  return 0


def _import():
  from lfs_jax import interop  # pylint: disable=g-import-not-at-top

  got = interop.import_delta(_FROM.value, _workdir(), _CONFIG.value)
  print(f"imported as session 1 of {got['workdir']}: tokens {' '.join(got['tokens'])}, "
        f"{got['from_export']} UNet weights from the delta, {got['from_base']} from the base; "
        "train more sessions with --mode=train --resume and the same --config")
  return 0


def _evaluate():
  from lfs_jax.evaluate import report, run_eval  # pylint: disable=g-import-not-at-top

  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  got = run_eval.evaluate(_workdir(), clip=_CLIP.value, overrides=overrides)
  m = got["metrics"]
  for v, r in m["variants"].items():
    pairs = [(report.HEADERS[k], r["final"][k]) for k in m["metrics"]]
    pairs += [(f"IAD({report.HEADERS[k]})", r["forgetting"][k]["iad_mean"])
              for k in m["ia_metrics"]]
    print(f"{v}: " + " ".join(f"{k}={x:.4f}" if x is not None else f"{k}=-"
                              for k, x in pairs))
  print(f"{got['computed']} cells computed, {got['reused']} reused; results in "
        f"{paths.abspath(got['out_dir'])} (see report.md)")
  return 0


def _compare():
  from lfs_jax.evaluate import compare  # pylint: disable=g-import-not-at-top

  got = compare.compare(_WORKDIRS.value, out_dir=_OUT.value, sub=_CONFIG.value.eval.out)
  print(f"{len(got['rows'])} rows in {paths.abspath(got['files'][0])}")
  if got["differences"]:
    print(f"note: evaluated under different settings: {', '.join(got['differences'])}")
  return 0


def _check_storage() -> None:
  """The URLs a mode reads or writes answer (backend, credentials, bucket) before any
  work; training checks its own (`session.check_storage`). Local paths: nothing."""
  mode, workdirs = _MODE.value, _WORKDIRS.value
  if mode in ("sample", "evaluate", "export", "compare"):
    for w in workdirs:
      paths.check(w, "--workdir")
  if mode == "import":
    paths.check(_workdir(), "--workdir", must_exist=False)
    paths.check(_FROM.value, "--from")
    if _CONFIG.value.model.source == "local" and _CONFIG.value.model.path:
      paths.check(_CONFIG.value.model.path, "model.path")
  if _CLIP.value:
    paths.check(_CLIP.value, "--clip")
  if _OUT.value:
    paths.check(_OUT.value, "--out", must_exist=False)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from lfs_jax.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  from lfs_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from lfs_jax.lock import WorkdirLocked  # pylint: disable=g-import-not-at-top

  from lfs_jax import console  # pylint: disable=g-import-not-at-top

  console.setup(console.absl_verbosity())
  if not _WORKDIRS.value:
    raise app.UsageError("--workdir is required")
  if _MODE.value == "compare":
    if len(_WORKDIRS.value) < 2:
      raise app.UsageError("--mode=compare needs two or more --workdir")
  elif len(_WORKDIRS.value) > 1:
    raise app.UsageError("--workdir is given once, except for --mode=compare")
  if _CLIP.value and _MODE.value != "evaluate":
    raise app.UsageError("--clip is for --mode=evaluate")
  if _MODE.value == "sample":
    if not _PROMPT.value:
      raise app.UsageError("--mode=sample needs at least one --prompt")
  elif _PROMPT.value:
    raise app.UsageError("--prompt is for --mode=sample")
  if _SESSION.value is not None and _MODE.value not in ("sample", "export"):
    raise app.UsageError("--session is for --mode=sample and --mode=export")
  for flag, mode, also in ((_OUT, "export", ("compare",)), (_FROM, "import", ())):
    if flag.value and _MODE.value != mode and _MODE.value not in also:
      raise app.UsageError(f"--{flag.name} is for --mode={' and --mode='.join((mode,) + also)}")
    if _MODE.value == mode and not flag.value:
      raise app.UsageError(f"--mode={mode} needs --{flag.name}=DIR")
  modes = {"train": _train, "sample": _sample, "export": _export, "import": _import,
           "evaluate": _evaluate, "compare": _compare}
  try:
    from lfs_jax import parallel  # pylint: disable=g-import-not-at-top

    # Before any other JAX call: joins a multi-host job (TPU pod, Slurm, explicit).
    parallel.initialize(_CONFIG.value.distributed)
    _check_storage()
    return modes[_MODE.value]()
  except (ConfigError, ValueError, FileNotFoundError, CheckpointError, WorkdirLocked) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


def run():
  """Console-script entry point (`lfs-jax`)."""
  app.run(main)


if __name__ == "__main__":
  run()
