"""Offline greedy generation through vLLM, with or without APEX; prints one
JSON object: the token ids of every prompt and, with APEX, its counters,
where its host KV tier lives, and vLLM's own per-layer KV tensors (their
addresses and sizes, read from the worker's model runner) to compare with.

    python generate.py MODEL_DIR apex|vllm [--max-tokens N]

The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so
that APEX's counters can be read here."""
# This file lives outside the package's folder so that it imports the
# installed apex_vllm, not the source tree beside it.
import argparse
import json
import os

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three primary colors:",
    "The quick brown fox",
    "Water boils at a temperature of",
]


def _runner_kv(worker):
    """On the worker: (address, bytes, layout) of each tensor in its model
    runner's kv_caches, the list bind_kv_cache filled."""
    mr = worker.model_runner
    return {"tensors": [[t.data_ptr(), t.numel() * t.element_size()] for t in mr.kv_caches],
            "layout": mr.cache_config.kv_cache_layout,
            "num_blocks": mr.kv_cache_config.num_blocks}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("mode", choices=["apex", "vllm"])
    ap.add_argument("--max-tokens", type=int, default=24)
    a = ap.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    kw = {}
    if a.mode == "apex":
        kw["attention_config"] = {"backend": "CUSTOM"}
    # block_size 32 (CPU_ATTN needs a multiple of 32) and a batch of 4 with 6 prompts: decode and prefill rows
    # share steps, and requests queue for blocks.
    llm = LLM(model=a.model, dtype="float32", enforce_eager=True, max_model_len=512,
              max_num_seqs=4, block_size=32, seed=0, **kw)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=a.max_tokens))
    res = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
           "text": [o.outputs[0].text for o in outs]}
    if a.mode == "apex":
        from apex_vllm.backend import RUNTIME
        res["apex"] = RUNTIME.ctx.stats() if RUNTIME.ctx else None
        res["apex_layers"] = len(RUNTIME.layer_index)
        res["apex_kv_reason"] = RUNTIME.kv_reason
        res["apex_kv_ptrs"] = RUNTIME.kv_ptrs
    res["vllm_kv"] = llm.collective_rpc(_runner_kv)[0]
    if a.mode == "apex":
        # vLLM's /metrics text: closing the context writes APEX_METRICS_FILE's
        # final figures, which the plugin's collector reads at the scrape.
        from prometheus_client import generate_latest
        from apex_vllm import metrics
        if RUNTIME.ctx:
            # The file's final figures are the counters at close, which can be
            # past the snapshot above: vLLM may run a step after generate returns.
            res["apex_at_close"] = RUNTIME.ctx.stats()
            RUNTIME.ctx.close()
        res["metrics_text"] = generate_latest(metrics.vllm_registry()).decode()
        res["metrics_file"] = os.environ.get(metrics.ENV)
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main()
