"""The numbers of DESIGN 1.3 as plain NumPy on CLIP embeddings (no JAX, no files).

  TA         text alignment: cosine between a generated image's CLIP embedding and
             its prompt's (modifier token removed), averaged over images.
  CLIPScore  2.5 * max(cos, 0) per image, then averaged: the scale of Hessel et al.
             (2021) that CustomConcept101's evaluate.py reports as "text alignment".
  IA         image alignment: mean cosine over every (generated, reference photo) pair,
             by an image encoder (CLIP's image tower, or DINO's CLS embedding), against
             a set of reference photos (the training photos, or held-out ones):
             "ia" (CLIP, training photos), "ia_heldout", "dino", "dino_heldout".
  IA[j, k]   the accuracy matrix: IA of concept j after session k (k >= s_j, the
             session that learned j); NaN before s_j. TA[j, k] likewise.
  IAD_j      IA[j, s_j] - IA[j, K], K the last session: how much of j was forgotten;
             relative: 100 * IAD_j / |IA[j, s_j]| (in %). Undefined (NaN) for concepts
             of session K itself; IAD is the mean over the others.

Embeddings may come unnormalised; every cosine normalises them in float64.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence, Tuple

import numpy as np

CLIPSCORE_SCALE = 2.5


def ia_name(encoder: str, references: str) -> str:
  """The IA metric of an encoder ("clip", "dino") and reference set ("train", "heldout")."""
  base = {"clip": "ia", "dino": "dino"}[encoder]
  return base if references == "train" else f"{base}_{references}"


def unit(x) -> np.ndarray:
  """Rows scaled to unit length, float64 [N, D]; a zero row is an error."""
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f"expected embeddings [N, D], got shape {x.shape}")
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  if np.any(norm == 0):
    raise ValueError("an embedding of zero length has no direction")
  return x / norm


def cosine_matrix(a, b) -> np.ndarray:
  """Cosines of every pair: [N, D] x [M, D] -> [N, M]."""
  return unit(a) @ unit(b).T


def paired_cosine(a, b) -> np.ndarray:
  """Cosine of row i of `a` with row i of `b`: [N, D] x [N, D] -> [N]."""
  a, b = unit(a), unit(b)
  if a.shape != b.shape:
    raise ValueError(f"paired embeddings need equal shapes, got {a.shape} and {b.shape}")
  return np.sum(a * b, axis=-1)


def clipscore(cos, scale: float = CLIPSCORE_SCALE) -> np.ndarray:
  """CLIPScore of cosines: scale * max(cos, 0), elementwise."""
  return scale * np.maximum(np.asarray(cos, np.float64), 0.0)


def text_alignment(images, texts) -> Tuple[float, float]:
  """(TA, CLIPScore): image i [N, D] against its prompt's text embedding i [N, D]."""
  cos = paired_cosine(images, texts)
  return float(cos.mean()), float(clipscore(cos).mean())


def image_alignment(generated, reference) -> float:
  """IA: the mean cosine over all pairs of generated [N, D] and reference [M, D] images."""
  return float(cosine_matrix(generated, reference).mean())


def strip_tokens(text: str, pattern: re.Pattern) -> str:
  """"photo of a <c1> dog" -> "photo of a dog": modifier tokens out, spaces collapsed."""
  return " ".join(pattern.sub(" ", text).split())


def accuracy_matrix(values: Iterable[Tuple[str, int, float]], concepts: Sequence[str],
                    sessions: Sequence[int]) -> np.ndarray:
  """(concept, session, value) triples -> [len(concepts), len(sessions)], NaN where absent.

  A value of None (a concept without reference photos has no IA) stays NaN.

  Raises:
    ValueError: a triple naming an unknown concept or session, or given twice.
  """
  rows = {c: i for i, c in enumerate(concepts)}
  cols = {k: i for i, k in enumerate(sessions)}
  out = np.full((len(concepts), len(sessions)), np.nan)
  seen = set()
  for concept, session, value in values:
    if concept not in rows or session not in cols:
      raise ValueError(f"value for concept {concept!r} after session {session} is outside "
                       f"the matrix (concepts {list(concepts)}, sessions {list(sessions)})")
    if (concept, session) in seen:
      raise ValueError(f"two values for concept {concept!r} after session {session}")
    seen.add((concept, session))
    out[rows[concept], cols[session]] = np.nan if value is None else value
  return out


def iad(matrix, learned: Sequence[int], sessions: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
  """Forgetting per concept: IAD_j and its relative form in %.

  Args:
    matrix: IA [J, K] (accuracy_matrix), columns in the order of `sessions`.
    learned: [J] the session s_j that learned each concept.
    sessions: [K] the session of each column, ascending; the last is K.

  Returns:
    (IAD [J], relative IAD [J] in %), NaN for concepts learned in the last session or
    with a missing IA[j, s_j] / IA[j, K] (and relative NaN where IA[j, s_j] is 0).
  """
  m = np.asarray(matrix, np.float64)
  sessions = list(sessions)
  if m.shape != (len(learned), len(sessions)):
    raise ValueError(f"matrix shape {m.shape} does not match {len(learned)} concepts and "
                     f"{len(sessions)} sessions")
  drop = np.full(len(learned), np.nan)
  rel = np.full(len(learned), np.nan)
  last = sessions[-1] if sessions else None
  for j, s in enumerate(learned):
    if s == last or s not in sessions:
      continue
    first, final = m[j, sessions.index(s)], m[j, -1]
    drop[j] = first - final
    if first != 0:
      rel[j] = 100.0 * drop[j] / abs(first)
  return drop, rel


def nanmean(x) -> float:
  """Mean of the defined entries; NaN when none is (no warning)."""
  x = np.asarray(x, np.float64)
  x = x[~np.isnan(x)]
  return float(x.mean()) if x.size else float("nan")


def column_means(matrix) -> np.ndarray:
  """[J, K] -> [K]: per session, the mean over the concepts it has a value for."""
  m = np.asarray(matrix, np.float64)
  return np.array([nanmean(m[:, k]) for k in range(m.shape[1])])


def summary(matrices: Mapping[str, np.ndarray], learned: Sequence[int],
            sessions: Sequence[int], ia_metrics: Sequence[str] = ("ia",)) -> dict:
  """Per-session means of each matrix and the forgetting (IAD) of each IA matrix.

  Args:
    matrices: name ("ta", "clipscore", and the IA metrics) -> [J, K].
    learned: [J] sessions that learned the concepts.
    sessions: [K] ascending sessions of the columns.
    ia_metrics: the names of the IA matrices; the first is the headline one.

  Returns:
    {"per_session": {name: [K] means}, "final": {name: mean of the last column},
     "forgetting": {IA name: {"iad": [J], "iad_rel": [J], "iad_mean", "iad_rel_mean"}},
     and the headline IA metric's "iad", "iad_rel", "iad_mean", "iad_rel_mean"}.
  """
  means = {name: column_means(m) for name, m in matrices.items()}
  forgetting = {}
  for name in ia_metrics:
    drop, rel = iad(matrices[name], learned, sessions)
    forgetting[name] = {"iad": drop, "iad_rel": rel, "iad_mean": nanmean(drop),
                        "iad_rel_mean": nanmean(rel)}
  return {"per_session": means,
          "final": {name: (float(v[-1]) if len(v) else float("nan"))
                    for name, v in means.items()},
          "forgetting": forgetting, **forgetting[ia_metrics[0]]}
