#!/usr/bin/env bash
# Stage 3 over P processes of T threads each (the original ran 6 x 8): each process clusters
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
drive multithread_cluster "$@"
