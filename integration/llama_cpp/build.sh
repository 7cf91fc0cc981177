#!/usr/bin/env bash
# Sets up llama.cpp (cached build) and the default model, then builds APEX's
# llama.cpp pieces into build-llama/ (or $APEX_LLAMA_BUILD_DIR):
#   lib/libggml-apex.so, lib/libapex-preload.so, bin/apex-llama-run.
# The backend links libapex.so.1 of the APEX build $APEX_BUILD_DIR (default
# build/: ./apex build first), found through its rpath at run time.
# Prints three lines: KEY=VALUE for LLAMA_BIN (the llama.cpp tools),
# APEX_GGML_LIB, APEX_PRELOAD_LIB, APEX_LLAMA_RUN, MODEL.
set -euo pipefail
cd "$(dirname "$0")/../.."
JOBS=${JOBS:-2}
llama_build=$(bash setup_hooks/fetch_llama_cpp.sh | tail -1)
model=${APEX_MODEL:-}
if [ -n "$model" ]; then
  bash setup_hooks/fetch_model.sh --check "$model" >/dev/null
else
  model=$(bash setup_hooks/fetch_model.sh | tail -1)
fi
llama_src=$(dirname "$llama_build")/src
out=${APEX_LLAMA_BUILD_DIR:-build-llama}
apex_build=$(cd "${APEX_BUILD_DIR:-build}" 2>/dev/null && pwd) \
  || { echo "no APEX build at ${APEX_BUILD_DIR:-build} (./apex build first)" >&2; exit 1; }
cmake -S integration/llama_cpp -B "$out" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DLLAMA_CPP_SRC="$llama_src" -DLLAMA_CPP_BUILD="$llama_build" -DAPEX_BUILD_DIR="$apex_build" >"$out.configure.log" 2>&1 \
  || { cat "$out.configure.log" >&2; exit 1; }
rm -f "$out.configure.log"
cmake --build "$out" -j"$JOBS" >&2
out=$(cd "$out" && pwd) # APEX_LLAMA_BUILD_DIR may be relative or absolute
echo "LLAMA_BIN=$llama_build/bin"
echo "APEX_GGML_LIB=$out/lib/libggml-apex.so"
echo "APEX_PRELOAD_LIB=$out/lib/libapex-preload.so"
echo "APEX_LLAMA_RUN=$out/bin/apex-llama-run"
echo "MODEL=$model"
