#!/usr/bin/env bash
# Stage 3: train the SKD student under torchrun (DDP); writes runs/<task>/<run>/ (checkpoints/,
# config.json, metrics.jsonl, loss.png, export/hf, export/st). Resumes when run again.
set -euo pipefail

usage() {
  cat <<USAGE
usage: $0 TASK [--nproc_per_node N --nnodes N --node_rank R --master_addr A --master_port P]
          [options of scripts/04_train.py]

TASK: an index 1-16, bbc-news, tweet-sentiment or a data file. Needs text_train/<task>/train.json
(scripts/00_texts.py) and, for --loss sense, sense_dict/<task>/<teacher>.kmeanspkl (run_sep_cluster.sh).
Examples:
  $0 bbc-news --nproc_per_node 2 --epochs 1 --max-steps 300 --max-length 128 --lr 1e-5
  # the paper's layout, 3 machines x 3 processes, on each machine R = 0, 1, 2:
  $0 7 --nproc_per_node 3 --nnodes 3 --node_rank R --master_addr HOST0 --master_port 29500 \\
      --teacher llm2vec-llama3-8b

USAGE
  run_stage scripts/04_train.py --help | sed -n '/^options:/,$p'
  echo
}

source "$(dirname "$0")/scripts/lib.sh"
drive train "$@"
