#!/usr/bin/env bash
# The stage chain (launch/stages.sh) on every worker of a Cloud TPU VM slice, one process per
# host, from a given commit of this repository.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh --name=NAME --zone=ZONE [options] -- STAGES_ARGS...

  1. --create: queues the slice (gcloud compute tpus queued-resources create) and waits until
     it is ACTIVE.
  2. Copies the code at --commit (git archive) to every worker into ~/ttt-jax-<sha>, and
     installs it there with its own extras (pip install -e '.[tpu]') once: a worker that has
     the commit installed skips both.
  3. Starts launch/stages.sh --distributed STAGES_ARGS on every worker (jax.distributed finds
     the other hosts through the TPU metadata), streams worker 0's log, and on failure
     collects every worker's log into ./logs/<name>-<time>.log.

Options:
  --name=NAME            TPU VM (and queued resource) name
  --zone=ZONE            e.g. us-east5-a
  --project=PROJECT      default: gcloud's configured project
  --create               queue the slice first (needs --accelerator and --runtime)
  --accelerator=TYPE     e.g. v5p-256, v6e-256
  --runtime=VERSION      TPU VM image, e.g. v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)
  --spot                 a spot slice (with --create)
  --commit=REV           the code to run (default HEAD; must be committed)
  --dry-run              print every command (shell-quoted), run nothing
  -h, --help             this text
STAGES_ARGS go to launch/stages.sh on each worker, quoted as given: ROOT LATENTS_ROOT (gs://
paths every host sees), --stages=..., per-stage mesh flags (--stage-flags=63s:...) and XLA/libtpu
flags (--stage-env=63s:LIBTPU_INIT_ARGS=...), -- train flags. See launch/README.md.
EOF
}

name="" zone="" project="" create=0 accelerator="" runtime="" spot=0 commit=HEAD dry_run=0
stages_args=()
while (( $# )); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --create) create=1 ;;
    --accelerator=*) accelerator=${1#*=} ;;
    --runtime=*) runtime=${1#*=} ;;
    --spot) spot=1 ;;
    --commit=*) commit=${1#*=} ;;
    --dry-run) dry_run=1 ;;
    --) shift; stages_args=("$@"); break ;;
    *) echo "tpu_vm.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z $name || -z $zone || ${#stages_args[@]} -eq 0 ]]; then
  usage >&2; exit 2
fi
if (( create )) && [[ -z $accelerator || -z $runtime ]]; then
  echo "tpu_vm.sh: --create needs --accelerator and --runtime" >&2; exit 2
fi

cd "$(dirname "$0")/.."
sha=$(git rev-parse --verify "$commit^{commit}")
code="ttt-jax-$sha"
log="$code/run.log"
where=(--zone="$zone")
[[ -n $project ]] && where+=(--project="$project")

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
remote() {  # remote WORKERS COMMAND: one shell command line on the workers
  run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker="$1" --command="$2"
}

if (( create )); then
  queued=(gcloud compute tpus queued-resources create "$name" --node-id="$name" "${where[@]}"
          --accelerator-type="$accelerator" --runtime-version="$runtime")
  (( spot )) && queued+=(--spot)
  run "${queued[@]}"
  state=(gcloud compute tpus queued-resources describe "$name" "${where[@]}"
         --format='value(state.state)')
  if (( dry_run )); then
    quote_all "${state[@]}"; echo "  # repeated until ACTIVE"
  else
    until [[ $("${state[@]}") == ACTIVE ]]; do sleep 30; done
  fi
fi

# The code at the commit, copied and installed once per worker.
archive="/tmp/$code.tar.gz"
run git archive --format=tar.gz -o "$archive" "$sha"
run gcloud compute tpus tpu-vm scp "$archive" "$name:" "${where[@]}" --worker=all
# (Remote commands are one line each: --dry-run prints them quoted as plain shell words.)
remote all "set -e; if [ ! -f ~/$code/.installed ]; then mkdir -p ~/$code &&"\
" tar xzf ~/$code.tar.gz -C ~/$code && pip install -q -e ~/$code'[tpu]' &&"\
" touch ~/$code/.installed; fi"

# Every worker starts the chain detached (an ssh cut does not stop it); worker 0's log streams
# here until its chain ends, and its exit status is this script's.
quoted=$(quote_all "${stages_args[@]}")
# (A subshell that ignores SIGHUP, not bash -c '...': the quoted arguments may hold quotes.)
remote all "cd ~/$code && rm -f run.log run.rc &&"\
" ( trap '' HUP; launch/stages.sh --distributed $quoted > run.log 2>&1; echo \$? > run.rc )"\
" > /dev/null 2>&1 < /dev/null &"
status=0
remote 0 "tail -n +1 -F ~/$log & t=\$!; until [ -f ~/$code/run.rc ]; do sleep 10; done;"\
" sleep 2; kill \$t; exit \$(cat ~/$code/run.rc)" || status=$?
if (( status )); then
  mkdir -p logs
  collected="logs/$name-$(date -u +%Y%m%dT%H%M%SZ).log"
  echo "worker 0 exited $status; every worker's log goes to $collected" >&2
  remote all "sed \"s/^/[\$(hostname)] /\" ~/$log" > "$collected" || true
fi
exit "$status"
