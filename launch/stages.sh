#!/usr/bin/env bash
# The paper's five stages in order, each handed off from the previous one's workdir.
#
#   launch/stages.sh ROOT LATENTS_ROOT [CONFIG_ARG] [extra train flags...]
#
# ROOT/<stage> are the workdirs; LATENTS_ROOT/<stage> the precomputed datasets
# (python -m ttt_jax.data.precompute --config=configs/tomjerry_<stage>.py ...). CONFIG_ARG is
# empty or "runlocal". A stage whose workdir already holds its final model is skipped; an
# interrupted one resumes from its last checkpoint. On a TPU pod run this on every worker
# (launch/tpu_pod.sh does), with --distributed.
set -euo pipefail
root=${1:?workdir root}; latents=${2:?latents root}; arg=${3:-}; shift $(( $# < 3 ? $# : 3 ))
previous=""
for stage in 3s 9s 18s 30s 63s; do
  config="configs/tomjerry_${stage}.py${arg:+:$arg}"
  python -m ttt_jax.train --config="$config" --workdir="$root/$stage" \
      --config.data.latents="$latents/$stage" --config.init_from="$previous" "$@"
  # A stage stopped by SIGTERM (preemption) exits 0 with a checkpoint but no model/: the next
  # stage must not start from it. Stop; rerunning this script resumes the stage.
  if ! python -c 'import sys; from etils import epath; sys.exit(not epath.Path(sys.argv[1]).is_dir())' \
      "$root/$stage/model"; then
    echo "stage $stage stopped before its last step; rerun $0 to resume it" >&2
    exit 0
  fi
  previous="$root/$stage"
done
