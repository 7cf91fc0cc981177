"""The workload of every real generation in this folder."""
# One workload for every real generation here (test_generate.py,
# test_tiers.py): vLLM alone runs it once per pytest session, and every APEX
# run is compared with that run's greedy tokens.
PROMPTS = 8
MAX_TOKENS = 40
POOL = 40  # blocks in vLLM's pool for the tier runs (num_gpu_blocks_override)
WORKLOAD = ["--prompts", str(PROMPTS), "--max-num-seqs", "6", "--max-tokens", str(MAX_TOKENS)]
