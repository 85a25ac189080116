#!/usr/bin/env bash
# Runs the five stages on every worker of a Cloud TPU VM pod slice (multi-host JAX).
#
#   launch/tpu_pod.sh TPU_NAME ZONE gs://BUCKET/run gs://BUCKET/latents [extra train flags...]
#
# Every host runs the same command; jax.distributed.initialize() (--distributed) finds the
# others through the TPU metadata. Workdirs and datasets must be on storage every host sees
# (GCS through gcsfuse or a shared filesystem): Orbax writes one checkpoint from all hosts.
# The mesh is set per stage with --config.mesh.*, e.g. --config.mesh.fsdp=-1 --config.mesh.data=1.
set -euo pipefail
name=${1:?TPU name}; zone=${2:?zone}; root=${3:?workdir root}; latents=${4:?latents root}
shift 4
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
  cd ~/ttt-jax && pip install -q -e . 'jax[tpu]' &&
  launch/stages.sh '$root' '$latents' '' --distributed $*"
