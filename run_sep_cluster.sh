#!/usr/bin/env bash
# Stage 3 for one task in one process: work/<task>/<teacher>/combined.pkl ->
# sense_dict/<task>/<teacher>.kmeanspkl (+ .summary.txt, .senses.png).
set -euo pipefail

usage() {
  cat <<USAGE
usage: $0 TASK [TASK ...] [options of scripts/03_cluster.py]

TASK comes first: an index 1-16, bbc-news, tweet-sentiment or a data file; several (or all):
one task set's dictionary, over its tasks' combined states (run_gather_sense.sh with the same tasks).
Examples:
  $0 bbc-news
  $0 bbc-news --k-rule mcl --backend sklearn --threads 2
  $0 bbc-news --device cuda

USAGE
  run_stage scripts/03_cluster.py --help | sed -n '/^options:/,$p'
  echo
}

source "$(dirname "$0")/scripts/lib.sh"
drive sep_cluster "$@"
