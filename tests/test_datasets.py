"""lfs_jax.datasets: DreamBooth / plain folders / CustomConcept101 -> ConceptSpec; sessions."""

import json
import os

import numpy as np
import pytest

from lfs_jax import data, datasets
from lfs_jax.datasets import DatasetError

_DB_TEXT = """Classes

subject_name,class
teapot,teapot
dog2,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
"a {0} {1} wearing a red hat".format(unique_token, class_token),
'a {0} {1} in a chef outfit'.format(unique_token, class_token),
]
"""


def _touch_images(folder, names=("00.jpg", "01.jpg")):
  """Image files that are never decoded here (datasets only lists paths)."""
  os.makedirs(folder, exist_ok=True)
  for n in names:
    with open(os.path.join(folder, n), "wb") as f:
      f.write(b"x")


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


# ---------------------------------------------------------------------------
# DreamBooth

def test_real_dreambooth(dreambooth_root):
  """The dataset's own prompts_and_classes.txt, subject folders as the fixture built them."""
  concepts = datasets.read_dreambooth(dreambooth_root)
  assert len(concepts) == 30
  assert list(concepts)[:3] == ["backpack", "backpack_dog", "bear_plushie"]  # file order
  dog2, teapot, backpack_dog = concepts["dog2"], concepts["teapot"], concepts["backpack_dog"]
  assert dog2.class_word == "dog" and concepts["bear_plushie"].class_word == "stuffed animal"
  assert concepts["pink_sunglasses"].class_word == "glasses"
  assert len(dog2.prompts) == 25 and len(teapot.prompts) == 25
  assert dog2.prompts[0] == "a {} in the jungle"
  assert dog2.prompts[-1] == "a cube shaped {}" and dog2.prompts[-5] == "a red {}"
  assert "a {} wearing a red hat" in dog2.prompts            # live prompts
  assert "a {} wearing a red hat" not in teapot.prompts      # object prompts
  assert "a {} with a wheat field in the background" in teapot.prompts
  assert teapot.prompts[-3] == "a shiny {}"
  assert backpack_dog.prompts == teapot.prompts              # a backpack is an object
  live = sorted(n for n, c in concepts.items() if c.prompts == dog2.prompts)
  assert live == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]
  assert all(os.path.isabs(p) and p.endswith(".jpg") for p in dog2.images)
  assert [os.path.basename(p) for p in dog2.images] == ["00.jpg", "01.jpg", "02.jpg"]
  assert [os.path.dirname(p) for p in dog2.images] == [os.path.join(dreambooth_root, "dog2")] * 3
  assert len(teapot.images) == 2
  assert dog2.render("<c1>")[0] == "a <c1> dog in the jungle"
  # The parent folder works too.
  assert datasets.read_dreambooth(os.path.dirname(dreambooth_root)).keys() == concepts.keys()


def test_synthetic_dreambooth(tmp_path):
  root = str(tmp_path / "dataset")
  _write(os.path.join(root, datasets.DREAMBOOTH_FILE), _DB_TEXT)
  _touch_images(os.path.join(root, "teapot"), ("01.jpg", "00.jpg", "notes.txt"))
  _touch_images(os.path.join(root, "dog2"))
  concepts = datasets.read_dreambooth(root)
  assert list(concepts) == ["teapot", "dog2"]
  assert concepts["teapot"].prompts == ("a {} in the jungle", "a red {}")
  assert concepts["dog2"].prompts == ("a {} in the jungle", "a {} wearing a red hat",
                                      "a {} in a chef outfit")
  assert [os.path.basename(p) for p in concepts["teapot"].images] == ["00.jpg", "01.jpg"]


@pytest.mark.parametrize("bad, match", [
    ("'a {1} {0} here'.format(unique_token, class_token),", "exactly once"),
    ("'a {0} {1} here'.format(class_token, unique_token),", "cannot parse"),
    ("'a {0} {1} here' % (unique_token, class_token),", "cannot parse"),
    ("__import__('os').system('true')  # format(", "cannot parse"),
])
def test_dreambooth_bad_prompt_lines(tmp_path, bad, match):
  root = str(tmp_path)
  text = _DB_TEXT.replace("'a red {0} {1}'.format(unique_token, class_token)", bad)
  _write(os.path.join(root, datasets.DREAMBOOTH_FILE), text)
  _touch_images(os.path.join(root, "teapot"))
  _touch_images(os.path.join(root, "dog2"))
  with pytest.raises(DatasetError, match=rf"{datasets.DREAMBOOTH_FILE}:13.*{match}"):
    datasets.read_dreambooth(root)


def test_dreambooth_errors(tmp_path):
  with pytest.raises(DatasetError, match="nothere"):
    datasets.read_dreambooth(str(tmp_path / "nothere"))
  root = str(tmp_path / "db")
  os.makedirs(root)
  with pytest.raises(DatasetError, match=f"{root}/{datasets.DREAMBOOTH_FILE} is missing"):
    datasets.read_dreambooth(root)
  _write(os.path.join(root, datasets.DREAMBOOTH_FILE), _DB_TEXT)
  _touch_images(os.path.join(root, "teapot"))
  with pytest.raises(DatasetError, match=f"{root}/dog2 of concept 'dog2' does not exist"):
    datasets.read_dreambooth(root)
  os.makedirs(os.path.join(root, "dog2"))
  with pytest.raises(DatasetError, match=f"{root}/dog2 .*holds no"):
    datasets.read_dreambooth(root)
  _write(os.path.join(root, datasets.DREAMBOOTH_FILE),
         _DB_TEXT.replace("Live Subject Prompts", "Live Prompts"))
  with pytest.raises(DatasetError, match="live subject prompts"):
    datasets.read_dreambooth(root)


# ---------------------------------------------------------------------------
# Plain folders

def test_bundled_concepts_load():
  concepts = datasets.read_folders(datasets.bundled_root(), datasets.bundled_classes)
  assert {n: c.class_word for n, c in concepts.items()} == {
      "cat": "cat", "dog": "dog", "dog2": "dog"}
  assert all(len(c.images) == 3 for c in concepts.values())
  assert concepts["dog"].prompts == datasets.DEFAULT_PROMPTS
  images, records = data.load_images(concepts["dog2"].images, 64)
  assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8
  assert len({r.sha256 for r in records}) == 3


def test_folders_class_sources_and_prompts(tmp_path):
  root = str(tmp_path)
  for n in ("a", "b", "c"):
    _touch_images(os.path.join(root, n), ("x.png", "y.webp", "z.JPG"))
  os.makedirs(os.path.join(root, ".cache"))
  _write(os.path.join(root, "NOTICE.md"), "not a concept")
  _write(os.path.join(root, "classes.txt"), "name,class\n# comment\na, teddy bear\nb,cup\n")
  _write(os.path.join(root, "c", "class.txt"), "vase\n")
  _write(os.path.join(root, "b", "prompts.txt"), "a {} on a table\n\n{} in snow\n")
  concepts = datasets.read_folders(root)
  assert list(concepts) == ["a", "b", "c"]
  assert [concepts[n].class_word for n in "abc"] == ["teddy bear", "cup", "vase"]
  assert concepts["b"].prompts == ("a {} on a table", "{} in snow")
  assert concepts["a"].prompts == datasets.DEFAULT_PROMPTS
  assert len(concepts["a"].images) == 3
  # The argument wins over the files.
  assert datasets.read_folders(root, {"a": "plushie"})["a"].class_word == "plushie"


def test_folders_errors(tmp_path):
  root = str(tmp_path)
  with pytest.raises(DatasetError, match="missing_root"):
    datasets.read_folders(os.path.join(root, "missing_root"))
  with pytest.raises(DatasetError, match="no concept folders"):
    datasets.read_folders(root)
  _touch_images(os.path.join(root, "teapot"))
  with pytest.raises(DatasetError, match="concept 'teapot'.*no class word"):
    datasets.read_folders(root)
  with pytest.raises(DatasetError, match=f"names concept 'ghost' but {root}/ghost"):
    datasets.read_folders(root, {"teapot": "teapot", "ghost": "dog"})
  _write(os.path.join(root, "classes.txt"), "teapot\n")
  with pytest.raises(DatasetError, match=r"classes.txt:1: expected 'name,class'"):
    datasets.read_folders(root)
  _write(os.path.join(root, "classes.txt"), "teapot,teapot\n")
  _write(os.path.join(root, "teapot", "class.txt"), "kettle")
  with pytest.raises(DatasetError, match="disagrees"):
    datasets.read_folders(root)
  os.remove(os.path.join(root, "teapot", "class.txt"))
  _write(os.path.join(root, "teapot", "prompts.txt"), "no placeholder here\n")
  with pytest.raises(DatasetError, match=r"teapot/prompts.txt:1"):
    datasets.read_folders(root)
  os.remove(os.path.join(root, "teapot", "prompts.txt"))
  _touch_images(os.path.join(root, "teapot"), ("anim.gif",))
  with pytest.raises(DatasetError, match=r"teapot/anim.gif: .gif images are not supported"):
    datasets.read_folders(root)


# ---------------------------------------------------------------------------
# CustomConcept101

def _cc101(root, entries, prompts=None):
  _write(os.path.join(root, "dataset.json"), json.dumps(entries))
  for name, text in (prompts or {}).items():
    _write(os.path.join(root, "prompts", name), text)


_ENTRIES = [
    {"instance_prompt": "photo of a <new1> dog", "class_prompt": "dog",
     "instance_data_dir": "./benchmark_dataset/pet_dog1",
     "class_data_dir": "./regularization/pet_dog", "prompt_filename": "prompts/dog.txt"},
    {"instance_prompt": "photo of a <new1> cow plushie", "class_prompt": "cow plushie",
     "instance_data_dir": "./benchmark_dataset/plushie_cow",
     "class_data_dir": "./regularization/plushie_cow",
     "prompt_filename": "prompts/plushie.txt"},
]
_PROMPTS = {"dog.txt": "Photo of a {}.\n{} swimming in a pool.\n",
            "plushie.txt": "{} on a bed.\n"}


def test_customconcept101(tmp_path):
  root = str(tmp_path)
  _cc101(root, _ENTRIES, _PROMPTS)
  _touch_images(os.path.join(root, "benchmark_dataset", "pet_dog1"), ("b.jpeg", "a.jpg"))
  _touch_images(os.path.join(root, "benchmark_dataset", "plushie_cow"))
  concepts = datasets.read_customconcept101(root)
  assert list(concepts) == ["pet_dog1", "plushie_cow"]
  dog = concepts["pet_dog1"]
  assert dog.class_word == "dog" and dog.prompts == ("Photo of a {}.", "{} swimming in a pool.")
  assert dog.render("<new1>")[1] == "<new1> dog swimming in a pool."
  assert [os.path.basename(p) for p in dog.images] == ["a.jpg", "b.jpeg"]
  assert concepts["plushie_cow"].class_word == "cow plushie"


def test_customconcept101_errors(tmp_path):
  root = str(tmp_path)
  with pytest.raises(DatasetError, match="dataset.json is missing"):
    datasets.read_customconcept101(root)
  _write(os.path.join(root, "dataset.json"), "[{")
  with pytest.raises(DatasetError, match="not valid JSON"):
    datasets.read_customconcept101(root)
  _cc101(root, [{"class_prompt": "dog"}])
  with pytest.raises(DatasetError, match="entry 0 lacks instance_data_dir, prompt_filename"):
    datasets.read_customconcept101(root)
  _cc101(root, _ENTRIES, {"dog.txt": _PROMPTS["dog.txt"]})
  with pytest.raises(DatasetError, match="benchmark_dataset/pet_dog1 of concept 'pet_dog1'"):
    datasets.read_customconcept101(root)
  _touch_images(os.path.join(root, "benchmark_dataset", "pet_dog1"))
  _touch_images(os.path.join(root, "benchmark_dataset", "plushie_cow"))
  with pytest.raises(DatasetError, match="prompts/plushie.txt is missing"):
    datasets.read_customconcept101(root)
  _cc101(root, _ENTRIES, {"plushie.txt": "{0} and {1} on a bed.\n"})
  with pytest.raises(DatasetError, match=r"plushie.txt:1: .*exactly one"):
    datasets.read_customconcept101(root)
  _cc101(root, [_ENTRIES[0], _ENTRIES[0]], _PROMPTS)
  with pytest.raises(DatasetError, match="entry 1 repeats concept 'pet_dog1'"):
    datasets.read_customconcept101(root)


# ---------------------------------------------------------------------------
# Sessions

def _specs(*names):
  return {n: datasets.ConceptSpec(n, "dog", ("/x.jpg",), ("a {}",)) for n in names}


def test_select_sessions():
  c = _specs("dog", "cat", "dog2")
  sessions = datasets.select(c, " dog , cat ; dog2")
  assert [[s.name for s in ses] for ses in sessions] == [["dog", "cat"], ["dog2"]]


@pytest.mark.parametrize("sessions, match", [
    ("dog;wolf", "unknown concept 'wolf' in session 2; known: cat, dog, dog2"),
    ("dog,cat;dog", "'dog' in session 2 is also in session 1"),
    ("dog,dog", "twice in that session"),
    ("dog;;cat", "session 2 .* is empty"),
    ("dog;", "session 2 .* is empty"),
    ("dog,,cat", "empty concept name"),
    ("  ", "no sessions"),
])
def test_select_errors(sessions, match):
  with pytest.raises(DatasetError, match=match):
    datasets.select(_specs("dog", "cat", "dog2"), sessions)


def test_concept_spec_validates():
  with pytest.raises(DatasetError, match="exactly one"):
    datasets.ConceptSpec("x", "dog", ("/a.jpg",), ("a {} and {}",))
  with pytest.raises(DatasetError, match="no images"):
    datasets.ConceptSpec("x", "dog", (), ("a {}",))
  with pytest.raises(DatasetError, match="empty class"):
    datasets.ConceptSpec("x", " ", ("/a.jpg",), ("a {}",))
