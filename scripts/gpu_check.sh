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

# The whole script stays under BUDGET seconds (default 460, under 8 minutes): each section's
# limit is cut to what is left, and a section that would get under 15 s is skipped (and
# counted as a failure, so a truncated check never passes).
BUDGET=${GPU_CHECK_BUDGET:-460}
DEADLINE=$(( $(date +%s) + BUDGET ))

# run_section NAME SECONDS CMD...: run CMD with a time limit, log it, record the outcome.
run_section() {
    local name=$1 limit=$2 start rc left
    shift 2
    left=$(( DEADLINE - $(date +%s) ))
    if [ "$left" -lt 15 ]; then
        FAILED=1
        echo "$name: skipped (time budget spent)" | tee -a "$OUT/summary.txt"
        return
    fi
    if [ "$limit" -gt "$left" ]; then limit=$left; fi
    echo
    echo "=== $name (limit ${limit}s) ==="
    start=$(date +%s)
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then FAILED=1; fi
    echo "$name: rc=$rc ($(( $(date +%s) - start ))s)" | tee -a "$OUT/summary.txt"
}

# ---------------------------------------------------------------- environment
run_section environment 30 "$PY" - <<'PYEOF'
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

# ---------------------------------------------------------------- cuda: C++/CUDA extension (issue 4)
# Built first, in place against this machine's torch (sm_90 only), so that the tests and the
# benchmark suite below cover the cuda backend too.
run_section cuda_build 180 env DFM_FUSED_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
    MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext --inplace
run_section cuda_build_info 15 "$PY" -c \
    "import json, dfm_fused._extension as e; i = e.build_info(); print(json.dumps(i)); assert i['cuda'], i"

# ---------------------------------------------------------------- triton backend
# The Triton kernels are compiled just in time (first call, then cached under ~/.triton):
# nothing to build. The interpreter suite is CPU CI's job and is deselected here.
# Pass 1: every case with one config per kernel (DFM_FUSED_AUTOTUNE=0: one compile each, no
# autotuning); pass 2: the large shapes with full autotuning, as the benchmarks run them.
run_section triton_tests 110 env DFM_FUSED_AUTOTUNE=0 "$PY" -m pytest tests/test_triton.py -q -rfEs \
    -p no:cacheprovider -k "not interpreter_suite and not large" --junitxml="$OUT/triton_tests.xml"
run_section triton_tests_large 80 "$PY" -m pytest tests/test_triton.py -q -rfEs -p no:cacheprovider \
    -k "large" --junitxml="$OUT/triton_tests_large.xml"

# The extension's tests (cpp and cuda backends, gradcheck, torch.compile).
run_section cuda_tests 90 "$PY" -m pytest tests/test_extension.py -q -rfEs -p no:cacheprovider \
    --junitxml="$OUT/cuda_tests.xml"

# One run per op so that a time-out loses one JSON file, not both.
for op in state_update feedback_input; do
    run_section "bench_triton_$op" 50 "$PY" -m pytest benchmarks/bench_triton_ops.py -q -p no:cacheprovider \
        -k "$op" --benchmark-json="$OUT/bench_triton_$op.json" --benchmark-columns=min,median,max
done

run_section cuda_bench 40 "$PY" benchmarks/bench_extension.py --device cuda --repeat 20 \
    --out "$OUT/bench_extension_cuda.json"


# ---------------------------------------------------------------- benchmark suite (issue 5)
# Every op and backend against the reference (forward, forward + backward; ResNet18 and
# segmentation shapes) and the ResNet18 DFM training step at T = 1, 4, 8 (reference, fused with
# and without memory saving); float32 only and no torch.compile here (bench_triton_ops covers
# the compiled reference) to fit the time budget. Last, so a time-out loses only this JSON.
run_section bench_suite 150 "$PY" -m pytest benchmarks -q -p no:cacheprovider --benchmark-only \
    --dfm-no-compile --dfm-dtypes float32 --benchmark-json="$OUT/bench_suite.json" \
    --benchmark-columns=min,median,max

echo
cat "$OUT/summary.txt"
exit $FAILED
