"""`python -m bench`: the JAX and PyTorch benchmarks side by side, then one table.

Each JAX workload runs in a process of its own, so that its peak device memory is
its own (JAX cannot reset the allocator's peak); PyTorch resets its peak between
workloads and runs them in one process. Every JSON line is echoed as it arrives
and appended to --out, so a run cut short keeps what it measured.

    python -m bench                                  # both, every workload, auto size
    python -m bench --frameworks jax --workloads cd,lfs --jax-flags="--remat dots"
    python -m bench --torch-modes eager,compile --out /tmp/bench.jsonl
    python -m bench --table-only /tmp/bench.jsonl    # re-print a table
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from typing import Dict, List

import bench
from lfs_jax import console

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SHARED = ("size", "batch", "sample_steps", "warmup", "iters", "sample_iters", "seed",
           "verbosity")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--frameworks", default="jax,torch", help="jax, torch or jax,torch")
  p.add_argument("--workloads", default=",".join(bench.WORKLOADS))
  p.add_argument("--torch-modes", default="eager", help="eager, compile or eager,compile")
  p.add_argument("--jax-flags", default="", help="more flags for bench.bench_jax, one string")
  p.add_argument("--no-isolate", action="store_true",
                 help="all JAX workloads in one process (peak memory then accumulates)")
  p.add_argument("--out", default="", help="append the JSON lines to this file")
  p.add_argument("--table-only", default="", metavar="JSONL",
                 help="print the table of an existing JSON-lines file and exit")
  # Passed to both sides.
  p.add_argument("--size", choices=("auto", "full", "tiny"), default="auto")
  p.add_argument("--batch", type=int, default=0)
  p.add_argument("--sample-steps", type=int, default=0)
  p.add_argument("--warmup", type=int, default=-1)
  p.add_argument("--iters", type=int, default=-1)
  p.add_argument("--sample-iters", type=int, default=-1)
  p.add_argument("--seed", type=int, default=0)
  console.add_verbosity(p)
  return p.parse_args(argv)


def _shared_flags(args) -> List[str]:
  out = []
  for name in _SHARED:
    out += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
  return out


def _run_child(cmd: List[str], out_file) -> List[Dict]:
  """Runs one benchmark process; echoes and collects its JSON lines (stderr passes through)."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      filter(None, [_ROOT, os.environ.get("PYTHONPATH", "")])))
  print("+ " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
  records = []
  with subprocess.Popen(cmd, cwd=_ROOT, env=env, stdout=subprocess.PIPE, text=True) as proc:
    for line in proc.stdout:
      line = line.strip()
      if not line.startswith("{"):
        print(line, file=sys.stderr)
        continue
      rec = json.loads(line)
      records.append(rec)
      print(line, flush=True)
      if out_file:
        out_file.write(line + "\n")
        out_file.flush()
  if proc.returncode:
    print(f"! exit status {proc.returncode}: {cmd[2:]}", file=sys.stderr, flush=True)
  return records


def _fmt(v, digits=1) -> str:
  if v is None:
    return "-"
  if isinstance(v, bool):
    return "warm" if v else "cold"
  return f"{v:,.{digits}f}"


def table(records: List[Dict]) -> str:
  """A markdown table of the records (one row each).

  TFLOP/s and MFU of every framework use one FLOP count per workload: PyTorch's
  (FlopCounterMode) where a torch record of that workload and device is in
  `records`, else the record's own. On a GPU, XLA's cost analysis of the compiled
  program misses the convolutions, matmuls and attention that it hands to cuDNN and
  cuBLAS (the H100 run counted under 2 % of the work), so its own count is no base
  for a JAX MFU there.
  """
  common = {(r["workload"], r["device"]): r["flops"] for r in records
            if r["framework"].startswith("torch") and r.get("flops")}
  head = ("| workload | framework | device | batch | px | ms | img/s | peak GiB | compile s "
          "| cache | TFLOP/s | MFU |")
  rows = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
  for r in records:
    flops = common.get((r["workload"], r["device"]), r.get("flops"))
    tflops = flops / (r["ms"] / 1e3) / 1e12 if flops and r.get("ms") else None
    peak = bench.peak_flops(r["device"])
    mfu = f"{100 * tflops * 1e12 / peak:.1f}%" if tflops and peak else "-"
    rows.append(
        f"| {r['workload']} | {r['framework']} | {r['device']} | {r['batch']} | "
        f"{r['resolution']} | {_fmt(r.get('ms'))} | {_fmt(r.get('img_per_s'), 2)} | "
        f"{_fmt(r.get('peak_mem_gib'), 2)} | {_fmt(r.get('compile_s'))} | "
        f"{_fmt(r.get('cache_warm'))} | {_fmt(tflops, 2)} | {mfu} |")
  return "\n".join(rows)


def main(argv=None) -> int:
  args = parse_args(argv)
  console.setup(args.verbosity)
  if args.table_only:
    with open(args.table_only) as f:
      print(table([json.loads(l) for l in f if l.strip().startswith("{")]))
    return 0
  frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
  workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
  bad = [f for f in frameworks if f not in ("jax", "torch")] + [
      w for w in workloads if w not in bench.WORKLOADS]
  if bad:
    raise SystemExit(f"unknown framework(s) or workload(s): {bad}")
  out_file = open(args.out, "a") if args.out else None  # pylint: disable=consider-using-with
  records = []
  try:
    if "jax" in frameworks:
      groups = [workloads] if args.no_isolate else [[w] for w in workloads]
      for group in groups:
        records += _run_child(
            [sys.executable, "-m", "bench.bench_jax", "--workloads", ",".join(group)]
            + _shared_flags(args) + shlex.split(args.jax_flags), out_file)
    torch_workloads = [w for w in workloads if w != "lfs_cached"]
    if "torch" in frameworks and torch_workloads:
      records += _run_child(
          [sys.executable, "-m", "bench.bench_torch", "--workloads", ",".join(torch_workloads),
           "--modes", args.torch_modes] + _shared_flags(args), out_file)
  finally:
    if out_file:
      out_file.close()
  order = {w: i for i, w in enumerate(bench.WORKLOADS)}
  records.sort(key=lambda r: (order.get(r["workload"], 99), r["framework"]))
  print("\n" + table(records), flush=True)
  expected = len(workloads) * ("jax" in frameworks) + len(torch_workloads) * (
      "torch" in frameworks) * len([m for m in args.torch_modes.split(",") if m.strip()])
  return 0 if len(records) == expected else 1


if __name__ == "__main__":
  sys.exit(main())
