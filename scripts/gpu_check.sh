#!/usr/bin/env bash
# GPU verification, run on the GPU machine from the repository root (no network needed).
# Usage: bash scripts/gpu_check.sh OUT_DIR
# Writes logs, junit XML and benchmark JSON to OUT_DIR. Each section runs under its own
# time limit; the script exits non-zero if any section failed. Whole run: under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: bash scripts/gpu_check.sh OUT_DIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
status=0
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
    | tee "$OUT/environment.txt"

# ---------------------------------------------------------------------------------------
# cuda: the C++/CUDA extension (csrc/), built here against this machine's torch.
# ---------------------------------------------------------------------------------------
cuda_section() {
    local start
    start=$(date +%s)
    DFM_FUSED_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
        timeout 300 python setup.py build_ext --inplace > "$OUT/cuda_build.log" 2>&1 \
        || { echo "cuda: build failed (see cuda_build.log)"; tail -20 "$OUT/cuda_build.log"; return 1; }
    echo "cuda: extension built in $(( $(date +%s) - start )) s"
    PYTHONPATH="$PWD" python -c "import json, dfm_fused._extension as e; print(json.dumps(e.build_info()))" \
        > "$OUT/cuda_build_info.json" || return 1
    PYTHONPATH="$PWD" timeout 180 python -m pytest tests/test_extension.py -q -p no:cacheprovider \
        --junitxml="$OUT/cuda_tests.xml" > "$OUT/cuda_tests.log" 2>&1
    local tests=$?
    tail -3 "$OUT/cuda_tests.log"
    PYTHONPATH="$PWD" timeout 90 python benchmarks/bench_extension.py --device cuda --repeat 20 \
        --out "$OUT/extension_cuda.json" > "$OUT/cuda_bench.log" 2>&1
    local bench=$?
    cat "$OUT/cuda_bench.log"
    return $(( tests || bench ))
}
cuda_section || status=1

exit $status
