# Shared by the root shell drivers (source it; do not run it).
#
# parse_launch_args "$@" reads the torchrun flags and leaves the rest in EXTRA_ARGS:
#   --nproc_per_node N (default 1)  --nnodes N (1)  --node_rank R (0)
#   --master_addr A (127.0.0.1)     --master_port P (29500)
# and the first positional argument as TASK (index 1-16, a task name or a data file).
# launch SCRIPT ARGS... runs a stage script under torchrun with those flags.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PYTHON="$REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
# A progress bar redrawn every 0.1 s fills a log file (CI, a cluster job's stderr): when stderr
# is not a terminal, redraw every 30 s unless the user chose otherwise. (tqdm reads TQDM_* when
# it is imported, so this must be set before Python starts.)
if [[ ! -t 2 ]]; then export TQDM_MININTERVAL="${TQDM_MININTERVAL:-30}"; fi

NPROC_PER_NODE=1
NNODES=1
NODE_RANK=0
MASTER_ADDR=127.0.0.1
MASTER_PORT=29500
TASK=""
EXTRA_ARGS=()

launch_usage() {
  cat <<USAGE
launch flags (torchrun's names):
  --nproc_per_node N   processes on this machine (default 1)
  --nnodes N           machines (default 1)
  --node_rank R        this machine's rank (default 0)
  --master_addr A      rank-0 machine's address (default 127.0.0.1)
  --master_port P      rank-0 machine's port (default 29500)
Any other option is passed to the stage script (see its --help).
USAGE
}

parse_launch_args() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --nproc_per_node|--nproc-per-node|--nproc) NPROC_PER_NODE="$2"; shift 2 ;;
      --nnodes) NNODES="$2"; shift 2 ;;
      --node_rank|--node-rank) NODE_RANK="$2"; shift 2 ;;
      --master_addr|--master-addr) MASTER_ADDR="$2"; shift 2 ;;
      --master_port|--master-port) MASTER_PORT="$2"; shift 2 ;;
      --nproc_per_node=*|--nnodes=*|--node_rank=*|--master_addr=*|--master_port=*)
        local key="${1%%=*}" value="${1#*=}"; shift; parse_launch_args "$key" "$value" ;;
      -h|--help) usage; launch_usage; exit 0 ;;
      --) shift; EXTRA_ARGS+=("$@"); break ;;
      -*) EXTRA_ARGS+=("$1"); shift ;;
      *) if [[ -z "$TASK" ]]; then TASK="$1"; else EXTRA_ARGS+=("$1"); fi; shift ;;
    esac
  done
  for value in "$NPROC_PER_NODE" "$NNODES" "$NODE_RANK" "$MASTER_PORT"; do
    [[ "$value" =~ ^[0-9]+$ ]] || { echo "error: launch flags must be whole numbers, got '$value'" >&2; exit 2; }
  done
}

# launch SCRIPT [ARGS...]: the stage script under torchrun with the parsed flags
# (embdistill.torchrun: torchrun without option abbreviations, one-line failures).
launch() {
  local script="$1"; shift
  "$PYTHON" -m embdistill.torchrun \
    --nproc_per_node "$NPROC_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    "$REPO_ROOT/$script" "$@"
}

# run_stage SCRIPT [ARGS...]: a single-process stage (no torchrun).
run_stage() {
  local script="$1"; shift
  "$PYTHON" "$REPO_ROOT/$script" "$@"
}
