#!/usr/bin/env bash
# Check a built dfm_fused wheel before it is published:
#  - its metadata requires the torch it was built for: the local tag +cu<CUDA>torch<X.Y> (or
#    +cputorch<X.Y>) and Requires-Dist torch with the upper bound <X.(Y+1), so that pip refuses
#    another torch minor;
#  - a CUDA wheel's extension holds SASS (cubins) for every architecture of the list and PTX for
#    each one marked +PTX; the architectures found are printed (cuobjdump --list-elf/--list-ptx).
# Fails, naming what is missing, when either does not hold.
#
# Usage: bash scripts/check_wheel.sh WHEEL [ARCH_LIST]
#   ARCH_LIST  the TORCH_CUDA_ARCH_LIST the wheel was built with (default: $TORCH_CUDA_ARCH_LIST,
#              else setup.py's RELEASE_CUDA_ARCHS, "8.0;8.6;8.9;9.0;10.0;12.0+PTX")
# A release: bash scripts/build_wheel.sh dist && bash scripts/check_wheel.sh dist/dfm_fused-*.whl
# (README, "Releases"). CI builds sm_80 and sm_90 only, for time, and checks that list.
# Needs python and cuobjdump ($CUOBJDUMP, the CUDA toolkit's, or the one triton ships).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WHEEL="${1:?usage: check_wheel.sh WHEEL [ARCH_LIST]}"
[ -f "$WHEEL" ] || { echo "check_wheel.sh: WHEEL: no such file: $WHEEL" >&2; exit 2; }
ARCHS="${2:-${TORCH_CUDA_ARCH_LIST:-$(sed -n 's/^RELEASE_CUDA_ARCHS = "\(.*\)"$/\1/p' "$ROOT/setup.py")}}"
PY="${PYTHON:-python}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY" -m zipfile -e "$WHEEL" "$TMP"
failures=0
fail() { echo "FAIL $*"; failures=$((failures + 1)); }

# ---------------------------------------------------------------- metadata: the torch it was built for
META="$(ls "$TMP"/dfm_fused-*.dist-info/METADATA)"
VERSION="$(sed -n 's/^Version: //p' "$META")"
TORCH_REQ="$(sed -n 's/^Requires-Dist: \(torch[^a-z_-].*\)$/\1/p' "$META")"
echo "$(basename "$WHEEL"): version $VERSION, Requires-Dist: ${TORCH_REQ:-(none)}"
if [[ "$VERSION" =~ \+(cu[0-9]+|cpu)torch([0-9]+)\.([0-9]+)$ ]]; then
    DEVICE="${BASH_REMATCH[1]}"
    MAJOR="${BASH_REMATCH[2]}"
    MINOR="${BASH_REMATCH[3]}"
    UPPER="<$MAJOR.$((MINOR + 1))"
    LOWER=">=$MAJOR.$MINOR"
    # Requires-Dist lists the specifiers comma-separated, in any order: torch<2.15,>=2.14.1.
    if [[ ",${TORCH_REQ#torch}," != *",$UPPER,"* ]]; then
        fail "Requires-Dist: torch has no upper bound $UPPER (the wheel is for torch $MAJOR.$MINOR): $TORCH_REQ"
    fi
    if [[ ",${TORCH_REQ#torch}," != *",$LOWER"* ]]; then
        fail "Requires-Dist: torch has no lower bound $LOWER.x (the wheel is for torch $MAJOR.$MINOR): $TORCH_REQ"
    fi
else
    fail "version $VERSION has no local tag +cu<CUDA>torch<X.Y> or +cputorch<X.Y> (built without scripts/build_wheel.sh?)"
    DEVICE=unknown
fi

# ---------------------------------------------------------------- the extension's GPU code
LIB="$(ls "$TMP"/dfm_fused/_C*.so)"
find_cuobjdump() {
    local c
    for c in "${CUOBJDUMP:-}" "${CUDA_HOME:-/usr/local/cuda}/bin/cuobjdump" "$(command -v cuobjdump || true)" \
        "$("$PY" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))' 2>/dev/null || true)"; do
        if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
    done
    echo "check_wheel.sh: cuobjdump not found: set CUOBJDUMP, or install the CUDA toolkit's or triton's" >&2
    return 1
}
CUOBJDUMP="$(find_cuobjdump)"
# "ELF file 1: _C.1.sm_90.cubin" / "PTX file 1: _C.1.sm_120.ptx"; for a library without device
# code cuobjdump says so and exits non-zero, which leaves both lists empty.
ELF_LIST="$("$CUOBJDUMP" --list-elf "$LIB" 2>&1 || true)"
PTX_LIST="$("$CUOBJDUMP" --list-ptx "$LIB" 2>&1 || true)"
SASS="$(sed -n 's/.*\.\(sm_[0-9]*[a-z]*\)\.cubin$/\1/p' <<< "$ELF_LIST" | sort -u -V | tr '\n' ' ')"
PTX="$(sed -n 's/.*\.sm_\([0-9]*[a-z]*\)\.ptx$/compute_\1/p' <<< "$PTX_LIST" | sort -u -V | tr '\n' ' ')"
SASS="${SASS% }"
PTX="${PTX% }"
echo "SASS: ${SASS:-(none)}"
echo "PTX:  ${PTX:-(none)}"
if [ "$DEVICE" = cpu ]; then
    [ -z "$SASS$PTX" ] || fail "a +cpu wheel holds GPU code ($SASS$PTX)"
else
    echo "expected (TORCH_CUDA_ARCH_LIST): $ARCHS"
    for arch in ${ARCHS//[;,]/ }; do
        number="${arch%+PTX}"
        number="${number//./}"
        [[ " $SASS " == *" sm_$number "* ]] || fail "no SASS for sm_$number ($arch) in $(basename "$LIB")"
        if [[ "$arch" == *+PTX ]]; then
            [[ " $PTX " == *" compute_$number "* ]] || fail "no PTX for compute_$number ($arch) in $(basename "$LIB")"
        fi
    done
fi
if [ "$failures" -ne 0 ]; then
    echo "check_wheel.sh: $failures failure(s)"
    exit 1
fi
echo "check_wheel.sh: ok"
