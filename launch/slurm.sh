#!/usr/bin/env bash
# The stage chain (launch/stages.sh) on a SLURM GPU cluster: submits one sbatch job whose tasks
# (one per GPU or one per node) each run the chain as one jax.distributed process.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/slurm.sh [options] -- STAGES_ARGS...

Submits `sbatch ... --wrap='srun ... launch/stages.sh --distributed STAGES_ARGS'` from the
repository (on storage every node sees). jax.distributed.initialize() (--distributed) reads the
coordinator, process count and process id from SLURM's variables. Install the package once
before submitting (--install): pip install -e . 'jax[cuda12]' in setup.py's jax range.

Options:
  --nodes=N              nodes (default 1)
  --gpus-per-node=G      GPUs per node (default 8)
  --tasks=gpu|node       one process per GPU (default; JAX gives it the GPU of its
                         SLURM_LOCALID) or one per node (it takes all G GPUs)
  --partition=P          SLURM partition
  --account=A            SLURM account
  --time=T               time limit, e.g. 48:00:00
  --job-name=NAME        default ttt-jax
  --install              pip install -e . with jax[cuda12] here first (shared storage: once)
  --dry-run              print the commands (shell-quoted), submit nothing
  -h, --help             this text
STAGES_ARGS go to launch/stages.sh, quoted as given: ROOT LATENTS_ROOT, --stages=...,
--stage-flags=STAGE:..., --stage-env=STAGE:NAME=VALUE (per-stage XLA_FLAGS), -- train flags.
EOF
}

nodes=1 gpus=8 tasks=gpu partition="" account="" time_limit="" job=ttt-jax install=0 dry_run=0
stages_args=()
while (( $# )); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --nodes=*) nodes=${1#*=} ;;
    --gpus-per-node=*) gpus=${1#*=} ;;
    --tasks=*) tasks=${1#*=} ;;
    --partition=*) partition=${1#*=} ;;
    --account=*) account=${1#*=} ;;
    --time=*) time_limit=${1#*=} ;;
    --job-name=*) job=${1#*=} ;;
    --install) install=1 ;;
    --dry-run) dry_run=1 ;;
    --) shift; stages_args=("$@"); break ;;
    *) echo "slurm.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if (( ${#stages_args[@]} == 0 )); then
  usage >&2; exit 2
fi
case "$tasks" in
  gpu) per_node=$gpus devices=() ;;
  node) per_node=1 devices=(--local-device-ids="$(seq -s, 0 $((gpus - 1)))") ;;
  *) echo "slurm.sh: --tasks must be gpu or node, got '$tasks'" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

(( install )) && run pip install -q -e . 'jax[cuda12]>=0.10.0,<0.12'  # setup.py's jax range
(( dry_run )) || mkdir -p logs
batch=(sbatch --job-name="$job" --nodes="$nodes" --ntasks-per-node="$per_node"
       --gpus-per-node="$gpus" --output="logs/%x-%j.log" --chdir="$PWD")
[[ -n $partition ]] && batch+=(--partition="$partition")
[[ -n $account ]] && batch+=(--account="$account")
[[ -n $time_limit ]] && batch+=(--time="$time_limit")
# --kill-on-bad-exit: one failed process ends the job instead of leaving the others waiting in a
# collective. Each task runs the chain itself; finished stages are skipped on every process.
inner="exec launch/stages.sh --distributed $(quote_all ${devices[@]+"${devices[@]}"} "${stages_args[@]}")"
run "${batch[@]}" --wrap="srun --kill-on-bad-exit=1 bash -c $(quote "$inner")"
