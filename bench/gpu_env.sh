# Sourced by the lent-GPU scripts (bench/gpu.sh, bench/gpu_bases.sh) from the
# repository root with $OUT set: installs the carried wheels (.whl/, see bench/gpu.sh's
# header) on PYTHONPATH with the repository, and records the GPU and the versions in
# $OUT/gpu.txt.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no .whl/: diffusers and ml_collections must already be installed" >&2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  | tee "$OUT/gpu.txt"
python3 - <<'EOF' 2>&1 | tee -a "$OUT/gpu.txt"
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "ml_collections"):
  try:
    print(name, importlib.import_module(name).__version__)
  except Exception as e:  # report, the stage that needs it fails later
    print(name, "MISSING", e)
import jax
print("jax devices", jax.devices())
EOF
