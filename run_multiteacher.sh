#!/usr/bin/env bash
# Multi-teacher distillation (arXiv 2510.18680), every stage in turn:
#   texts (per task) -> teacher embeddings -> train (Gaussian-kernel NLL) -> train (MSE)
#   -> evaluate (NLL student, MSE student, student before distillation, each teacher).
# Each stage skips work that is done, so a rerun resumes where the last one stopped.
set -euo pipefail

usage() {
  cat <<USAGE
usage: $0 TASK [TASK ...] [launch flags] [options]

TASKs (first): indices 1-16, bbc-news, tweet-sentiment or data files. Their training texts form
the corpus; the students are evaluated on each task's held-out split.

options (defaults in brackets; anything else goes to both training runs, see below):
  --teachers T [T ...]     minilm, lsa, encoder hub ids or folders [minilm lsa]
  --max-train N            training texts per task, stage 0 [all]
  --max-test N             held-out texts per task, stage 0 [all]
  --shard-size N           texts per teacher shard [100000]
  --lsa-dim N              LSA teacher's dimension [256]
  --teacher-batch-size N   texts per teacher forward pass [64]
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
  launch_usage
  echo
  echo "training options (scripts/11_train_multiteacher.py; --loss and --run are set here):"
  run_stage scripts/11_train_multiteacher.py --help | sed -n '/^options:/,$p' | tail -n +2
}

source "$(dirname "$0")/scripts/lib.sh"
parse_launch_args "$@"
[[ -n "$TASK" ]] || { usage >&2; echo "error: give at least one task" >&2; exit 2; }

TASKS=("$TASK")
set -- "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"
while [[ $# -gt 0 && "$1" != -* ]]; do TASKS+=("$1"); shift; done

TEACHERS=(minilm lsa)
RESULTS=multiteacher
COMMON=()   # every stage
TEXTS=()    # stage 0
CORPUS=()   # the stages that name the corpus
BUILD=()    # the teacher stage
TRAIN=()    # both training runs
EVAL=()     # the evaluation
need_value() { [[ $# -ge 2 && "$2" != -* ]] || { echo "error: $1 needs a value" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --teachers) shift; TEACHERS=(); while [[ $# -gt 0 && "$1" != -* ]]; do TEACHERS+=("$1"); shift; done
                [[ ${#TEACHERS[@]} -gt 0 ]] || { echo "error: --teachers needs at least one teacher" >&2; exit 2; } ;;
    --max-train|--max-test) need_value "$@"; TEXTS+=("$1" "$2"); shift 2 ;;
    --shard-size|--lsa-dim|--lsa-min-df|--lsa-max-features|--max-texts|--corpus-split)
      need_value "$@"; BUILD+=("$1" "$2"); shift 2 ;;
    --teacher-batch-size) need_value "$@"; BUILD+=(--batch-size "$2"); shift 2 ;;
    --corpus) need_value "$@"; CORPUS+=("$1" "$2"); shift 2 ;;
    --samples-per-label|--n-experiments) need_value "$@"; EVAL+=("$1" "$2"); shift 2 ;;
    --results) need_value "$@"; RESULTS="$2"; shift 2 ;;
    --base-dir|--seed|--log-level) need_value "$@"; COMMON+=("$1" "$2"); shift 2 ;;
    --overwrite) COMMON+=("$1"); shift ;;
    --loss|--run) echo "error: $1 is set by this driver (runs mt-nll and mt-mse)" >&2; exit 2 ;;
    *) TRAIN+=("$1"); shift ;;
  esac
done
NAMING=(--task "${TASKS[@]}" "${CORPUS[@]+"${CORPUS[@]}"}" --teachers "${TEACHERS[@]}")

echo "== texts: ${TASKS[*]}"
for task in "${TASKS[@]}"; do
  run_stage scripts/00_texts.py --task "$task" "${TEXTS[@]+"${TEXTS[@]}"}" "${COMMON[@]+"${COMMON[@]}"}"
done

echo "== teacher embeddings: ${TEACHERS[*]}"
launch scripts/10_teacher_embeddings.py "${NAMING[@]}" "${BUILD[@]+"${BUILD[@]}"}" "${COMMON[@]+"${COMMON[@]}"}"

# The runs keep the script's default names, mt-<loss>, which the evaluation below names.
for loss in nll mse; do
  echo "== train: $loss -> runs/.../mt-$loss"
  launch scripts/11_train_multiteacher.py "${NAMING[@]}" --loss "$loss" \
    "${TRAIN[@]+"${TRAIN[@]}"}" "${COMMON[@]+"${COMMON[@]}"}"
done

echo "== evaluate -> results/$RESULTS"
BASE=()
for ((i = 0; i < ${#COMMON[@]}; i++)); do
  [[ "${COMMON[$i]}" == --base-dir ]] && BASE=(--base-dir "${COMMON[$((i + 1))]}")
done
MODELS=()
while IFS= read -r spec; do MODELS+=("$spec"); done < <(
  "$PYTHON" -m embdistill.multiteacher "${NAMING[@]}" "${BASE[@]+"${BASE[@]}"}" \
    --runs nll-student=mt-nll mse-student=mt-mse)
[[ ${#MODELS[@]} -gt 0 ]] || { echo "error: no models to evaluate" >&2; exit 2; }
run_stage scripts/06_evaluate.py --tasks "${TASKS[@]}" --run "$RESULTS" --models "${MODELS[@]}" \
  "${EVAL[@]+"${EVAL[@]}"}" "${COMMON[@]+"${COMMON[@]}"}"
