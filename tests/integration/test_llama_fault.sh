#!/usr/bin/env bash
# Fault injection inside llama.cpp (issue 14 §3): APEX_FAULT makes the Nth
# failure point fail (csrc/fault.c, in libapex: the ggml backend's host pool
# and the GPU tier's context share its one count). What llama.cpp must see:
#  1. the KV pool's mapping refused: llama.cpp fails the context cleanly
#     (exit 1 from apex-llama-run, APEX's message, no signal);
#  2. the GPU tier's device refusing a copy or a kernel launch, once or from
#     then on: the run completes and the tokens are those of a run without
#     faults (the tier's results are recomputed on the CPU, or the tier is
#     never set up and says so).
# Needs the cached llama.cpp build and model (./apex build && integration/llama_cpp/build.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
fail() { echo "FAIL: $*" >&2; exit 1; }
eval "$(bash integration/llama_cpp/build.sh 2>/dev/null | sed 's/^/export /')"

set +e
log=$(APEX_FAULT=host_alloc:1 GGML_BACKEND_PATH=$APEX_GGML_LIB "$APEX_LLAMA_RUN" -m "$MODEL" -np 2 -n 4 -t 2 2>&1 >/dev/null)
rc=$?
set -e
[ "$rc" = 1 ] || { echo "$log" | tail -5; fail "injected KV pool failure: exit status $rc (expected 1)"; }
echo "$log" | grep -q "APEX: cannot allocate llama.cpp's KV cache.*injected" || { echo "$log" | tail -5; fail "injected KV pool failure: no APEX message"; }
echo "$log" | grep -q "failed to create the llama context" || { echo "$log" | tail -5; fail "injected KV pool failure: context not refused"; }
echo "injected KV pool failure: ok (clear message, context refused, no abort)"

hyb() { # extra env...
  env GGML_BACKEND_PATH=$APEX_GGML_LIB APEX_GGML_HYBRID=1 APEX_DEVICE=emulated APEX_EMU_DEVICE_MB=512 \
      APEX_GGML_GPU_SEQS=4 "$@" "$APEX_LLAMA_RUN" -m "$MODEL" -np 4 -n 16 -t 2 --logit-steps 0
}
ref=$(hyb 2>/dev/null) || fail "GPU tier (emulated) without faults"
for fault in copy:40 launch:3 event:25 copy:40:persist all:200:persist; do
  err=$(mktemp)
  out=$(hyb APEX_FAULT=$fault 2>"$err") || { tail -5 "$err"; rm -f "$err"; fail "GPU tier with APEX_FAULT=$fault: the run failed"; }
  grep -q "fault injection armed from APEX_FAULT='$fault'" "$err" || { tail -5 "$err"; rm -f "$err"; fail "APEX_FAULT=$fault not armed"; }
  python3 - "$ref" "$out" "$fault" <<'PY' || { tail -5 "$err"; rm -f "$err"; fail "GPU tier with APEX_FAULT=$fault"; }
import json, sys
ref, out, fault = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
assert out["tokens"] == ref["tokens"], "tokens differ from the run without faults"
a = out["apex"]
print("GPU tier, APEX_FAULT=%s: ok (tokens identical to the run without faults; %d sequence-layer "
      "attentions on the tier)" % (fault, a["gpu_attn"]))
PY
  rm -f "$err"
done
echo "PASS: tests/integration/test_llama_fault.sh"
