#!/usr/bin/env bash
# Build the wheel (CPU + CUDA kernels), install it into a fresh virtual environment and run
# the test suite against the installed package, not the source tree.
# Usage: bash scripts/test.sh [extra pytest args]
# Environment: DFM_FUSED_VENV (build venv, default .venv), DFM_FUSED_TEST_VENV (default
# .venv-test), TORCH_CUDA_ARCH_LIST (default 9.0 here, to keep the CUDA compile short).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(realpath -m "${DFM_FUSED_VENV:-.venv}")"
TEST_VENV="$(realpath -m "${DFM_FUSED_TEST_VENV:-.venv-test}")"
# The CUDA build of torch with its nvidia-* wheels is about 5.5 GB; a second copy in the test
# venv plus pip's cache of the downloads filled a CI machine's disk. So pip keeps no cache, and
# the test venv borrows the build venv's packages through a .pth file (see below).
export PIP_NO_CACHE_DIR=1
# torch 2.14.1 is the CUDA build (it runs on the CPU too, ships triton, and lets the
# CUDA sources compile on a machine without a GPU).
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "torch==2.14.1" ninja setuptools wheel
rm -rf dist
start=$(date +%s)
PATH="$VENV/bin:$PATH" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" bash scripts/build_wheel.sh dist
echo "wheel built in $(( $(date +%s) - start )) s"

# The test venv is new and dfm_fused enters it only from the wheel. `pip wheel` installs
# nothing into the build venv, so the .pth file lends torch (and the build tools) and no
# dfm_fused; pip sees the lent torch and does not install it again.
rm -rf "$TEST_VENV"
python3 -m venv "$TEST_VENV"
"$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
    > "$("$TEST_VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_dfm_fused_build_env.pth"
"$TEST_VENV/bin/python" -m pip install -q "$(ls dist/dfm_fused-*.whl)[test]"
# Run from a scratch directory that holds only a link to tests/: `tests` stays importable
# (tests import tests._golden) but the source dfm_fused/ is not on sys.path, so the installed
# wheel is what runs. test_extension.py asserts this (DFM_FUSED_EXPECT_INSTALLED) and that the
# extension loads (DFM_FUSED_REQUIRE_EXTENSION).
RUN_DIR="$(mktemp -d)"
trap 'rm -rf "$RUN_DIR"' EXIT
ln -s "$PWD/tests" "$RUN_DIR/tests"
cd "$RUN_DIR"
DFM_FUSED_EXPECT_INSTALLED=1 DFM_FUSED_REQUIRE_EXTENSION=1 \
    "$TEST_VENV/bin/python" -m pytest tests -q -ra -p no:cacheprovider --rootdir "$RUN_DIR" "$@"
