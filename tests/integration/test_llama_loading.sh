#!/usr/bin/env bash
# Every documented way of loading APEX, in every llama.cpp tool users run:
#   GGML_BACKEND_PATH=.../libggml-apex.so   and   LD_PRELOAD=.../libapex-preload.so
# in llama-server, llama-cli, llama-bench and llama-batched (unmodified tools
# of the cached, patched llama.cpp build), first from the build tree, then
# from an install tree (cmake --install of a build configured with the
# llama.cpp adapter: lib/apex/). Each run must log APEX's start lines (KV in
# APEX's pool, attention taken over) and its exit line with attention ops > 0.
# And APEX is not silent when told twice: both ways at once give one line
# saying the second is ignored, and still one APEX device. Neither library
# defines any of the core's internals (tests/install/check_adapter_symbols.sh).
# About 1.5 minutes on 2 cores (the install build is most of it).
set -euo pipefail
cd "$(dirname "$0")/../.."
t0=$SECONDS
fail() { echo "FAIL: loading APEX: $*" >&2; exit 1; }
paths=$(bash integration/llama_cpp/build.sh) || fail "set-up (integration/llama_cpp/build.sh)"
eval "$(sed 's/^/L_/' <<<"$paths")"
B=$L_LLAMA_BIN M=$L_MODEL
tmp=$(mktemp -d /tmp/apex_test_loading.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
unset GGML_BACKEND_PATH LD_PRELOAD APEX_METRICS_FILE APEX_STATS_FILE APEX_GGML_QUIET

# expect_apex LOG WHAT: APEX's start and exit lines are in LOG.
expect_apex() {
  grep -q "APEX: taking over llama.cpp's attention" "$1" || { tail -15 "$1" >&2; fail "$2: APEX did not take over attention"; }
  grep -q "APEX: llama.cpp's KV cache lives in APEX's host pool" "$1" || fail "$2: the KV cache is not in APEX's pool"
  grep -qE "^APEX: [1-9][0-9]* attention ops" "$1" || { tail -15 "$1" >&2; fail "$2: no APEX exit line with attention ops"; }
}

# run_tool TOOL VAR=VALUE: one short run of TOOL with APEX loaded that way; log in $tmp/out.log.
run_tool() {
  local tool=$1 how=$2 log=$tmp/out.log
  case $tool in
    llama-bench)   env "$how" "$B/llama-bench" -m "$M" -p 0 -n 4 -fa 1 -r 1 >"$log" 2>&1 ;;
    llama-batched) env "$how" "$B/llama-batched" -m "$M" -p "Hello" -np 2 -n 24 -fa on -kvu >"$log" 2>&1 ;;
    llama-cli)     env "$how" "$B/llama-cli" -m "$M" -p "Hello" -n 8 -st -fa on --temp 0 </dev/null >"$log" 2>&1 ;;
    llama-server)
      local port=$((20000 + RANDOM % 5000))
      env "$how" "$B/llama-server" -m "$M" -np 2 -c 2048 -fa on --host 127.0.0.1 --port "$port" >"$log" 2>&1 &
      local pid=$! up=0
      for _ in $(seq 1 300); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health")" = 200 ] && { up=1; break; }
        kill -0 $pid 2>/dev/null || break
        sleep 0.2
      done
      [ $up = 1 ] && curl -s -o /dev/null -H 'Content-Type: application/json' \
        -d '{"messages":[{"role":"user","content":"Hello"}],"max_tokens":8,"temperature":0}' \
        "http://127.0.0.1:$port/v1/chat/completions"
      kill -TERM $pid 2>/dev/null || true
      wait $pid || fail "$tool ($how): exit status $? on SIGTERM"
      [ $up = 1 ] || { tail -15 "$log" >&2; fail "$tool ($how): not ready"; } ;;
  esac || { tail -15 "$log" >&2; fail "$tool ($how): exit status $?"; }
}

# check_all GGML_LIB PRELOAD_LIB WHERE
check_all() {
  for tool in llama-server llama-cli llama-bench llama-batched; do
    for how in "GGML_BACKEND_PATH=$1" "LD_PRELOAD=$2"; do
      run_tool "$tool" "$how"
      expect_apex "$tmp/out.log" "$tool with ${how%%=*} ($3)"
      echo "  $tool, ${how%%=*} ($3): $(grep -oE "^APEX: [0-9]+ attention ops" "$tmp/out.log" | cut -c7-)"
    done
  done
}

echo "adapter symbols (build tree):"
bash tests/install/check_adapter_symbols.sh "$L_APEX_GGML_LIB" "$L_APEX_PRELOAD_LIB" || fail "core internals in the ggml backend"
echo "build tree:"
check_all "$L_APEX_GGML_LIB" "$L_APEX_PRELOAD_LIB" "build tree"

# Both ways at once: one line says the second is ignored; APEX runs once.
env LD_PRELOAD="$L_APEX_PRELOAD_LIB" GGML_BACKEND_PATH="$L_APEX_GGML_LIB" \
  "$B/llama-bench" -m "$M" -p 0 -n 4 -fa 1 -r 1 >"$tmp/both.log" 2>&1 || { tail "$tmp/both.log" >&2; fail "both ways at once"; }
grep -q "APEX: already registered through LD_PRELOAD; ignoring GGML_BACKEND_PATH" "$tmp/both.log" \
  || fail "both ways at once: APEX said nothing about the second"
expect_apex "$tmp/both.log" "both ways at once"
[ "$(grep -c "APEX: taking over" "$tmp/both.log")" = 1 ] || fail "both ways at once: APEX took over twice"
echo "  both at once: the second is ignored, with a line ($((SECONDS - t0)) s)"

# The install tree: cmake --install of a build with the adapter, then the same
# from lib/apex/ (and the consumer check of tests/install/).
llama_build=$(dirname "$L_LLAMA_BIN")
bi=build-install
cmake -S . -B $bi -DCMAKE_BUILD_TYPE=RelWithDebInfo -DAPEX_CUDA=OFF -DAPEX_BUILD_TESTS=OFF \
  -DLLAMA_CPP_SRC="$(dirname "$llama_build")/src" -DLLAMA_CPP_BUILD="$llama_build" >"$tmp/cfg.log" 2>&1 \
  || { cat "$tmp/cfg.log" >&2; fail "configuring $bi"; }
cmake --build $bi -j"${JOBS:-2}" >"$tmp/bld.log" 2>&1 || { tail -30 "$tmp/bld.log" >&2; fail "building $bi"; }
bash tests/install/test_install.sh $bi
P=$tmp/prefix
cmake --install $bi --prefix "$P" >/dev/null
bash tests/install/check_adapter_symbols.sh "$P/lib/apex/libggml-apex.so" "$P/lib/apex/libapex-preload.so" \
  || fail "core internals in the installed ggml backend"
echo "install tree ($P):"
check_all "$P/lib/apex/libggml-apex.so" "$P/lib/apex/libapex-preload.so" "installed"
echo "PASS: APEX loads both documented ways in llama-server, llama-cli, llama-bench, llama-batched ($((SECONDS - t0)) s)"
