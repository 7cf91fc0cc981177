"""Offline greedy generation through vLLM, with or without APEX; prints one
JSON object: the token ids of every prompt and, with APEX, its counters,
where its host KV tier lives, and vLLM's own per-layer KV tensors (their
addresses and sizes, read from the worker's model runner) to compare with.

    python generate.py MODEL_DIR apex|vllm [--max-tokens N] [--prompts N]
        [--max-num-seqs N] [--num-blocks N] [--apex-scheduler]

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
    "The largest planet in the solar system is",
    "In 1492, Columbus sailed",
    "The recipe calls for two cups of",
    "import numpy as np",
]


def _runner_kv(worker):
    """On the worker: (address, bytes, layout) of each tensor in its model
    runner's kv_caches, the list bind_kv_cache filled."""
    mr = worker.model_runner
    return {"tensors": [[t.data_ptr(), t.numel() * t.element_size()] for t in mr.kv_caches],
            "layout": mr.cache_config.kv_cache_layout,
            "num_blocks": mr.kv_cache_config.num_blocks}


def _attn_backend(worker):
    """On the worker: the attention backend names its layers use."""
    ctx = worker.model_runner.compilation_config.static_forward_context
    return sorted({type(m.attn_backend).__name__ if not isinstance(m.attn_backend, type)
                   else m.attn_backend.__name__ for m in ctx.values()
                   if hasattr(m, "attn_backend")})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("mode", choices=["apex", "vllm"])
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--prompts", type=int, default=6, help="the first N prompts")
    ap.add_argument("--max-num-seqs", type=int, default=4)
    ap.add_argument("--num-blocks", type=int, default=0,
                    help="vLLM's pool (num_gpu_blocks_override); 0: from the KV space")
    ap.add_argument("--dtype", default="float32", help="the model's dtype (and so the KV's)")
    ap.add_argument("--apex-scheduler", action="store_true",
                    help="APEX's scheduler (two tiers, apex_vllm.scheduler.ApexScheduler)")
    a = ap.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    kw = {}
    if a.mode == "apex":
        kw["attention_config"] = {"backend": "CUSTOM"}
    if a.apex_scheduler:
        kw["scheduler_cls"] = "apex_vllm.scheduler.ApexScheduler"
    if a.num_blocks:
        kw["num_gpu_blocks_override"] = a.num_blocks
    # block_size 32 (CPU_ATTN needs a multiple of 32) and a batch of 4 with 6 prompts: decode and prefill rows
    # share steps, and requests queue for blocks.
    llm = LLM(model=a.model, dtype=a.dtype, enforce_eager=True, max_model_len=512,
              max_num_seqs=a.max_num_seqs, block_size=32, seed=0, **kw)
    outs = llm.generate(PROMPTS[:a.prompts],
                        SamplingParams(temperature=0, max_tokens=a.max_tokens))
    res = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
           "text": [o.outputs[0].text for o in outs]}
    if a.mode == "apex":
        from apex_vllm.backend import RUNTIME
        res["apex"] = RUNTIME.ctx.stats() if RUNTIME.ctx else None
        res["apex_layers"] = len(RUNTIME.layer_index)
        res["apex_kv_reason"] = RUNTIME.kv_reason
        res["apex_kv_ptrs"] = RUNTIME.kv_ptrs
        res["apex_device_blocks"] = RUNTIME.device_blocks
        res["apex_copies_applied"] = RUNTIME.copies_applied
        from apex_vllm import tiers
        res["apex_fallback"] = tiers.resolve().fallback
    res["vllm_kv"] = llm.collective_rpc(_runner_kv)[0]
    res["attn_backend"] = llm.collective_rpc(_attn_backend)[0]
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
