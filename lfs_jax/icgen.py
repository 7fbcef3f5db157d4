"""In-Context Generation on the host: which concept a prompt names, which latent starts it.

The context bank (DESIGN 1.2) holds, per concept, the VAE posterior (mean, logvar)
of each of its photos, unscaled, under the key "concept<i>" (i = 1-based registry
index). A prompt names a concept by its modifier token ("a <c2> dog on a beach");
`select` picks the start latent among its photos:

  random  one photo, drawn from the image's seed (same seed, same photo)
  first   the first photo
  mean    the mean of the photos' latents

[choice] The context latent is the posterior mean, not a draw mean + σ·ε: the
start is then a deterministic function of the photo, and the noise that ICGen adds
at t_s (σ(t_s) ≫ the VAE's σ) makes the posterior's own spread irrelevant.
"""

from __future__ import annotations

import re
from typing import Dict, List, NamedTuple, Optional

import numpy as np

from lfs_jax import concepts as concepts_lib

SELECTS = ("random", "first", "mean")
# Purpose of the host RNG that draws a `random` photo from an image seed.
_SELECT_PURPOSE = 1


class PromptConcepts(NamedTuple):
  """The concepts a prompt names, in order of appearance."""
  tokens: List[str]          # every known modifier token in the prompt, first first
  concept: Optional[str]     # the one that picks the context (the first), or None


def token_pattern(token_format: str, *, rows: bool = False) -> re.Pattern:
  """A regex for every token `token_format` can produce ("<c{}>" -> r"<c\\d+>");
  `rows`: a multi-vector concept's other tokens too ("<c3>_1")."""
  if token_format.count("{}") != 1:
    raise ValueError(f"concepts.token_format must contain '{{}}' once, got {token_format!r}")
  head, tail = token_format.split("{}")
  return re.compile(re.escape(head) + r"\d+" + re.escape(tail) + (r"(?:_\d+)?" if rows else ""))


# Any "<word>" (no space or bracket inside): what a user types as a modifier token.
_BRACKETED = re.compile(r"<[^<>\s]+>")


def resolve(prompt: str, registry: concepts_lib.Registry, token_format: str,
            session: Optional[int] = None, *, strict: bool = True) -> PromptConcepts:
  """Finds the modifier tokens a prompt names.

  A prompt naming several concepts is allowed (the text encoder sees them all);
  ICGen then starts from the first one named, and the sidecar says so.

  Args:
    strict: every "<word>" must be a known token (sample.strict_tokens); False
      checks only the words of `token_format`, other "<...>" text stays plain text.

  Raises:
    ValueError: an unknown token (e.g. "<c9>", a concept of a later session, or a
      typo such as "<dgo>"); the message lists the known ones.
  """
  known = registry.names
  found = [m.group(0) for m in token_pattern(token_format).finditer(prompt)]
  words = [m.group(0) for m in _BRACKETED.finditer(prompt)] if strict else found
  unknown = [t for t in words if t not in known]
  if unknown:
    where = f" at session {session}" if session is not None else ""
    escape = (" (to keep another '<...>' as plain text, set "
              "--config.sample.strict_tokens=False)" if set(unknown) - set(found) else "")
    raise ValueError(
        f"prompt {prompt!r} names {', '.join(repr(t) for t in dict.fromkeys(unknown))}, "
        f"which this run does not know{where}{escape}; known modifier tokens: "
        f"{', '.join(known) or '(none)'}")
  tokens = list(dict.fromkeys(found))
  return PromptConcepts(tokens, tokens[0] if tokens else None)


def bank_key(registry: concepts_lib.Registry, token: str) -> str:
  """"concept<i>": the bank entry of the concept whose (first) token is `token`."""
  return f"concept{registry.names.index(token) + 1}"


def context_latent(bank: Dict[str, Dict[str, np.ndarray]], key: str, select: str,
                   seed: int) -> tuple:
  """The unscaled start latent of one image and which photo it came from.

  Args:
    bank: {"concept<i>": {"mean": [n, h, w, c], "logvar": [n, h, w, c]}}.
    key: the concept's bank key.
    select: random | first | mean.
    seed: the image's seed (picks the photo for `random`).

  Returns:
    (latent [h, w, c] float32, photo index or "mean").
  """
  if select not in SELECTS:
    raise ValueError(f"icgen.select must be one of {list(SELECTS)}, got {select!r}")
  if key not in bank:
    raise ValueError(f"the context bank has no {key!r} (have {sorted(bank)}); a concept "
                     "imported with --mode=import has no photos: sample it with "
                     "--config.icgen.strength=1")
  mean = np.asarray(bank[key]["mean"], np.float32)
  if select == "mean":
    return mean.mean(axis=0), "mean"
  index = 0
  if select == "random":
    index = int(np.random.default_rng([_SELECT_PURPOSE, int(seed)]).integers(len(mean)))
  return mean[index], index

