#!/usr/bin/env bash
# tests/sweep/run_emulated.sh [OUTDIR] - the hybrid sweep's CPU twin (./apex
# test): the CPU build of llama.cpp, APEX's GPU tier on the emulated device,
# the default model (SmolLM2-135M), small sizes (B = 2; N = 4, 6; contexts
# 64 and 256; 8 tokens). Writes OUTDIR/sweep.json and sweep.png (default
# build/sweep-emulated) and checks the report is whole: every run ran, every
# point has its measured and predicted ratios and the trace summary.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-build/sweep-emulated}
paths=$(bash integration/llama_cpp/build.sh)
get() { sed -n "s/^$1=//p" <<<"$paths"; }
run=$(get APEX_LLAMA_RUN)
[ -f build/lib/libapex.so.1 ] && [ -x build/bin/apex-sweep-predict ] || {
  echo "run_emulated: build the main tree first (./apex build)" >&2; exit 1; }
t0=$(date +%s)
python3 tests/sweep/sweep.py --emulated --run "$run" --shim "$(get APEX_GGML_LIB)" \
  --lib "$PWD/build/lib/libapex.so.1" --predict "$PWD/build/bin/apex-sweep-predict" --model "$(get MODEL)" \
  --out "$OUT" --b 2 --n-mult 2,3 --ctx 64,256 --tokens 8 --threads "${THREADS:-$(nproc)}" \
  --geom 30,9,3,64 --trace-point b2_n4_ctx256 >/dev/null
python3 - "$OUT/sweep.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
bad = []
if not r["all_runs_ran"]:
    bad.append("a run failed")
for p in r["points"]:
    tag = "B%d N%d ctx %d" % (p["b"], p["n"], p["ctx"])
    for k in ("measured_ratio_vs_fit", "predicted_ratio_vs_fit", "measured_over_predicted_step"):
        if not (isinstance(p.get(k), float) and p[k] > 0):
            bad.append("%s: no %s" % (tag, k))
    s = (p.get("apex_hybrid") or {}).get("trace_summary") or {}
    if not (s.get("layer_steps", 0) > 0 and s.get("gpu_attn_us_per_layer", 0) > 0 and s.get("cpu_attn_us_per_layer", 0) > 0):
        bad.append("%s: trace summary without GPU-tier and CPU attention: %s" % (tag, s))
    g = (p.get("apex_hybrid") or {}).get("stream_gpu") or []
    if sum(1 for x in g if x) != p["b"]:
        bad.append("%s: %d sequences on the GPU tier, want %d" % (tag, sum(1 for x in g if x), p["b"]))
if bad:
    sys.exit("run_emulated: " + "; ".join(bad))
print("run_emulated: %d points, every run ran, predicted and measured ratios and trace summaries present"
      % len(r["points"]))
PY
[ -s "$OUT/sweep.png" ] || { echo "run_emulated: no plot" >&2; exit 1; }
[ -s "$OUT/b2_n4_ctx256.trace.json" ] || { echo "run_emulated: no trace file" >&2; exit 1; }
echo "run_emulated: done in $(( $(date +%s) - t0 )) s ($OUT/sweep.json, sweep.png)"
