#!/usr/bin/env bash
# tests/gpu/run_torch_shim.sh OUTDIR - the vLLM integration's GPU check on a
# device machine (vLLM itself cannot be installed there): builds libapex.so
# (CUDA) and the torch-op shim against that machine's torch, then runs
# tests/gpu/test_torch_shim.py. Writes OUTDIR/torch_shim.json and
# OUTDIR/torch_shim.log. Build dependencies missing there travel as .deb
# files in $APEX_DEB_DIR (default .debs), unpacked into the build folder.
set -u
OUT=${1:?usage: tests/gpu/run_torch_shim.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT" || exit 2
BUILD=${APEX_GPU_BUILD:-build-vllm-gpu}
LOG=$OUT/torch_shim.log
: >"$LOG"
. "$ROOT/tests/gpu/sysroot.sh"
pkg-config --exists hwloc 2>/dev/null || use_debs "$ROOT/$BUILD/sysroot" >>"$LOG"
export PATH=$PATH:/usr/local/cuda/bin
PY=${APEX_PYTHON:-python3}
t0=$(date +%s)
if cmake -S . -B "$BUILD" -DAPEX_CUDA=ON -DAPEX_CUDA_ARCHS="${APEX_CUDA_ARCHS:-90}" \
        -DAPEX_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=Release -DAPEX_TORCH_PYTHON="$PY" \
        -DCMAKE_PROJECT_INCLUDE="$ROOT/integration/vllm/cmake/inject.cmake" >>"$LOG" 2>&1 &&
   cmake --build "$BUILD" -j"$(nproc)" --target apex apex_torch >>"$LOG" 2>&1; then
    echo "build ok in $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
else
    echo "build FAILED (see $LOG)"; tail -30 "$LOG"; exit 1
fi
APEX_TORCH_LIB=$ROOT/$BUILD/lib/libapex_torch.so APEX_DEVICE=cuda \
    "$PY" tests/gpu/test_torch_shim.py 2>>"$LOG" | tee "$OUT/torch_shim.json.txt"
rc=${PIPESTATUS[0]}
head -n 1 "$OUT/torch_shim.json.txt" > "$OUT/torch_shim.json"
exit "$rc"
