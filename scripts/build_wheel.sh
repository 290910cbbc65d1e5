#!/usr/bin/env bash
# Build a dfm_fused wheel with the CPU and CUDA kernels, against the torch of the active Python.
# The wheel is made for that torch: its version carries a local tag with the CUDA and torch
# versions, e.g. dfm_fused-0.1.0+cu130torch2.14-cp311-cp311-linux_x86_64.whl, and its metadata
# requires that torch release up to the next minor (torch>=2.14.1,<2.15), so pip refuses to
# install it beside another torch, whose ABI the extension would not load into.
#
# Usage: bash scripts/build_wheel.sh [out_dir]        (default out_dir: dist)
# Environment:
#   TORCH_CUDA_ARCH_LIST     GPU architectures (default: the release list, setup.py's
#                            RELEASE_CUDA_ARCHS, "8.0;8.6;8.9;9.0;10.0;12.0+PTX")
#   CUDA_HOME                CUDA toolkit (default /usr/local/cuda when it exists)
#   MAX_JOBS                 parallel compile jobs
#   DFM_FUSED_BUILD_CUDA     1 (default here) builds the CUDA kernels; 0 builds a CPU-only wheel
#   DFM_FUSED_PTXAS_VERBOSE  1: nvcc prints every CUDA kernel's resource usage and pip shows the
#                            whole build output (for scripts/check_gpu_compile.py cuda --log)
# A release is checked with scripts/check_wheel.sh (README, "Releases").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-dist}"
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then
    export CUDA_HOME=/usr/local/cuda
fi
export DFM_FUSED_BUILD_CUDA="${DFM_FUSED_BUILD_CUDA:-1}"
export DFM_FUSED_LOCAL_VERSION=1
PIP_VERBOSITY=()
if [ "${DFM_FUSED_PTXAS_VERBOSE:-0}" = 1 ]; then
    export DFM_FUSED_PTXAS_VERBOSE
    PIP_VERBOSITY=(-v)
fi
mkdir -p "$OUT"
# --no-build-isolation: the extension must be compiled against the torch installed here.
python -m pip wheel --no-build-isolation --no-deps "${PIP_VERBOSITY[@]}" -w "$OUT" .
ls -1 "$OUT"/dfm_fused-*.whl
