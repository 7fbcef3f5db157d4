#!/usr/bin/env bash
# One machine, all its local devices (GPUs, the chips of one TPU host, or CPU), one process.
#
#   launch/local.sh CONFIG WORKDIR [--config.x=y ...]
#   launch/local.sh configs/sd15.py runs/sd15 --config.model.path=/models/sd15 \
#       --config.data.root=/data/concepts --config.data.sessions="teddy;mug"
#
# The mesh takes every device (mesh.data=-1): with FSDP=1 (default) each device holds
# the whole frozen base and the batch is split over all of them; FSDP=k puts k devices
# on the fsdp axis and, with FROZEN=fsdp, splits each frozen weight over them (for a
# base that does not fit one device). train.batch_size and kd.batch_size must be
# multiples of the device count. distributed.cluster=none: never wait for other hosts.
# Add --resume to continue the run in WORKDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: launch/local.sh CONFIG WORKDIR [flags]}
WORKDIR=${2:?usage: launch/local.sh CONFIG WORKDIR [flags]}
shift 2
exec "${PYTHON:-python}" -m lfs_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
  --config.distributed.cluster=none \
  --config.mesh.data=-1 --config.mesh.fsdp="${FSDP:-1}" --config.mesh.frozen="${FROZEN:-replicated}" \
  "$@"
