#!/usr/bin/env bash
# A Cloud TPU pod slice (e.g. v4-32: 4 hosts x 4 chips): the same command on every host.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b WORKDIR=/mnt/shared/runs/sd15 \
#     launch/tpu_pod.sh --config.model.path=/mnt/shared/models/sd15 \
#       --config.data.root=/mnt/shared/concepts --config.data.sessions="teddy;mug"
#
# Every host runs `python -m lfs_jax.main` (gcloud ... --worker=all); with
# distributed.cluster=auto (the default) each one calls jax.distributed.initialize(),
# which finds the other hosts from the TPU metadata, and the mesh spans all chips.
# Needs on every host: this repository at REPO_DIR with lfs_jax installed
# (pip install -e '.[gcs]' 'jax[tpu]'), the model and photos at the same paths, and
# WORKDIR on storage that every host sees (a gs:// bucket URL, or NFS, Filestore,
# gcsfuse): Orbax writes the checkpoints from all hosts, process 0 writes
# config.json, concepts.json and logs. With buckets (README, "Buckets (GCS) on a pod"):
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b WORKDIR=gs://my-bucket/runs/sd15 \
#     launch/tpu_pod.sh --config.model.path=gs://my-bucket/models/sd15 \
#       --config.data.root=gs://my-bucket/concepts --config.data.sessions="teddy;mug"
# CONFIG defaults to configs/sd15.py. The mesh: FSDP chips per fsdp group (default 1:
# pure data parallel, each chip a whole copy of the frozen base) and FROZEN=fsdp to
# split the frozen base over them (SD 2.x at 768 px on 16 GB chips, say);
# train.batch_size and kd.batch_size must be multiples of the chip count (the config
# sets 8: pass --config.train.batch_size=32 --config.kd.batch_size=32 on 32 chips).
# A preempted slice gets SIGTERM: progress is saved; rerun with --resume.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (shared storage)}"
REPO_DIR=${REPO_DIR:-lfs_jax}
CONFIG=${CONFIG:-configs/sd15.py}
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} \
  --worker=all --command "cd $REPO_DIR && python -m lfs_jax.main --config=$CONFIG \
    --workdir=$WORKDIR --config.mesh.data=-1 --config.mesh.fsdp=${FSDP:-1} \
    --config.mesh.frozen=${FROZEN:-replicated} ${ARGS}"
