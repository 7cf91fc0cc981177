#!/usr/bin/env bash
# tests/gpu/run_vllm_tiers.sh OUTDIR - the vLLM two-tier test
# (tests/integration/vllm/test_tiers.py) on a GPU, for a machine where vLLM's
# CUDA build is installed in the Python given by APEX_PYTHON (the project's
# GPU machine has no package registry and cannot hold vLLM's wheel and CUDA
# dependencies today; see docs/vllm.md). The device tier is then CUDA memory
# (APEX_TEST_DEVICE=cuda), the host tier the rest of vLLM's pool, APEX's
# scheduler (apex_vllm.scheduler.ApexScheduler) choosing each request's tier.
# Needs: vLLM (CUDA) + torch + openai + pytest in APEX_PYTHON, nvcc, and a
# model folder (APEX_VLLM_MODEL: a Hugging Face folder, fp32 weights; the
# GGUF-made one of tests/integration/test_vllm.sh works).
# Writes OUTDIR/vllm_tiers.log (pytest's output, with the tier figures).
set -u
OUT=${1:?usage: tests/gpu/run_vllm_tiers.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT" || exit 2
PY=${APEX_PYTHON:-python3}
LOG=$OUT/vllm_tiers.log
"$PY" -c 'import vllm, torch, openai, pytest; assert torch.cuda.is_available()' >"$LOG" 2>&1 || {
    echo "vLLM (CUDA build), openai and pytest are needed in $PY, and a GPU (see $LOG)"; exit 2; }
[ -d "${APEX_VLLM_MODEL:-}" ] || { echo "APEX_VLLM_MODEL must name a model folder"; exit 2; }
APEX_CUDA_ARCHS=${APEX_CUDA_ARCHS:-90} "$PY" -m pip install -q --no-build-isolation . >>"$LOG" 2>&1 \
    || { echo "pip install of APEX failed (see $LOG)"; tail -30 "$LOG"; exit 1; }
APEX_TEST_DEVICE=cuda "$PY" -m pytest -s -q -p no:cacheprovider -W ignore::DeprecationWarning \
    tests/integration/vllm/test_tiers.py 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
