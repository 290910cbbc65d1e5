#!/usr/bin/env bash
# GPU verification in one go: build what needs building, run the CUDA tests, run the op
# benchmarks and write their JSON to OUT_DIR. Runs from the source tree (PYTHONPATH, no pip
# installs, no network) and must finish in under 8 minutes on an H100/H200.
#
# Usage: bash scripts/gpu_check.sh OUT_DIR
#
# Each section runs under its own time limit, logs to OUT_DIR/<section>.log, and a failing
# section does not stop the later ones; the exit status is non-zero if any section failed.
# OUT_DIR/summary.txt lists each section's status and duration.
set -uo pipefail

OUT=${1:?usage: bash scripts/gpu_check.sh OUT_DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
FAILED=0
: > "$OUT/summary.txt"

# run_section NAME SECONDS CMD...: run CMD with a time limit, log it, record the outcome.
run_section() {
    local name=$1 limit=$2 start rc
    shift 2
    echo
    echo "=== $name (limit ${limit}s) ==="
    start=$(date +%s)
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then FAILED=1; fi
    echo "$name: rc=$rc ($(( $(date +%s) - start ))s)" | tee -a "$OUT/summary.txt"
}

# ---------------------------------------------------------------- environment
run_section environment 60 "$PY" - <<'PYEOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton not importable:", exc)
assert torch.cuda.is_available(), "no CUDA device"
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"device {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
import dfm_fused
print("backends on cuda:", dfm_fused.backend_status("cuda"))
PYEOF

# ---------------------------------------------------------------- triton backend
# The Triton kernels are compiled just in time (first call, then cached under ~/.triton):
# nothing to build. The interpreter suite is CPU CI's job and is deselected here.
# Pass 1: every case with one config per kernel (DFM_FUSED_AUTOTUNE=0: one compile each, no
# autotuning); pass 2: the large shapes with full autotuning, as the benchmarks run them.
run_section triton_tests 130 env DFM_FUSED_AUTOTUNE=0 "$PY" -m pytest tests/test_triton.py -q -rfEs \
    -p no:cacheprovider -k "not interpreter_suite and not large" --junitxml="$OUT/triton_tests.xml"
run_section triton_tests_large 130 "$PY" -m pytest tests/test_triton.py -q -rfEs -p no:cacheprovider \
    -k "large" --junitxml="$OUT/triton_tests_large.xml"

# One run per op so that a time-out loses one JSON file, not both.
for op in state_update feedback_input; do
    run_section "bench_triton_$op" 100 "$PY" -m pytest benchmarks/bench_triton_ops.py -q -p no:cacheprovider \
        -k "$op" --benchmark-json="$OUT/bench_triton_$op.json" --benchmark-columns=min,median,max
done

# ---------------------------------------------------------------- benchmark suite (issue 5)
# Every op and backend against the reference (forward, forward + backward; ResNet18 and
# segmentation shapes) and the ResNet18 DFM training step at T = 1, 4, 8 (reference, fused with
# and without memory saving); float32 only and no torch.compile here (bench_triton_ops covers
# the compiled reference) to fit the time budget. Last, so a time-out loses only this JSON.
run_section bench_suite 240 "$PY" -m pytest benchmarks -q -p no:cacheprovider --benchmark-only \
    --dfm-no-compile --dfm-dtypes float32 --benchmark-json="$OUT/bench_suite.json" \
    --benchmark-columns=min,median,max

# ---------------------------------------------------------------- cuda: C++/CUDA extension (issue 4)
# Built in place against this machine's torch (sm_90 only), then the extension tests (cpp and
# cuda backends, gradcheck, torch.compile) and the extension benchmark (reference, torch, cuda).
# After the benchmark suite, so the suite's timings do not include a second GPU backend.
run_section cuda_build 240 env DFM_FUSED_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
    MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext --inplace
run_section cuda_build_info 30 "$PY" -c \
    "import json, dfm_fused._extension as e; i = e.build_info(); print(json.dumps(i)); assert i['cuda'], i"
run_section cuda_tests 150 "$PY" -m pytest tests/test_extension.py -q -rfEs -p no:cacheprovider \
    --junitxml="$OUT/cuda_tests.xml"
run_section cuda_bench 60 "$PY" benchmarks/bench_extension.py --device cuda --repeat 20 \
    --out "$OUT/bench_extension_cuda.json"

echo
cat "$OUT/summary.txt"
exit $FAILED
