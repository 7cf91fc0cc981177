#!/usr/bin/env bash
# tests/gpu/pack_llama_cuda.sh [DIR] - what tests/gpu/run_llama_hybrid.sh needs
# on a device machine (no network there), packed on this machine into DIR
# (default .carry, ignored by git):
#   llama-cuda.tar.gz  llama.cpp's CUDA build (setup_hooks/fetch_llama_cpp.sh
#                      with APEX_LLAMA_CUDA=1; archs APEX_CUDA_ARCHS, default
#                      90): its shared libraries and tools, stripped, and the
#                      headers APEX's llama.cpp pieces build against
#   vocab.gguf         the default model's tokenizer alone (apex-random-model
#                      --write-vocab), for the random-weight model
# The CUDA build of llama.cpp takes about 40 min on 2 cores the first time
# (cached outside the clone like the CPU build).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DIR=${1:-$ROOT/.carry}
mkdir -p "$DIR"
build=$(APEX_LLAMA_CUDA=1 bash "$ROOT/setup_hooks/fetch_llama_cpp.sh" | tail -1)
src=$(dirname "$build")/src
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
L=$tmp/llama-cuda
mkdir -p "$L/bin" "$L/src/ggml/src"
cp -a "$build"/bin/*.so* "$L/bin/"
for t in llama-batched llama-bench llama-simple; do cp "$build/bin/$t" "$L/bin/"; done
strip --strip-unneeded "$L"/bin/*.so.* "$L"/bin/llama-* 2>/dev/null || true
cp -a "$src/include" "$L/src/"
cp -a "$src/ggml/include" "$L/src/ggml/"
cp "$src/ggml/src/ggml-backend-impl.h" "$L/src/ggml/src/"
tar -czf "$DIR/llama-cuda.tar.gz" -C "$tmp" llama-cuda
# The tokenizer of the default model, through the CPU build's tools.
eval "$(bash "$ROOT/integration/llama_cpp/build.sh" | grep -E '^(MODEL)=')"
"$ROOT/build-llama/bin/apex-random-model" --write-vocab "$DIR/vocab.gguf" --vocab "$MODEL"
ls -la "$DIR"
