# Sourced by the launch scripts: `run` prints a command, shell-quoted, and runs it unless
# dry_run=1 (--dry-run), so what a dry run prints is exactly what would run.

quote() {  # one word for a POSIX shell: as it is when safe, else in single quotes
  if [[ $1 =~ ^[A-Za-z0-9_./=:,+@%^-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {  # the words, quoted, separated by spaces
  local word sep=""
  for word in "$@"; do printf '%s' "$sep"; quote "$word"; sep=" "; done
}

run() {
  quote_all "$@"; echo
  (( dry_run )) || "$@"
}
