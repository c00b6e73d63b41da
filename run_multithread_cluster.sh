#!/usr/bin/env bash
# Stage 2 over P processes of T threads each (the original ran 6 x 8): each process clusters
# its share of the tokens into part files, rank 0 merges them into
# sense_dict/<task>/<teacher>.kmeanspkl. Rerun after a crash to resume from finished parts.
set -euo pipefail

usage() {
  cat <<USAGE
usage: $0 TASK [--procs P] [--threads T] [options of scripts/03_cluster.py]

  --procs P     processes on this machine, this one included (default 2; --nproc_per_node too)
  --threads T   OpenMP / torch threads per process (default 1)
TASK comes first: an index 1-16, bbc-news, tweet-sentiment or a data file.
Example:
  $0 bbc-news --procs 6 --threads 8

USAGE
  run_stage scripts/03_cluster.py --help | sed -n '/^options:/,$p'
  echo
}

source "$(dirname "$0")/scripts/lib.sh"
PROCS=2
THREADS=1
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --procs) PROCS="${2:?--procs needs a value}"; shift 2 ;;
    --threads) THREADS="${2:?--threads needs a value}"; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
for value in "$PROCS" "$THREADS"; do
  [[ "$value" =~ ^[1-9][0-9]*$ ]] || { echo "error: --procs and --threads must be positive whole numbers, got '$value'" >&2; exit 2; }
done
NPROC_PER_NODE="$PROCS"
parse_launch_args "${ARGS[@]+"${ARGS[@]}"}"
[[ -n "$TASK" ]] || { usage >&2; exit 2; }
export OMP_NUM_THREADS="$THREADS"  # torchrun would set 1 otherwise
launch scripts/03_cluster.py --task "$TASK" --threads "$THREADS" "${EXTRA_ARGS[@]}"
