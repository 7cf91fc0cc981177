#!/usr/bin/env bash
# Integration test of APEX inside llama.cpp (CPU build, real model):
#  1. the harness (GGML_BACKEND_PATH): greedy tokens identical with and without
#     APEX for 8 parallel prompts x 128 tokens, APEX's counters show it ran,
#     and llama.cpp's KV cache lived in APEX's host pool (every attention and
#     KV write APEX ran used it); a sequence's state saved and loaded into
#     another slot, and copied across streams, gives the same logits, and a
#     K-shift (in-place ROPE on the cache) gives the same logits as natively;
#     The same on a random-weight model of Llama-3.1-8B attention geometry
#     (harness --random-model: head_dim 128, GQA 4).
#  2. the same through LD_PRELOAD (shorter), and one sequence decoding 600
#     tokens: past 512 cache rows ggml-cpu takes its split-KV path, which
#     exact mode reproduces chunk for chunk (tokens still identical);
#  3. APEX_GGML_KV_POOL=0 (the hook answers nothing, as if llama.cpp were
#     unpatched): tokens still identical, KV in llama.cpp's own buffers;
#  4. an unmodified llama.cpp tool (llama-batched; -kvu, which it needs to
#     share one prompt across sequences) runs with APEX loaded, KV in the pool;
#  5. bad input: the pool refusing the KV cache (APEX_GGML_KV_POOL_MAX_MB)
#     fails the context cleanly with APEX's message (no abort);
#  6. the pool's CUDA pinning, on a stand-in CUDA runtime (this build has none);
#  7. the GPU tier (APEX_Hybrid KV, what a CUDA build uses) on APEX's emulated
#     device: the slots within the budget decode there, the others on the
#     CPU; with every slot on the tier, a loaded state, a cross-stream copy
#     and a K-shift reach it (the same logits); with APEX_GGML_TIER_CHECK the
#     CPU kernel recomputes the tier's results: equal to fp32 rounding; bad
#     tier settings (no libapex, a malformed budget, no device) say so in one
#     line and leave every sequence on the CPU; the scheduler places the
#     sequences in the tier (test_llama_place.sh);
#  8. bad input: a missing and a malformed model file get a clear message.
set -euo pipefail
cd "$(dirname "$0")/../.."
fail() { echo "FAIL: $*" >&2; exit 1; }
check() { # json, label, kv_pool (1: the KV must be in APEX's pool, 0: must not)
  python3 - "$1" "$2" "$3" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
label, want_pool = sys.argv[2], sys.argv[3] == "1"
assert r["tokens_identical"], "%s: tokens differ: %s" % (label, r["first_difference"])
assert r["apex_attention_calls"] > 0, "%s: APEX did not run" % label
assert r["apex_decode_attentions"] >= r["prompts"] * (r["tokens_per_prompt"] - 1) * 30, "%s: too few decode attentions" % label
multi = r["prompts"] > 1  # the state/copy/K-shift checks need a second sequence
for k in ("kv_checks_apex", "kv_checks_native"):
    c = r[k]
    assert not multi or (c and c["state_load_max_diff"] == 0 and c["seq_cp_max_diff"] == 0), \
        "%s: %s: %s" % (label, k, c)
assert not multi or r["kshift_identical"] is True, \
    "%s: the K-shift step differs from native: %s" % (label, r["kv_checks_apex"])
if want_pool:
    assert r["kv_in_apex_pool"] and r["apex_kv_pool_bytes"] > 0, "%s: KV not in APEX's pool: %s" % (label, r)
    where = "KV in APEX's host pool (%.1f MiB, %d/%d attention ops read it there)" % (
        r["apex_kv_pool_bytes"] / 2**20, r["apex_attention_kv_in_pool"], r["apex_attention_calls"])
else:
    assert not r["kv_in_apex_pool"] and r["apex_kv_pool_bytes"] == 0, "%s: KV in APEX's pool: %s" % (label, r)
    where = "KV in llama.cpp's buffers"
print("%s: ok (tokens identical, max logit diff %s, %d APEX attention calls, %s, %s"
      "tok/s native %.1f apex %.1f)" % (label, r["max_logit_abs_diff"], r["apex_attention_calls"], where,
                                        "state/copy/K-shift checks exact, " if multi else "",
                                        r["tok_s_native"], r["tok_s_apex"]))
PY
}
out=$(./integration/harness --json) || { echo "$out"; fail "harness"; }
check "$out" "harness (GGML_BACKEND_PATH, 8 x 128)" 1
out=$(./integration/harness --json --preload --tokens 32) || { echo "$out"; fail "harness --preload"; }
check "$out" "harness (LD_PRELOAD, 8 x 32)" 1
out=$(./integration/harness --json --prompts 1 --tokens 600) || { echo "$out"; fail "harness, one long sequence"; }
check "$out" "harness (one sequence x 600: ggml's split-KV decode past 512 rows)" 1
out=$(APEX_GGML_KV_POOL=0 ./integration/harness --json --tokens 32) || { echo "$out"; fail "harness, APEX_GGML_KV_POOL=0"; }
check "$out" "harness (APEX_GGML_KV_POOL=0: no KV pool offered, 8 x 32)" 0
out=$(./integration/harness --json --random-model 2 --prompts 4 --tokens 16) \
  || { echo "$out"; fail "harness, random Llama-3.1-8B-geometry model"; }
python3 - "$out" <<'PY' || fail "harness, random Llama-3.1-8B-geometry model"
import json, sys
r = json.loads(sys.argv[1])
assert r["tokens_identical"] and r["max_logit_abs_diff"] == 0, "tokens/logits differ: %s" % r["first_difference"]
assert r["apex_decode_attentions"] >= 4 * 15 * 2 and r["kv_in_apex_pool"], r
c = r["kv_checks_apex"]
assert c["state_load_max_diff"] == 0 and c["seq_cp_max_diff"] == 0 and r["kshift_identical"], c
print("harness (random Llama-3.1-8B geometry, 2 layers: 32 q heads, 8 KV heads, head_dim 128; 4 x 16): ok "
      "(tokens and logits identical, state/copy/K-shift checks exact)")
PY

eval "$(bash integration/llama_cpp/build.sh 2>/dev/null | sed 's/^/export /')"
# llama-batched does not call ggml_backend_load_all() (GGML_BACKEND_PATH is
# not read there): the preload route is the one for it.
log=$(LD_PRELOAD=$APEX_PRELOAD_LIB "$LLAMA_BIN/llama-batched" -m "$MODEL" -p "Hello, my name is" \
      -np 4 -n 32 -fa on -kvu -t 2 2>&1) || { echo "$log" | tail -20; fail "llama-batched with APEX"; }
echo "$log" | grep -q "APEX: taking over" || fail "llama-batched: APEX did not take over attention"
echo "$log" | grep -Eq "APEX: [1-9][0-9]* attention ops" || fail "llama-batched: no APEX attention ran"
echo "$log" | grep -q "APEX: llama.cpp's KV cache lives in APEX's host pool" || fail "llama-batched: KV not in APEX's pool"
echo "llama-batched (unmodified) with APEX: ok (KV in APEX's host pool)"

# The pool refuses the KV cache: llama.cpp must fail the context with a
# message, not abort (exit 1 from apex-llama-run, not a signal).
set +e
log=$(APEX_GGML_KV_POOL_MAX_MB=1 GGML_BACKEND_PATH=$APEX_GGML_LIB "$APEX_LLAMA_RUN" -m "$MODEL" -np 2 -n 4 -t 2 2>&1 >/dev/null)
rc=$?
set -e
[ "$rc" = 1 ] || { echo "$log" | tail -5; fail "KV pool allocation failure: exit status $rc (expected 1)"; }
echo "$log" | grep -q "APEX: cannot allocate llama.cpp's KV cache" || { echo "$log" | tail -5; fail "KV pool allocation failure: no APEX message"; }
echo "$log" | grep -q "failed to create the llama context" || { echo "$log" | tail -5; fail "KV pool allocation failure: llama.cpp did not fail the context"; }
echo "KV pool allocation failure: ok (clear message, context refused, no abort)"

# The CUDA pinning path, on a stand-in CUDA runtime (this build has none):
# registered when the runtime is in the process, unregistered at free; a
# failed registration leaves the pool unpinned and clears the CUDA error.
stub=$(mktemp -d)
cat >"$stub/cudart_stub.c" <<'EOF'
#include <stdio.h>
#include <stdlib.h>
static int pending;
int cudaHostRegister(void *p, size_t n, unsigned flags) {
    int rc = getenv("STUB_FAIL") ? 2 : 0; /* cudaErrorMemoryAllocation */
    pending = rc;
    fprintf(stderr, "cudart-stub: register %zu flags %u -> %d\n", n, flags, rc);
    return rc;
}
int cudaHostUnregister(void *p) { fprintf(stderr, "cudart-stub: unregister\n"); return 0; }
int cudaGetLastError(void) { int r = pending; pending = 0; fprintf(stderr, "cudart-stub: cleared %d\n", r); return r; }
EOF
cc -shared -fPIC -o "$stub/libcudart_stub.so" "$stub/cudart_stub.c" || fail "building the CUDA runtime stand-in"
pin_run() { LD_PRELOAD=$stub/libcudart_stub.so GGML_BACKEND_PATH=$APEX_GGML_LIB "$APEX_LLAMA_RUN" -m "$MODEL" -np 3 -n 4 -t 2 2>"$stub/err" >"$stub/out"; }
pin_run || { tail -5 "$stub/err"; fail "run with the CUDA runtime stand-in"; }
grep -q "cudart-stub: register .* flags 1 -> 0" "$stub/err" && grep -q "pinned for CUDA" "$stub/err" \
  && grep -q "cudart-stub: unregister" "$stub/err" || { cat "$stub/err"; fail "KV pool not pinned/unpinned"; }
python3 -c "import json,sys; a=json.load(open(sys.argv[1]))['apex']; assert a['kv_bytes_pinned'] == a['kv_bytes_apex'] > 0, a" "$stub/out" \
  || fail "kv_bytes_pinned"
STUB_FAIL=1 pin_run || { tail -5 "$stub/err"; fail "run with a failing CUDA registration"; }
grep -q "cudart-stub: cleared 2" "$stub/err" && grep -q "not pinned: cudaHostRegister failed" "$stub/err" \
  || { cat "$stub/err"; fail "failed CUDA registration: error not cleared or not reported"; }
rm -rf "$stub"
echo "KV pool pinning (stand-in CUDA runtime): ok (registered, unregistered; a failure is reported and cleared)"

# The GPU tier on the emulated device (the libapex.so.1 the backend links).
hyb() { # n_prompts, n_tokens, gpu_seqs, extra env...
  local np=$1 nt=$2 g=$3
  shift 3
  env GGML_BACKEND_PATH=$APEX_GGML_LIB APEX_GGML_HYBRID=1 APEX_DEVICE=emulated APEX_EMU_DEVICE_MB=512 \
      APEX_GGML_GPU_SEQS=$g "$@" "$APEX_LLAMA_RUN" -m "$MODEL" -np "$np" -n "$nt" -t 2 --logit-steps 0
}
out=$(hyb 4 24 4 2>/dev/null) || fail "GPU tier (emulated), every slot on it"
python3 - "$out" <<'PY' || fail "GPU tier (emulated), every slot on it"
import json, sys
r = json.loads(sys.argv[1]); a = r["apex"]; c = r["kv_checks"]
assert a["kv_bytes_hybrid"] > 0, "KV not in an APEX_Hybrid buffer: %s" % a
assert all(g > 0 for g in a["stream_gpu"]) and a["gpu_attn"] >= 4 * 23 * 30, "decode not on the GPU tier: %s" % a
assert c["state_load_max_diff"] == 0 and c["seq_cp_max_diff"] == 0, "state/copy on the GPU tier: %s" % c
print("GPU tier (emulated), 4 of 4 slots: ok (%d decode attentions there; a loaded state and a cross-stream "
      "copy give the same logits there)" % a["gpu_attn"])
PY
out=$(hyb 4 24 2 APEX_GGML_TIER_CHECK=1 APEX_GGML_EXACT=0 2>/dev/null) || fail "GPU tier (emulated), 2 of 4 slots"
python3 - "$out" <<'PY' || fail "GPU tier (emulated), 2 of 4 slots"
import json, sys
r = json.loads(sys.argv[1]); a = r["apex"]
sg = a["stream_gpu"]
# The scheduler gives the two slots to streams 0 and 1 (priority: stream
# order) for all 23 decode steps; 2 and 3 reach the tier only in the KV
# checks after them, once 0 and 1 stop decoding and free their slots.
assert sg[0] >= 23 * 30 and sg[1] >= 23 * 30 and sg[2] + sg[3] <= 2 * 30, "placement: %s" % sg
assert a["tier_check_max_diff"] <= 1e-4, "GPU tier vs CPU kernel: %g" % a["tier_check_max_diff"]
print("GPU tier (emulated), 2 of 4 slots: ok (streams 0-1 on the tier, 2-3 on the CPU while all decode; the tier's "
      "results, K-shift included, equal the CPU kernel's to %.2g)" % a["tier_check_max_diff"])
PY

# Bad GPU-tier settings: one line, every sequence on the CPU, the run completes.
for bad in "APEX_GGML_GPU_KV_MB=lots|is not a number of MiB" "APEX_DEVICE=none|has no device" \
           "APEX_GPU_PRESET=nosuch|APEX's scheduler: .*unknown GPU preset 'nosuch'"; do
  setting=${bad%%|*} want=${bad#*|}
  err=$(mktemp)
  out=$(hyb 2 4 2 "$setting" 2>"$err") || { tail -3 "$err"; fail "GPU tier with $setting"; }
  grep -q "APEX: no GPU tier for this KV cache (.*$want" "$err" || { cat "$err"; fail "GPU tier with $setting: no clear line"; }
  rm -f "$err"
  python3 -c "import json,sys; a=json.loads(sys.argv[1])['apex']; assert a['gpu_attn'] == 0 and a['attention_calls'] > 0, a" "$out" \
    || fail "GPU tier with $setting: placement"
done
echo "GPU tier bad settings (malformed budget, no device, unknown GPU preset): ok (one line, all on the CPU)"
# The scheduler's placement in the tier: staggered sequences, slots freed and
# reused, the decision log against what ran, two runs the same.
bash tests/integration/test_llama_place.sh || fail "GPU tier placement"

msg=$(bash setup_hooks/fetch_model.sh --check /nonexistent/model.gguf 2>&1) && fail "missing model accepted"
echo "$msg" | grep -q "does not exist" || fail "missing model: unclear message: $msg"
bad=$(mktemp); head -c 4096 /dev/urandom >"$bad"
msg=$(APEX_MODEL=$bad bash integration/llama_cpp/build.sh 2>&1) && { rm -f "$bad"; fail "malformed model accepted"; }
rm -f "$bad"
echo "$msg" | grep -q "not a GGUF file" || fail "malformed model: unclear message: $msg"
echo "bad model files: ok"
echo "PASS: tests/integration/test_llama_cpp.sh"
