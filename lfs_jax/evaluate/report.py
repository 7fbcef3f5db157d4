"""Evaluation cells -> metrics.json, metrics.csv, report.md and forgetting.png.

`summarize` is pure (cells in, a JSON-ready dict out); `write_all` writes the files,
each atomically (tmp + rename). Plots use matplotlib's object API with the Agg
canvas (no pyplot state, no display needed).
"""

from __future__ import annotations

import csv
import io
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from lfs_jax import checkpoint
from lfs_jax.evaluate import metrics

METRICS = ("ta", "clipscore", "ia")
TITLES = {"ta": "TA (raw cosine)", "clipscore": "CLIPScore 2.5·max(cos, 0)",
          "ia": "IA (mean image-image cosine)"}
VARIANT_NAMES = {"icgen": "with ICGen", "plain": "without ICGen"}
CSV_FIELDS = ("session", "concept", "token", "class_word", "learned", "variant",
              "num_images", "ta", "clipscore", "ia")


def _json_num(x) -> Optional[float]:
  x = float(x)
  return None if math.isnan(x) else x


def _nums(a) -> Any:
  """A numpy array as nested lists, NaN -> None (valid JSON)."""
  a = np.asarray(a, np.float64)
  return _json_num(a) if a.ndim == 0 else [_nums(v) for v in a]


def summarize(cells: Sequence[Mapping[str, Any]], registry, sessions: Sequence[int],
              variants: Sequence[str], *, settings: Mapping[str, Any], workdir: str,
              method: str) -> Dict[str, Any]:
  """The accuracy matrices, per-session means and IAD of each variant.

  Args:
    cells: cell records (run_eval.compute_cell) of this evaluation.
    registry: the concepts (rows, in registry order).
    sessions: the evaluated sessions (columns, ascending).
    variants: "icgen" and/or "plain".
    settings, workdir, method: recorded as they are.

  Returns:
    metrics.json's dict: "concepts", "sessions", "settings", and per variant the
    matrices [J][K] (null where k < s_j), "per_session" means, "final" (the last
    session's means), "iad" / "iad_rel" per concept and their means.
  """
  names = [c.name for c in registry.concepts]
  learned = [c.session for c in registry.concepts]
  out = {"workdir": os.path.abspath(workdir), "method": method, "settings": dict(settings),
         "sessions": list(sessions),
         "concepts": [{"name": c.name, "token": c.token, "class_word": c.class_word,
                       "learned": c.session} for c in registry.concepts],
         "variants": {}, "cells": [dict(c) for c in cells]}
  for v in variants:
    mine = [c for c in cells if c["variant"] == v]
    mats = {m: metrics.accuracy_matrix([(c["concept"], c["session"], c[m]) for c in mine],
                                       names, sessions) for m in METRICS}
    s = metrics.summary(mats, learned, sessions)
    out["variants"][v] = {
        **{m: _nums(mats[m]) for m in METRICS},
        "per_session": {m: _nums(s["per_session"][m]) for m in METRICS},
        "final": {m: _json_num(s["final"][m]) for m in METRICS},
        "iad": dict(zip(names, _nums(s["iad"]))),
        "iad_rel": dict(zip(names, _nums(s["iad_rel"]))),
        "iad_mean": _json_num(s["iad_mean"]), "iad_rel_mean": _json_num(s["iad_rel_mean"])}
  return out


def fmt(x, digits: int = 4) -> str:
  return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A markdown table."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _label(c: Mapping[str, Any], code: bool = False) -> str:
  """"dog (<c1> dog)"; in markdown the phrase goes in backticks, or "<c1>" reads as HTML."""
  phrase = f"{c['token']} {c['class_word']}"
  return f"{c['name']} ({f'`{phrase}`' if code else phrase})"


def markdown(summary: Mapping[str, Any], grids: Sequence[str] = ()) -> str:
  """report.md: the summary table, then per variant the IA / TA / CLIPScore matrices."""
  ks, concepts = summary["sessions"], summary["concepts"]
  st = summary["settings"]
  parts = [f"# Evaluation of {summary['workdir']}", "",
           f"method `{summary['method']}`, sessions {', '.join(map(str, ks))}; "
           f"{st['num_images']} image(s) per prompt, "
           f"{st['num_prompts'] or 'all'} prompt(s) per concept, "
           f"{st['sample.sampler']} {st['sample.steps']} steps, guidance "
           f"{st['sample.guidance']}, ICGen strength {st['icgen.strength']} "
           f"({st['icgen.select']}); CLIP `{st['clip']}`.", "",
           "TA: CLIP cosine of image and prompt (modifier token "
           f"{'kept' if st['keep_token'] else 'removed'}); CLIPScore = 2.5·max(cos, 0) "
           "per image (CustomConcept101's scale); IA: mean cosine over all (generated, "
           "reference photo) pairs; IAD = IA[j, s_j] − IA[j, K] (K = last session), "
           "relative in % of IA[j, s_j]. Means are over the concepts learned so far.", "",
           "## Summary after the last session", "",
           table(["variant", "TA", "CLIPScore", "IA", "IAD", "IAD %"],
                 [[f"{v} ({VARIANT_NAMES[v]})", fmt(r["final"]["ta"]),
                   fmt(r["final"]["clipscore"]), fmt(r["final"]["ia"]), fmt(r["iad_mean"]),
                   fmt(r["iad_rel_mean"], 2)] for v, r in summary["variants"].items()]),
           "", "![forgetting curves](forgetting.png)", ""]
  for v, r in summary["variants"].items():
    parts += [f"## {v}: {VARIANT_NAMES[v]}", "", "### Per session (means over the concepts "
              "learned so far)", "",
              table(["after session", "concepts", "TA", "CLIPScore", "IA"],
                    [[k, sum(c["learned"] <= k for c in concepts),
                      *(fmt(r["per_session"][m][i]) for m in METRICS)]
                     for i, k in enumerate(ks)]), ""]
    for m in ("ia", "ta", "clipscore"):
      extra = ["IAD", "IAD %"] if m == "ia" else []
      rows = []
      for j, c in enumerate(concepts):
        row = [_label(c, code=True), c["learned"], *(fmt(x) for x in r[m][j])]
        if m == "ia":
          row += [fmt(r["iad"][c["name"]]), fmt(r["iad_rel"][c["name"]], 2)]
        rows.append(row)
      rows.append(["mean", "", *(fmt(x) for x in r["per_session"][m]),
                   *([fmt(r["iad_mean"]), fmt(r["iad_rel_mean"], 2)] if m == "ia" else [])])
      parts += [f"### {TITLES[m]}: {m.upper()}[j, k]", "",
                table(["concept", "learned", *(f"after {k}" for k in ks), *extra], rows), ""]
  if grids:
    parts += ["## Sample grids", "", "The first image of every prompt, per cell.", ""]
    parts += [f"- [{g}]({g})" for g in grids]
    parts.append("")
  return "\n".join(parts)


def csv_text(summary: Mapping[str, Any]) -> str:
  """metrics.csv: one row per cell."""
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
  w.writeheader()
  for c in summary["cells"]:
    w.writerow({k: c[k] for k in CSV_FIELDS})
  return buf.getvalue()


def write_text(path: str, text: str) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def save_png(path: str, image: np.ndarray) -> None:
  """Writes a uint8 [H, W, 3] image atomically (process 0 only)."""
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp"
  Image.fromarray(image).save(tmp, format="PNG")
  os.replace(tmp, path)


def plot(path: str, panels: Sequence[Dict[str, Any]], ylabel: str, sharey: bool = True
         ) -> None:
  """Line plots side by side, one panel per dict {"title", "lines": [(label, xs, ys, style)]}."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=(5 * len(panels), 4), layout="constrained")
  axes = fig.subplots(1, len(panels), sharey=sharey, squeeze=False)[0]
  for ax, panel in zip(axes, panels):
    for label, xs, ys, style in panel["lines"]:
      ax.plot(xs, ys, style, label=label, marker="o")
    ax.set_title(panel["title"])
    ax.set_xlabel("after session")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    if panel["lines"]:
      ax.legend(fontsize="small")
  axes[0].set_ylabel(ylabel)
  tmp = f"{path}.tmp.png"
  fig.savefig(tmp, dpi=100)
  os.replace(tmp, path)


def forgetting_panels(summary: Mapping[str, Any]) -> List[Dict[str, Any]]:
  """Per variant: IA[j, k] of each concept over the sessions k >= s_j."""
  ks = summary["sessions"]
  panels = []
  for v, r in summary["variants"].items():
    lines = []
    for j, c in enumerate(summary["concepts"]):
      pts = [(k, y) for k, y in zip(ks, r["ia"][j]) if y is not None]
      if pts:
        lines.append((_label(c), [p[0] for p in pts], [p[1] for p in pts], "-"))
    panels.append({"title": f"IA {VARIANT_NAMES[v]}", "lines": lines})
  return panels


def write_all(out_dir: str, summary: Mapping[str, Any]) -> List[str]:
  """Writes metrics.json, metrics.csv, report.md and forgetting.png; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  grids = [c["grid"] for c in summary["cells"] if c.get("grid")]
  paths = [os.path.join(out_dir, n) for n in
           ("metrics.json", "metrics.csv", "report.md", "forgetting.png")]
  checkpoint.write_json_atomic(paths[0], summary)
  write_text(paths[1], csv_text(summary))
  write_text(paths[2], markdown(summary, grids))
  plot(paths[3], forgetting_panels(summary), "IA")
  return paths
