"""`--mode=compare`: evaluated runs side by side (e.g. method=lfs vs method=custom_diffusion).

Reads each run's <workdir>/<eval.out>/metrics.json (written by --mode=evaluate) and
writes, in `out_dir` (default: the first run's <eval.out>/compare/):

    compare.md    one table: per run and variant, the last session's TA, CLIPScore,
                  every IA metric (CLIP, DINO; training or held-out photos), the
                  headline IA's IAD and IAD %, then its mean after every session
    compare.csv   the same rows
    compare.json  the same, plus each run's evaluation settings
    compare.png   the mean of TA and of each image alignment over sessions, one line per
                  run and variant
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Dict, List, Optional, Sequence

import jax

from lfs_jax import checkpoint
from lfs_jax import paths as paths_lib
from lfs_jax.errors import EvalError
from lfs_jax.evaluate import report

_STYLES = {"icgen": "-", "plain": "--"}
_ORDER = ("ta", "clipscore", "ia", "ia_heldout", "dino", "dino_heldout")


def metric_names(runs: Sequence[Dict[str, Any]]) -> List[str]:
  """The metrics any run has, in a fixed order (metrics.json from before DINO: TA, IA)."""
  have = set().union(*(m.get("metrics", ("ta", "clipscore", "ia")) for m in runs))
  return [k for k in _ORDER if k in have]


def headline(m: Dict[str, Any]) -> str:
  """The IA metric a run's IAD fields are about (its first IA metric)."""
  return m.get("ia_metrics", ["ia"])[0]


def load_metrics(workdir: str, sub: str = "metrics") -> Dict[str, Any]:
  """A run's metrics.json.

  Raises:
    EvalError: the run was not evaluated (names the file and the command to run).
  """
  path = os.path.join(workdir, sub, "metrics.json")
  if not paths_lib.isfile(path):
    raise EvalError(f"{path} does not exist: evaluate the run first with "
                    f"--mode=evaluate --workdir={workdir} --clip=DIR")
  return json.loads(paths_lib.read_text(path))


def run_names(workdirs: Sequence[str]) -> List[str]:
  """Short distinct names: the folder names, with their parents where two clash."""
  paths = [paths_lib.abspath(w).rstrip(os.sep) for w in workdirs]
  names = [os.path.basename(p) for p in paths]
  if len(set(names)) < len(names):
    names = [os.path.join(os.path.basename(os.path.dirname(p)), n) for p, n in zip(paths, names)]
  if len(set(names)) < len(names):
    names = [f"{n}#{i + 1}" for i, n in enumerate(names)]
  return names


def rows_of(names: Sequence[str], runs: Sequence[Dict[str, Any]], sessions: Sequence[int]
            ) -> List[Dict[str, Any]]:
  """One row per (run, variant): final means, the headline IA's IAD and its mean after
  every session."""
  rows = []
  for name, m in zip(names, runs):
    for v, r in m["variants"].items():
      ia = dict(zip(m["sessions"], r["per_session"][headline(m)]))
      rows.append({"run": name, "method": m["method"], "variant": v,
                   "sessions": len(m["sessions"]), **r["final"], "iad_of": headline(m),
                   "iad": r["iad_mean"], "iad_rel": r["iad_rel_mean"],
                   **{f"ia@{k}": ia.get(k) for k in sessions}})
  return rows


def differences(runs: Sequence[Dict[str, Any]]) -> List[str]:
  """The evaluation settings that are not the same in every run."""
  keys = sorted(set().union(*(m["settings"] for m in runs)))
  return [k for k in keys if len({json.dumps(m["settings"].get(k)) for m in runs}) > 1]


def compare(workdirs: Sequence[str], *, out_dir: Optional[str] = None,
            sub: str = "metrics") -> Dict[str, Any]:
  """Writes compare.{md,csv,json,png} for two or more evaluated runs.

  Args:
    workdirs: the run directories (each evaluated with --mode=evaluate).
    out_dir: where to write (default: <workdirs[0]>/<sub>/compare).
    sub: the runs' results folder (eval.out).

  Returns:
    {"out_dir", "files", "rows", "differences"}.
  """
  if len(workdirs) < 2:
    raise EvalError(f"compare needs two or more runs, got {len(workdirs)}")
  runs = [load_metrics(w, sub) for w in workdirs]
  names = run_names(workdirs)
  sessions = sorted(set().union(*(m["sessions"] for m in runs)))
  rows = rows_of(names, runs, sessions)
  diff = differences(runs)
  out_dir = out_dir or os.path.join(workdirs[0], sub, "compare")
  files = [os.path.join(out_dir, f"compare.{e}") for e in ("md", "csv", "json", "png")]
  result = {"out_dir": out_dir, "files": files, "rows": rows, "differences": diff}
  if jax.process_index() != 0:
    return result
  paths_lib.makedirs(out_dir)

  ms = metric_names(runs)
  header = ["run", "method", "variant", "sessions", *(report.HEADERS[k] for k in ms),
            "IAD of", "IAD", "IAD %", *(f"after {k}" for k in sessions)]
  body = [[r["run"], r["method"], f"{r['variant']} ({report.VARIANT_NAMES[r['variant']]})",
           r["sessions"], *(report.fmt(r.get(k)) for k in ms), report.HEADERS[r["iad_of"]],
           report.fmt(r["iad"]), report.fmt(r["iad_rel"], 2),
           *(report.fmt(r[f"ia@{k}"]) for k in sessions)] for r in rows]
  md = ["# Comparison", "", *(f"- {n}: `{m['workdir']}`" for n, m in zip(names, runs)), "",
        "TA, CLIPScore and each image alignment after each run's last session (means over "
        "its concepts); IAD = mean of IA[j, s_j] − IA[j, K] of the image alignment named "
        "in 'IAD of' (each run's first); then that alignment's mean after every session.", "",
        report.table(header, body), "", "![means over sessions](compare.png)", ""]
  if diff:
    md += ["**The runs were evaluated under different settings:** " +
           ", ".join(f"`{k}`" for k in diff) + " (see compare.json).", ""]
  report.write_text(files[0], "\n".join(md))
  buf = io.StringIO()
  fields = list(dict.fromkeys(k for r in rows for k in r)) or ["run"]
  w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
  w.writeheader()
  w.writerows(rows)
  report.write_text(files[1], buf.getvalue())
  checkpoint.write_json_atomic(files[2], {
      "runs": {n: {"workdir": m["workdir"], "method": m["method"], "settings": m["settings"]}
               for n, m in zip(names, runs)},
      "rows": rows, "differences": diff})
  panels = []
  for metric in [k for k in ms if k not in ("clipscore",)]:
    lines = []
    for name, m in zip(names, runs):
      for v, r in m["variants"].items():
        if metric not in r["per_session"]:
          continue
        pts = [(k, y) for k, y in zip(m["sessions"], r["per_session"][metric]) if y is not None]
        lines.append((f"{name} {v}", [p[0] for p in pts], [p[1] for p in pts], _STYLES[v]))
    panels.append({"title": f"mean {report.HEADERS[metric]}", "lines": lines})
  report.plot(files[3], panels, "mean over concepts", sharey=False)
  return result
