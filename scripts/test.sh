#!/usr/bin/env bash
# Build the wheel (CPU + CUDA kernels), check its metadata and GPU code statically, install it into
# a fresh virtual environment and run the test suite against the installed package, not the
# source tree.
# Usage: bash scripts/test.sh [extra pytest args]
# Environment: DFM_FUSED_VENV (build venv, default .venv), DFM_FUSED_TEST_VENV (default
# .venv-test), TORCH_CUDA_ARCH_LIST (default "8.0;9.0" here: the release list's first and its
# H100/H200 target, to keep the CUDA compile short; scripts/check_wheel.sh checks a full release).
#
# Static checks of the GPU code (no GPU needed; each prints a table of every kernel's registers,
# spills and shared memory, and fails on a compile error, a spill, shared memory over the limit
# or a kernel it could not measure):
#   check_wheel.sh                  the wheel requires the torch it was built for; SASS for each arch
#   check_gpu_compile.py cuda       csrc/cuda kernels, from nvcc's --resource-usage in the build log
#   check_gpu_compile.py triton     every Triton kernel and autotune config, for sm_90 and sm_80
# Every check and the suite run even when an earlier one fails; the script then exits non-zero
# and names the failed steps.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(realpath -m "${DFM_FUSED_VENV:-.venv}")"
TEST_VENV="$(realpath -m "${DFM_FUSED_TEST_VENV:-.venv-test}")"
ARCHS="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
# The CUDA build of torch with its nvidia-* wheels is about 5.5 GB; a second copy in the test
# venv plus pip's cache of the downloads filled a CI machine's disk. So pip keeps no cache, and
# the test venv borrows the build venv's packages through a .pth file (see below).
export PIP_NO_CACHE_DIR=1
# torch 2.14.1 is the CUDA build (it runs on the CPU too, ships triton, and lets the
# CUDA sources compile on a machine without a GPU).
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "torch==2.14.1" ninja setuptools wheel
rm -rf dist
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
BUILD_LOG="$WORK/wheel_build.log"
start=$(date +%s)
# The build's whole output (pip -v, nvcc --resource-usage) goes to BUILD_LOG for the CUDA check.
if ! PATH="$VENV/bin:$PATH" TORCH_CUDA_ARCH_LIST="$ARCHS" DFM_FUSED_PTXAS_VERBOSE=1 \
        bash scripts/build_wheel.sh dist > "$BUILD_LOG" 2>&1; then
    tail -n 150 "$BUILD_LOG"
    echo "wheel build failed (the last lines of its log above)"
    exit 1
fi
WHEEL="$(realpath dist/dfm_fused-*.whl)"
echo "wheel built in $(( $(date +%s) - start )) s: $WHEEL"

failed=()
step() {  # step NAME COMMAND...: run, time and record a failure without stopping
    local name="$1" t0 rc=0
    shift
    t0=$(date +%s)
    echo "=== $name"
    "$@" || rc=$?
    echo "=== $name: $([ "$rc" = 0 ] && echo ok || echo "FAILED (exit $rc)") in $(( $(date +%s) - t0 )) s"
    [ "$rc" = 0 ] || failed+=("$name")
}
step check_wheel env PATH="$VENV/bin:$PATH" PYTHON="$VENV/bin/python" bash scripts/check_wheel.sh "$WHEEL" "$ARCHS"
step cuda_static "$VENV/bin/python" scripts/check_gpu_compile.py cuda --log "$BUILD_LOG" --wheel "$WHEEL"

# The test venv is new and dfm_fused enters it only from the wheel. `pip wheel` installs
# nothing into the build venv, so the .pth file lends torch (and the build tools) and no
# dfm_fused; pip sees the lent torch and does not install it again.
rm -rf "$TEST_VENV"
python3 -m venv "$TEST_VENV"
"$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
    > "$("$TEST_VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_dfm_fused_build_env.pth"
"$TEST_VENV/bin/python" -m pip install -q "$WHEEL[test]"
# The Triton kernels as installed (scripts/ is sys.path[0] there, not the source dfm_fused/).
step triton_static "$TEST_VENV/bin/python" scripts/check_gpu_compile.py triton --jobs "$(nproc)"

# Run from a scratch directory that holds only a link to tests/: `tests` stays importable
# (tests import tests._golden) but the source dfm_fused/ is not on sys.path, so the installed
# wheel is what runs. test_extension.py asserts this (DFM_FUSED_EXPECT_INSTALLED) and that the
# extension loads (DFM_FUSED_REQUIRE_EXTENSION); test_packaging.py reads the wheel's metadata
# and asks pip to install it beside another torch (DFM_FUSED_WHEEL).
RUN_DIR="$WORK/run"
mkdir "$RUN_DIR"
ln -s "$PWD/tests" "$RUN_DIR/tests"
step pytest env -C "$RUN_DIR" DFM_FUSED_EXPECT_INSTALLED=1 DFM_FUSED_REQUIRE_EXTENSION=1 DFM_FUSED_WHEEL="$WHEEL" \
    "$TEST_VENV/bin/python" -m pytest tests -q -ra -p no:cacheprovider --rootdir "$RUN_DIR" "$@"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "scripts/test.sh: FAILED: ${failed[*]}"
    exit 1
fi
echo "scripts/test.sh: all steps passed"
