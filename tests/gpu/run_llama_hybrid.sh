#!/usr/bin/env bash
# tests/gpu/run_llama_hybrid.sh OUTDIR - llama.cpp's CUDA build with APEX's GPU
# tier on a device machine: native llama.cpp (all KV on the GPU; only the
# sequences that fit the budget; -nkvo) against APEX hybrid (the sequences
# within the budget on the GPU tier, the others on the CPU), tokens/s and
# per-step latency, on the default model and on a random-weight model of
# Llama-3.1-8B geometry (apex-random-model, 4 layers).
#
# The device machine has no network, so its inputs travel with the tree:
#   APEX_LLAMA_CUDA_TAR  llama.cpp's CUDA build and headers
#                        (tests/gpu/pack_llama_cuda.sh makes it; default
#                        .carry/llama-cuda.tar.gz)
#   APEX_GPU_MODEL       the default model's .gguf (optional: skipped if unset)
#   APEX_GPU_VOCAB       a vocab-only .gguf for the random model (default
#                        .carry/vocab.gguf)
#   APEX_GPU_MODELS      "smollm2 llama8b" (default), or one of them
# Writes OUTDIR/llama_hybrid.json (every run's figures and the comparisons)
# and OUTDIR/llama_hybrid.log.
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
MODEL=${APEX_GPU_MODEL:-}
N=${APEX_GPU_SEQS_TOTAL:-16}   # sequences in the batch
G=${APEX_GPU_SEQS_FIT:-8}      # of them, those the GPU budget holds
T=${APEX_GPU_TOKENS:-64}       # generated tokens per sequence
WANT=" ${APEX_GPU_MODELS:-smollm2 llama8b} "  # which models to run
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
   cmake --build build-gpu-llama -j"$(nproc)" --target apex >>"$LOG" 2>&1 &&
   cmake -S integration/llama_cpp -B build-llama-gpu -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined \
        -DLLAMA_CPP_SRC="$LB/src" -DLLAMA_CPP_BUILD="$LB" >>"$LOG" 2>&1 &&
   cmake --build build-llama-gpu -j"$(nproc)" --target ggml-apex apex-llama-run apex-random-model >>"$LOG" 2>&1; then
    say "built in $(( $(date +%s) - t0 )) s"
else
    say "build FAILED"; tail -40 "$LOG" >&2; exit 1
fi
export LD_LIBRARY_PATH=$LB/bin:${LD_LIBRARY_PATH:-}
RUN=$ROOT/build-llama-gpu/bin/apex-llama-run
SHIM=$ROOT/build-llama-gpu/lib/libggml-apex.so
export APEX_LIB=$ROOT/build-gpu-llama/lib/libapex.so.1
THREADS=$(nproc)
# Exact mode (the default) needs AVX-512 for the CPU side; fp32 mode otherwise.
EXACT=1
grep -qw avx512f /proc/cpuinfo || EXACT=0
say "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $THREADS threads, APEX_GGML_EXACT=$EXACT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$LOG" 2>&1

# ---- the random-weight model of Llama-3.1-8B geometry
RAND=$STAGE/random-llama8b-4l.gguf
if [[ $WANT == *" llama8b "* ]] && [ -f "$VOCAB" ] && "$ROOT/build-llama-gpu/bin/apex-random-model" --vocab "$VOCAB" --out "$RAND" \
        --layers 4 >>"$LOG" 2>&1; then
    say "random model: $(du -h "$RAND" | cut -f1)"
else
    say "no random model (vocab $VOCAB)"; RAND=
fi

# One run: name, then env assignments, then --, then apex-llama-run's args.
run() {
    local name=$1; shift
    local envs=()
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    say "run $name: ${envs[*]} $*"
    env -u GGML_BACKEND_PATH "${envs[@]}" timeout 300 "$RUN" -t "$THREADS" --logit-steps 0 --no-checks "$@" \
        >"$OUT/$name.json" 2>>"$LOG"
    local rc=$?
    [ "$rc" = 0 ] || { say "$name failed ($rc)"; echo null >"$OUT/$name.json"; }
}

# A model's five runs: native with every sequence on the GPU (the reference
# tokens), native with only the sequences that fit, native -nkvo, APEX
# hybrid with G of N sequences on the GPU tier, and a short APEX run that
# also computes the GPU tier's sequences on the CPU and reports the largest
# difference (APEX_GGML_TIER_CHECK, fp32 mode).
model_runs() {
    local tag=$1 m=$2 fill=$3
    local apex=(GGML_BACKEND_PATH="$SHIM" APEX_GGML_GPU_SEQS="$G" APEX_DEVICE=cuda APEX_GGML_EXACT="$EXACT")
    run "${tag}_native_all" -- -m "$m" -np "$N" -n "$T" -ngl 99 --fill "$fill"
    run "${tag}_native_fit" -- -m "$m" -np "$G" -n "$T" -ngl 99 --fill "$fill"
    run "${tag}_native_nkvo" -- -m "$m" -np "$N" -n "$T" -ngl 99 -nkvo --fill "$fill"
    run "${tag}_apex_hybrid" "${apex[@]}" APEX_STATS_FILE="$OUT/${tag}_apex_stats.json" -- \
        -m "$m" -np "$N" -n "$T" -ngl 99 --fill "$fill"
    run "${tag}_apex_check" "${apex[@]}" APEX_GGML_TIER_CHECK=1 APEX_GGML_EXACT=0 -- \
        -m "$m" -np "$N" -n 8 -ngl 99 --fill "$fill"
}
[[ $WANT == *" smollm2 "* ]] && [ -n "$MODEL" ] && [ -f "$MODEL" ] && model_runs smollm2 "$MODEL" "${APEX_GPU_FILL_SMALL:-1024}"
[ -n "$RAND" ] && model_runs llama8b "$RAND" "${APEX_GPU_FILL_8B:-2048}"

# ---- report
python3 - "$OUT" "$N" "$G" "$T" "$EXACT" <<'EOF' | tee "$OUT/llama_hybrid.json"
import json, os, sys
out, n, g, t = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def load(name):
    try:
        return json.loads(open(os.path.join(out, name + ".json"), "rb").read().decode("utf-8", "replace"))
    except Exception:
        return None
rep = {"report": "llama.cpp CUDA: native vs APEX hybrid", "sequences": n, "gpu_budget_sequences": g,
       "tokens": t, "apex_exact_mode": sys.argv[5] == "1", "models": {}}
for tag in ("smollm2", "llama8b"):
    runs = {k: load(f"{tag}_{k}") for k in ("native_all", "native_fit", "native_nkvo", "apex_hybrid", "apex_check")}
    if all(v is None for v in runs.values()):
        continue
    m = {}
    for k, v in runs.items():
        if v is None:
            m[k] = None
            continue
        a = v.get("apex") or {}
        m[k] = {"tok_s": v["tok_s"], "ms_per_step": v["ms_per_step"], "sequences": v["prompts"],
                "prefill_tokens": v["prefill_tokens"], "t_prefill": v["t_prefill"]}
        if a:
            m[k].update({"apex_attention_calls": a.get("attention_calls"), "gpu_attn": a.get("gpu_attn"),
                         "stream_gpu": a.get("stream_gpu"), "stream_attn": a.get("stream_attn"),
                         "tier_check_max_diff": a.get("tier_check_max_diff")})
    ref, hyb = runs["native_all"], runs["apex_hybrid"]
    if ref and hyb:
        same = [a == b for a, b in zip(ref["tokens"], hyb["tokens"])]
        first = None
        for p, (a, b) in enumerate(zip(ref["tokens"], hyb["tokens"])):
            d = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            if d is not None:
                first = {"prompt": p, "token": d}
                break
        m["hybrid_vs_native_all"] = {"prompts_identical": sum(same), "of": len(same), "first_difference": first}
        m["texts"] = {"native_all": ref["texts"][:2], "apex_hybrid": hyb["texts"][:2]}
        sg = (hyb.get("apex") or {}).get("stream_gpu") or []
        m["placement"] = {"gpu_seqs": [i for i, c in enumerate(sg) if c > 0],
                          "cpu_seqs": [i for i in range(n) if i >= len(sg) or sg[i] == 0]}
    for k in ("native_fit", "native_nkvo"):
        if hyb and runs[k]:
            m[f"hybrid_vs_{k}_tok_s"] = round(hyb["tok_s"] / runs[k]["tok_s"], 3)
    rep["models"][tag] = m
print(json.dumps(rep))
EOF
say "done in $(( $(date +%s) - t0 )) s"
