#!/usr/bin/env bash
# Create .venv and install everything (idempotent: a second run only checks).
#   bash setup.sh            # then: .venv/bin/python ..., or source .venv/bin/activate
# PYTHON=python3.12 bash setup.sh to choose the interpreter (3.10+).
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.installed-$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)"

if [[ -f "$STAMP" ]]; then
  echo "setup: $VENV is up to date"
  exit 0
fi
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "setup: Python 3.10+ is required")'
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# The CPU build of torch unless one is already there: a plain `torch` requirement would pull
# several GB of CUDA packages on a CPU machine.
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  echo "setup: installing torch==2.13.0 (CPU build)"
  "${PIP[@]}" torch==2.13.0
fi
echo "setup: installing requirements.txt"
"${PIP[@]}" -r requirements.txt
"${PIP[@]}" --no-deps -e .
rm -f "$VENV"/.installed-*
touch "$STAMP"
echo "setup: done ($("$VENV/bin/python" -c 'import torch, transformers, mteb; print(f"torch {torch.__version__}, transformers {transformers.__version__}, mteb {mteb.__version__}")'))"
