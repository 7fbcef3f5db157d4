"""One console for every entry point: progress bars and one line per event.

Every command (`lfs_jax.main`, `lfs_jax.mini.bench`, `lfs_jax.mini.train_base`,
`lfs_jax.mini.oracle`, `python -m bench`) calls `setup` first thing. At the default
verbosity 0 the libraries underneath (absl, Orbax, JAX, TensorStore, transformers)
show warnings and errors only, and notices a normal run does not need (transformers'
"PyTorch was not found", its advisory warnings) are off; `--verbosity=1` turns their
INFO logs back on.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import List, Optional, Tuple

# Python loggers of the libraries whose INFO lines would drown the progress bars.
_LIBRARIES = ("absl", "jax", "orbax", "tensorstore", "transformers", "diffusers", "PIL",
              "matplotlib")


def setup(verbosity: int = 0) -> None:
  """Sets the console of a command.

  Args:
    verbosity: 0 = library warnings and errors only; >= 1 = their INFO lines too.
  """
  verbose = verbosity >= 1
  # Read by transformers at import (and by XLA's C++ logging): set before both load.
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "0" if verbose else "1")
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info" if verbose else "error")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "1")
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
  level = logging.INFO if verbose else logging.WARNING
  for name in _LIBRARIES:
    logging.getLogger(name).setLevel(level)
  if "transformers" in sys.modules:  # imported already: its own switch as well
    sys.modules["transformers"].utils.logging.set_verbosity(level)


def absl_verbosity() -> int:
  """The --verbosity of an absl command, 0 unless given on the command line.

  absl's own default (0, its INFO) would show every library's INFO lines.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top

  flag = flags.FLAGS["verbosity"]
  return int(flag.value) if flag.present else 0


def add_verbosity(parser) -> None:
  """The --verbosity option of an argparse command."""
  parser.add_argument("--verbosity", type=int, default=0,
                      help="1: show the libraries' INFO logs (default 0: warnings only)")


class Clock:
  """Wall-clock phases of a command from its start, summed up in one line.

  `mark(name)` closes the phase `name` now; `mark(name, seconds)` records a phase
  measured elsewhere (e.g. tracing inside a compile) and moves the clock by that
  much, so the next mark gets the rest.
  """

  def __init__(self, start: Optional[float] = None):
    self.start = time.perf_counter() if start is None else start
    self._last = self.start
    self.phases: List[Tuple[str, float, str]] = []

  def mark(self, name: str, seconds: Optional[float] = None, note: str = "") -> None:
    if seconds is None:
      seconds = time.perf_counter() - self._last
    self._last += seconds
    self.phases.append((name, seconds, note))

  def line(self, what: str) -> str:
    """`what: 41.3 s = imports 3.2 + base load 5.1 + tracing 12.3 (...) + ...`."""
    parts = [f"{name} {s:.1f}" + (f" ({note})" if note else "") for name, s, note in self.phases]
    return f"{what}: {self._last - self.start:.1f} s = " + " + ".join(parts)
