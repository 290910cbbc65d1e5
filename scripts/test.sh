#!/usr/bin/env bash
# Install everything the tests need into a fresh virtual environment and run them.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DFM_FUSED_VENV:-.venv}"
python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# torch 2.14.1 is the CUDA build (it runs on the CPU too, ships triton, and lets the
# CUDA sources compile on a machine without a GPU).
python -m pip install -q "torch==2.14.1" ninja setuptools wheel
python -m pip install -q --no-build-isolation -e ".[test]"
python -m pytest tests -q "$@"
