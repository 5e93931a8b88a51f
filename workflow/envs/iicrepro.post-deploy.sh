#!/usr/bin/env bash
# Runs once in the new conda environment, from the workflow's working directory (the repository).
set -euo pipefail
python -m pip install --quiet -e .
