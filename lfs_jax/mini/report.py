"""The mini benchmark's outputs: tables (mean ± std over seeds), the goal, plots, samples.

Every function takes `per_seed`: one {variant: summary} per seed (bench._summary),
and `bases`: each seed's base class-prompt accuracy. With one seed the numbers are
printed plain; with several, "mean±std" (sample std, ddof 1) beside every number, and
the goal is judged on the means.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

Summaries = Dict[str, Dict[str, Any]]

# The goal of issue 17 (judged on means over seeds).
LEARNS_ACC = 0.8           # custom_diffusion's concept accuracy right after its session ...
LEARNS_NIA = 0.8           # ... and its normalised IA then, at least these (item 1)
CD_FORGETS_NIAD = 0.2      # custom_diffusion's mean normalised IAD at least this ...
MIN_SESSIONS = 6           # ... over at least this many sessions
KEEPS_IAD_SHARE = 0.25     # a method's nIAD at most this share of custom_diffusion's
KEEPS_NIA_SHARE = 0.8      # its final nIA at least this share of separate's
KEEPS_CLASS_DROP = 0.03    # its final class-prompt accuracy at most this below the base
NOT_JUDGED = ("custom_diffusion", "separate", "separate+icgen")
# The oracle heads a concept sample must all read right (oracle.head_hits), as printed.
CONCEPT_HEADS = ("shape", "colour", "pattern", "colour2")
HEAD_NAMES = ("shape", "colour", "pattern", "second colour")

# Printed columns: (summary key, header, sign shown).
COLUMNS = (("ia_final", "IA", False), ("ia_photos_final", "IA photos", False),
           ("nia_own", "nIA own", False), ("nia_final", "nIA", False),
           ("niad_mean", "nIAD", False), ("concept_accuracy_own", "acc own", False),
           ("concept_accuracy_final", "acc", False), ("class_accuracy_final", "class acc", False),
           ("class_accuracy_drop", "drop", True))


def stats(values: Sequence[float]) -> Tuple[float, float]:
  """(mean, sample std with ddof 1; 0 for a single value)."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def fmt(values: Sequence[float], sign: bool = False) -> str:
  """"0.123" for one value, "0.123±0.045" for several."""
  mean, std = stats(values)
  head = f"{mean:+.3f}" if sign else f"{mean:.3f}"
  return head if len(values) == 1 else f"{head}±{std:.3f}"


def means(per_seed: Sequence[Summaries], bases: Sequence[float]) -> Dict[str, Dict[str, float]]:
  """variant -> {column key: mean over seeds}; "base" -> {"class_accuracy_final": ...}."""
  out = {v: {k: stats([s[v][k] for s in per_seed])[0] for k, _, _ in COLUMNS}
         for v in per_seed[0]}
  out["base"] = {"class_accuracy_final": stats(bases)[0]}
  return out


def _mark(ok: bool) -> str:
  return "met" if ok else "NOT met"


def goal_lines(per_seed: Sequence[Summaries], bases: Sequence[float],
               n_sessions: int) -> List[str]:
  """Issue 17's goal on the means over seeds: does custom_diffusion learn each concept
  in its session (item 1), does it forget, and which variants keep (each condition,
  then the verdict, one line a variant)."""
  m = means(per_seed, bases)
  n = f"{len(per_seed)} seed{'s' if len(per_seed) > 1 else ''}"
  cd = m.get("custom_diffusion")
  lines = []
  if cd is None:
    lines.append("goal: custom_diffusion not run, so 'CD learns' and 'CD forgets' cannot be judged")
  else:
    ok = cd["concept_accuracy_own"] >= LEARNS_ACC and cd["nia_own"] >= LEARNS_NIA
    lines.append(f"CD learns: acc own {cd['concept_accuracy_own']:.3f} >= {LEARNS_ACC} and "
                 f"nIA own {cd['nia_own']:.3f} >= {LEARNS_NIA}, {n}: {_mark(ok)}")
    ok = cd["niad_mean"] >= CD_FORGETS_NIAD and n_sessions >= MIN_SESSIONS
    lines.append(f"CD forgets: mean nIAD(custom_diffusion) {cd['niad_mean']:.3f} >= "
                 f"{CD_FORGETS_NIAD} over {n_sessions} sessions (>= {MIN_SESSIONS}), {n}: "
                 f"{_mark(ok)}")
  for v in per_seed[0]:
    if v in NOT_JUDGED:
      continue
    s = m[v]
    # an ICGen variant against separate+icgen where that ran (both copy from the photos)
    icgen = per_seed[0][v].get("icgen", False)
    ref = "separate+icgen" if icgen and "separate+icgen" in m else "separate"
    parts = []
    verdict = True
    if cd is not None:
      ok = s["niad_mean"] <= KEEPS_IAD_SHARE * cd["niad_mean"]
      parts.append(f"nIAD {s['niad_mean']:.3f} <= {KEEPS_IAD_SHARE:.0%} of CD's "
                   f"{cd['niad_mean']:.3f}: {_mark(ok)}")
      verdict &= ok
    else:
      verdict = False
    if ref in m:
      ok = s["nia_final"] >= KEEPS_NIA_SHARE * m[ref]["nia_final"]
      parts.append(f"final nIA {s['nia_final']:.3f} >= {KEEPS_NIA_SHARE} x {ref}'s "
                   f"{m[ref]['nia_final']:.3f}: {_mark(ok)}")
      verdict &= ok
    else:
      parts.append("final nIA vs separate: not judged (separate not run)")
      verdict = False
    ok = s["class_accuracy_drop"] <= KEEPS_CLASS_DROP
    parts.append(f"class acc within {KEEPS_CLASS_DROP * 100:.0f} points of the base "
                 f"({-s['class_accuracy_drop']:+.3f}): {_mark(ok)}")
    verdict &= ok
    lines.append(f"{v} keeps: " + "; ".join(parts) + f" => {_mark(verdict)}")
  return lines


def table(per_seed: Sequence[Summaries], bases: Sequence[float], n_sessions: int) -> str:
  """The printed table and the goal. IA is against held-out renders of each concept (IA
  photos: against its training photos); nIA normalised by the floor and ceiling; "own" =
  right after the concept's own session (plasticity), "final" = after the last."""
  several = len(per_seed) > 1
  w = 14 if several else 10
  name_w = max(18, 2 + max(len(v) for v in per_seed[0]))
  head = f"{'variant':<{name_w}}" + "".join(f"{h:>{w}}" for _, h, _ in COLUMNS)
  rows = [head, "-" * len(head)]
  for v in per_seed[0]:
    rows.append(f"{v:<{name_w}}" + "".join(
        f"{fmt([s[v][k] for s in per_seed], sign):>{w}}" for k, _, sign in COLUMNS))
  rows.append(f"{'base model':<{name_w}}" + " " * (w * (len(COLUMNS) - 2))
              + f"{fmt(bases):>{w}}")
  if several:
    rows.append(f"(mean±std over {len(per_seed)} seeds, std with ddof 1)")
  return "\n".join(rows + goal_lines(per_seed, bases, n_sessions))


def plots(path: str, per_seed: Sequence[Summaries], bases: Sequence[float]) -> None:
  """Mean IA, concept accuracy and class-prompt accuracy per session (integer ticks;
  with several seeds the mean and a ±std bar)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  ks = sorted(per_seed[0][next(iter(per_seed[0]))]["class_accuracy"])

  def curve(s, key, k):
    if key == "class_accuracy":
      return s["class_accuracy"][k]
    return float(np.mean([m[k] for m in s[key].values() if k in m]))

  for v in per_seed[0]:
    for ax, key in zip(axes, ("ia_matrix", "accuracy_matrix", "class_accuracy")):
      got = np.array([[curve(s[v], key, k) for k in ks] for s in per_seed])
      err = got.std(0, ddof=1) if len(got) > 1 else None
      ax.errorbar(ks, got.mean(0), yerr=err, marker="o", capsize=3, label=v)
  axes[2].axhline(float(np.mean(bases)), color="gray", ls="--", label="base")
  seeds = f" ({len(per_seed)} seeds, mean ± std)" if len(per_seed) > 1 else ""
  for ax, title in zip(axes, ("mean IA of learned concepts", "concept accuracy (oracle)",
                              "class-prompt accuracy")):
    ax.set_title(title + seeds, fontsize=10)
    ax.set_xlabel("session")
    ax.set_xticks(ks)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def samples_png(path: str, header: List[str], rows: List[Tuple[str, List[np.ndarray]]]) -> None:
  """A header of column labels, then one labelled row of tiles per variant (3x upscaled)."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top

  tile, head_h = 96, 18
  label_w = max(130, 7 * max(len(label) for label, _ in rows) + 8)
  width = label_w + tile * max(len(t) for _, t in rows)
  canvas = Image.new("RGB", (width, head_h + tile * len(rows)), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for i, text in enumerate(header):
    draw.text((label_w + i * tile + 2, 3), text[:15], fill=(0, 0, 0))
  for r, (label, tiles) in enumerate(rows):
    draw.text((4, head_h + r * tile + tile // 2 - 6), label, fill=(0, 0, 0))
    for i, t in enumerate(tiles):
      canvas.paste(Image.fromarray(t).resize((tile, tile), Image.NEAREST),
                   (label_w + i * tile, head_h + r * tile))
  canvas.save(path)


def heads_table(per_seed: Sequence[Summaries]) -> List[str]:
  """Markdown lines: per variant, the share of a concept's samples right after its own
  session that each oracle head reads right ("acc own" needs all four at once); []
  where the evaluations predate the per-head record."""
  have = [v for v in per_seed[0] if all(s[v].get("heads_own") for s in per_seed)]
  if not have:
    return []
  lines = ["", "Right after its own session, the share of a concept's samples each oracle "
           "head reads right (acc own needs all four in one sample):", "",
           "| variant | acc own | " + " | ".join(HEAD_NAMES) + " |",
           "|---|---|" + "---|" * len(HEAD_NAMES)]
  for v in have:
    lines.append(f"| {v} | " + fmt([s[v]["concept_accuracy_own"] for s in per_seed]) + " | "
                 + " | ".join(fmt([s[v]["heads_own"][h] for s in per_seed])
                              for h in CONCEPT_HEADS) + " |")
  return lines


def markdown(per_seed: Sequence[Summaries], bases: Sequence[float], seeds: Sequence[int],
             names: Sequence[str], sessions_of: Dict[str, int], cfg,
             timings: Dict[str, float]) -> str:
  """report.md: the settings, the table (mean ± std), the goal and, per variant, the IA
  matrix (mean over seeds) with concept accuracy in brackets."""
  several = len(per_seed) > 1
  n_sessions = max(sessions_of.values())
  lines = ["# Mini-world lifelong benchmark", "",
           f"Sessions: `{cfg.data.sessions}`; {cfg.train.steps} steps per session; "
           f"sampler {cfg.sample.sampler} {cfg.sample.steps} steps, guidance "
           f"{cfg.sample.guidance}" + (f" (rescale {cfg.sample.guidance_rescale})"
                                         if cfg.sample.guidance_rescale else "")
           + f"; ICGen strength {cfg.icgen.strength}; "
           f"DFKD weight {cfg.kd.weight}, mode {cfg.kd.mode}, T_tau {cfg.kd.steps}; "
           f"K/V anchor weight {cfg.kd.kv_weight} (the +kv variants and anchor only); "
           f"prior preservation weight {cfg.prior.weight}, {cfg.prior.count} class images "
           f"of '{cfg.prior.template}' (the +prior variants only); seeds "
           f"{', '.join(map(str, seeds))}" + (" (mean±std, ddof 1)" if several else "") + ".",
           "",
           "IA is scored against fresh renders of each concept's design that neither "
           "training nor ICGen saw; IA photos against the concept's training photos (the "
           "ICGen context). nIA = (IA - floor) / (ceiling - floor), floor = the base's "
           "class-prompt samples, ceiling = other fresh renders, both against the same "
           "references. \"own\" = right after the concept's own session.", "",
           "| variant | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
           "|---|" + "---|" * len(COLUMNS)]
  for v in per_seed[0]:
    lines.append(f"| {v} | " + " | ".join(
        fmt([s[v][k] for s in per_seed], sign) for k, _, sign in COLUMNS) + " |")
  lines.append("| base model | " + " | " * (len(COLUMNS) - 2) + fmt(bases) + " | |")
  lines += [""] + [f"- {line}" for line in goal_lines(per_seed, bases, n_sessions)]
  lines += heads_table(per_seed)
  for v in per_seed[0]:
    ks = sorted(per_seed[0][v]["class_accuracy"])
    lines += ["", f"## {v}: IA[concept, session] (concept accuracy in brackets)"
              + (", means over seeds" if several else ""), "",
              "| concept (session) | " + " | ".join(f"s{k}" for k in ks) + " | IAD |",
              "|---|" + "---|" * (len(ks) + 1)]
    for n in names:
      cells = [f"{np.mean([s[v]['ia_matrix'][n][k] for s in per_seed]):.3f} "
               f"({np.mean([s[v]['accuracy_matrix'][n][k] for s in per_seed]):.2f})"
               if k in per_seed[0][v]["ia_matrix"][n] else "" for k in ks]
      iad = [s[v]["iad"][n] for s in per_seed if n in s[v]["iad"]]
      lines.append(f"| {n} ({sessions_of[n]}) | " + " | ".join(cells) + " | "
                   + (fmt(iad) if iad else "-") + " |")
    for key in ("accuracy", "shape", "colour"):
      lines.append(f"| class {key} | " + " | ".join(
          fmt([s[v]["class_" + key][k] for s in per_seed]) for k in ks) + " | |")
  lines += ["", "Wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()), ""]
  return "\n".join(lines)
