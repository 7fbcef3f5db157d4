"""The concept registry: modifier tokens, class words, photos and the session of each.

Concept k (1-based, over the whole run) owns the token `token_format.format(k)`
("<c3>") and, with `concepts.vectors` = n > 1, n - 1 more ("<c3>_1" … "<c3>_{n-1}",
textual inversion's multi-vector form, named as diffusers' `load_textual_inversion`
names the rows of an [n, D] embedding). The registry's tokens, concept by concept,
are rows 0, 1, … of the extra embedding table that the CLIP text model appends to its
frozen vocabulary; the tokenizer maps row r to id `vocab_size + r`. A prompt names a
concept by its first token; `Registry.expand` writes the others after it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import List, Optional, Sequence, Tuple

import numpy as np

from lfs_jax import data as data_lib
from lfs_jax import paths
from lfs_jax.datasets import ConceptSpec


class ConceptError(ValueError):
  """A concept that cannot join the registry (names it and why)."""


@dataclasses.dataclass(frozen=True)
class Concept:
  name: str                      # dataset name, e.g. "dog2"
  token: str                     # modifier token, e.g. "<c3>"
  class_word: str                # e.g. "dog"
  initializer: str               # word whose embedding initialises the token row
  session: int                   # 1-based session that learned it
  images: Tuple[data_lib.ImageRecord, ...]
  prompts: Tuple[str, ...] = ()  # evaluation prompts with "{}" for "<token> <class>"
  # Photos held out as evaluation references only (data.heldout): never trained on,
  # never an ICGen context; and the seed that drew them.
  references: Tuple[data_lib.ImageRecord, ...] = ()
  split_seed: Optional[int] = None
  # The dataset's own training prompts ("photo of {}"); () = concepts.templates.
  train_prompts: Tuple[str, ...] = ()
  # Embedding rows of the concept (concepts.vectors when it was learned).
  vectors: int = 1

  @property
  def tokens(self) -> Tuple[str, ...]:
    """("<c3>", "<c3>_1", …): the concept's tokens, one per embedding row."""
    return (self.token,) + tuple(f"{self.token}_{i}" for i in range(1, self.vectors))

  def training_prompts(self, templates: Sequence[str]) -> List[str]:
    """The concept's training prompts, one per template slot (len(templates) of them).

    Its own prompts, when the dataset words them, are repeated to fill the slots,
    so every concept of a session has as many prompts as the config's templates.
    """
    own = self.train_prompts or tuple(templates)
    return [own[i % len(own)].replace("{}", self.phrase()) for i in range(len(templates))]

  def phrase(self) -> str:
    """"<c3> dog" ("<c3> <c3>_1 dog" with two vectors): what "{}" in a template becomes."""
    return f"{' '.join(self.tokens)} {self.class_word}"


@dataclasses.dataclass(frozen=True)
class Registry:
  concepts: Tuple[Concept, ...] = ()

  @property
  def tokens(self) -> List[str]:
    """Every token, concept by concept: token i is row i of the extra embedding table."""
    return [t for c in self.concepts for t in c.tokens]

  @property
  def names(self) -> List[str]:
    """Each concept's first token: the one prompts name it by."""
    return [c.token for c in self.concepts]

  def expand(self, prompt: str) -> str:
    """"a <c3> dog" -> "a <c3> <c3>_1 dog": each multi-vector concept's other tokens
    written after its first (what the text encoder must read). Idempotent."""
    for c in self.concepts:
      if c.vectors > 1:
        rest = " ".join(c.tokens[1:])
        prompt = re.sub(re.escape(c.token) + r"(?!_\d)(?! " + re.escape(c.tokens[1]) + ")",
                        lambda m: f"{c.token} {rest}", prompt)
    return prompt

  def in_session(self, session: int) -> List[Concept]:
    return [c for c in self.concepts if c.session == session]

  def before(self, session: int) -> List[Concept]:
    return [c for c in self.concepts if c.session < session]

  def up_to(self, session: int) -> "Registry":
    return Registry(tuple(c for c in self.concepts if c.session <= session))

  def add_session(self, specs: Sequence[ConceptSpec], session: int, *,
                  token_format: str, vocab: Sequence[str] = (),
                  initializer: str = "class", vectors: int = 1) -> "Registry":
    """Returns a registry with `specs` learned in `session` (tokens numbered on).

    Each new concept gets `vectors` embedding rows (tokens "<ck>", "<ck>_1", …).

    Raises:
      ConceptError: a concept without images, a name or token already taken, or a
        token that is already a word of the tokenizer's vocabulary.
    """
    if any(c.session >= session for c in self.concepts):
      raise ConceptError(f"session {session} is not after the registry's last session")
    check_vectors(vectors)
    concepts = list(self.concepts)
    names = {c.name for c in concepts}
    vocab = set(vocab)
    for spec in specs:
      if not spec.images:
        raise ConceptError(f"concept {spec.name!r} has no images")
      if spec.name in names:
        raise ConceptError(f"concept {spec.name!r} was already learned in an earlier session")
      record = lambda paths: tuple(data_lib.ImageRecord(p, data_lib.sha256_file(p))
                                   for p in paths)
      concept = Concept(
          name=spec.name, token=token_format.format(len(concepts) + 1),
          class_word=spec.class_word,
          initializer=(spec.class_word.split()[-1] if initializer == "class"
                       else initializer), session=session,
          images=record(spec.images), prompts=tuple(spec.prompts),
          references=record(spec.heldout), split_seed=spec.split_seed,
          train_prompts=tuple(spec.train_prompts), vectors=vectors)
      taken = vocab | {t for c in concepts for t in c.tokens}
      clash = [t for t in concept.tokens if t in taken]
      if clash:
        raise ConceptError(
            f"modifier token {clash[0]!r} for concept {spec.name!r} already exists in the "
            "tokenizer; choose another concepts.token_format")
      concepts.append(concept)
      names.add(spec.name)
    return Registry(tuple(concepts))

  def to_json(self) -> str:
    return json.dumps([dataclasses.asdict(c) for c in self.concepts], indent=2)

  @classmethod
  def from_json(cls, text: str) -> "Registry":
    out = []
    for d in json.loads(text):
      d["images"] = tuple(data_lib.ImageRecord(**r) for r in d["images"])
      # A registry from before held-out references has none.
      d["references"] = tuple(data_lib.ImageRecord(**r) for r in d.get("references", ()))
      d["train_prompts"] = tuple(d.get("train_prompts", ()))
      d["prompts"] = tuple(d["prompts"])
      out.append(Concept(**d))
    return cls(tuple(out))

  def save(self, path: str) -> None:
    """Writes the registry's JSON atomically (`paths.write_text`)."""
    paths.write_text(path, self.to_json())

  @classmethod
  def load(cls, path: str) -> "Registry":
    return cls.from_json(paths.read_text(path))


def check_vectors(vectors) -> None:
  """Raises ConceptError unless `vectors` (concepts.vectors) is an integer >= 1."""
  if isinstance(vectors, bool) or not isinstance(vectors, int) or vectors < 1:
    raise ConceptError(f"concepts.vectors must be an integer >= 1 (embedding rows a "
                       f"modifier token), got {vectors!r}")


def add_tokens(tokenizer, registry: Registry, vocab_size: int) -> None:
  """Adds the registry's tokens to `tokenizer` so token i (row i) gets id vocab_size + i."""
  if len(tokenizer) < vocab_size:
    raise ConceptError(
        f"the tokenizer has {len(tokenizer)} entries but the text encoder {vocab_size}")
  for i, token in enumerate(registry.tokens):
    want = vocab_size + i
    have = tokenizer.convert_tokens_to_ids(token)
    if have == want:
      continue
    if len(tokenizer) != want:
      raise ConceptError(
          f"cannot give {token!r} id {want}: the tokenizer already has {len(tokenizer)} "
          "entries (a tokenizer with added tokens of its own is not supported)")
    tokenizer.add_tokens([token])
    if tokenizer.convert_tokens_to_ids(token) != want:
      raise ConceptError(f"tokenizer gave {token!r} an unexpected id")


def tokenize(tokenizer, prompts: Sequence[str], max_length: int) -> np.ndarray:
  """Prompts -> int32 ids [N, max_length] (padded, truncated), as SD pipelines do."""
  out = tokenizer(list(prompts), padding="max_length", max_length=max_length,
                  truncation=True, return_tensors="np")
  return np.asarray(out["input_ids"], np.int32)


def initial_rows(tokenizer, concepts: Sequence[Concept], table: np.ndarray) -> np.ndarray:
  """Initial embedding rows [sum of vectors, D]: each of a concept's rows starts at the
  mean embedding of its initializer's tokens."""
  rows = []
  for c in concepts:
    ids = tokenizer(c.initializer, add_special_tokens=False)["input_ids"]
    if not ids:
      raise ConceptError(f"initializer word {c.initializer!r} of {c.name!r} has no tokens")
    rows += [np.asarray(table)[ids].mean(axis=0)] * c.vectors
  return np.stack(rows).astype(np.float32) if rows else np.zeros((0, table.shape[1]), np.float32)
