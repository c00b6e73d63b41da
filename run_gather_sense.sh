#!/usr/bin/env bash
# Stages 1-2 of SKD for one task: count its text tokens, gather sampled teacher token states
# under torchrun (one rank file per process), then combine the ranks into combined.pkl, the
# input of the cluster stage. Needs text_train/<task>/train.json (scripts/00_texts.py).
set -euo pipefail

usage() {
  cat <<USAGE
usage: bash run_gather_sense.sh TASK [TASK ...] [launch flags] [stage options]

  TASK   task index 1-16, a task name (bbc-news, tweet-sentiment, ...) or a .jsonl/.csv file;
         several (or all: 1-16): each is gathered and combined, then their states are combined
         for the task set (work/<set>/<teacher>/, e.g. work/bbc-news+tweet-sentiment/minilm/)

Runs scripts/01_count.py, scripts/02_gather.py (under torchrun) and a0_generate_combinepkl.py.
Stage options (see each script's --help) go to the scripts that take them:
  --teacher NAME       teacher alias, folder or hub id (default minilm)        all three
  --max-length N       tokens per text (default 512, the paper's; cut to the     count, gather
                       teacher's own limit: MiniLM reads 256)
  --per-token N        ~samples per token (default 1000)                        gather
  --batch-size N  --dtype float16|float32  --flush-every N  --device D          gather
  --cap N              most samples per token after combining (default 4000)    combine
  --combined-pickle M  auto|always|never: combined.pkl beside the row file      combine
  --base-dir DIR  --overwrite  --seed N  --log-level L                          all three
With --nnodes > 1 the combine is left for one machine to run once all have finished
(the command is printed).

examples:
  bash run_gather_sense.sh bbc-news
  bash run_gather_sense.sh bbc-news tweet-sentiment   # and the two as one task set
  bash run_gather_sense.sh 14 --nproc_per_node 6 --teacher llm2vec-llama3-8b --max-length 512
USAGE
}

source "$(dirname "$0")/scripts/lib.sh"
drive gather_sense "$@"
