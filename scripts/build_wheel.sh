#!/usr/bin/env bash
# Build a dfm_fused wheel with the CPU and CUDA kernels, against the torch of the active Python.
# The wheel's version carries a local tag with the CUDA and torch versions it was built
# against, e.g. dfm_fused-0.1.0+cu130torch2.14-cp311-cp311-linux_x86_64.whl.
#
# Usage: bash scripts/build_wheel.sh [out_dir]        (default out_dir: dist)
# Environment:
#   TORCH_CUDA_ARCH_LIST  GPU architectures (default "8.0;8.6;8.9;9.0+PTX")
#   CUDA_HOME             CUDA toolkit (default /usr/local/cuda when it exists)
#   MAX_JOBS              parallel compile jobs
#   DFM_FUSED_BUILD_CUDA  1 (default here) builds the CUDA kernels; 0 builds a CPU-only wheel
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-dist}"
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then
    export CUDA_HOME=/usr/local/cuda
fi
export DFM_FUSED_BUILD_CUDA="${DFM_FUSED_BUILD_CUDA:-1}"
export DFM_FUSED_LOCAL_VERSION=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;8.6;8.9;9.0+PTX}"
mkdir -p "$OUT"
# --no-build-isolation: the extension must be compiled against the torch installed here.
python -m pip wheel --no-build-isolation --no-deps -w "$OUT" .
ls -1 "$OUT"/dfm_fused-*.whl
