#!/usr/bin/env bash
# Stages 4-5: for a sense objective, SKD's sense targets of the training texts (computed once,
# under torchrun); then the student under torchrun (DDP); writes work/<task>/<teacher>/targets.npz and runs/<task>/<run>/
# (checkpoints/, config.json, metrics.jsonl, loss.png, export/hf, export/st, export/st-replace).
# Each stage skips or resumes finished work when run again.
set -euo pipefail

usage() {
  cat <<USAGE
usage: $0 TASK [TASK ...] [--nproc_per_node N --nnodes N --node_rank R --master_addr A --master_port P]
          [options of scripts/05_train.py]

TASK: an index 1-16, bbc-news, tweet-sentiment or a data file; several (or all): one task set,
one student of every task's texts (runs/<set>/, e.g. runs/bbc-news+tweet-sentiment/). Needs text_train/<task>/train.json
(scripts/00_texts.py) and, for --loss sense or sense-pooled, sense_dict/<task>/<teacher>.kmeanspkl
(run_sep_cluster.sh). The default objective is pooled-mse (the quality study's winner); SKD, the
paper's, is --loss sense: with it (and sense-pooled) scripts/04_targets.py runs first, under the same launch flags; it
gets the options it takes (--teacher, --sense-dict, --targets, --max-length, --device, --overwrite
...), and --targets-batch-size as its --batch-size.
Examples:
  $0 bbc-news --loss sense --nproc_per_node 2 --epochs 1 --max-steps 300 --max-length 128 --lr 1e-5
  # the paper's layout, 3 machines x 3 processes, on each machine R = 0, 1, 2:
  $0 7 --loss sense --nproc_per_node 3 --nnodes 3 --node_rank R --master_addr HOST0 --master_port 29500 \\
      --teacher llm2vec-llama3-8b

USAGE
  run_stage scripts/05_train.py --help | sed -n '/^options:/,$p'
  echo
  echo "options of scripts/04_targets.py (those that 05_train.py does not take as well):"
  run_stage scripts/04_targets.py --help | sed -n '/^options:/,$p' | grep -E -- "--(flush-every|teacher-dtype)" -A1
  echo
}

source "$(dirname "$0")/scripts/lib.sh"
drive train "$@"
