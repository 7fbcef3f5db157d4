"""Dataset adapters: folders of few-shot photos -> ConceptSpec (name, class, images, prompts).

Three layouts are read; none decodes an image (lfs_jax.data does that):

- DreamBooth (github.com/google/dreambooth, folder `dataset/`): one folder per
  subject and `prompts_and_classes.txt` with the subject->class table and the two
  prompt lists of the paper, written as Python `'a {0} {1} ...'.format(unique_token,
  class_token)` lines. They are parsed with regular expressions, never evaluated.
- Plain folders: `root/<concept>/*.{jpg,jpeg,png,webp}` with class words from an
  argument, `root/<concept>/class.txt` or `root/classes.txt`.
- CustomConcept101 (github.com/adobe-research/custom-diffusion, folder
  `customconcept101/`): `dataset.json` plus `prompts/*.txt` and the unzipped
  `benchmark_dataset/`.

Prompts keep one `{}` where "<token> <class>" goes ("a {} in the jungle" ->
"a <c1> dog in the jungle"); fill them with `ConceptSpec.render(token)`, not
`str.format` (a prompt may hold other braces).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from typing import Callable, Dict, List, Mapping, Optional, Tuple

from lfs_jax import data as data_lib
from lfs_jax import paths
from lfs_jax.errors import ConfigError

PLACEHOLDER = "{}"
# Generic evaluation prompts for the plain-folder layout (no prompts.txt).
DEFAULT_PROMPTS = (
    "photo of a {}",
    "a {} on the beach",
    "a {} in the snow",
    "a {} in the jungle",
    "a {} on a cobblestone street",
    "a {} with a city in the background",
    "a {} on top of a wooden floor",
    "a watercolor painting of a {}",
)
# DreamBooth's README: "9 out of these subjects are live subjects (dogs and cats)".
# A subject is live iff its class word is one of these (cat, cat2, dog, dog2, dog3,
# dog5, dog6, dog7, dog8; backpack_dog is a backpack, an object).
DREAMBOOTH_LIVE_CLASSES = ("dog", "cat")
DREAMBOOTH_FILE = "prompts_and_classes.txt"
# Image types we refuse loudly inside a concept folder instead of skipping silently.
_REFUSED_IMAGE_EXTENSIONS = (".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif",
                             ".jxl", ".jp2", ".ico", ".ppm", ".pgm", ".tga")

# Class words of the bundled 64 px DreamBooth photos (bundled_root(); see its
# NOTICE.md), for the tiny config: read_folders(bundled_root(), bundled_classes).
bundled_classes = {"dog": "dog", "cat": "cat", "dog2": "dog"}


class DatasetError(ValueError):
  """A dataset layout that cannot be read (names the file or folder)."""


@dataclasses.dataclass(frozen=True)
class ConceptSpec:
  """One concept to learn: its photos and the prompts that evaluate it.

  Attributes:
    name: subject folder name, e.g. "dog2".
    class_word: e.g. "dog", "stuffed animal".
    images: sorted absolute image paths (the training and ICGen-context photos).
    prompts: evaluation prompts, each with exactly one "{}" for "<token> <class>".
    heldout: photos held out as evaluation references only (`hold_out`): never
      trained on, never an ICGen context.
    split_seed: the seed of that split (None when nothing is held out).
    train_prompts: the dataset's own training prompts, each with one "{}" for
      "<token> <class>" (CustomConcept101's instance_prompt "photo of {}"); () =
      the config's concepts.templates.
  """
  name: str
  class_word: str
  images: Tuple[str, ...]
  prompts: Tuple[str, ...]
  heldout: Tuple[str, ...] = ()
  split_seed: Optional[int] = None
  train_prompts: Tuple[str, ...] = ()

  def __post_init__(self):
    if not self.name:
      raise DatasetError("a concept needs a non-empty name")
    if not self.class_word or not self.class_word.strip():
      raise DatasetError(f"concept {self.name!r}: empty class word")
    if not self.images:
      raise DatasetError(f"concept {self.name!r}: no images")
    if not self.prompts:
      raise DatasetError(f"concept {self.name!r}: no prompts")
    for p in self.prompts + self.train_prompts:
      if p.count(PLACEHOLDER) != 1:
        raise DatasetError(
            f"concept {self.name!r}: prompt {p!r} must hold exactly one '{{}}'")

  def render(self, token: str) -> Tuple[str, ...]:
    """The prompts with "{}" replaced by "<token> <class_word>"."""
    return tuple(p.replace(PLACEHOLDER, f"{token} {self.class_word}") for p in self.prompts)


def bundled_root() -> str:
  """The folder of bundled 64 px photos (dog/, cat/, dog2/; 3 jpgs each)."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "concepts")


# ---------------------------------------------------------------------------
# Shared helpers

def _read_text(path: str, what: str) -> str:
  if not paths.isfile(path):
    raise DatasetError(f"{what} {path} is missing")
  try:
    return paths.read_text(path, "utf-8-sig")
  except (OSError, UnicodeDecodeError) as e:
    raise DatasetError(f"cannot read {what} {path}: {e}") from None


def _list_images(folder: str, concept: str) -> Tuple[str, ...]:
  """Sorted absolute paths of the photos directly inside `folder`."""
  if not paths.isdir(folder):
    raise DatasetError(f"image folder {folder} of concept {concept!r} does not exist")
  found = []
  for n in paths.listdir(folder):
    full = os.path.join(folder, n)
    if n.startswith(".") or not paths.isfile(full):
      continue
    ext = os.path.splitext(n)[1].lower()
    if ext in data_lib.ALLOWED_EXTENSIONS:
      found.append(paths.abspath(full))
    elif ext in _REFUSED_IMAGE_EXTENSIONS:
      raise DatasetError(
          f"{full}: {ext} images are not supported (allowed: "
          f"{', '.join(data_lib.ALLOWED_EXTENSIONS)}); convert or remove it")
  if not found:
    raise DatasetError(f"image folder {folder} of concept {concept!r} holds no "
                       f"{'/'.join(data_lib.ALLOWED_EXTENSIONS)} images")
  return tuple(found)


def _read_prompt_file(path: str) -> Tuple[str, ...]:
  """One prompt per line, each with exactly one "{}"; blank and '#' lines skipped."""
  prompts = []
  for i, line in enumerate(_read_text(path, "prompt file").splitlines(), 1):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    if line.count(PLACEHOLDER) != 1:
      raise DatasetError(f"{path}:{i}: prompt {line!r} must hold exactly one '{{}}' "
                         "(where '<token> <class>' goes)")
    prompts.append(line)
  if not prompts:
    raise DatasetError(f"prompt file {path} holds no prompts")
  return tuple(prompts)


def _read_class_table(path: str) -> Dict[str, str]:
  """'name,class' lines (blank, '#' and a 'subject_name,class' header skipped)."""
  table: Dict[str, str] = {}
  for i, line in enumerate(_read_text(path, "class table").splitlines(), 1):
    line = line.strip()
    if not line or line.startswith("#") or line.replace(" ", "") in (
        "subject_name,class", "name,class"):
      continue
    name, sep, cls = line.partition(",")
    name, cls = name.strip(), cls.strip()
    if not sep or not name or not cls:
      raise DatasetError(f"{path}:{i}: expected 'name,class', got {line!r}")
    if name in table:
      raise DatasetError(f"{path}:{i}: concept {name!r} listed twice")
    table[name] = cls
  return table


# ---------------------------------------------------------------------------
# DreamBooth

# 'a {0} {1} in the jungle'.format(unique_token, class_token),   (quotes ' or ")
_DB_PROMPT = re.compile(
    r"""^\s*(?P<q>['"])(?P<t>.*)(?P=q)\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)"""
    r"""\s*,?\s*$""")
_DB_CLASS_ROW = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*,\s*(\S.*?)\s*$")


def _dreambooth_template(path: str, lineno: int, t: str) -> str:
  if t.count("{0} {1}") != 1 or t.replace("{0} {1}", "").count("{") != 0:
    raise DatasetError(f"{path}:{lineno}: prompt {t!r} does not hold '{{0}} {{1}}' "
                       "exactly once (token then class)")
  return t.replace("{0} {1}", PLACEHOLDER)


def _parse_dreambooth(path: str) -> Tuple[Dict[str, str], Tuple[str, ...], Tuple[str, ...]]:
  """(subject -> class, object prompts, live prompts) from prompts_and_classes.txt."""
  lines = _read_text(path, "DreamBooth table").splitlines()
  heads = {}
  for i, line in enumerate(lines):
    key = line.strip().lower()
    if key in ("subject_name,class", "object prompts", "live subject prompts"):
      heads.setdefault(key, i)
  for key in ("subject_name,class", "object prompts", "live subject prompts"):
    if key not in heads:
      raise DatasetError(f"{path}: no {key!r} line; is this DreamBooth's {DREAMBOOTH_FILE}?")
  if not heads["subject_name,class"] < heads["object prompts"] < heads["live subject prompts"]:
    raise DatasetError(f"{path}: expected the class table, then 'Object Prompts', then "
                       "'Live Subject Prompts'")

  classes: Dict[str, str] = {}
  for i in range(heads["subject_name,class"] + 1, heads["object prompts"]):
    line = lines[i].strip()
    if not line:
      if classes:
        break  # the table ends at its first blank line
      continue
    m = _DB_CLASS_ROW.match(line)
    if not m:
      if classes:
        break  # e.g. the "Prompts" title after the table
      raise DatasetError(f"{path}:{i + 1}: expected 'subject,class', got {line!r}")
    if m.group(1) in classes:
      raise DatasetError(f"{path}:{i + 1}: subject {m.group(1)!r} listed twice")
    classes[m.group(1)] = m.group(2)
  if not classes:
    raise DatasetError(f"{path}: the subject_name,class table is empty")

  def prompts(start: int, stop: int, section: str) -> Tuple[str, ...]:
    out = []
    for i in range(start, stop):
      line = lines[i].strip()
      if line[:1] in ("'", '"') or "format(" in line:
        m = _DB_PROMPT.match(line)
        if not m:
          raise DatasetError(f"{path}:{i + 1}: cannot parse prompt line {line!r}")
        out.append(_dreambooth_template(path, i + 1, m.group("t")))
    if not out:
      raise DatasetError(f"{path}: no prompts under {section!r}")
    return tuple(out)

  obj = prompts(heads["object prompts"] + 1, heads["live subject prompts"], "Object Prompts")
  live = prompts(heads["live subject prompts"] + 1, len(lines), "Live Subject Prompts")
  return classes, obj, live


def read_dreambooth(root: str) -> Dict[str, ConceptSpec]:
  """Reads the DreamBooth dataset.

  Args:
    root: the `dataset/` folder (holding prompts_and_classes.txt and one folder per
      subject), or its parent.

  Returns:
    {subject: ConceptSpec} in the table's order; dog*/cat* subjects (class "dog" or
    "cat") get the 25 live-subject prompts, the others the 25 object prompts.
  """
  if not paths.isdir(root):
    raise DatasetError(f"DreamBooth folder {root} does not exist")
  if not paths.isfile(os.path.join(root, DREAMBOOTH_FILE)) and paths.isfile(
      os.path.join(root, "dataset", DREAMBOOTH_FILE)):
    root = os.path.join(root, "dataset")
  classes, obj, live = _parse_dreambooth(os.path.join(root, DREAMBOOTH_FILE))
  out = {}
  for name, cls in classes.items():
    out[name] = ConceptSpec(
        name=name, class_word=cls,
        images=_list_images(os.path.join(root, name), name),
        prompts=live if cls in DREAMBOOTH_LIVE_CLASSES else obj)
  return out


# ---------------------------------------------------------------------------
# Plain folders

def read_folders(root: str, classes: Optional[Mapping[str, str]] = None
                 ) -> Dict[str, ConceptSpec]:
  """Reads `root/<concept>/*.{jpg,jpeg,png,webp}`, one concept per sub-folder.

  Class words come from `classes` if it names the concept, else from
  `root/<concept>/class.txt` (one line) or `root/classes.txt` ('name,class' lines);
  the two files must agree when both name a concept. Prompts come from
  `root/<concept>/prompts.txt`, else `root/prompts.txt`, else DEFAULT_PROMPTS (one
  per line, each with one "{}").

  Args:
    root: the folder of concept folders.
    classes: optional {concept: class word}; every concept it names must exist.

  Returns:
    {concept: ConceptSpec}, sorted by name.
  """
  if not paths.isdir(root):
    raise DatasetError(f"concept folder {root} does not exist")
  names = sorted(n for n in paths.listdir(root)
                 if not n.startswith(".") and paths.isdir(os.path.join(root, n)))
  if not names:
    raise DatasetError(f"{root} holds no concept folders (expected root/<concept>/*.jpg)")
  classes = dict(classes or {})
  table_path = os.path.join(root, "classes.txt")
  table = _read_class_table(table_path) if paths.isfile(table_path) else {}
  for n, source in [(n, "the classes argument") for n in classes] + [
      (n, table_path) for n in table]:
    if n not in names:
      raise DatasetError(f"{source} names concept {n!r} but {os.path.join(root, n)} "
                         "does not exist")
  root_prompts_path = os.path.join(root, "prompts.txt")
  root_prompts = (_read_prompt_file(root_prompts_path)
                  if paths.isfile(root_prompts_path) else DEFAULT_PROMPTS)

  out = {}
  for n in names:
    folder = os.path.join(root, n)
    own_path = os.path.join(folder, "class.txt")
    own = _read_text(own_path, "class file").strip() if paths.isfile(own_path) else None
    if own is not None and (not own or "\n" in own):
      raise DatasetError(f"{own_path} must hold one class word on one line, got {own!r}")
    if n in classes:
      cls = classes[n]
    else:
      if own is not None and n in table and own != table[n]:
        raise DatasetError(f"class of {n!r} disagrees: {own!r} in {own_path}, "
                           f"{table[n]!r} in {table_path}")
      cls = own if own is not None else table.get(n)
    if not cls:
      raise DatasetError(
          f"concept {n!r} ({folder}) has no class word: pass classes={{{n!r}: ...}}, "
          f"write {own_path} or add '{n},<class>' to {table_path}")
    prompts_path = os.path.join(folder, "prompts.txt")
    prompts = (_read_prompt_file(prompts_path) if paths.isfile(prompts_path)
               else root_prompts)
    out[n] = ConceptSpec(name=n, class_word=cls, images=_list_images(folder, n),
                         prompts=prompts)
  return out


# ---------------------------------------------------------------------------
# CustomConcept101

_CC101_KEYS = ("class_prompt", "instance_data_dir", "prompt_filename")
# The modifier token of an instance_prompt ("photo of a <new1> dice plushie").
_CC101_TOKEN = re.compile(r"<[^<>\s]+>")


def _cc101_instance(path: str, i: int, entry: Mapping[str, str]) -> Tuple[str, Tuple[str, ...]]:
  """(class word, training prompts) of an entry, as its instance_prompt words them.

  "photo of a <new1> dice plushie" -> ("dice plushie", ("photo of a {}",)): the words
  after the modifier token are the phrase the dataset puts after it (CustomConcept101
  writes "dice plushie" there for class_prompt "dice"), and the prompt around it is
  the one the dataset trains with ("photo of <new1> sunglasses" has no article). An
  entry without instance_prompt falls back to class_prompt and the config's templates.
  """
  text = entry.get("instance_prompt")
  if text is None:
    return entry["class_prompt"].strip(), ()
  tokens = _CC101_TOKEN.findall(text) if isinstance(text, str) else []
  if len(tokens) != 1:
    raise DatasetError(
        f"{path}: entry {i} instance_prompt {text!r} must hold exactly one modifier token "
        "such as <new1>")
  before, _, phrase = text.partition(tokens[0])
  phrase = " ".join(phrase.split())
  if not phrase or PLACEHOLDER in text:
    raise DatasetError(
        f"{path}: entry {i} instance_prompt {text!r} must end with the concept's words "
        "after its modifier token (\"photo of a <new1> cat\")")
  return phrase, (f"{before}{PLACEHOLDER}",)


def read_customconcept101(root: str) -> Dict[str, ConceptSpec]:
  """Reads CustomConcept101's single-concept benchmark.

  Layout (adobe-research/custom-diffusion, folder customconcept101/, with
  benchmark_dataset.zip unzipped into it): `root/dataset.json` is a list of entries
  {"instance_prompt": "photo of a <new1> dice plushie", "class_prompt": "dice",
  "instance_data_dir": "./benchmark_dataset/plushie_dice", "class_data_dir": ...,
  "prompt_filename": "prompts/plushie.txt"}; both paths are relative to `root`.
  The concept is worded as instance_prompt words it: class word "dice plushie" (the
  words after the token; class_prompt "dice" names its regularisation images) and
  training prompt "photo of a {}". A prompt file holds one evaluation prompt per
  line with "{}" for "<token> <class>" ("{} swimming in a pool."). The
  multi-concept file (dataset_multiconcept.json, "{0}"/"{1}" prompts) is not read.

  Returns:
    {instance dir basename: ConceptSpec} in the file's order.
  """
  if not paths.isdir(root):
    raise DatasetError(f"CustomConcept101 folder {root} does not exist")
  path = os.path.join(root, "dataset.json")
  try:
    entries = json.loads(_read_text(path, "CustomConcept101 index"))
  except json.JSONDecodeError as e:
    raise DatasetError(f"{path} is not valid JSON ({e})") from None
  if not isinstance(entries, list) or not entries:
    raise DatasetError(f"{path} must be a non-empty JSON list of concept entries")
  out: Dict[str, ConceptSpec] = {}
  prompt_cache: Dict[str, Tuple[str, ...]] = {}
  for i, e in enumerate(entries):
    if not isinstance(e, dict):
      raise DatasetError(f"{path}: entry {i} is not an object")
    missing = [k for k in _CC101_KEYS if not isinstance(e.get(k), str) or not e[k].strip()]
    if missing:
      raise DatasetError(f"{path}: entry {i} lacks {', '.join(missing)}")
    folder = paths.normpath(os.path.join(root, e["instance_data_dir"]))
    name = os.path.basename(folder)
    if name in out:
      raise DatasetError(f"{path}: entry {i} repeats concept {name!r}")
    prompt_path = paths.normpath(os.path.join(root, e["prompt_filename"]))
    if prompt_path not in prompt_cache:
      prompt_cache[prompt_path] = _read_prompt_file(prompt_path)
    class_word, train_prompts = _cc101_instance(path, i, e)
    out[name] = ConceptSpec(name=name, class_word=class_word,
                            images=_list_images(folder, name),
                            prompts=prompt_cache[prompt_path], train_prompts=train_prompts)
  return out


# ---------------------------------------------------------------------------
# Held-out reference photos

def hold_out(spec: ConceptSpec, n: int, seed: int) -> ConceptSpec:
  """Moves `n` of the concept's photos, drawn by (seed, concept name), to `heldout`.

  The draw depends only on the seed, the concept's name and its sorted photo list,
  so a concept gets the same split in any session order and on every host.

  Raises:
    DatasetError: the concept has no more than `n` photos (nothing left to train on).
  """
  if n <= 0:
    return spec
  if n >= len(spec.images):
    raise DatasetError(
        f"concept {spec.name!r} has {len(spec.images)} photo(s); holding out "
        f"data.heldout={n} as references leaves none to train on: lower data.heldout "
        "or leave this concept out of data.sessions")
  picked = set(random.Random(f"lfs_jax heldout {seed} {spec.name}").sample(
      range(len(spec.images)), n))
  return dataclasses.replace(
      spec, images=tuple(p for i, p in enumerate(spec.images) if i not in picked),
      heldout=tuple(p for i, p in enumerate(spec.images) if i in picked), split_seed=seed)


# ---------------------------------------------------------------------------
# Sessions

def select(concepts: Mapping[str, ConceptSpec], sessions: str) -> List[List[ConceptSpec]]:
  """Orders concepts into sessions: "dog,cat;dog2" -> [[dog, cat], [dog2]].

  Sessions are separated by ';', concepts within one by ','; spaces are ignored.
  A concept may appear only once in the whole run.
  """
  if not isinstance(sessions, str) or not sessions.strip():
    raise DatasetError("no sessions given (expected e.g. 'dog,cat;dog2')")
  known = ", ".join(sorted(concepts))
  seen: Dict[str, int] = {}
  out = []
  for k, part in enumerate(sessions.split(";"), 1):
    names = [n.strip() for n in part.split(",")]
    if not part.strip():
      raise DatasetError(f"session {k} of {sessions!r} is empty")
    session = []
    for n in names:
      if not n:
        raise DatasetError(f"session {k} of {sessions!r} has an empty concept name")
      if n not in concepts:
        raise DatasetError(f"unknown concept {n!r} in session {k}; known: {known}")
      if n in seen:
        where = "twice in that session" if seen[n] == k else f"also in session {seen[n]}"
        raise DatasetError(f"concept {n!r} in session {k} is {where}; each concept is "
                           "learned once")
      seen[n] = k
      session.append(concepts[n])
    out.append(session)
  return out


# ------------------------------------------------------------------ the format table


def parse_classes(text: str) -> Dict[str, str]:
  """"dog=dog,teddy=teddy bear" -> {"dog": "dog", "teddy": "teddy bear"}."""
  out = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    if "=" not in item:
      raise ConfigError(f"data.classes entry {item!r} is not concept=class")
    name, cls = (s.strip() for s in item.split("=", 1))
    out[name] = cls
  return out


@dataclasses.dataclass(frozen=True)
class Format:
  """One `data.format`: how to read its root, and the root to use when none is given."""
  read: Callable[[str, object], Dict[str, ConceptSpec]]  # (root, cfg.data) -> concepts by name
  default_root: Optional[Callable[[], str]] = None      # None: data.root is required


# data.format -> its reader. A new dataset layout is one reader above and one entry here.
FORMATS: Dict[str, Format] = {
    "folders": Format(lambda root, d: read_folders(root, parse_classes(d.classes) or None),
                      default_root=bundled_root),
    "dreambooth": Format(lambda root, d: read_dreambooth(root)),
    "customconcept101": Format(lambda root, d: read_customconcept101(root)),
}


def session_specs(data_cfg, seed: int = 0) -> List[List[ConceptSpec]]:
  """The concepts of each session, in order, from the dataset the config names.

  With data.heldout = n > 0, n photos of every concept (drawn by `seed` and the
  concept's name) are held out as evaluation references (`hold_out`).

  Raises:
    ConfigError / DatasetError: a bad format, root, session list or held-out count;
      a concept that the split leaves without a training photo (named).
  """
  name, root = data_cfg.format, data_cfg.root
  fmt = FORMATS.get(name)
  if fmt is None:
    raise ConfigError(f"data.format must be {', '.join(list(FORMATS)[:-1])} or "
                      f"{list(FORMATS)[-1]}, got {name!r}")
  if not root and fmt.default_root is not None:
    root = fmt.default_root()
  if not root:
    raise ConfigError(f"data.format={name!r} needs --config.data.root=/path/to/dataset")
  found = fmt.read(root, data_cfg)
  if root and not paths.isdir(root):
    raise ConfigError(f"data.root {root!r} does not exist")
  n = data_cfg.heldout
  if not isinstance(n, int) or isinstance(n, bool) or n < 0:
    raise ConfigError(f"data.heldout={n!r}: the number of photos per concept held out as "
                      "evaluation references, an integer >= 0")
  return [[hold_out(spec, n, seed) for spec in session]
          for session in select(found, data_cfg.sessions)]
