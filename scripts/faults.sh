#!/usr/bin/env bash
# The fault sweep: re-runs every injected-fault test and prints case | expected | observed.
#   scripts/faults.sh [--quick] [--out docs/faults.md] [-- extra pytest arguments]
# The full-disk cases mount a small tmpfs and need root; elsewhere they are reported as skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PATH="$PWD/.venv/bin:$PATH"
exec "$PY" scripts/faults.py "$@"
