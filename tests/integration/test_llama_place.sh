#!/usr/bin/env bash
# The scheduler placing sequences in llama.cpp's GPU tier (issue 11 section
# 3), on APEX's emulated device, SmolLM2: 4 sequences of staggered lengths
# (apex-llama-run --stagger: they finish one after another), 2 GPU slots.
#  - placement follows the plan: the decision log (APEX_GGML_PLACE_LOG) says
#    per step where each decoding stream's KV is, and the per-stream tier
#    counters say where its attentions ran: stream_gpu[s] = layers x its
#    device steps, and the decode attentions off the tier = layers x the
#    host steps; a slot freed by a finished sequence goes to a waiting one
#    (apex_migrations > 0 both ways, apex_sched_steps = the decode steps);
#  - a migrated sequence's KV is right on the tier: APEX_GGML_TIER_CHECK has
#    the CPU kernel recompute every tier result, equal to fp32 rounding
#    (1e-4, the 2-of-4 test's bound; the KV rows themselves read back bit for
#    bit in test_place's unit check through the paged ABI); the CPU kernel's
#    results are the ones kept, so the tokens equal the CPU-only run's;
#  - two identical runs make identical decisions (the logs are equal);
#  - the harness's --json reports apex_sched_steps and apex_migrations.
# Called from test_llama_cpp.sh (needs APEX_GGML_LIB, APEX_LLAMA_RUN and MODEL
# in the environment).
set -euo pipefail
cd "$(dirname "$0")/../.."
fail() { echo "FAIL: $*" >&2; exit 1; }
: "${APEX_GGML_LIB:?}" "${APEX_LLAMA_RUN:?}" "${MODEL:?}"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
run() { # name, extra env...
  local t0=$SECONDS
  local name=$1
  shift
  env GGML_BACKEND_PATH=$APEX_GGML_LIB APEX_DEVICE=emulated APEX_EMU_DEVICE_MB=512 APEX_GGML_GPU_SEQS=2 \
      APEX_GGML_EXACT=0 APEX_GGML_TIER_CHECK=1 "$@" \
      "$APEX_LLAMA_RUN" -m "$MODEL" -np 4 -n 16 --stagger 3 -t 2 --logit-steps 0 >"$dir/$name.json" 2>"$dir/$name.err" \
    || { tail -5 "$dir/$name.err"; fail "placement run $name"; }
  echo "  run $name: $((SECONDS - t0)) s" >&2
}
run a APEX_GGML_HYBRID=1 APEX_GGML_PLACE_LOG="$dir/a.log"
run b APEX_GGML_HYBRID=1 APEX_GGML_PLACE_LOG="$dir/b.log"
run cpu # no APEX_Hybrid: no GPU tier, every sequence on the CPU kernel
cmp -s "$dir/a.log" "$dir/b.log" || { diff "$dir/a.log" "$dir/b.log" | head; fail "two identical runs placed differently"; }
python3 - "$dir" <<'PY' || fail "placement"
import json, sys
d = sys.argv[1]
a, b, cpu = (json.load(open("%s/%s.json" % (d, n))) for n in ("a", "b", "cpu"))
log = [json.loads(l) for l in open(d + "/a.log")]
head, steps = log[0]["tier"], log[1:]
layers, slots = head["layers"], head["slots"]
st = a["apex"]
lengths = [len(t) for t in a["tokens"]]
assert lengths == [7, 10, 13, 16], "staggered lengths: %s" % lengths
assert st["sched_steps"] == len(steps) == 15, "steps placed: %d, logged %d" % (st["sched_steps"], len(steps))
dev_steps, host_steps, n_dev = [0] * 4, [0] * 4, []
for s in steps:
    on = [x for x in s["streams"] if x[3] == "device"]
    assert len(on) <= slots, "more streams on the device than slots: %s" % s
    assert sorted(x[0] for x in on) == sorted(k for k in s["slots"] if k >= 0), "slots vs decisions: %s" % s
    for stream, length, state, tier in s["streams"]:
        if state == "decode":
            (dev_steps if tier == "device" else host_steps)[stream] += 1
        elif state == "idle":
            assert tier == "host", "an idle stream kept its slot: %s" % s
# What ran where, per stream: the tier ran exactly the device decisions.
assert st["stream_gpu"][:4] == [layers * n for n in dev_steps], \
    "tier counters %s vs the log's device steps %s x %d layers" % (st["stream_gpu"], dev_steps, layers)
assert st["decode_attn"] - st["gpu_attn"] == layers * sum(host_steps), \
    "decode attentions off the tier: %d, the log's host steps %d x %d layers" % (
        st["decode_attn"] - st["gpu_attn"], sum(host_steps), layers)
assert [d + h for d, h in zip(dev_steps, host_steps)] == [n - 1 for n in lengths], "decode steps per stream"
# Slots freed by finished sequences went to waiting ones.
assert st["migrations_to_device"] > 2 and st["migrations_to_host"] > 0, st
assert dev_steps[2] > 0 and dev_steps[3] > 0 and host_steps[2] > 0 and host_steps[3] > 0, \
    "streams 2 and 3 never promoted: %s / %s" % (dev_steps, host_steps)
assert st["tier_check_max_diff"] <= 1e-4, "GPU tier vs CPU kernel: %g" % st["tier_check_max_diff"]
assert a["tokens"] == b["tokens"] == cpu["tokens"], "tokens differ from the CPU-only run"
assert cpu["apex"]["gpu_attn"] == 0 and cpu["apex"]["sched_steps"] == 0, cpu["apex"]
print("GPU tier placement (emulated, 4 staggered sequences, 2 slots): ok (%d steps placed, %d migrations to the "
      "device, %d to the host; device steps per stream %s, host steps %s = the tier's counters; tier vs CPU "
      "kernel %.2g; tokens = the CPU-only run; two runs, the same decisions)" % (
          st["sched_steps"], st["migrations_to_device"], st["migrations_to_host"], dev_steps, host_steps,
          st["tier_check_max_diff"]))
PY

# The harness reports the placement: with the tier on the emulated device and
# TIER_CHECK in exact mode (the CPU kernel's exact results kept), tokens equal
# llama.cpp's own. The run's KV checks decode twice more (placed too).
out=$(env APEX_GGML_HYBRID=1 APEX_DEVICE=emulated APEX_EMU_DEVICE_MB=512 APEX_GGML_GPU_SEQS=2 APEX_GGML_TIER_CHECK=1 \
      APEX_GGML_EXACT=1 \
      ./integration/harness --json --prompts 3 --tokens 8 --threads 2 --logit-steps 1 2>"$dir/harness.err") \
  || { tail -5 "$dir/harness.err"; echo "$out" | head -c 2000; fail "harness with the GPU tier"; }
python3 - "$out" <<'PY' || fail "harness --json: apex_sched_steps / apex_migrations"
import json, sys
r = json.loads(sys.argv[1])
assert r["tokens_identical"], r["first_difference"]
assert r["apex_sched_steps"] >= 7 and r["apex_migrations_to_device"] >= 2, r
assert r["apex_migrations"] == r["apex_migrations_to_device"] + r["apex_migrations_to_host"], r
print("harness --json with the GPU tier: ok (apex_sched_steps %d, apex_migrations %d, tokens identical)" % (
    r["apex_sched_steps"], r["apex_migrations"]))
PY
echo "PASS: tests/integration/test_llama_place.sh"
