#!/usr/bin/env bash
# The main job on a fresh machine: install into .venv, then compare dfm_fused against the
# reference (fused ops and a ResNet18-DFM training step): table, JSON and PNG chart, written to
# bench_results/ (git-ignored; the benchmark prints the paths).
# Usage: bash scripts/run.sh [python -m dfm_fused.bench flags, e.g. --quick]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DFM_FUSED_VENV:-.venv}"
export PIP_NO_CACHE_DIR=1
say() { echo "run.sh: $*"; }
say "creating the virtual environment $VENV"
python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
say "installing torch 2.14.1, ninja, setuptools, wheel, matplotlib into $VENV (quiet; a few minutes the first time)"
python -m pip install -q "torch==2.14.1" ninja setuptools wheel matplotlib
# Compile the CUDA kernels only where a GPU can run them (DFM_FUSED_BUILD_CUDA overrides).
if [ -z "${DFM_FUSED_BUILD_CUDA:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        export DFM_FUSED_BUILD_CUDA=1
    else
        export DFM_FUSED_BUILD_CUDA=0
    fi
fi
if [ "$DFM_FUSED_BUILD_CUDA" = 1 ]; then
    say "compiling the C++ extension with its CUDA kernels (quiet; several minutes, longest on few cores)"
else
    say "compiling the C++ extension, CPU kernels only (quiet; about 3 minutes on 2 cores)"
fi
python -m pip install -q --no-build-isolation -e .
say "built; running python -m dfm_fused $*"
python -m dfm_fused "$@"
