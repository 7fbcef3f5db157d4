"""Deltas in diffusers' formats: export a session, import a delta.

A leaf selection (crossattn_kv, crossattn, attn) goes out as Custom Diffusion
processors, described below; `train.selection=lora` goes out as diffusers' LoRA
file (`lfs_jax.lora_format`), which `pipe.load_lora_weights` reads. The token
embeddings, concepts.json and the README are the same for both.

diffusers reads a Custom Diffusion result from one folder:

    pytorch_custom_diffusion_weights.safetensors   the UNet's attention processors
        <module>.processor.to_k_custom_diffusion.weight          [out, in]  (train_kv)
        <module>.processor.to_v_custom_diffusion.weight          [out, in]
        <module>.processor.to_q_custom_diffusion.weight          [out, in]  (train_q_out)
        <module>.processor.to_out_custom_diffusion.0.weight      [out, in]
        <module>.processor.to_out_custom_diffusion.0.bias        [out]
        <module>.processor                                       [0]: an untouched layer
    <token>.safetensors                            {token: [D]}, one per modifier token

`<module>` is an attention layer (`down_blocks.0.attentions.0.transformer_blocks.0.attn2`).
diffusers builds one `CustomDiffusionAttnProcessor` per processor key: its to_k/to_v
replace the layer's own (for self-attention too, whose keys come from the image
features), to_q/to_out come along or not at all, and a layer with an empty entry
keeps its own weights. `set_attn_processor` wants an entry for EVERY attention
layer; diffusers' pickle format stores `{}` for the untouched ones, which
safetensors cannot hold, so we write a 0-length tensor there: the loader turns any
entry of length 0 into the same untouched processor.

So a session is exportable when, in each attention layer, the trained leaves are
nothing, {to_k, to_v}, or {to_q, to_k, to_v, to_out}: every `train.selection`
(crossattn_kv, crossattn, attn) qualifies; anything else is refused by name.

Import is the inverse, into a NEW run directory whose session 1 is the delta
("imported", no photos, an empty context bank); the sessions that `--mode=train
--resume` then trains are numbered from 2 and distil from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from lfs_jax import base as base_lib
from lfs_jax import checkpoint
from lfs_jax import concepts as concepts_lib
from lfs_jax import delta as delta_lib
from lfs_jax import lora_format
from lfs_jax import paths
from lfs_jax import runs
from lfs_jax import tiny
from lfs_jax.models import unet
from lfs_jax.train import step as step_lib
from lfs_jax.weights import convert, files, safetensors_io

WEIGHTS_NAME = "pytorch_custom_diffusion_weights.safetensors"
CONCEPTS_NAME = "concepts.json"
README_NAME = "README.md"
# diffusers' name of each processor sub-layer <-> our leaf under the attention module.
_KV = {"to_k_custom_diffusion.weight": ("to_k", "kernel"),
       "to_v_custom_diffusion.weight": ("to_v", "kernel")}
_Q_OUT = {"to_q_custom_diffusion.weight": ("to_q", "kernel"),
          "to_out_custom_diffusion.0.weight": ("to_out_0", "kernel"),
          "to_out_custom_diffusion.0.bias": ("to_out_0", "bias")}
_TO_LEAF = {**_KV, **_Q_OUT}
_TO_KEY = {v: k for k, v in _TO_LEAF.items()}
_KEY_RE = re.compile(r"(?P<module>.+)\.processor(?:\.(?P<sub>.+))?")

Path = Tuple[str, ...]


class InteropError(ValueError):
  """A delta that cannot be exported or imported as asked (names the culprit)."""


# ---------------------------------------------------------------- UNet layers


def attention_modules(unet_tree: Mapping) -> List[Path]:
  """Paths of every attention layer of a UNet parameter tree (those with a to_k)."""
  return sorted({p[:-2] for p in convert.flatten(unet_tree)
                 if len(p) >= 3 and p[-2] == "to_k" and re.fullmatch(r"attn\d+", p[-3])})


def processor_tensors(delta_unet: Mapping, modules: List[Path]) -> Dict[str, np.ndarray]:
  """Selected UNet leaves -> diffusers' Custom Diffusion processor tensors.

  Args:
    delta_unet: the trained leaves (Flax paths, kernels [in, out]).
    modules: every attention layer of the UNet (`attention_modules`).

  Returns:
    {diffusers key: float32 array}, weights [out, in], a [0] entry per untouched layer.

  Raises:
    InteropError: a leaf outside an attention layer's to_q/to_k/to_v/to_out, or a
      layer whose trained leaves diffusers cannot express.
  """
  groups: Dict[Path, Dict[Path, np.ndarray]] = {m: {} for m in modules}
  for path, leaf in sorted(convert.flatten(delta_unet).items()):
    module, sub = path[:-2], path[-2:]
    if module not in groups or sub not in _TO_KEY:
      raise InteropError(
          f"trained weight {'/'.join(path)} is not an attention layer's to_q/to_k/to_v/"
          "to_out: diffusers' Custom Diffusion format cannot hold it")
    groups[module][sub] = np.asarray(leaf, np.float32)
  out = {}
  for module, subs in groups.items():
    key = convert.path_to_torch_key(module) + ".processor"
    if not subs:
      out[key] = np.zeros((0,), np.float32)
      continue
    _check_group(set(subs), "/".join(module))
    for sub, arr in subs.items():
      out[f"{key}.{_TO_KEY[sub]}"] = np.ascontiguousarray(arr.T if sub[1] == "kernel" else arr)
  return out


def _check_group(subs, where: str) -> None:
  kv, q_out = set(_KV.values()), set(_Q_OUT.values())
  if subs != kv and subs != kv | q_out:
    names = sorted("/".join(s) for s in subs)
    raise InteropError(
        f"{where}: trains {names}; diffusers' Custom Diffusion processors hold to_k and "
        "to_v, optionally with to_q and to_out (weight and bias), and nothing else")


def read_processors(path: str) -> Dict[Path, np.ndarray]:
  """A Custom Diffusion weights file -> {Flax leaf path: float32 array} (kernels [in, out])."""
  state = _read_safetensors(path)
  out: Dict[Path, np.ndarray] = {}
  groups: Dict[Path, set] = {}
  for key in sorted(state):
    m = _KEY_RE.fullmatch(key)
    arr = np.asarray(state[key])
    if m is None or (m["sub"] is not None and m["sub"] not in _TO_LEAF):
      raise InteropError(f"{path}: tensor {key!r} is not a Custom Diffusion processor weight")
    module = convert.torch_key_to_path(m["module"])
    if m["sub"] is None:
      if arr.size:
        raise InteropError(f"{path}: {key!r} should be empty (an untouched layer)")
      continue
    sub = _TO_LEAF[m["sub"]]
    groups.setdefault(module, set()).add(sub)
    arr = arr.astype(np.float32)
    out[module + sub] = np.ascontiguousarray(arr.T) if sub[1] == "kernel" else arr
  for module, subs in groups.items():
    _check_group(subs, f"{path}: {'/'.join(module)}")
  if not out:
    raise InteropError(f"{path} holds no Custom Diffusion weights")
  return out


def _read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """Reads a safetensors file, whatever its suffix; refuses pickles by name."""
  try:
    return safetensors_io.load_file(path)
  except safetensors_io.SafetensorsError:
    magic = paths.read_range(path, 0, 2)
    if magic in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
      raise files.PickleRefusedError(
          f"{path} is a pickle (torch.save) file; lfs_jax never unpickles (it can run "
          "arbitrary code). Convert it once, in a trusted environment:\n"
          "  python -c \"import sys, torch, safetensors.torch as s; d = torch.load(sys.argv[1]); "
          "s.save_file({k: v.contiguous() for k, v in d.items() if isinstance(v, torch.Tensor)}, "
          "sys.argv[1].rsplit('.', 1)[0] + '.safetensors')\" "
          f"'{path}'\nthen delete the pickle.") from None
    raise


# ---------------------------------------------------------------- export


def _base_description(model_cfg, seed: int) -> Tuple[str, str]:
  """(where the base model is, its folder) for the README."""
  if model_cfg.source == "local":
    path = paths.abspath(model_cfg.path)
    variant = f" (weights variant `{model_cfg.variant}`)" if model_cfg.variant else ""
    return f"the diffusers Stable Diffusion folder `{path}`{variant}", path
  return (f"lfs_jax's tiny random model with seed {seed}; write it as a diffusers folder "
          f"first: `python -c \"from lfs_jax import tiny; "
          f"tiny.save_folder(tiny.random_params({seed}), 'tiny_sd')\"`", "tiny_sd")


def _abstract_unet(model_cfg):
  if model_cfg.source == "local":
    config = files.read_config(files.component_folder(model_cfg.path, "unet"))
  else:
    config = tiny.UNET
  return unet.abstract_params(unet.UNetConfig.from_diffusers(config))


def _token_filename(token: str) -> str:
  if not token or token in (".", "..") or "/" in token or "\\" in token or "\0" in token:
    raise InteropError(f"modifier token {token!r} cannot name a file <token>.safetensors")
  return f"{token}.safetensors"


@contextlib.contextmanager
def _staged(out_dir: str):
  """Yields the folder to write `out_dir`'s files into; nothing half-written is left.

  A local `out_dir` is written as a temporary folder beside it, renamed into place
  when complete. A URL (a bucket has no rename) is written in place, each file one
  object write, and deleted again if the writing fails; callers write the file that
  marks it complete (README.md, config.json) last.
  """
  if paths.exists(out_dir) and (not paths.isdir(out_dir) or paths.listdir(out_dir)):
    raise InteropError(f"{out_dir} already exists and is not an empty folder; choose a new one")
  if paths.is_url(out_dir):
    try:
      yield out_dir
    except BaseException:
      paths.rmtree(out_dir)
      raise
    return
  tmp = f"{os.path.abspath(out_dir).rstrip(os.sep)}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.isdir(out_dir):
    os.rmdir(out_dir)  # empty (checked before anything was written)
  os.replace(tmp, out_dir)


def export_session(workdir: str, out_dir: str, session: Optional[int] = None) -> Dict[str, Any]:
  """Writes a finished session as diffusers' Custom Diffusion files (+ README, concepts.json).

  Args:
    workdir: the run directory.
    out_dir: the folder to write (new, or empty).
    session: the session to export; None = the latest finished.

  Returns:
    {"session", "out_dir", "tokens", "files"}.

  Raises:
    InteropError: no such session, a selection diffusers cannot express, a used out_dir.
  """
  cfg = runs.run_config(workdir)
  finished = checkpoint.finished_sessions(workdir)
  if not finished:
    raise InteropError(f"{workdir} has no finished session to export")
  session = finished[-1] if session is None else session
  if session not in finished:
    raise InteropError(f"session {session} is not a finished session of {workdir} "
                       f"(finished: {', '.join(map(str, finished))})")
  stored = checkpoint.restore_session(workdir, session)
  delta, meta = stored["delta"], stored["meta"]
  registry = concepts_lib.Registry.from_json(json.dumps(meta["concepts"]))
  selection = delta_lib.from_config(cfg.train)
  if isinstance(selection, delta_lib.LoRA):
    weights_name = lora_format.WEIGHTS_NAME
    try:
      tensors = lora_format.to_diffusers(delta["unet"], selection)
    except lora_format.LoraFormatError as e:
      raise InteropError(f"session {session}: {e}") from None
  else:
    weights_name = WEIGHTS_NAME
    tensors = processor_tensors(delta["unet"], attention_modules(_abstract_unet(cfg.model)))
  rows = np.asarray(delta["tokens"], np.float32)
  if rows.shape[0] != len(registry.tokens):
    raise InteropError(f"session {session}: {rows.shape[0]} token rows for the "
                       f"{len(registry.tokens)} tokens {registry.tokens}")
  names = {c.token: _token_filename(c.token) for c in registry.concepts}
  starts = np.cumsum([0] + [c.vectors for c in registry.concepts])

  with _staged(out_dir) as tmp:
    safetensors_io.save_file(tensors, os.path.join(tmp, weights_name), metadata={"format": "pt"})
    for c, start in zip(registry.concepts, starts):
      # One vector: [D], as Custom Diffusion writes it; n: [n, D], which diffusers'
      # load_textual_inversion turns into "<ck>", "<ck>_1", … (the registry's names).
      own = rows[start:start + c.vectors]
      safetensors_io.save_file({c.token: own if c.vectors > 1 else own[0]},
                               os.path.join(tmp, names[c.token]), metadata={"format": "pt"})
    paths.write_text(os.path.join(tmp, CONCEPTS_NAME), json.dumps(
        [{"token": c.token, "class_word": c.class_word, "name": c.name,
          "session": c.session, "prompts": list(c.prompts),
          **({"vectors": c.vectors} if c.vectors > 1 else {})} for c in registry.concepts],
        indent=2))
    paths.write_text(os.path.join(tmp, README_NAME),  # last: an export with it is complete
                     _readme(cfg, workdir, session, registry, paths.abspath(out_dir),
                             weights_name))
  return {"session": session, "out_dir": paths.abspath(out_dir), "tokens": registry.names,
          "files": [weights_name] + list(names.values())}


def _readme(cfg, workdir: str, session: int, registry, out_dir: str, weights_name: str) -> str:
  base, base_path = _base_description(cfg.model, cfg.seed)
  q = json.dumps  # Python string literals with double quotes
  tokens = registry.names
  last = registry.concepts[-1]  # diffusers' pipeline writes a multi-vector token's others itself
  example = cfg.concepts.templates[0].format(f"{last.token} {last.class_word}")
  table = "\n".join(f"| `{c.token}` | {c.class_word} | {c.name} | {c.session} |"
                    for c in registry.concepts)
  if weights_name == lora_format.WEIGHTS_NAME:
    kind = "LoRA"
    what = ("the trained UNet LoRA factors (diffusers' PEFT layout, the scale "
            "lora_alpha / rank folded into lora_B)")
    load = f'pipe.load_lora_weights(delta, weight_name="{weights_name}")'
  else:
    kind = "Custom Diffusion"
    what = ("the trained UNet attention weights as diffusers'\n  "
            "`CustomDiffusionAttnProcessor`s (layers not trained have an empty entry)")
    load = ("# _pipeline=pipe is needed: without it diffusers (0.42 at least) builds the processors\n"
            "# but never installs them (huggingface/diffusers#9320).\n"
            f'pipe.unet.load_attn_procs(delta, weight_name="{weights_name}",\n'
            "                          _pipeline=pipe)")
  return f"""# {kind} delta exported by lfs_jax

Session {session} of the lfs_jax run `{paths.abspath(workdir)}`: UNet selection
`{cfg.train.selection}` and {len(tokens)} modifier token(s).

Base model it needs: {base}.

| token | class word | concept | learned in session |
|---|---|---|---|
{table}

Files:
- `{weights_name}`: {what}.
- `<token>.safetensors`: each modifier token's text embedding ({{token: [D]}}, or
  {{token: [n, D]}} for a token of n vectors: diffusers then adds `<token>_1` … and
  writes them after `<token>` in every prompt).
- `{CONCEPTS_NAME}`: tokens and class words, read by `python -m lfs_jax.main --mode=import`.

## Use with diffusers (PyTorch)

```python
import torch
from diffusers import StableDiffusionPipeline

delta = {q(out_dir)}
pipe = StableDiffusionPipeline.from_pretrained({q(base_path)}, torch_dtype=torch.float16).to("cuda")
{load}
for token in {q(tokens)}:
    pipe.load_textual_inversion(delta, weight_name=f"{{token}}.safetensors")
image = pipe({q(example)}, num_inference_steps=50, guidance_scale=6.0).images[0]
```

lfs_jax's in-context generation (ICGen: starting from a concept photo's latent) is
not part of this export; diffusers samples plain text-to-image.
"""


# ---------------------------------------------------------------- import


def _read_tokens(from_dir: str) -> Dict[str, Tuple[np.ndarray, str]]:
  """{token: ([n, D] float32, file name)} from the other *.safetensors / *.bin files."""
  out: Dict[str, Tuple[np.ndarray, str]] = {}
  stems = {n.rsplit(".", 1)[0] for n in (WEIGHTS_NAME, lora_format.WEIGHTS_NAME)}
  for name in paths.listdir(from_dir):
    path = os.path.join(from_dir, name)
    if (name.rsplit(".", 1)[0] in stems or not name.endswith((".safetensors", ".bin"))
        or not paths.isfile(path)):
      continue
    state = _read_safetensors(path)
    if len(state) != 1:
      raise InteropError(
          f"{path} holds {len(state)} tensors; a token embedding file holds exactly one, "
          "{token: [D]}")
    (token, arr), = state.items()
    arr = np.asarray(arr, np.float32)
    if arr.ndim == 1:
      arr = arr[None]
    if arr.ndim != 2 or not arr.shape[0]:
      raise InteropError(f"{path}: embedding of {token!r} has shape {arr.shape}; a token "
                         "embedding is [D] or, with several vectors, [n, D]")
    if token in out:
      raise InteropError(f"token {token!r} is in both {out[token][1]} and {name}")
    out[token] = (arr, name)
  return out


def _read_concepts(from_dir: str, tokens: List[str]) -> List[Dict[str, Any]]:
  """The tokens' class words (and names, prompts) from `from_dir/concepts.json`, in its order."""
  path = os.path.join(from_dir, CONCEPTS_NAME)
  example = json.dumps([{"token": t, "class_word": "dog"} for t in tokens])
  if not paths.isfile(path):
    raise InteropError(
        f"{from_dir} has no {CONCEPTS_NAME}: lfs_jax needs each token's class word (for "
        f"its prompts and the distillation). Write {path} like\n  {example}")
  try:
    entries = json.loads(paths.read_text(path))
  except json.JSONDecodeError as e:
    raise InteropError(f"{path} is not valid JSON ({e})") from None
  if not isinstance(entries, list) or not all(
      isinstance(e, dict) and isinstance(e.get("token"), str)
      and isinstance(e.get("class_word"), str) and e["class_word"].strip() for e in entries):
    raise InteropError(f"{path} must be a list of {{\"token\", \"class_word\"}} objects, e.g.\n"
                       f"  {example}")
  listed = [e["token"] for e in entries]
  if sorted(listed) != sorted(tokens):
    raise InteropError(f"{path} lists tokens {listed}, the folder has embedding files for "
                       f"{sorted(tokens)}: they must be the same")
  return entries


def _leaf_delta(imported: Dict[Path, np.ndarray], weights: str, selection: str,
                unet_params) -> Tuple[dict, int]:
  """A leaf selection's delta: the export's leaves, the base's for the rest (+ leaf count)."""
  selected, _ = delta_lib.split(unet_params, delta_lib.selection_predicate(selection))
  want = convert.flatten(selected)
  for path, arr in imported.items():
    if path not in want:
      raise InteropError(
          f"{weights} trains {'/'.join(path)}, which train.selection="
          f"{selection!r} does not select (a wider selection takes it)")
    if arr.shape != tuple(want[path].shape):
      raise InteropError(f"{weights}: {'/'.join(path)} has shape {arr.shape}, the base "
                         f"model's is {tuple(want[path].shape)}: not this base's delta")
  return convert.unflatten({p: imported[p] if p in imported
                            else np.asarray(want[p], np.float32) for p in want}), len(want)


def _lora_delta(imported: Dict[Path, Tuple[np.ndarray, np.ndarray]], weights: str,
                selection: delta_lib.LoRA, unet_params, seed: int) -> Tuple[dict, int]:
  """LoRA factors in the run's scale: the file's for its layers, the initial ones
  (product zero) for the other targets (+ target count)."""
  flat = convert.flatten(selection.initial(unet_params, seed))
  targets = {p[:-1] for p in flat}
  for module, (a, b) in imported.items():
    name = "/".join(module)
    if module not in targets:
      raise InteropError(f"{weights} adapts {name}, which train.lora_targets="
                         f"{','.join(selection.targets)!r} does not target")
    if a.shape[1] != selection.rank:
      raise InteropError(f"{weights}: {name} has rank {a.shape[1]}; the run's "
                         f"train.lora_rank is {selection.rank}")
    want_a, want_b = flat[module + ("lora_A",)].shape, flat[module + ("lora_B",)].shape
    if a.shape != want_a or b.shape != want_b:
      raise InteropError(f"{weights}: {name} has factors {a.shape}, {b.shape}; the base "
                         f"model's layer takes {want_a}, {want_b}: not this base's LoRA")
    flat[module + ("lora_A",)] = a
    flat[module + ("lora_B",)] = (b / np.float32(selection.scale)).astype(np.float32)
  return convert.unflatten(flat), len(targets)


def import_delta(from_dir: str, workdir: str, cfg) -> Dict[str, Any]:
  """Turns a Custom Diffusion or LoRA delta folder into a new run whose session 1 it is.

  The run's `train.selection` decides the delta's leaves: those in the export are
  taken from it, the others from the base model (for LoRA: its layers' factors from
  the file, the other targets' at their start, product zero); an export with weights
  outside the selection is refused. The tokens keep their names and come first in the
  registry, in the order of `concepts.json`. The config is recorded with `data.sessions = ""`
  (the sessions trained later are appended); the context bank is empty, so ICGen
  cannot start from imported concepts (sample them with icgen.strength=1).

  Args:
    from_dir: folder with pytorch_custom_diffusion_weights.safetensors (or, for
      train.selection=lora, pytorch_lora_weights.safetensors), one embedding
      file per token (.safetensors, or diffusers' safetensors-in-.bin) and concepts.json.
    workdir: the new run directory (absent or empty).
    cfg: the run's config (base model, train.selection, ...), locked.

  Returns:
    {"workdir", "session": 1, "tokens", "from_export", "from_base"} (leaf counts; for
    LoRA, adapted layers).
  """
  if not paths.isdir(from_dir):
    raise InteropError(f"--from folder {from_dir!r} does not exist")
  selection = delta_lib.from_config(cfg.train)
  lora = isinstance(selection, delta_lib.LoRA)
  name = lora_format.WEIGHTS_NAME if lora else WEIGHTS_NAME
  weights = os.path.join(from_dir, name)
  if not paths.isfile(weights):
    alt = os.path.join(from_dir, name.replace(".safetensors", ".bin"))
    if not paths.isfile(alt):
      other = WEIGHTS_NAME if lora else lora_format.WEIGHTS_NAME
      hint = (f"; it holds {other}, which a run with train.selection="
              f"{'crossattn_kv|crossattn|attn' if lora else 'lora'} imports"
              if paths.isfile(os.path.join(from_dir, other)) else "")
      raise InteropError(f"{from_dir} has no {name} (nor a .bin of that name){hint}")
    weights = alt
  if paths.exists(workdir) and (not paths.isdir(workdir) or paths.listdir(workdir)):
    raise InteropError(f"{workdir} is not empty: an import starts a new run directory")
  if lora:
    try:
      imported = lora_format.from_diffusers(weights, _read_safetensors(weights))
    except lora_format.LoraFormatError as e:
      raise InteropError(str(e)) from None
  else:
    imported = read_processors(weights)
  tokens = _read_tokens(from_dir)
  if not tokens:
    raise InteropError(f"{from_dir} has no token embedding files (<token>.safetensors)")
  entries = _read_concepts(from_dir, list(tokens))

  pipe = base_lib.load_base(cfg.model, cfg.seed)
  if lora:
    delta_unet, n_total = _lora_delta(imported, weights, selection, pipe.unet_params, cfg.seed)
  else:
    delta_unet, n_total = _leaf_delta(imported, weights, cfg.train.selection, pipe.unet_params)

  d = pipe.text_encoder.config.hidden_size
  vocab = pipe.tokenizer.get_vocab()
  concepts, names = [], set()
  for e in entries:
    own, fname = tokens[e["token"]]
    if own.shape[1] != d:
      raise InteropError(f"{fname}: embedding of {e['token']!r} has width {own.shape[1]}, "
                         f"the text encoder's is {d}")
    if e["token"] in vocab:
      raise InteropError(f"token {e['token']!r} ({fname}) is already a word of the tokenizer")
    if e.get("vectors", len(own)) != len(own):
      raise InteropError(f"{CONCEPTS_NAME} gives {e['token']!r} {e['vectors']} vectors, "
                         f"{fname} holds {len(own)}")
    name = e.get("name") or e["token"].strip("<>") or e["token"]
    if name in names:
      raise InteropError(f"concept name {name!r} appears twice in {CONCEPTS_NAME}")
    names.add(name)
    concepts.append(concepts_lib.Concept(
        name=name, token=e["token"], class_word=e["class_word"],
        initializer=e["class_word"].split()[-1], session=1, images=(),
        prompts=tuple(e.get("prompts") or ()), vectors=len(own)))
  registry = concepts_lib.Registry(tuple(concepts))
  firsts = {c.token for c in concepts}
  taken = [t for c in concepts for t in c.tokens[1:] if t in vocab or t in firsts]
  if taken:
    raise InteropError(f"token {taken[0]!r} (a multi-vector token's row) is already a word "
                       "of the tokenizer")
  rows = np.concatenate([tokens[c.token][0] for c in concepts])

  config = runs.jsonable(cfg.to_dict())
  config["data"]["sessions"] = ""
  meta = runs.session_meta(
      1, registry, config, steps=0, metrics={}, seconds=0.0,
      imported={"from": paths.abspath(from_dir), "weights": os.path.basename(weights),
                "tokens": {t: tokens[t][1] for t in registry.names}})
  optimizer = step_lib.make_optimizer(cfg.train)
  opt_state = optimizer.init({"unet": delta_unet, "tokens": rows})
  with _staged(workdir) as tmp:
    checkpoint.save_session(tmp, 1, delta={"unet": delta_unet, "tokens": rows}, bank={},
                            opt_state=opt_state, meta=meta)
    registry.save(os.path.join(tmp, runs.CONCEPTS))
    runs.write_config(tmp, config)  # last: a folder with config.json is a run
  return {"workdir": paths.abspath(workdir), "session": 1, "tokens": registry.names,
          "from_export": len(imported), "from_base": n_total - len(imported)}
