#!/usr/bin/env bash
# Stage 6: evaluate models on tasks (any mteb task type, --task-types) through mteb; writes
# results/<run>/ (table.md, table.json, scores.png, mteb/). Single process: the launch flags are
# accepted and ignored.
set -euo pipefail

usage() {
  cat <<USAGE
usage: $0 TASK --models SPEC [SPEC ...] [--run NAME] [options of scripts/06_evaluate.py]

TASK comes first: an index 1-16, bbc-news, tweet-sentiment, an MTEB task name or a data file
(more tasks: --tasks; task types, e.g. Classification Clustering: --task-types).
Example:
  $0 bbc-news --run demo --models teacher:minilm untrained:minilm@3 \\
      student:runs/bbc-news/skd/export/hf \\
      replace:runs/bbc-news/skd/export/hf@sense_dict/bbc-news/minilm.kmeanspkl \\
      replace:minilm@sense_dict/bbc-news/minilm.kmeanspkl

USAGE
  run_stage scripts/06_evaluate.py --help | sed -n '/^options:/,$p'
  echo
}

source "$(dirname "$0")/scripts/lib.sh"
drive evaluate "$@"
