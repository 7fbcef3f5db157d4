"""The concept registry: tokens, rows and prompts of single- and multi-vector concepts."""

import numpy as np
import pytest
from transformers import CLIPTokenizer

from lfs_jax import concepts, icgen
from lfs_jax.datasets import ConceptSpec
from lfs_jax.evaluate import metrics
from lfs_jax.train import session

TOKENIZER = "lfs_jax/assets/mini_base/tokenizer"


def _specs(*names, photo):
  return [ConceptSpec(name=n, class_word=n, images=(photo,), prompts=("a {}",)) for n in names]


@pytest.fixture
def photo(tmp_path):
  path = tmp_path / "p.png"
  path.write_bytes(b"not read by the registry beyond its hash")
  return str(path)


def test_a_multi_vector_concept_owns_consecutive_rows_named_as_diffusers_names_them(photo):
  reg = concepts.Registry().add_session(_specs("dog", photo=photo), 1, token_format="<c{}>",
                                        vectors=3)
  reg = reg.add_session(_specs("cat", photo=photo), 2, token_format="<c{}>")
  assert reg.tokens == ["<c1>", "<c1>_1", "<c1>_2", "<c2>"]
  assert reg.names == ["<c1>", "<c2>"]
  assert reg.concepts[0].phrase() == "<c1> <c1>_1 <c1>_2 dog"
  assert reg.concepts[1].phrase() == "<c2> cat"
  # The registry's JSON keeps the rows; one written before the field had one.
  assert concepts.Registry.from_json(reg.to_json()) == reg
  old = reg.to_json().replace('"vectors": 3', '"vectors": 1').replace(',\n    "vectors": 1', "")
  assert "vectors" not in old and concepts.Registry.from_json(old).tokens == [
      "<c1>", "<c2>"]


def test_expand_writes_the_other_rows_once_and_only_after_whole_tokens(photo):
  reg = concepts.Registry()
  for k in range(1, 11):  # <c1> (two vectors) … <c10>
    reg = reg.add_session(_specs(f"x{k}", photo=photo), k, token_format="<c{}>",
                          vectors=2 if k == 1 else 1)
  once = reg.expand("a <c1> dog beside a <c10> and <c1>")
  assert once == "a <c1> <c1>_1 dog beside a <c10> and <c1> <c1>_1"
  assert reg.expand(once) == once
  assert reg.expand(reg.concepts[0].phrase()) == reg.concepts[0].phrase()
  # TA's text drops every row's token; ICGen resolves a prompt to the concept.
  pattern = icgen.token_pattern("<c{}>", rows=True)
  assert metrics.strip_tokens("photo of a <c1> <c1>_1 dog", pattern) == "photo of a dog"
  assert icgen.resolve(once, reg, "<c{}>").tokens == ["<c1>", "<c10>"]
  assert icgen.bank_key(reg, "<c10>") == "concept10"


def test_initial_rows_and_tokenizer_ids_follow_the_rows(photo):
  tok = CLIPTokenizer.from_pretrained(TOKENIZER)
  reg = concepts.Registry().add_session(_specs("dog", "cat", photo=photo), 1,
                                        token_format="<c{}>", vectors=2)
  table = np.random.default_rng(0).standard_normal((len(tok), 8)).astype(np.float32)
  rows = concepts.initial_rows(tok, reg.concepts, table)
  assert rows.shape == (4, 8)
  dog = tok("dog", add_special_tokens=False)["input_ids"]
  np.testing.assert_allclose(rows[1], table[dog].mean(0), rtol=1e-6)
  concepts.add_tokens(tok, reg, len(table))
  ids = concepts.tokenize(tok, [reg.concepts[1].phrase()], 8)[0]
  assert list(ids[1:4]) == [len(table) + 2, len(table) + 3,
                            tok("cat", add_special_tokens=False)["input_ids"][0]]


def test_bad_vector_counts_and_clashing_rows_are_refused_by_name(photo, tmp_path, tiny_config):
  with pytest.raises(concepts.ConceptError, match="concepts.vectors"):
    concepts.Registry().add_session(_specs("dog", photo=photo), 1, token_format="<c{}>",
                                    vectors=0)
  with pytest.raises(concepts.ConceptError, match="'<c1>_1'"):
    concepts.Registry().add_session(_specs("dog", photo=photo), 1, token_format="<c{}>",
                                    vocab=["<c1>_1"], vectors=2)
  for bad in (0, -2):
    with pytest.raises(ValueError, match="concepts.vectors"):
      session.prepare(tiny_config(concepts__vectors=bad), str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
