"""A VAE's round trip scored by the oracle: the ceiling it puts on any UNet.

Kept apart from `ceiling` (the command) so that `train_base --vae_only` can score a
VAE it has just trained without importing the command that imports it.
"""

from __future__ import annotations

from typing import Dict, Mapping

import numpy as np

from lfs_jax.mini import oracle, world

# Fresh renders, a seed no benchmark photo set uses (the benchmark's photos use cfg.seed).
SEED = 123


def reconstruct(vae_model, vae_params, images: np.ndarray, batch: int = 256) -> np.ndarray:
  """uint8 [N, H, W, 3] -> decode(encoder mean), uint8 (what a perfect UNet could give)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  @jax.jit
  def roundtrip(p, x):
    mean, _ = vae_model.apply({"params": p}, x, method="encode")
    return vae_model.apply({"params": p}, mean, method="decode")

  out = []
  for i in range(0, len(images), batch):
    x = jnp.asarray(images[i:i + batch], jnp.float32) / 127.5 - 1.0
    out.append(np.asarray(jnp.clip((roundtrip(vae_params, x) + 1) * 127.5, 0, 255)))
  return np.concatenate(out).round().astype(np.uint8)


def vae_ceiling(vae_model, vae_params, oracle_params, n: int = 64, seed: int = SEED
                ) -> Dict[str, Dict[str, float]]:
  """{concept: {renders, reconstructions, shape, colour, pattern, colour2, mse}}."""

  renders = {c.name: world.render_all(world.concept_scenes(c, n, seed)) for c in world.CONCEPTS}
  # One round trip for every concept: reconstruct() compiles once a call.
  recs = reconstruct(vae_model, vae_params, np.concatenate(list(renders.values())))
  out = {}
  for i, c in enumerate(world.CONCEPTS):
    imgs, rec = renders[c.name], recs[i * n:(i + 1) * n]
    _, p = oracle.predict(oracle_params, imgs)
    _, pr = oracle.predict(oracle_params, rec)
    row = {"renders": float(oracle.concept_right(p, c).mean()),
           "reconstructions": float(oracle.concept_right(pr, c).mean())}
    row.update({k: float(v.mean()) for k, v in oracle.head_hits(pr, c).items()})
    row["mse"] = float(np.mean((rec.astype(np.float64) - imgs) ** 2) / 127.5 ** 2)
    out[c.name] = row
  return out


def table(rows: Mapping[str, Mapping[str, float]],
          keys=("renders", "reconstructions", "shape", "colour", "pattern", "colour2", "mse"),
          first: str = "concept", mean: bool = True) -> str:
  lines = [f"| {first} | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
  for name, r in rows.items():
    lines.append(f"| {name} | " + " | ".join(
        f"{r[k]:.3f}" if k == "mse" else f"{r[k]:.2f}" for k in keys) + " |")
  if mean:
    avg = {k: float(np.mean([r[k] for r in rows.values()])) for k in keys}
    lines.append("| **mean** | " + " | ".join(
        f"{avg[k]:.3f}" if k == "mse" else f"{avg[k]:.2f}" for k in keys) + " |")
  return "\n".join(lines)
