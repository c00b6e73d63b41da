#!/usr/bin/env bash
# One GPU check: every CUDA path against its baseline -> OUT_DIR/gpu_check.json + gpu_check.md.
#   bash bench/gpu_check.sh OUT_DIR            # one GPU (80 GB), a few minutes, no network
#   bash bench/gpu_check.sh OUT_DIR --tiny     # the same code on the CPU at toy sizes
#   bash bench/gpu_check.sh OUT_DIR --only gather skd_step
# Sections, output format and what each compares: bench/gpu_check.py's docstring.
set -euo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: $0 OUT_DIR [--tiny] [--only SECTION ...]" >&2
  exit 2
fi
source "$(dirname "$0")/../scripts/lib.sh"
OUT="$1"
shift
exec "$PYTHON" "$REPO_ROOT/bench/gpu_check.py" --out "$OUT" "$@"
