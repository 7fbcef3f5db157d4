#!/usr/bin/env bash
# The benchmark on a lent GPU machine (nvidia-h100-x1 or nvidia-h200), run from the
# repository root:
#
#   bash bench/gpu.sh jax       # JAX, cold compile cache, then a warm-cache compile pass (~6-8 min)
#   bash bench/gpu.sh torch     # PyTorch eager (~2 min)
#   bash bench/gpu.sh compile   # PyTorch torch.compile (slow: the anchors' first steps took 135 s)
#   bash bench/gpu.sh all       # jax then torch (may pass one 10-minute command: prefer two calls)
#   bash bench/gpu.sh lease     # one call for a 15-minute lease (<= 9.5 min): jax cold, torch eager,
#                               # then warm-cache compiles of the train steps
#
# It writes $OUT/bench.jsonl (timed runs), $OUT/bench_warm.jsonl (warm-cache compiles)
# and $OUT/<stage>.log, and prints a markdown table of everything measured so far.
#
# That machine has jax (CUDA), flax, optax, transformers and torch but neither
# diffusers nor ml_collections, and no package index. Bring their wheels in .whl/
# (pure Python; prepare them on the developer machine, in the repo root):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl \
#     diffusers==0.42.1 ml_collections==1.1.0 importlib_metadata==10.2.0 lazy-importer==0.1.0
#
# and name `.whl` in the run call's `carry`. Without .whl only the JAX stage can run
# (lfs_jax's configs need ml_collections: then that stage fails at import, loudly).
set -uo pipefail
stage="${1:-all}"
OUT="${OUT:-/tmp/bench_out}"
CACHE="${LFS_BENCH_CACHE:-/tmp/lfs_bench_xla}"   # persistent XLA cache (fresh machine: cold)
WORKLOADS="${BENCH_WORKLOADS:-cd,lfs,lfs_cached,sample,vae}"  # a subset splits a short lease
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

source bench/gpu_env.sh || exit 1

run_jax() {
  # Cold: the cache folder starts empty. Each workload is its own process (its own peak memory).
  rm -rf "$CACHE"
  timeout 420 python3 -m bench --frameworks jax --workloads "$WORKLOADS" --out "$OUT/bench.jsonl" \
    --jax-flags "--compile-cache $CACHE" 2>&1 | tee "$OUT/jax.log"
  # Warm: the same programs again, lower + compile only, now served by the cache.
  timeout 120 python3 -m bench --frameworks jax --workloads "$WORKLOADS" --out "$OUT/bench_warm.jsonl" \
    --jax-flags "--compile-cache $CACHE --compile-only" 2>&1 | tee "$OUT/jax_warm.log"
}
run_lease() {
  # Everything a 15-minute lease allows in one command, each part capped so the whole
  # ends inside 9.5 minutes: cold JAX (every workload), PyTorch eager, warm JAX compiles.
  # On an H100 the JAX part took ~100 s per train step (90 s of it cold compile), 45 s
  # for the sampler and 20 s for the VAE: 400 s holds all five (330 s cut the sampler).
  rm -rf "$CACHE"
  timeout 400 python3 -m bench --frameworks jax --workloads "$WORKLOADS" --out "$OUT/bench.jsonl" \
    --jax-flags "--compile-cache $CACHE" 2>&1 | tee "$OUT/jax.log"
  run_torch eager 110   # ~70 s on an H100
  local warm  # the train steps among $WORKLOADS: the warm-compile target is theirs
  warm=$(tr ',' '\n' <<<"$WORKLOADS" | grep -xE 'cd|lfs|lfs_cached' | head -2 | paste -sd, -)
  [ -n "$warm" ] && timeout 50 python3 -m bench --frameworks jax --workloads "$warm" \
    --out "$OUT/bench_warm.jsonl" --jax-flags "--compile-cache $CACHE --compile-only" 2>&1 \
    | tee "$OUT/jax_warm.log"
}
run_torch() {
  timeout "${2:-300}" python3 -m bench --frameworks torch --workloads "$WORKLOADS" --torch-modes "$1" \
    --out "$OUT/bench.jsonl" 2>&1 | tee "$OUT/torch_$1.log"
}

case "$stage" in
  jax) run_jax ;;
  torch) run_torch eager ;;
  compile) run_torch compile ;;
  all) run_jax; run_torch eager ;;
  lease) run_lease ;;
  *) echo "usage: bash bench/gpu.sh [jax|torch|compile|all|lease]" >&2; exit 2 ;;
esac

echo; echo "== timed runs ($OUT/bench.jsonl)"
[ -s "$OUT/bench.jsonl" ] && python3 -m bench --table-only "$OUT/bench.jsonl"
if [ -s "$OUT/bench_warm.jsonl" ]; then
  echo; echo "== warm-cache compiles ($OUT/bench_warm.jsonl)"
  python3 -m bench --table-only "$OUT/bench_warm.jsonl"
fi
