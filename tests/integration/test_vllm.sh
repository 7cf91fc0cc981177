#!/usr/bin/env bash
# APEX in vLLM, on this machine's CPUs (vLLM's CPU platform, APEX host mode):
#  1. the vLLM environment (setup_hooks/setup_vllm.sh; cached, reused),
#  2. pip install of this repo into it (pyproject.toml: scikit-build-core runs
#     the CMake build of libapex.so and the torch-op shim),
#  3. the default model as a Hugging Face folder, made from the GGUF file
#     (cached beside it),
#  4. pytest: the adapter against vLLM's own classes, real offline
#     generation with and without APEX (identical greedy tokens, APEX's
#     counters), and the two tiers with APEX's scheduler (test_tiers.py:
#     offline and `vllm serve`, APEX_DEVICE=emulated set per run there).
# APEX_SKIP_VLLM=1 skips it all (prints why).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${APEX_SKIP_VLLM:-0}" = 1 ]; then echo "vLLM integration: skipped (APEX_SKIP_VLLM=1)"; exit 0; fi
t0=$SECONDS
VENV=$(bash setup_hooks/setup_vllm.sh)
echo "vLLM environment: $VENV ($((SECONDS - t0)) s)"
# Host-only build: the CPU platform has no GPU to use, and skipping nvcc keeps
# the build to seconds.
APEX_CUDA=OFF "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
  --no-build-isolation . 
echo "APEX installed into it ($((SECONDS - t0)) s)"
gguf=$(bash setup_hooks/fetch_model.sh)
model=$(dirname "$gguf")/$(basename "$gguf" .gguf)-hf-f32  # beside the GGUF, in the model cache
"$VENV/bin/python" integration/vllm/tools/make_model.py "$gguf" "$model" >/dev/null 2>&1 \
  || "$VENV/bin/python" integration/vllm/tools/make_model.py "$gguf" "$model"
echo "model: $model ($((SECONDS - t0)) s)"
APEX_VLLM_MODEL=$model APEX_DEVICE=none "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  -W ignore::DeprecationWarning tests/integration/vllm
echo "vLLM integration: done in $((SECONDS - t0)) s"
