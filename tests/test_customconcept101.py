"""The CustomConcept101 adapter on a fixture laid out like the real dataset.

adobe-research/custom-diffusion's customconcept101/: dataset.json (a list of entries
with instance_prompt, class_prompt, instance_data_dir, class_data_dir,
prompt_filename, paths relative to the folder), prompts/<name>.txt (one prompt per
line, "{}" where the concept goes; several concepts share a file) and the unzipped
benchmark_dataset/<concept>/ photos. The entries' wording follows the real file's
patterns (a class_prompt that differs from the words after the token, an
instance_prompt without an article); the texts are written for this test.
"""

import json
import os
import shutil

import pytest

from lfs_jax import base as base_lib
from lfs_jax import concepts as concepts_lib
from lfs_jax import datasets
from lfs_jax.datasets import DatasetError

ENTRIES = [
    {"instance_prompt": "photo of a <new1> dice plushie", "class_prompt": "dice",
     "instance_data_dir": "./benchmark_dataset/plushie_dice",
     "class_data_dir": "./regularization/plushie_dice",
     "prompt_filename": "prompts/plushie.txt"},
    {"instance_prompt": "photo of <new1> sunglasses", "class_prompt": "sunglasses",
     "instance_data_dir": "./benchmark_dataset/wearable_sunglasses1",
     "class_data_dir": "./regularization/wearable_sunglasses",
     "prompt_filename": "prompts/sunglasses.txt"},
    {"instance_prompt": "photo of a <new1> cat", "class_prompt": "cat",
     "instance_data_dir": "./benchmark_dataset/pet_cat1",
     "class_data_dir": "./regularization/pet_cat", "prompt_filename": "prompts/cat.txt"},
]
PROMPTS = {
    "plushie.txt": "Photo of a {}.\n{} on a wooden shelf.\nA pencil sketch of {}.\n",
    "sunglasses.txt": "{} on a sandy beach.\nA person wearing {}.\n",
    "cat.txt": "Photo of a {}.\n{} asleep on a sofa.\n{} in the snow.\n",
}


def make_customconcept101(root: str) -> str:
  """The fixture, with the bundled 64 px photos as each concept's pictures."""
  with open(os.path.join(root, "dataset.json"), "w") as f:
    json.dump(ENTRIES, f, indent=4)
  os.makedirs(os.path.join(root, "prompts"))
  for name, text in PROMPTS.items():
    with open(os.path.join(root, "prompts", name), "w") as f:
      f.write(text)
  bundled = datasets.bundled_root()
  for entry, src in zip(ENTRIES, ("dog", "dog2", "cat")):
    shutil.copytree(os.path.join(bundled, src), os.path.join(root, entry["instance_data_dir"]))
  return root


def test_concepts_are_worded_as_the_dataset_writes_them(tmp_path):
  found = datasets.read_customconcept101(make_customconcept101(str(tmp_path)))
  assert list(found) == ["plushie_dice", "wearable_sunglasses1", "pet_cat1"]
  dice, glasses, cat = found.values()
  # The class word is what instance_prompt puts after the token, not class_prompt.
  assert dice.class_word == "dice plushie" and dice.train_prompts == ("photo of a {}",)
  assert glasses.class_word == "sunglasses" and glasses.train_prompts == ("photo of {}",)
  assert cat.class_word == "cat" and len(cat.images) == 3
  # Evaluation prompts: the concept's prompt file, verbatim.
  assert dice.prompts == ("Photo of a {}.", "{} on a wooden shelf.", "A pencil sketch of {}.")
  assert dice.render("<c1>")[1] == "<c1> dice plushie on a wooden shelf."
  # Training: the dataset's own prompt, filling every template slot; the registry keeps it.
  templates = ("photo of a {}", "a photo of a {}", "a picture of a {}")
  reg = concepts_lib.Registry().add_session([dice, glasses], 1, token_format="<c{}>")
  assert reg.concepts[1].training_prompts(templates) == ["photo of <c2> sunglasses"] * 3
  assert reg.concepts[0].training_prompts(templates) == ["photo of a <c1> dice plushie"] * 3
  again = concepts_lib.Registry.from_json(reg.to_json())
  assert again == reg
  plain = datasets.read_folders(datasets.bundled_root(), datasets.bundled_classes)["dog"]
  reg = concepts_lib.Registry().add_session([plain], 1, token_format="<c{}>")
  assert reg.concepts[0].training_prompts(templates) == [t.format("<c1> dog") for t in templates]


def test_sessions_and_split_from_the_config(tmp_path, tiny_config):
  root = make_customconcept101(str(tmp_path))
  cfg = tiny_config(data__format="customconcept101", data__root=root, data__heldout=1,
                    data__sessions="plushie_dice;pet_cat1,wearable_sunglasses1")
  sessions = base_lib.session_specs(cfg.data, seed=3)
  assert [[c.name for c in s] for s in sessions] == [
      ["plushie_dice"], ["pet_cat1", "wearable_sunglasses1"]]
  dice = sessions[0][0]
  assert len(dice.images) == 2 and len(dice.heldout) == 1 and dice.split_seed == 3
  assert dice.class_word == "dice plushie"


def test_bad_instance_prompts_are_named(tmp_path):
  root = make_customconcept101(str(tmp_path))
  for bad, why in (("photo of a dice plushie", "exactly one modifier token"),
                   ("photo of a <new1> <new2> cat", "exactly one modifier token"),
                   ("photo of a <new1>", "must end with the concept's words")):
    with open(os.path.join(root, "dataset.json"), "w") as f:
      json.dump([{**ENTRIES[0], "instance_prompt": bad}], f)
    with pytest.raises(DatasetError, match=f"entry 0 instance_prompt .*{why}"):
      datasets.read_customconcept101(root)
  # An entry without instance_prompt keeps class_prompt and the config's templates.
  entry = {k: v for k, v in ENTRIES[0].items() if k != "instance_prompt"}
  with open(os.path.join(root, "dataset.json"), "w") as f:
    json.dump([entry], f)
  dice = datasets.read_customconcept101(root)["plushie_dice"]
  assert dice.class_word == "dice" and dice.train_prompts == ()
