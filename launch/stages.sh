#!/usr/bin/env bash
# The paper's five stages in order, each handed off from the previous one's workdir.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/stages.sh [options] ROOT LATENTS_ROOT [-- extra train flags...]

Trains configs/tomjerry_<stage>.py for each stage into ROOT/<stage>, reading
LATENTS_ROOT/<stage> (python -m ttt_jax.data.precompute), each stage starting from the
previous one's parameters (--config.init_from). ROOT may be a gs:// path.

A stage whose workdir is finished (its newest Orbax checkpoint is at its config's train.steps
and its model/ export is complete: python -m ttt_jax.checkpoint WORKDIR) is skipped; an
interrupted one resumes from its last checkpoint. A stage stopped by SIGTERM (preemption)
exits 0 unfinished: the chain stops there, and rerunning this script resumes it.

Options:
  --stages=3s,9s,...        stages to run, in order (default 3s,9s,18s,30s,63s); the first
                            one's init_from is the stage before it in the full chain
  --runlocal                the :runlocal configs (CPU size, same structure)
  --distributed             pass --distributed to train (one process per host)
  --local-device-ids=0,1,.. with --distributed: this process's devices (default: JAX's choice,
                            under SLURM the GPU of SLURM_LOCALID)
  --stage-flags=STAGE:FLAGS train flags for one stage only, split at whitespace, e.g.
                            --stage-flags='63s:--config.mesh.context=8 --config.mesh.fsdp=-1'
                            (repeatable)
  --stage-env=STAGE:NAME=VALUE  an environment variable for one stage's train process, the
                            value kept whole, e.g. --stage-env='63s:LIBTPU_INIT_ARGS=--a --b'
                            (repeatable)
  --dry-run                 print the commands (shell-quoted), run nothing
  -h, --help                this text
Flags after -- go to every stage's train command, quoted as given.
EOF
}

all_stages=(3s 9s 18s 30s 63s)
stages=("${all_stages[@]}")
dry_run=0 runlocal=0 distributed=0 local_device_ids=""
declare -A stage_flags=() stage_env=()
positional=() extra=()
while (( $# )); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --runlocal) runlocal=1 ;;
    --distributed) distributed=1 ;;
    --local-device-ids=*) local_device_ids=${1#*=} ;;
    --stages=*) IFS=, read -ra stages <<< "${1#*=}" ;;
    --stage-flags=*) v=${1#*=}; stage_flags[${v%%:*}]+=" ${v#*:}" ;;
    # Newline-separated NAME=VALUE assignments per stage: values may hold spaces.
    --stage-env=*) v=${1#*=}; stage_env[${v%%:*}]+="${v#*:}"$'\n' ;;
    --) shift; extra=("$@"); break ;;
    -*) echo "stages.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) positional+=("$1") ;;
  esac
  shift
done
if (( ${#positional[@]} != 2 )); then
  usage >&2; exit 2
fi
root=${positional[0]%/} latents=${positional[1]%/}
python=${PYTHON:-python}
suffix=""
if (( runlocal )); then suffix=":runlocal"; fi
for stage in "${stages[@]}" "${!stage_flags[@]}" "${!stage_env[@]}"; do
  if [[ ! " ${all_stages[*]} " == *" $stage "* ]]; then
    echo "stages.sh: unknown stage '$stage' (stages: ${all_stages[*]})" >&2; exit 2
  fi
done

# The stage before `stage` in the full chain ("" for 3s).
previous_of() {
  local i
  for i in "${!all_stages[@]}"; do
    if [[ ${all_stages[$i]} == "$1" ]]; then
      (( i > 0 )) && echo "$root/${all_stages[$((i - 1))]}"
      return 0
    fi
  done
}

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

for stage in "${stages[@]}"; do
  workdir="$root/$stage"
  if (( ! dry_run )) && "$python" -m ttt_jax.checkpoint "$workdir"; then
    echo "stage $stage: finished in $workdir; skipped"
    continue
  fi
  (( dry_run )) && echo "# unless $python -m ttt_jax.checkpoint $(quote "$workdir") exits 0 (finished):"
  cmd=()
  while IFS= read -r assignment; do
    [[ -n $assignment ]] && cmd+=("$assignment")
  done <<< "${stage_env[$stage]:-}"
  (( ${#cmd[@]} )) && cmd=(env "${cmd[@]}")
  read -ra flags <<< "${stage_flags[$stage]:-}"
  previous=$(previous_of "$stage")
  cmd+=("$python" -m ttt_jax.train "--config=configs/tomjerry_${stage}.py$suffix"
        "--workdir=$workdir" "--config.data.latents=$latents/$stage"
        "--config.init_from=$previous")
  (( distributed )) && cmd+=(--distributed)
  [[ -n $local_device_ids ]] && cmd+=(--local_device_ids="$local_device_ids")
  cmd+=(${flags[@]+"${flags[@]}"} ${extra[@]+"${extra[@]}"})
  run "${cmd[@]}"
  (( dry_run )) && continue
  # A stage stopped by SIGTERM (preemption) exits 0 with a checkpoint but unfinished: the next
  # stage must not start from it.
  if ! "$python" -m ttt_jax.checkpoint "$workdir"; then
    echo "stage $stage stopped before its last step; rerun $0 to resume it" >&2
    exit 0
  fi
done
