#!/usr/bin/env bash
# Stages 4-5: SKD's sense targets of the training texts (computed once, under torchrun), then the
# student under torchrun (DDP); writes work/<task>/<teacher>/targets.npz and runs/<task>/<run>/
# (checkpoints/, config.json, metrics.jsonl, loss.png, export/hf, export/st, export/st-replace).
# Each stage skips or resumes finished work when run again.
set -euo pipefail

usage() {
  cat <<USAGE
usage: $0 TASK [--nproc_per_node N --nnodes N --node_rank R --master_addr A --master_port P]
          [options of scripts/05_train.py]

TASK: an index 1-16, bbc-news, tweet-sentiment or a data file. Needs text_train/<task>/train.json
(scripts/00_texts.py) and, for --loss sense, sense_dict/<task>/<teacher>.kmeanspkl (run_sep_cluster.sh).
With --loss sense (the default) scripts/04_targets.py runs first; it takes --teacher, --sense-dict,
--max-length, --allow-max-length-mismatch, --targets (as its --output), --targets-batch-size (as its
--batch-size) and the common options (--base-dir --overwrite --seed --log-level --text-column
--label-column); everything else goes to scripts/05_train.py only.
Examples:
  $0 bbc-news --nproc_per_node 2 --epochs 1 --max-steps 300 --max-length 128 --lr 1e-5
  # the paper's layout, 3 machines x 3 processes, on each machine R = 0, 1, 2:
  $0 7 --nproc_per_node 3 --nnodes 3 --node_rank R --master_addr HOST0 --master_port 29500 \\
      --teacher llm2vec-llama3-8b

USAGE
  run_stage scripts/05_train.py --help | sed -n '/^options:/,$p'
  echo
}

source "$(dirname "$0")/scripts/lib.sh"
parse_launch_args "$@"
[[ -n "$TASK" ]] || { usage; echo "error: give a task" >&2; exit 2; }

TARGETS_OPTIONS=" --teacher --sense-dict --max-length --allow-max-length-mismatch --base-dir --overwrite --seed --log-level --text-column --label-column "
FLAGS=" --overwrite --allow-max-length-mismatch "
TARGETS_ARGS=() TRAIN_ARGS=() LOSS=sense
set -- "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  name="${1%%=*}"
  if [[ "$1" == *=* || "$FLAGS" == *" $name "* || $# -eq 1 ]]; then option=("$1"); else option=("$1" "$2"); fi
  shift "${#option[@]}"
  value="${option[1]:-${option[0]#*=}}"
  case "$name" in
    --targets) TARGETS_ARGS+=(--output "$value"); TRAIN_ARGS+=("${option[@]}"); continue ;;
    --targets-batch-size) TARGETS_ARGS+=(--batch-size "$value"); continue ;;
    --loss) LOSS="$value" ;;
  esac
  [[ "$TARGETS_OPTIONS" == *" $name "* ]] && TARGETS_ARGS+=("${option[@]}")
  TRAIN_ARGS+=("${option[@]}")
done

if [[ "$LOSS" == sense ]]; then
  launch scripts/04_targets.py --task "$TASK" "${TARGETS_ARGS[@]+"${TARGETS_ARGS[@]}"}"
fi
launch scripts/05_train.py --task "$TASK" "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}"
