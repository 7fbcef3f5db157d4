"""Command line: `python -m lfs_jax.main --config=configs/tiny.py --workdir=DIR`.

Modes:
  train (default)  runs every session of the config that the run directory has not
                   finished yet.
  sample           `--prompt=... [--prompt=...] [--session=K]`: images from a
                   finished session (the latest by default) into DIR/samples/. The
                   run's own config.json is the config; only --config.sample.* and
                   --config.icgen.* (and machine settings) may be overridden.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "tiny.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "ml_collections config file (configs/*.py[:arg]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample"], "What to do.")
_RESUME = flags.DEFINE_bool("resume", False, "Continue the run in --workdir.")
_SESSION = flags.DEFINE_integer("session", None,
                                "sample: session to sample from (default: the latest finished).")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "sample: a prompt (repeat the flag for more).")


def _train():
  from lfs_jax.train import session  # pylint: disable=g-import-not-at-top

  try:
    results = session.run(_CONFIG.value, _WORKDIR.value, resume=_RESUME.value)
  except session.Preempted as e:
    print(f"preempted: {e}; continue with --resume", file=sys.stderr)
    return 0
  for r in results:
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in r.items()))
  print(f"run directory: {os.path.abspath(_WORKDIR.value)}")
  return 0


def _sample():
  from lfs_jax import sample  # pylint: disable=g-import-not-at-top

  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  run, paths = sample.sample_run(_WORKDIR.value, _PROMPT.value, session=_SESSION.value,
                                 overrides=overrides)
  print(f"session {run.session}: {len(paths)} files in "
        f"{os.path.dirname(os.path.abspath(paths[0])) if paths else '-'}")
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from lfs_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.WARNING)  # Orbax is chatty at INFO
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  if _MODE.value == "sample":
    if not _PROMPT.value:
      raise app.UsageError("--mode=sample needs at least one --prompt")
  elif _PROMPT.value or _SESSION.value is not None:
    raise app.UsageError("--prompt and --session are for --mode=sample")
  try:
    return _sample() if _MODE.value == "sample" else _train()
  except (ConfigError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


def run():
  """Console-script entry point (`lfs-jax`)."""
  app.run(main)


if __name__ == "__main__":
  run()
