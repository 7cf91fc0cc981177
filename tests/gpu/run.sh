#!/usr/bin/env bash
# tests/gpu/run.sh OUTDIR - the GPU tier on a device machine, in one command.
#
# Builds APEX with CUDA (sm_90 only unless APEX_CUDA_ARCHS says otherwise),
# runs every CUDA kernel against the CPU reference (test_cuda_kernels), the
# bandwidth benchmark (bench_cuda), the hybrid pipeline's unit test on the
# GPU (test_pipeline, APEX_TEST_DEVICE=cuda) and benchmark, the paged ABI's
# device-tier tests (test_paged_api and test_paged_copy, APEX_TEST_DEVICE=cuda), and the torch-op
# shim on CUDA tensors (run_torch_shim.sh), and writes
# OUTDIR/gpu_report.json (their results, nvidia-smi facts, build status) plus
# OUTDIR/gpu_run.log (build output and every program's stderr).
#
# The device machine has no network. Build dependencies missing there
# (libhwloc-dev, libcmocka-dev, pkg-config) can travel as .deb files in
# $APEX_DEB_DIR (default: .debs in the repository root); they are unpacked
# into the build folder, never into /.
set -u
OUT=${1:?usage: tests/gpu/run.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT" || exit 2
BUILD=${APEX_GPU_BUILD:-build-gpu}
ARCHS=${APEX_CUDA_ARCHS:-90}
LOG=$OUT/gpu_run.log
: >"$LOG"
T_START=$(date +%s)
say() { echo "[run.sh] $*" | tee -a "$LOG" >&2; }

# ---- dependencies
missing=()
for p in cmake gcc libhwloc-dev libcmocka-dev; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
command -v pkg-config >/dev/null 2>&1 || missing+=("pkg-config(pkgconf)")
command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ] || missing+=("nvcc")
say "missing packages: ${missing[*]:-none}"

CMAKE_EXTRA=()
. "$ROOT/tests/gpu/sysroot.sh"
if use_debs "$ROOT/$BUILD/sysroot" >>"$LOG"; then
    say "unpacked the .deb files into $BUILD/sysroot"
    [ -n "$PKGCONF_EXE" ] && CMAKE_EXTRA+=("-DPKG_CONFIG_EXECUTABLE=$PKGCONF_EXE")
fi
export PATH=$PATH:/usr/local/cuda/bin

# ---- build
BUILD_OK=false
T0=$(date +%s)
if cmake -S . -B "$BUILD" -DAPEX_CUDA=ON -DAPEX_CUDA_ARCHS="$ARCHS" -DCMAKE_BUILD_TYPE=Release \
        "${CMAKE_EXTRA[@]}" >>"$LOG" 2>&1 &&
    cmake --build "$BUILD" -j16 --target test_cuda_kernels bench_cuda >>"$LOG" 2>&1; then
    BUILD_OK=true
fi
BUILD_S=$(($(date +%s) - T0))
say "build ok=$BUILD_OK in ${BUILD_S}s (archs $ARCHS)"
# The hybrid pipeline's unit test pointed at the GPU, and its benchmark.
PIPE_BUILT=false
if [ "$BUILD_OK" = true ] && cmake --build "$BUILD" -j16 --target test_pipeline test_paged_api test_paged_copy apex-bench >>"$LOG" 2>&1; then
    PIPE_BUILT=true
fi

# ---- run: each program prints one JSON object on stdout
run_json() { # name timeout args...
    local name=$1 limit=$2
    shift 2
    local bin=$BUILD/bin/$name
    if [ "$BUILD_OK" != true ] || [ ! -x "$bin" ]; then
        echo null >"$OUT/$name.json"
        echo 127
        return
    fi
    say "running $name $*"
    timeout "$limit" "$bin" "$@" >"$OUT/$name.json" 2> >(tee -a "$LOG" >&2)
    local rc=$?
    [ -s "$OUT/$name.json" ] || echo null >"$OUT/$name.json"
    say "$name exit $rc"
    echo "$rc"
}
RC_TEST=$(run_json test_cuda_kernels 180)
RC_BENCH=$(run_json bench_cuda 120)
RC_PIPE=127
PIPE_S=0
if [ "$PIPE_BUILT" = true ]; then
    say "running test_pipeline with APEX_TEST_DEVICE=cuda"
    T0=$(date +%s)
    APEX_TEST_DEVICE=cuda OMP_NUM_THREADS=4 timeout 120 "$BUILD/bin/test_pipeline" >>"$LOG" 2>&1
    RC_PIPE=$?
    PIPE_S=$(($(date +%s) - T0))
    say "test_pipeline (cuda) exit $RC_PIPE in ${PIPE_S}s"
fi
# The paged ABI (engine-owned block tables) with device-tier blocks on the GPU.
RC_PAGED=127
if [ "$PIPE_BUILT" = true ]; then
    say "running test_paged_api with APEX_TEST_DEVICE=cuda"
    APEX_TEST_DEVICE=cuda OMP_NUM_THREADS=4 timeout 120 "$BUILD/bin/test_paged_api" >>"$LOG" 2>&1 &&
        APEX_TEST_DEVICE=cuda timeout 60 "$BUILD/bin/test_paged_copy" >>"$LOG" 2>&1
    RC_PAGED=$?
    say "test_paged_api (cuda) exit $RC_PAGED"
fi
# How much of the CPU cohort's attention hides under the GPU cohort's.
RC_PBENCH=127
echo null >"$OUT/pipeline.json"
if [ "$PIPE_BUILT" = true ]; then
    say "running apex-bench pipeline on the GPU"
    APEX_DEVICE=cuda timeout 150 "$BUILD/bin/apex-bench" pipeline --json --g-seqs 32 --c-seqs 8 \
        --ctx 2048 --layers 8 >"$OUT/pipeline.json" 2> >(tee -a "$LOG" >&2)
    RC_PBENCH=$?
    [ -s "$OUT/pipeline.json" ] || echo null >"$OUT/pipeline.json"
    say "apex-bench pipeline exit $RC_PBENCH"
fi

# The vLLM integration's torch-op shim on CUDA tensors (its own build).
say "running tests/gpu/run_torch_shim.sh"
timeout 240 bash "$ROOT/tests/gpu/run_torch_shim.sh" "$OUT" >>"$LOG" 2>&1
RC_TORCH=$?
[ -s "$OUT/torch_shim.json" ] || echo null >"$OUT/torch_shim.json"
say "torch shim exit $RC_TORCH"

# ---- report
smi() { nvidia-smi --query-gpu="$1" --format=csv,noheader,nounits 2>/dev/null | head -1 | sed 's/^ *//; s/ *$//; s/"//g'; }
GPU_NAME=$(smi name)
DRIVER=$(smi driver_version)
MEM_MB=$(smi memory.total)
SM_CLK=$(smi clocks.max.sm)
MEM_CLK=$(smi clocks.max.memory)
PCIE=$(smi pcie.link.gen.current),$(smi pcie.link.width.current)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$([ -n "$(git status --porcelain 2>/dev/null)" ] && echo true || echo false)
NVCC=$(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p')
{
    printf '{"report":"apex tests/gpu","commit":"%s","dirty":%s,"date":"%s",' \
        "$COMMIT" "$DIRTY" "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    printf '"nvidia_smi":{"name":"%s","driver":"%s","memory_mib":"%s","max_sm_clock_mhz":"%s","max_mem_clock_mhz":"%s","pcie_gen_width":"%s"},' \
        "$GPU_NAME" "$DRIVER" "$MEM_MB" "$SM_CLK" "$MEM_CLK" "$PCIE"
    printf '"build":{"ok":%s,"seconds":%s,"archs":"%s","nvcc":"%s","missing_packages":"%s"},' \
        "$BUILD_OK" "$BUILD_S" "$ARCHS" "$NVCC" "${missing[*]:-}"
    printf '"exit_codes":{"test_cuda_kernels":%s,"bench_cuda":%s,"test_pipeline_cuda":%s,"test_paged_api_cuda":%s,"bench_pipeline":%s,"torch_shim":%s},' \
        "$RC_TEST" "$RC_BENCH" "$RC_PIPE" "$RC_PAGED" "$RC_PBENCH" "$RC_TORCH"
    printf '"test_pipeline_cuda":{"built":%s,"passed":%s,"seconds":%s},' "$PIPE_BUILT" \
        "$([ "$RC_PIPE" = 0 ] && echo true || echo false)" "$PIPE_S"
    printf '"test_cuda_kernels":%s,' "$(cat "$OUT/test_cuda_kernels.json")"
    printf '"bench_cuda":%s,' "$(cat "$OUT/bench_cuda.json")"
    printf '"bench_pipeline":%s,' "$(cat "$OUT/pipeline.json")"
    printf '"torch_shim":%s,' "$(cat "$OUT/torch_shim.json")"
    printf '"seconds":%s}\n' "$(($(date +%s) - T_START))"
} >"$OUT/gpu_report.json"
rm -f "$OUT/test_cuda_kernels.json" "$OUT/bench_cuda.json" "$OUT/pipeline.json" "$OUT/torch_shim.json"
say "wrote $OUT/gpu_report.json"
cat "$OUT/gpu_report.json"
[ "$BUILD_OK" = true ] && [ "$RC_TEST" = 0 ] && [ "$RC_BENCH" = 0 ] && [ "$RC_PIPE" = 0 ] &&
    [ "$RC_PAGED" = 0 ] && [ "$RC_TORCH" = 0 ]
