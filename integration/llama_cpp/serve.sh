#!/usr/bin/env bash
# ./apex serve [--model PATH] [--parallel N] [--port P] [--ctx-size N] [-- LLAMA_SERVER_ARGS...]
# llama-server (the cached llama.cpp build) with APEX loaded the way users
# load it: GGML_BACKEND_PATH=libggml-apex.so, -fa on. Prints the URL and what
# APEX took over (its own start-up lines), then serves until Ctrl-C or
# SIGTERM, which it passes to llama-server and waits for (APEX's exit line:
# where each sequence's attention ran). Without a GPU APEX runs in host mode
# and says so; with a CUDA build of llama.cpp (APEX_LLAMA_CUDA=1) and a GPU,
# it prints the GPU tier's budget.
#   --model PATH   a GGUF model (default: SmolLM2-135M-Instruct, fetched and cached)
#   --parallel N   sequence slots (llama-server -np; default 4)
#   --port P       default 8080; --host H default 127.0.0.1
#   --ctx-size N   total context over all slots (llama-server -c; default 4096 per slot)
# Environment: APEX_* as documented in integration/llama_cpp/README.md (e.g.
# APEX_METRICS_FILE=path for a Prometheus file of APEX's counters).
set -euo pipefail
cd "$(dirname "$0")/../.."
model="" parallel=4 port=8080 host=127.0.0.1 ctx=""
extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --model) model=$2; shift 2 ;;
    --parallel|-np) parallel=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --host) host=$2; shift 2 ;;
    --ctx-size|-c) ctx=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "apex serve: unknown option $1 (see ./apex serve --help)" >&2; exit 2 ;;
  esac
done
[[ $parallel =~ ^[1-9][0-9]*$ ]] || { echo "apex serve: --parallel must be a positive integer" >&2; exit 2; }
[[ $port =~ ^[0-9]+$ ]] && [ "$port" -le 65535 ] || { echo "apex serve: bad --port $port" >&2; exit 2; }
ctx=${ctx:-$((4096 * parallel))}

[ -n "$model" ] && export APEX_MODEL=$model
paths=$(bash integration/llama_cpp/build.sh) || { echo "apex serve: set-up failed" >&2; exit 1; }
eval "$(sed 's/^/local_/' <<<"$paths")"
server=$local_LLAMA_BIN/llama-server
[ -x "$server" ] || { echo "apex serve: no $server (setup_hooks/fetch_llama_cpp.sh builds it)" >&2; exit 1; }

log=$(mktemp /tmp/apex-serve.XXXXXX.log)
url="http://$host:$port"
echo "apex serve: starting llama-server ($(basename "$local_MODEL"), $parallel slots, context $ctx) with" \
     "GGML_BACKEND_PATH=$local_APEX_GGML_LIB; log: $log" >&2
# Its own session: a Ctrl-C at the terminal reaches this script only, which
# passes one SIGTERM on (a second signal makes llama-server quit at once).
GGML_BACKEND_PATH=$local_APEX_GGML_LIB setsid "$server" -m "$local_MODEL" -np "$parallel" -c "$ctx" -fa on \
  --host "$host" --port "$port" --metrics ${extra[@]+"${extra[@]}"} >"$log" 2>&1 &
pid=$!
stopping=0
stop() {
  stopping=1
  kill -TERM "$pid" 2>/dev/null || true
}
trap stop INT TERM

# Ready: /health answers 200 (the model is loaded and the slots exist).
ready=0
for _ in $(seq 1 600); do
  kill -0 "$pid" 2>/dev/null || break
  [ $stopping = 1 ] && break
  if [ "$(curl -s -o /dev/null -w '%{http_code}' "$url/health" 2>/dev/null)" = 200 ]; then ready=1; break; fi
  sleep 0.2
done
if [ $ready = 0 ]; then
  [ $stopping = 1 ] || { echo "apex serve: llama-server did not become ready; its log:" >&2; tail -30 "$log" >&2; }
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  exit 1
fi

echo "apex serve: $url  (OpenAI API: $url/v1/chat/completions; $url/health; $url/metrics)"
if grep -q '^APEX: ' "$log"; then
  grep '^APEX: ' "$log" | sed 's/^/  /'
else
  echo "  APEX: not loaded - llama-server logged nothing from APEX (see $log)"
fi
if grep -q "APEX_Hybrid" "$log"; then
  budget="the GPU's free memory less 1 GiB (APEX_GGML_GPU_KV_MB sets it)"
  [ -n "${APEX_GGML_GPU_KV_MB:-}" ] && budget="$APEX_GGML_GPU_KV_MB MiB (APEX_GGML_GPU_KV_MB)"
  [ -n "${APEX_GGML_GPU_SEQS:-}" ] && budget="$budget, at most $APEX_GGML_GPU_SEQS sequence slots"
  echo "  GPU tier: budget $budget; the slots within it keep their KV on the GPU and decode there, the others on the CPU"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "  host mode: this llama.cpp build is CPU-only, so every sequence's KV and attention stay on the CPU" \
       "(APEX_LLAMA_CUDA=1 ./apex serve builds llama.cpp with CUDA for APEX's GPU tier)"
else
  echo "  host mode: no GPU here; every sequence's KV lives in APEX's host pool and attends on APEX's CPU kernel"
fi
echo "apex serve: Ctrl-C (or SIGTERM) stops it"

# Serve until llama-server exits (a trapped signal interrupts wait: loop).
rc=0
while :; do
  wait "$pid" && rc=0 || rc=$?
  kill -0 "$pid" 2>/dev/null || break
done
# APEX's exit line: its attention ops and where each sequence's attention ran.
grep -E '^APEX: [0-9]+ attention ops' "$log" | sed 's/^/  /' || true
if [ $stopping = 1 ]; then
  echo "apex serve: stopped (llama-server exit status $rc)"
  exit 0
fi
echo "apex serve: llama-server exited with status $rc; its log: $log" >&2
tail -20 "$log" >&2
exit 1
