#!/usr/bin/env bash
# tests/gpu/run_llama_hybrid.sh OUTDIR - the hybrid sweep on a device machine
# (tests/sweep/sweep.py --cuda): llama.cpp's CUDA build, a random-weight
# model of Llama-3.1-8B geometry with all 32 layers (apex-random-model, made
# here), a GPU KV budget of B sequences (B = 4, 8), 2B and 3B sequences,
# contexts 256, 1024, 4096. Per point: native with the B that fit, native
# with all (the ceiling), native -nkvo, APEX hybrid (B on the GPU tier, the
# rest on the CPU), tokens/s, ms/step, the trace summary, and the model's
# predicted hybrid/native-fit ratio from a profile measured here (CPU kernel
# timed here, GPU attention measured by the tier; apex-sweep-predict).
# Sized for 8 minutes of an H100 with the build (APEX_SWEEP_* to shrink it).
#
# The device machine has no network, so its inputs travel with the tree:
#   APEX_LLAMA_CUDA_TAR  llama.cpp's CUDA build and headers
#                        (tests/gpu/pack_llama_cuda.sh makes it; default
#                        .carry/llama-cuda.tar.gz)
#   APEX_GPU_VOCAB       a vocab-only .gguf for the random model (default
#                        .carry/vocab.gguf)
# Writes OUTDIR/sweep.json, OUTDIR/sweep.png (when matplotlib is there; else
# tests/sweep/plot_sweep.py makes it from the JSON afterwards), one trace
# (OUTDIR/b8_n16_ctx1024.trace.json), each run's log, and
# OUTDIR/llama_hybrid.log.
set -u
OUT=${1:?usage: tests/gpu/run_llama_hybrid.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT" || exit 2
LOG=$OUT/llama_hybrid.log
: >"$LOG"
say() { echo "[llama_hybrid] $*" | tee -a "$LOG" >&2; }
STAGE=${APEX_GPU_STAGE:-/tmp/apex-llama-gpu}
TAR=${APEX_LLAMA_CUDA_TAR:-$ROOT/.carry/llama-cuda.tar.gz}
VOCAB=${APEX_GPU_VOCAB:-$ROOT/.carry/vocab.gguf}
B=${APEX_SWEEP_B:-4,8}              # sequences the GPU KV budget holds
MULT=${APEX_SWEEP_N_MULT:-2,3}      # N = B x these
CTX=${APEX_SWEEP_CTX:-256,1024,4096}
T=${APEX_SWEEP_TOKENS:-24}          # generated tokens per sequence
LAYERS=${APEX_SWEEP_LAYERS:-32}
mkdir -p "$STAGE"

. "$ROOT/tests/gpu/sysroot.sh"
pkg-config --exists hwloc 2>/dev/null || use_debs "$ROOT/build-gpu-llama/sysroot" >>"$LOG"
export PATH=$PATH:/usr/local/cuda/bin

# ---- llama.cpp's CUDA build, APEX (CUDA) and APEX's llama.cpp pieces
t0=$(date +%s)
[ -f "$TAR" ] || { say "missing $TAR (tests/gpu/pack_llama_cuda.sh)"; exit 2; }
rm -rf "$STAGE/llama-cuda" && tar -xzf "$TAR" -C "$STAGE" || { say "cannot unpack $TAR"; exit 2; }
LB=$STAGE/llama-cuda
if cmake -S . -B build-gpu-llama -DAPEX_CUDA=ON -DAPEX_CUDA_ARCHS="${APEX_CUDA_ARCHS:-90}" \
        -DAPEX_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=Release >>"$LOG" 2>&1 &&
   cmake --build build-gpu-llama -j"$(nproc)" --target apex apex-sweep-predict >>"$LOG" 2>&1 &&
   cmake -S integration/llama_cpp -B build-llama-gpu -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined \
        -DLLAMA_CPP_SRC="$LB/src" -DLLAMA_CPP_BUILD="$LB" -DAPEX_BUILD_DIR="$ROOT/build-gpu-llama" >>"$LOG" 2>&1 &&
   cmake --build build-llama-gpu -j"$(nproc)" --target ggml-apex apex-llama-run apex-random-model >>"$LOG" 2>&1; then
    say "built in $(( $(date +%s) - t0 )) s"
else
    say "build FAILED"; tail -40 "$LOG" >&2; exit 1
fi
export LD_LIBRARY_PATH=$LB/bin:${LD_LIBRARY_PATH:-}
RUN=$ROOT/build-llama-gpu/bin/apex-llama-run
SHIM=$ROOT/build-llama-gpu/lib/libggml-apex.so
APEX_LIB=$ROOT/build-gpu-llama/lib/libapex.so.1 # the one libggml-apex.so links (its rpath)
THREADS=$(nproc)
# Exact mode (the default) needs AVX-512 for the CPU side; fp32 mode otherwise.
EXACT=1
grep -qw avx512f /proc/cpuinfo || EXACT=0
say "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $THREADS threads, APEX_GGML_EXACT=$EXACT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$LOG" 2>&1

# ---- the random-weight model of Llama-3.1-8B geometry, all layers
RAND=$STAGE/random-llama8b-${LAYERS}l.gguf
t1=$(date +%s)
[ -f "$VOCAB" ] || { say "missing $VOCAB (tests/gpu/pack_llama_cuda.sh)"; exit 2; }
"$ROOT/build-llama-gpu/bin/apex-random-model" --vocab "$VOCAB" --out "$RAND" --layers "$LAYERS" >>"$LOG" 2>&1 ||
    { say "apex-random-model failed"; exit 1; }
say "random model: $(du -h "$RAND" | cut -f1) in $(( $(date +%s) - t1 )) s"

# ---- a short correctness check: the GPU tier's outputs against the CPU
# kernel on the same operands (APEX_GGML_TIER_CHECK, fp32 mode)
env -u GGML_BACKEND_PATH GGML_BACKEND_PATH="$SHIM" APEX_GGML_GPU_SEQS=4 APEX_DEVICE=cuda APEX_GGML_TIER_CHECK=1 \
    APEX_GGML_EXACT=0 timeout 120 "$RUN" -m "$RAND" -np 8 -n 4 -t "$THREADS" -ngl 99 --fill 240 --logit-steps 0 \
    --no-checks >"$OUT/tier_check.json" 2>>"$LOG" || say "tier check run failed"

# ---- the sweep
python3 "$ROOT/tests/sweep/sweep.py" --cuda --run "$RUN" --shim "$SHIM" --lib "$APEX_LIB" \
    --predict "$ROOT/build-gpu-llama/bin/apex-sweep-predict" --model "$RAND" --out "$OUT" \
    --b "$B" --n-mult "$MULT" --ctx "$CTX" --tokens "$T" --threads "$THREADS" --geom "$LAYERS,32,8,128" \
    --exact "$EXACT" --trace-point b8_n16_ctx1024 --run-timeout 120 2>>"$LOG" | tee -a "$LOG"
rc=${PIPESTATUS[0]}
say "sweep rc=$rc; done in $(( $(date +%s) - t0 )) s"
exit "$rc"
