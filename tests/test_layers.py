"""The import graph of lfs_jax: no cycles, and no import from a lower layer to a higher one.

Every `import` counts, also one inside a function ("lazy"): a lazy import is still
an arrow in the design. The layers are listed in docs/ARCHITECTURE.md.
"""

import ast
import functools
import os

import lfs_jax

ROOT = os.path.dirname(lfs_jax.__file__)

# Lowest first. A module may import its own layer and the layers below it; the first
# matching prefix names a module's layer.
LAYERS = (
    ("lfs_jax.errors", "lfs_jax.config_base", "lfs_jax.console", "lfs_jax.paths"),
    ("lfs_jax.parallel",),
    ("lfs_jax.models", "lfs_jax.diffusion"),
    ("lfs_jax.weights",),
    ("lfs_jax.data", "lfs_jax.datasets", "lfs_jax.concepts", "lfs_jax.icgen", "lfs_jax.base",
     "lfs_jax.tiny"),
    ("lfs_jax.checkpoint", "lfs_jax.delta", "lfs_jax.lora_format", "lfs_jax.lock"),
    ("lfs_jax.runs",),
    ("lfs_jax.sample",),
    ("lfs_jax.evaluate",),
    ("lfs_jax.train",),
    ("lfs_jax.interop",),
    ("lfs_jax.mini",),
    ("lfs_jax.main",),
)


def _modules():
  out = {}
  for dirpath, _, names in os.walk(ROOT):
    for name in names:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, name), os.path.dirname(ROOT))
        mod = rel[:-3].replace(os.sep, ".")
        out[mod[:-len(".__init__")] if mod.endswith(".__init__") else mod] = os.path.join(
            dirpath, name)
  return out


def _imports(mod: str, path: str, known) -> set:
  """lfs_jax modules that `mod` imports anywhere in its file."""
  with open(path) as f:
    tree = ast.parse(f.read())
  got = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        pkg = mod.split(".")[:len(mod.split(".")) - node.level + (path.endswith("__init__.py"))]
        base = ".".join(pkg + ([base] if base else []))
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    else:
      continue
    got.update(n for n in names if n in known and n != mod)
  return got


@functools.lru_cache(maxsize=None)
def _graph():
  mods = _modules()
  return {m: _imports(m, p, mods) for m, p in mods.items()}


def _layer(mod: str) -> int:
  for i, prefixes in enumerate(LAYERS):
    if any(mod == p or mod.startswith(p + ".") for p in prefixes):
      return i
  raise AssertionError(f"{mod} is in no layer of tests/test_layers.py: add it")


def test_every_import_points_down_or_sideways():
  bad = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
         for a, deps in _graph().items() for b in deps
         if b != "lfs_jax" and _layer(b) > _layer(a)]
  assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
  graph = _graph()
  index, low, stack, on, cycles = {}, {}, [], set(), []

  def visit(v):  # Tarjan's strongly connected components
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        cycles.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  assert not cycles, cycles


def test_sampling_and_evaluation_never_load_training():
  graph = _graph()
  for root in ["lfs_jax.sample", "lfs_jax.runs"] + [m for m in graph
                                                    if m.startswith("lfs_jax.evaluate")]:
    seen, todo = set(), [root]
    while todo:
      for dep in graph[todo.pop()] - seen:
        seen.add(dep)
        todo.append(dep)
    assert not [m for m in seen if m.startswith("lfs_jax.train")], (root, sorted(seen))


def test_the_walk_sees_lazy_imports():
  """The guard reads imports inside functions too (main imports the trainer lazily)."""
  assert "lfs_jax.train.session" in _graph()["lfs_jax.main"]
