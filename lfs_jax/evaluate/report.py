"""Evaluation cells -> metrics.json, metrics.csv, report.md and the forgetting plots.

One plot per IA metric: forgetting.png (CLIP, training photos), forgetting_dino.png,
forgetting_ia_heldout.png, forgetting_dino_heldout.png, as computed.

`summarize` is pure (cells in, a JSON-ready dict out); `write_all` writes the files,
each atomically (tmp + rename). Plots use matplotlib's object API with the Agg
canvas (no pyplot state, no display needed).
"""

from __future__ import annotations

import csv
import io
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from lfs_jax import checkpoint
from lfs_jax import paths
from lfs_jax import sample as sample_lib
from lfs_jax.evaluate import metrics

TEXT_METRICS = ("ta", "clipscore")
TITLES = {"ta": "TA (raw CLIP cosine)", "clipscore": "CLIPScore 2.5·max(cos, 0)",
          "ia": "IA, CLIP (training photos)", "ia_heldout": "IA, CLIP (held-out photos)",
          "dino": "IA, DINO (training photos)", "dino_heldout": "IA, DINO (held-out photos)"}
HEADERS = {"ta": "TA", "clipscore": "CLIPScore", "ia": "IA", "ia_heldout": "IA held-out",
           "dino": "DINO", "dino_heldout": "DINO held-out"}
VARIANT_NAMES = {"icgen": "with ICGen", "plain": "without ICGen"}
CSV_FIELDS = ("session", "concept", "token", "class_word", "learned", "variant",
              "num_images")
# The columns each benchmark's published table reports, in its order, under its
# names -> our metric. CustomConcept101: the "Single concept" table of
# customconcept101/README.md (adobe-research/custom-diffusion); its evaluate.py
# computes text alignment as CLIPScore and both image alignments as raw cosines.
# DreamBooth: DINO, CLIP-I, CLIP-T of the DreamBooth paper (Ruiz et al., 2023), all
# raw cosines.
PROTOCOLS = {
    "customconcept101": ("CustomConcept101 (Custom Diffusion's table)",
                         (("Textual-alignment (CLIP)", "clipscore"),
                          ("Image-alignment (CLIP)", "ia"),
                          ("Image-alignment (DINO)", "dino"))),
    "dreambooth": ("DreamBooth (Ruiz et al.)",
                   (("DINO", "dino"), ("CLIP-I", "ia"), ("CLIP-T", "ta"))),
}


def _rescale(st) -> str:
  phi = st.get("sample.guidance_rescale", 0.0)
  return f" (rescale {phi})" if phi else ""


def protocol_columns(protocol: str, computed: Sequence[str]) -> List[Tuple[str, str]]:
  """(published name, our metric) of a protocol's table; IA of held-out photos stands in
  for the training photos' when only held-out references were scored."""
  out = []
  for name, metric in PROTOCOLS[protocol][1]:
    if metric not in computed and f"{metric}_heldout" in computed:
      metric = f"{metric}_heldout"
    out.append((name, metric))
  return out


def _json_num(x) -> Optional[float]:
  x = float(x)
  return None if math.isnan(x) else x


def _nums(a) -> Any:
  """A numpy array as nested lists, NaN -> None (valid JSON)."""
  a = np.asarray(a, np.float64)
  return _json_num(a) if a.ndim == 0 else [_nums(v) for v in a]


def summarize(cells: Sequence[Mapping[str, Any]], registry, sessions: Sequence[int],
              variants: Sequence[str], *, settings: Mapping[str, Any], workdir: str,
              method: str, ia_metrics: Sequence[str] = ("ia",), protocol: str = ""
              ) -> Dict[str, Any]:
  """The accuracy matrices, per-session means and IAD of each variant.

  Args:
    cells: cell records (run_eval.compute_cell) of this evaluation.
    registry: the concepts (rows, in registry order).
    sessions: the evaluated sessions (columns, ascending).
    variants: "icgen" and/or "plain".
    settings, workdir, method: recorded as they are.
    ia_metrics: the IA metrics the cells hold (metrics.ia_name); the first is the
      headline one whose IAD the top-level "iad*" fields carry.
    protocol: "" or a PROTOCOLS key: the published columns report.md leads with.

  Returns:
    metrics.json's dict: "concepts", "sessions", "settings", "metrics", and per
    variant the matrices [J][K] of every metric (null where k < s_j), "per_session"
    means, "final" (the last session's means), "forgetting" (per IA metric: "iad" /
    "iad_rel" per concept and their means) and the headline IA's "iad*" fields.
  """
  names = [c.name for c in registry.concepts]
  learned = [c.session for c in registry.concepts]
  ia_metrics = list(ia_metrics)
  all_metrics = [*TEXT_METRICS, *ia_metrics]
  out = {"workdir": paths.abspath(workdir), "method": method, "settings": dict(settings),
         "sessions": list(sessions), "metrics": all_metrics, "ia_metrics": ia_metrics,
         "protocol": protocol,
         "concepts": [{"name": c.name, "token": c.token, "class_word": c.class_word,
                       "learned": c.session} for c in registry.concepts],
         "variants": {}, "cells": [dict(c) for c in cells]}

  def per_concept(x):
    return dict(zip(names, _nums(x)))

  for v in variants:
    mine = [c for c in cells if c["variant"] == v]
    mats = {m: metrics.accuracy_matrix([(c["concept"], c["session"], c[m]) for c in mine],
                                       names, sessions) for m in all_metrics}
    s = metrics.summary(mats, learned, sessions, ia_metrics)
    forgetting = {m: {"iad": per_concept(f["iad"]), "iad_rel": per_concept(f["iad_rel"]),
                      "iad_mean": _json_num(f["iad_mean"]),
                      "iad_rel_mean": _json_num(f["iad_rel_mean"])}
                  for m, f in s["forgetting"].items()}
    out["variants"][v] = {
        **{m: _nums(mats[m]) for m in all_metrics},
        "per_session": {m: _nums(s["per_session"][m]) for m in all_metrics},
        "final": {m: _json_num(s["final"][m]) for m in all_metrics},
        "forgetting": forgetting, **forgetting[ia_metrics[0]]}
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


def _protocol_section(summary: Mapping[str, Any]) -> List[str]:
  title, _ = PROTOCOLS[summary["protocol"]]
  cols = protocol_columns(summary["protocol"], summary["metrics"])
  rows = [[f"{v} ({VARIANT_NAMES[v]})",
           *(fmt(r["final"][m]) if m in r["final"] else "not computed" for _, m in cols)]
          for v, r in summary["variants"].items()]
  meaning = "; ".join(f"{name} = our `{HEADERS.get(m, m)}` ({TITLES.get(m, m)})"
                      for name, m in cols)
  missing = [name for name, m in cols if m not in summary["metrics"]]
  lines = [f"## Published columns: {title}", "",
           "After the last session, means over all concepts, under the names the "
           f"published table uses: {meaning}.", "",
           table(["variant", *(name for name, _ in cols)], rows), ""]
  if missing:
    lines += [f"Not computed here: {', '.join(missing)} (set eval.image_encoders=both and "
              "eval.dino for DINO).", ""]
  return lines


def markdown(summary: Mapping[str, Any], grids: Sequence[str] = ()) -> str:
  """report.md: the protocol's published columns, the summary, then per variant the
  per-session means and every metric's matrix."""
  ks, concepts = summary["sessions"], summary["concepts"]
  st = summary["settings"]
  ms, ias = summary["metrics"], summary["ia_metrics"]
  dino = f"; DINO `{st['dino']}`" if st.get("dino") else ""
  parts = [f"# Evaluation of {summary['workdir']}", "",
           f"method `{summary['method']}`, sessions {', '.join(map(str, ks))}; "
           f"{st['num_images']} image(s) per prompt, "
           f"{st['num_prompts'] or 'all'} prompt(s) per concept, "
           f"{st['sample.sampler']} {st['sample.steps']} steps (eta {st['sample.eta']}), "
           f"guidance {st['sample.guidance']}{_rescale(st)}, "
           f"ICGen strength {st['icgen.strength']} "
           f"({st['icgen.select']}); CLIP `{st['clip']}`{dino}; image alignment against "
           f"the {st.get('references', 'train')} reference photos.", "",
           "TA: CLIP cosine of image and prompt (modifier token "
           f"{'kept' if st['keep_token'] else 'removed'}); CLIPScore = 2.5·max(cos, 0) "
           "per image (CustomConcept101's scale); IA: mean cosine over all (generated, "
           "reference photo) pairs, by CLIP (IA) or DINO's CLS embedding (DINO), against "
           "the photos the concept was learned from or the held-out ones; IAD = "
           "IA[j, s_j] − IA[j, K] (K = last session), relative in % of IA[j, s_j]. Means "
           "are over the concepts learned so far.", ""]
  if summary.get("protocol"):
    parts += _protocol_section(summary)
  iad_cols = [x for m in ias for x in (f"IAD {HEADERS[m]}", f"IAD {HEADERS[m]} %")]
  parts += ["## Summary after the last session", "",
            table(["variant", *(HEADERS[m] for m in ms), *iad_cols],
                  [[f"{v} ({VARIANT_NAMES[v]})", *(fmt(r["final"][m]) for m in ms),
                    *(x for m in ias for x in (fmt(r["forgetting"][m]["iad_mean"]),
                                               fmt(r["forgetting"][m]["iad_rel_mean"], 2)))]
                   for v, r in summary["variants"].items()]),
            "", *(f"![forgetting curves, {TITLES[m]}]({plot_name(m)})" for m in ias), ""]
  for v, r in summary["variants"].items():
    parts += [f"## {v}: {VARIANT_NAMES[v]}", "", "### Per session (means over the concepts "
              "learned so far)", "",
              table(["after session", "concepts", *(HEADERS[m] for m in ms)],
                    [[k, sum(c["learned"] <= k for c in concepts),
                      *(fmt(r["per_session"][m][i]) for m in ms)]
                     for i, k in enumerate(ks)]), ""]
    for m in [*ias, *TEXT_METRICS]:
      f = r["forgetting"].get(m)
      extra = ["IAD", "IAD %"] if f else []
      rows = []
      for j, c in enumerate(concepts):
        row = [_label(c, code=True), c["learned"], *(fmt(x) for x in r[m][j])]
        if f:
          row += [fmt(f["iad"][c["name"]]), fmt(f["iad_rel"][c["name"]], 2)]
        rows.append(row)
      rows.append(["mean", "", *(fmt(x) for x in r["per_session"][m]),
                   *([fmt(f["iad_mean"]), fmt(f["iad_rel_mean"], 2)] if f else [])])
      parts += [f"### {TITLES[m]}: {m.upper()}[j, k]", "",
                table(["concept", "learned", *(f"after {k}" for k in ks), *extra], rows), ""]
  if grids:
    parts += ["## Sample grids", "", "The first image of every prompt, per cell.", ""]
    parts += [f"- [{g}]({g})" for g in grids]
    parts.append("")
  return "\n".join(parts)


def csv_text(summary: Mapping[str, Any]) -> str:
  """metrics.csv: one row per cell, then every metric."""
  fields = [*CSV_FIELDS, *summary["metrics"]]
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
  w.writeheader()
  for c in summary["cells"]:
    w.writerow({k: c[k] for k in fields})
  return buf.getvalue()


def write_text(path: str, text: str) -> None:
  paths.write_text(path, text)


def save_png(path: str, image: np.ndarray) -> None:
  """Writes a uint8 [H, W, 3] image atomically (process 0 only)."""
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_index() != 0:
    return
  paths.makedirs(os.path.dirname(path))
  paths.write_bytes(path, sample_lib.png_bytes(image))


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
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  paths.write_bytes(path, buf.getvalue())


def plot_name(metric: str) -> str:
  """forgetting.png for CLIP's IA on the training photos, forgetting_<metric>.png else."""
  return "forgetting.png" if metric == "ia" else f"forgetting_{metric}.png"


def forgetting_panels(summary: Mapping[str, Any], metric: str = "ia"
                      ) -> List[Dict[str, Any]]:
  """Per variant: `metric`[j, k] of each concept over the sessions k >= s_j."""
  ks = summary["sessions"]
  panels = []
  for v, r in summary["variants"].items():
    lines = []
    for j, c in enumerate(summary["concepts"]):
      pts = [(k, y) for k, y in zip(ks, r[metric][j]) if y is not None]
      if pts:
        lines.append((_label(c), [p[0] for p in pts], [p[1] for p in pts], "-"))
    panels.append({"title": f"{TITLES[metric]} {VARIANT_NAMES[v]}", "lines": lines})
  return panels


def write_all(out_dir: str, summary: Mapping[str, Any]) -> List[str]:
  """Writes metrics.json, metrics.csv, report.md and a forgetting plot per IA metric;
  returns their paths."""
  paths.makedirs(out_dir)
  grids = [c["grid"] for c in summary["cells"] if c.get("grid")]
  written = [os.path.join(out_dir, n) for n in ("metrics.json", "metrics.csv", "report.md")]
  checkpoint.write_json_atomic(written[0], summary)
  write_text(written[1], csv_text(summary))
  write_text(written[2], markdown(summary, grids))
  for m in summary["ia_metrics"]:
    written.append(os.path.join(out_dir, plot_name(m)))
    plot(written[-1], forgetting_panels(summary, m), HEADERS[m])
  return written
