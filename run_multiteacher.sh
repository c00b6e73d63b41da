#!/usr/bin/env bash
# Multi-teacher distillation (arXiv 2510.18680), every stage in turn:
#   texts (per task) -> teacher embeddings (each teacher's own sentence-transformers pipeline)
#   -> train (Gaussian-kernel NLL, standardised targets) -> train (MSE, the authors' raw targets)
#   -> evaluate (NLL student, MSE student, student before distillation, each teacher).
# Each stage skips work that is done, so a rerun resumes where the last one stopped.
set -euo pipefail

usage() {
  cat <<USAGE
usage: $0 TASK [TASK ...] [launch flags] [options]

TASKs (first): indices 1-16, bbc-news, tweet-sentiment or data files. Their training texts form
the corpus; the students are evaluated on each task's held-out split.

options (defaults in brackets; any other option goes to the stages that take it: the
training's go to both runs, see below, the evaluation's to scripts/06_evaluate.py). The table
labels the students by their targets: nll-student-standardised-targets and
mse-student-raw-targets by default (--standardize or --no-standardize sets both runs'):
  --teachers T [T ...]     minilm, lsa, sentence-transformers hub ids or folders [minilm lsa]
  --max-train N            training texts per task, stage 0 [all]
  --max-test N             held-out texts per task, stage 0 [all]
  --shard-size N           texts per teacher shard [100000]
  --lsa-dim N              LSA teacher's dimension [256]
  --teacher-batch-size N   texts per teacher forward pass [64] (--batch-size and
                           --max-length are the training's)
  --corpus hub:ID          a hub dataset as the corpus instead of the tasks' texts
  --max-texts N            cap on the corpus's texts
  --samples-per-label N    evaluation: texts per label per logistic regression [32]
  --n-experiments N        evaluation: experiments per task [10]
  --results NAME           results/NAME/ [multiteacher]
  --base-dir DIR, --seed N, --overwrite, --log-level L: every stage
Examples:
  # the offline demo (README): MiniLM + LSA teachers, both local tasks
  $0 bbc-news tweet-sentiment --max-train 600 --max-test 400 --lsa-dim 128 \\
      --max-steps 150 --batch-size 32 --max-length 128 --lr 1e-4
  # two processes
  $0 bbc-news --nproc_per_node 2 --max-steps 300

USAGE
  echo "training options (scripts/11_train_multiteacher.py; --loss and --run are set here):"
  run_stage scripts/11_train_multiteacher.py --help | sed -n '/^options:/,$p' | tail -n +2
  echo
}

source "$(dirname "$0")/scripts/lib.sh"
drive multiteacher "$@"
