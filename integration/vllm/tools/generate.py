"""Offline greedy generation through vLLM, with or without APEX; prints one
JSON object: the token ids of every prompt and, with APEX, its counters.

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
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main()
