#!/usr/bin/env bash
# Item 1's next base on a lent GPU machine: a mini-world base trained on the shipped
# base's recipe (N1's flags: pattern-naming captions, its text encoder trained with the
# UNet, the shipped VAE) at another UNet shape, then scored as the shipped base was.
# On the 2-core CPU the wide UNet trains at 1.8 steps/s (3.7 h for 24,000 steps), so
# these bases are trained on the GPU. Run from the repository root:
#
#   bash bench/gpu_bases.sh train wide     # the CUDA check, then train + named designs
#   bash bench/gpu_bases.sh score wide     # Custom Diffusion on it, three seeds
#   bash bench/gpu_bases.sh all wide       # both, one call (if the training is fast)
#
# ARCH (second argument): wide | cross16 | base (train_base --unet_arch; cross16 and
# wide from scratch). The model is written to $BASES/<arch> (default /tmp/bases: it
# survives between calls only while the machine stays warm, 30 s) and its UNet and text
# encoder come back as $OUT/<arch>_unet.tar and _text_encoder.tar with _TRAINING.json
# (the rest is the shipped base's). A later `score` call rebuilds the model from them:
# copy the three files into a git-ignored folder, carry it, FROM=that/folder.
# The training state is written every 2,000 steps (train_base --resume_every): a call
# killed at the run's time limit is continued by the next `train` call while the
# machine is still warm. Prints, and writes to $OUT/<arch>_table.md: the named-design
# rates (ceiling --named, 32 seeds) and Custom Diffusion's row (bench: acc own, nIA
# own, class accuracy; 3 seeds, 64 samples a concept, striped_star, checked_square,
# dotted_star), as docs/mini_world.md scores the shipped base.
#
# Wheels: as bench/gpu.sh's header says (carry .whl). A CPU dry run of every command,
# in minutes: DEVICE=cpu STEPS=20 IMAGES=400 SEEDS=0 NAMED=2 EVAL=2 OUT=/tmp/o \
#   bash bench/gpu_bases.sh all wide
set -uo pipefail
stage="${1:-all}"
arch="${2:-wide}"
OUT="${OUT:-/tmp/bench_out}"
BASES="${BASES:-/tmp/bases}"
DEVICE="${DEVICE:-cuda}"
STEPS="${STEPS:-24000}"      # N1's schedule length
IMAGES="${IMAGES:-60000}"
SEEDS="${SEEDS:-0,1,2}"
NAMED="${NAMED:-32}"         # seeds a design for ceiling --named
EVAL="${EVAL:-64}"           # samples a concept for the bench (:plastic's; 16 until 2026-12-07)
case "$arch" in wide|cross16|base) ;; *) echo "ARCH must be wide, cross16 or base, got $arch" >&2; exit 2 ;; esac
mkdir -p "$OUT" "$BASES"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
source bench/gpu_env.sh || exit 1
model="$BASES/$arch"

train() {
  if [ "$DEVICE" != cpu ]; then  # the loop on this device follows the CPU's (tests/test_mini.py)
    python3 -m pytest -q -p no:cacheprovider tests/test_mini.py -k cuda_follows 2>&1 \
      | tee "$OUT/cuda_test.log" | tail -3
  fi
  local t0=$SECONDS
  python3 -m lfs_jax.mini.train_base --out="$model" --backend=torch --torch_device="$DEVICE" \
    --seed=26 --images="$IMAGES" --pattern_share=0.5 --name_patterns --pattern_words=distinct \
    --train_text_encoder --unet_arch="$arch" --vae_from=lfs_jax/assets/mini_base \
    --unet_steps="$STEPS" --resume_every=2000 2>&1 | tee "$OUT/${arch}_train.log" | grep -v "unet step" || true
  grep "unet step" "$OUT/${arch}_train.log" | tail -2
  echo "train: $((SECONDS - t0)) s"
  [ -f "$model/TRAINING.json" ] || { echo "no model at $model" >&2; return 1; }
  cp "$model/TRAINING.json" "$OUT/${arch}_TRAINING.json"
  local part  # two files: a returned file holds at most 16 MiB (the wide UNet is 15.6 MB)
  for part in unet text_encoder; do
    tar -cf "$OUT/${arch}_$part.tar" -C "$model" "$part"
    [ "$(stat -c %s "$OUT/${arch}_$part.tar")" -le $((16 * 1024 * 1024)) ] \
      || { echo "$part tar over 16 MiB: not brought back"; rm -f "$OUT/${arch}_$part.tar"; }
  done
  python3 -m lfs_jax.mini.ceiling --named --pattern_words=distinct --images="$NAMED" \
    --model="$model" --json="$OUT/${arch}_named.json" 2>&1 | tee "$OUT/${arch}_named.log" | tail -12
}

score() {
  if [ ! -f "$model/TRAINING.json" ] && [ -n "${FROM:-}" ]; then  # the files train brought back
    rm -rf "$model" && cp -r lfs_jax/assets/mini_base "$model" && rm -rf "$model"/{unet,text_encoder} \
      && tar -xf "$FROM/${arch}_unet.tar" -C "$model" && tar -xf "$FROM/${arch}_text_encoder.tar" -C "$model" \
      && cp "$FROM/${arch}_TRAINING.json" "$model/TRAINING.json" || return 1
  fi
  [ -f "$model/TRAINING.json" ] || { echo "no model at $model: run the train stage first" >&2; return 1; }
  python3 -m lfs_jax.mini.bench --config=configs/mini.py:short --workdir="$BASES/bench_$arch" \
    --config.mini.variants=custom_diffusion \
    --config.data.sessions='striped_star;checked_square;dotted_star' \
    --config.mini.seeds="$SEEDS" --config.mini.eval_images="$EVAL" \
    --config.model.path="$model" 2>&1 | tee "$OUT/${arch}_bench.log" | grep -v "step/s" | tail -30
}

table() {  # what docs/mini_world.md's tables take, in one place
  {
    echo "## $arch: $(python3 -c 'import json, sys; r = json.load(open(sys.argv[1]))
print(r["steps_done"], "steps, train_base on", r["args"]["torch_device"])' "$model/TRAINING.json" 2>&1)"
    grep "unet step" "$OUT/${arch}_train.log" 2>/dev/null | tail -1
    [ -f "$OUT/${arch}_named.log" ] && tail -12 "$OUT/${arch}_named.log"
    [ -f "$BASES/bench_$arch/report.md" ] && sed -n '/^| variant/,/^$/p' "$BASES/bench_$arch/report.md"
  } | tee "$OUT/${arch}_table.md"
}

case "$stage" in
  train) train; table ;;
  score) score; table ;;
  all) train && score; table ;;
  *) echo "usage: bash bench/gpu_bases.sh [train|score|all] [wide|cross16|base]" >&2; exit 2 ;;
esac
