# Shared by the root shell drivers (source it; do not run it).
#
# drive NAME "$@" runs the driver NAME of embdistill/drivers.py, which reads the task(s) (first
# arguments: an index 1-16, a task name or a data file), torchrun's launch flags
#   --nproc_per_node N (default 1)  --nnodes N (1)  --node_rank R (0)
#   --master_addr A (127.0.0.1)     --master_port P (a free port on one machine, else 29500)
# and the stage options, which it routes to the stage scripts that take them; it names an
# option no stage takes, and checks every stage's options, before the first stage runs.
# -h/--help prints the driver's usage() and the launch flags instead.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PYTHON="$REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
# A progress bar redrawn every 0.1 s fills a log file (CI, a cluster job's stderr): when stderr
# is not a terminal, redraw every 30 s unless the user chose otherwise. (tqdm reads TQDM_* when
# it is imported, so this must be set before Python starts.)
if [[ ! -t 2 ]]; then export TQDM_MININTERVAL="${TQDM_MININTERVAL:-30}"; fi

launch_usage() {
  cat <<USAGE
launch flags (torchrun's names):
  --nproc_per_node N   processes on this machine (default 1)
  --nnodes N           machines (default 1)
  --node_rank R        this machine's rank (default 0)
  --master_addr A      rank-0 machine's address (default 127.0.0.1)
  --master_port P      rank-0 machine's port (default: a free port on one machine; 29500, the
                       same on every machine, with --nnodes > 1)
Any other option goes to the stage scripts that take it (see their --help); one that none
takes is an error.
USAGE
}

# drive NAME [ARGS...]: see above.
drive() {
  local name="$1" arg
  shift
  for arg in "$@"; do
    case "$arg" in
      -h|--help) usage; launch_usage; exit 0 ;;
      --) break ;;
    esac
  done
  exec "$PYTHON" -m embdistill.drivers "$name" "$@"
}

# run_stage SCRIPT [ARGS...]: a stage script (relative to the repository) in one process, as
# the drivers run one (embdistill.drivers.run_stage).
run_stage() {
  "$PYTHON" -m embdistill.drivers stage "$@"
}
