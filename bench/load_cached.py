"""Times XLA's load of executables from jax's persistent compilation cache, alone.

A warm restart's "compile" is jax reading a cache entry and XLA rebuilding the
executable from it (docs/benchmarks.md, "Restart time"). This probe does only that,
for each entry of a cache folder whose name matches, `--repeat` times in one process,
and prints one JSON line per load: wall and CPU seconds (user and system apart, since
first-touch memory is system time), minor page faults, and the process's peak RSS. The
first load of a process pays for fresh memory; later ones reuse what the first freed.

    python -m bench.load_cached ~/.cache/lfs_jax/bench_xla --match jit_step --repeat 2

The folder is a local one that `python -m bench.bench_jax --compile-cache DIR` (or a
training run's local `train.compile_cache`) filled; a bucket cache is not read here.
Nothing is executed; the loaded executables are dropped.
"""

import argparse
import json
import os
import resource
import sys
import time
from typing import Dict, List, Optional


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m bench.load_cached", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("cache", help="a local jax persistent compilation cache folder")
  p.add_argument("--match", default="", help="only entries whose file name contains this")
  p.add_argument("--repeat", type=int, default=2, help="loads of each entry (>= 1)")
  args = p.parse_args(argv)
  if args.repeat < 1:
    p.error(f"--repeat must be >= 1, got {args.repeat}")
  if not os.path.isdir(args.cache):
    p.error(f"cache folder {args.cache!r} does not exist")
  return args


def entries(folder: str, match: str) -> List[str]:
  """The cache entries (files ending in -cache) in `folder` whose name contains `match`."""
  names = sorted(n for n in os.listdir(folder)
                 if n.endswith("-cache") and match in n
                 and os.path.isfile(os.path.join(folder, n)))
  return [os.path.join(folder, n) for n in names]


def load_entry(path: str, repeat: int) -> List[Dict]:
  """Loads one cache entry `repeat` times; one record per load."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax._src import compilation_cache  # pylint: disable=import-outside-toplevel
  from jax._src.lib import xla_client  # pylint: disable=import-outside-toplevel

  with open(path, "rb") as f:
    raw = f.read()
  t0 = time.perf_counter()
  serialized, _ = compilation_cache.extract_executable_and_time(
      compilation_cache.decompress_executable(raw))
  decompress_s = time.perf_counter() - t0
  backend = jax.devices()[0].client
  devices = xla_client.DeviceList(tuple(jax.devices()[:1]))
  records = []
  for i in range(repeat):
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    exe = backend.deserialize_executable(serialized, devices, None)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    del exe
    records.append({
        "entry": os.path.basename(path), "load": i, "cached_bytes": len(raw),
        "serialized_bytes": len(serialized), "decompress_s": round(decompress_s, 6),
        "load_s": round(wall, 6), "user_s": round(r1.ru_utime - r0.ru_utime, 2),
        "system_s": round(r1.ru_stime - r0.ru_stime, 2),
        "minor_faults": r1.ru_minflt - r0.ru_minflt,
        "max_rss_mib": r1.ru_maxrss // 1024,  # Linux: KiB
    })
  return records


def main(argv: Optional[List[str]] = None) -> int:
  args = parse_args(argv)
  found = entries(args.cache, args.match)
  if not found:
    print(f"no cache entries matching {args.match!r} in {args.cache}", file=sys.stderr)
    return 1
  for path in found:
    for record in load_entry(path, args.repeat):
      print(json.dumps(record), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
