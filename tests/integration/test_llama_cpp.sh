#!/usr/bin/env bash
# Integration test of APEX inside llama.cpp (CPU build, real model):
#  1. the harness (GGML_BACKEND_PATH): greedy tokens identical with and without
#     APEX for 8 parallel prompts x 128 tokens, and APEX's counters show it ran;
#  2. the same through LD_PRELOAD (shorter);
#  3. an unmodified llama.cpp tool (llama-batched; -kvu, which it needs to
#     share one prompt across sequences) runs with APEX loaded;
#  4. bad input: a missing and a malformed model file get a clear message.
set -euo pipefail
cd "$(dirname "$0")/../.."
fail() { echo "FAIL: $*" >&2; exit 1; }
check() { # json, label
  python3 - "$1" "$2" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
label = sys.argv[2]
assert r["tokens_identical"], "%s: tokens differ: %s" % (label, r["first_difference"])
assert r["apex_attention_calls"] > 0, "%s: APEX did not run" % label
assert r["apex_decode_attentions"] >= r["prompts"] * (r["tokens_per_prompt"] - 1) * 30, "%s: too few decode attentions" % label
print("%s: ok (tokens identical, max logit diff %s, %d APEX attention calls, tok/s native %.1f apex %.1f)"
      % (label, r["max_logit_abs_diff"], r["apex_attention_calls"], r["tok_s_native"], r["tok_s_apex"]))
PY
}
out=$(./integration/harness --json) || { echo "$out"; fail "harness"; }
check "$out" "harness (GGML_BACKEND_PATH, 8 x 128)"
out=$(./integration/harness --json --preload --tokens 32) || { echo "$out"; fail "harness --preload"; }
check "$out" "harness (LD_PRELOAD, 8 x 32)"

eval "$(bash integration/llama_cpp/build.sh 2>/dev/null | sed 's/^/export /')"
# llama-batched does not call ggml_backend_load_all() (GGML_BACKEND_PATH is
# not read there): the preload route is the one for it.
log=$(LD_PRELOAD=$APEX_PRELOAD_LIB "$LLAMA_BIN/llama-batched" -m "$MODEL" -p "Hello, my name is" \
      -np 4 -n 32 -fa on -kvu -t 2 2>&1) || { echo "$log" | tail -20; fail "llama-batched with APEX"; }
echo "$log" | grep -q "APEX: taking over" || fail "llama-batched: APEX did not take over attention"
echo "$log" | grep -Eq "APEX: [1-9][0-9]* attention ops" || fail "llama-batched: no APEX attention ran"
echo "llama-batched (unmodified) with APEX: ok"

msg=$(bash setup_hooks/fetch_model.sh --check /nonexistent/model.gguf 2>&1) && fail "missing model accepted"
echo "$msg" | grep -q "does not exist" || fail "missing model: unclear message: $msg"
bad=$(mktemp); head -c 4096 /dev/urandom >"$bad"
msg=$(APEX_MODEL=$bad bash integration/llama_cpp/build.sh 2>&1) && { rm -f "$bad"; fail "malformed model accepted"; }
rm -f "$bad"
echo "$msg" | grep -q "not a GGUF file" || fail "malformed model: unclear message: $msg"
echo "bad model files: ok"
echo "PASS: tests/integration/test_llama_cpp.sh"
