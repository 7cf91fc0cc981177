#!/usr/bin/env bash
# Sets up (once) and prints the path of a small virtual environment with the
# `openai` Python client from PyPI: the real client APEX's llama-server test
# and serving benchmark talk to llama-server with. Cached (keyed by version) in
#   ${APEX_CACHE_DIR:-$HOME/.cache/apex}/client-venv-openai<V>
# and reused when complete (.complete written last).
set -euo pipefail
OPENAI_VERSION=3.63.0
CACHE=${APEX_CACHE_DIR:-$HOME/.cache/apex}
VENV=$CACHE/client-venv-openai$OPENAI_VERSION
log() { echo "apex setup: $*" >&2; }
die() { echo "apex setup: error: $*" >&2; exit 1; }

if [ -f "$VENV/.complete" ]; then echo "$VENV"; exit 0; fi
log "creating $VENV (openai $OPENAI_VERSION from PyPI)"
rm -rf "$VENV"
mkdir -p "$CACHE"
python3 -m venv "$VENV" || die "python3 -m venv failed (setup_hooks/install_deps.sh installs python3-venv)"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "openai==$OPENAI_VERSION" >&2 \
  || die "pip install openai==$OPENAI_VERSION failed (is PyPI reachable?)"
"$VENV/bin/python" -c "import openai" || die "openai does not import in $VENV"
touch "$VENV/.complete"
echo "$VENV"
