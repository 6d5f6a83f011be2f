#!/usr/bin/env bash
# goosejax pretraining on a Cloud TPU VM slice: the same command on every worker.
#
#   TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh --config configs/rwkv7-1.5b.yaml \
#       --run-dir /mnt/shared/runs/x data.paths=[/mnt/shared/data/pile_text_document] mesh.data=1 mesh.fsdp=-1
#
# Assumes goosejax is installed on every worker (pip install -e . in ~/goosejax). The run
# directory must be one filesystem that every worker mounts (Filestore/NFS, or a gcsfuse
# mount of a bucket): checkpoints are written by all workers together. `--distributed on`
# makes every worker call jax.distributed.initialize(), which finds the slice's coordinator
# on its own. Workers of a slice can start minutes apart after a preemption, hence the long
# start-up timeout. `launch/tpu_pod.sh --dry-run ARGS...` prints the gcloud command and runs
# nothing.
set -euo pipefail
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE to its zone}"
quoted=$(printf '%q ' "$@")
cmd=(gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command
     "cd ~/goosejax && goosejax train --distributed on --distributed-timeout 1800 --no-progress-bar $quoted")
if ((dry_run)); then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
"${cmd[@]}"
