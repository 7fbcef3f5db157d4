"""The mini world: a captioned-shapes world, its shipped base model and oracle, and the
lifelong benchmark on them (docs/mini_world.md)."""

import os
import shutil
import tempfile
from typing import Callable


def write_folder_atomically(out: str, write: Callable[[str], None]) -> None:
  """Calls write(tmp) on a fresh folder beside `out`, then puts it in `out`'s place.

  A failure leaves `out` as it was (nothing half-written).
  """
  out = os.path.abspath(out)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=os.path.dirname(out))
  try:
    write(tmp)
    if os.path.exists(out):
      shutil.rmtree(out)
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
