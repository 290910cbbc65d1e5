#!/usr/bin/env bash
# Checks to run on the GPU machine (H100/H200: no network, no pip installs), from the
# source tree. Usage: bash scripts/gpu_check.sh OUT_DIR   (results and logs go to OUT_DIR)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: bash scripts/gpu_check.sh OUT_DIR}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
status=0

# ---------------------------------------------------------------------------------
# Benchmarks (issue 5): the pytest-benchmark suite, JSON with speed-ups, memory
# ratios and the fraction of the SPEC floor reached (bandwidth and matmul peak are
# measured in the same run).
# ---------------------------------------------------------------------------------
"$PY" -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$OUT/benchmarks_$(date -u +%Y-%m-%d).json" 2>&1 | tee "$OUT/benchmarks.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

exit "$status"
