"""Real vLLM (CPU platform) offline generation on the default model, with and
without APEX: identical greedy tokens, APEX's counters show that every
attention of every layer ran in APEX, and the KV is held once: APEX's host
tier is vLLM's own per-layer KV tensors (no slab of APEX's own). vLLM's own
run is conftest.py's session `base` (the workload test_tiers.py uses too)."""
import json
import os
import subprocess
import sys

from workload import MAX_TOKENS, WORKLOAD

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
GENERATE = os.path.join(REPO, "integration", "vllm", "tools", "generate.py")


def run(model_dir, mode, env_extra, args=()):
    """generate.py's RESULT object (its output under "_log"); args are
    more options for it (a later --max-tokens wins)."""
    # APEX_METRICS_FILE too: the plugin, loaded by other tests in this pytest
    # process, set it to this process's folder, whose files (their contexts'
    # counters) the collector would sum with the run's own.
    env = {k: v for k, v in os.environ.items()
           if k not in ("VLLM_CPU_KVCACHE_SPACE", "APEX_HOST_KV_GB", "APEX_METRICS_FILE")}
    env.update(env_extra)
    p = subprocess.run([sys.executable, GENERATE, model_dir, mode, "--max-tokens",
                        str(MAX_TOKENS), *args], env=env, capture_output=True, text=True,
                       timeout=600)
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"{mode} run failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    res = json.loads(lines[-1][len("RESULT "):])
    res["_log"] = p.stdout + p.stderr  # vLLM's logger writes to stdout
    return res


def test_greedy_tokens_identical_with_and_without_apex(model_dir, base):
    # APEX_HOST_KV_GB sizes the pool (vLLM's CPU KV space) when vLLM's own
    # variable is unset; 1 GiB, vLLM's pool unbounded by num_gpu_blocks_override.
    apex = run(model_dir, "apex", {"APEX_HOST_KV_GB": "1"}, WORKLOAD)
    assert apex["tokens"] == base["tokens"], (apex["text"], base["text"])
    # each output is MAX_TOKENS long unless the model ended it (EOS) earlier
    n_out = [len(t) for t in base["tokens"]]
    assert all(0 < n <= MAX_TOKENS for n in n_out) and max(n_out) == MAX_TOKENS
    st, layers = apex["apex"], apex["apex_layers"]
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    assert layers == cfg["num_hidden_layers"]
    # every engine step runs every layer once; at least one step per token
    assert st["attention_calls"] % layers == 0
    assert st["attention_calls"] >= layers * MAX_TOKENS
    prompt_and_decode_rows = st["rows_attended_host"] // layers
    assert prompt_and_decode_rows >= sum(n - 1 for n in n_out)
    assert st["kv_rows_written"] == st["rows_attended_host"]
    assert st["errors"] == 0 and st["host_mode"] == 1
    # 1 GiB of blocks: block 32 tokens x kv heads x head_dim x K,V x fp32, all layers
    page = 32 * cfg["num_key_value_heads"] * cfg["head_dim"] * 2 * 4
    assert st["host_blocks"] == (1 << 30) // (page * layers)
    # Held once: APEX allocated no host KV; its host tier is exactly vLLM's
    # per-layer tensors (the worker's kv_caches, same addresses and sizes).
    vkv = apex["vllm_kv"]
    assert apex["apex_kv_reason"] is None
    assert st["host_kv_own_bytes"] == 0
    assert st["host_kv_external_bytes"] == layers * st["host_blocks"] * page
    assert vkv["layout"] in ("LBHNC", "LBNHC") and vkv["num_blocks"] == st["host_blocks"]
    assert [p for p, _ in vkv["tensors"]] == apex["apex_kv_ptrs"]
    assert all(n == st["host_blocks"] * page for _, n in vkv["tensors"])

    # The same counters in vLLM's Prometheus registry (apex_vllm/metrics.py
    # reading libapex's APEX_METRICS_FILE), documented with HELP and TYPE.
    text = apex["metrics_text"]
    assert apex["metrics_file"] and "%p" in apex["metrics_file"]  # the plugin's default
    for name, kind in (("apex_attention_calls_total", "counter"), ("apex_kv_blocks_used", "gauge")):
        assert f"# TYPE {name} {kind}" in text and f"# HELP {name} " in text, text
    fin = apex["apex_at_close"]  # the counters when the file was last written
    assert fin["attention_calls"] >= st["attention_calls"]
    samples = dict(l.rsplit(" ", 1) for l in text.splitlines() if l.startswith("apex_"))
    assert float(samples['apex_attention_calls_total{engine="libapex"}']) == fin["attention_calls"]
    assert float(samples['apex_kv_rows_written_total{engine="libapex"}']) == fin["kv_rows_written"]
    assert float(samples['apex_sequence_attentions_total{engine="libapex",tier="host"}']) == \
        fin["rows_attended_host"]
    assert float(samples['apex_errors_total{engine="libapex"}']) == 0
    assert float(samples['apex_kv_blocks_free{engine="libapex",tier="host"}']) == 0  # all claimed by vLLM
