#!/usr/bin/env bash
# Fetches llama.cpp (vendored in the pinned llama-cpp-python source distribution
# on PyPI) and builds it with CMake, cached outside the clone:
#   ${APEX_CACHE_DIR:-$HOME/.cache/apex}/llama.cpp-<version>/{src,build}
# Applies APEX's one patch to llama.cpp (integration/llama_cpp/
# llama-kv-cache-buft-hook.patch: lets a backend supply the KV cache's buffer
# type; see integration/llama_cpp/README.md), idempotently.
# Rebuilds only when the build is missing, a wanted target is not built yet,
# or the configuration or the patch changed (then incrementally: the patched
# file, the new targets and the links).
#   APEX_LLAMA_CUDA=1        CUDA build (build-cuda/ instead of build/): for the
#                            archs in APEX_CUDA_ARCHS (default 90) and a portable
#                            AVX2 CPU part, so it can be built on a machine without
#                            a GPU and run on another
#   APEX_LLAMA_TARGETS="..." extra targets (llama, llama-batched, llama-bench,
#                            llama-simple, llama-server and llama-cli always)
#   JOBS                     parallel build jobs (default 2)
# Prints the build directory on the last line of stdout.
set -euo pipefail

LLAMA_PY_VERSION=0.3.36
# sha256 of llama_cpp_python-0.3.36.tar.gz as published on PyPI.
LLAMA_PY_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e

CACHE=${APEX_CACHE_DIR:-$HOME/.cache/apex}
ROOT=$CACHE/llama.cpp-$LLAMA_PY_VERSION
SRC=$ROOT/src
JOBS=${JOBS:-2}
log() { echo "apex setup: $*" >&2; }
die() { echo "apex setup: error: $*" >&2; exit 1; }

PATCH=$(cd "$(dirname "$0")/.." && pwd)/integration/llama_cpp/llama-kv-cache-buft-hook.patch
[ -f "$PATCH" ] || die "missing $PATCH"
PATCH_SHA=$(sha256sum "$PATCH" | cut -d' ' -f1)
command -v patch >/dev/null 2>&1 \
  || die "the 'patch' tool is missing (setup_hooks/install_deps.sh installs it)"

mkdir -p "$ROOT"

# ---- source: the sdist from PyPI, checked against the pinned checksum.
if [ ! -f "$SRC/.apex-complete" ]; then
  sdist=$ROOT/llama_cpp_python-$LLAMA_PY_VERSION.tar.gz
  if [ ! -f "$sdist" ] || ! echo "$LLAMA_PY_SHA256  $sdist" | sha256sum -c --status; then
    log "downloading llama-cpp-python==$LLAMA_PY_VERSION (source distribution) from PyPI"
    tmp=$(mktemp -d "$ROOT/dl.XXXXXX")
    python3 -m pip download --quiet --no-deps --no-binary :all: \
      "llama-cpp-python==$LLAMA_PY_VERSION" -d "$tmp" >&2 \
      || die "pip download llama-cpp-python==$LLAMA_PY_VERSION failed (is PyPI reachable?)"
    mv "$tmp/llama_cpp_python-$LLAMA_PY_VERSION.tar.gz" "$sdist"
    rm -rf "$tmp"
  fi
  echo "$LLAMA_PY_SHA256  $sdist" | sha256sum -c --status \
    || die "checksum mismatch for $sdist (expected $LLAMA_PY_SHA256); delete it and retry"
  log "extracting vendored llama.cpp"
  rm -rf "$SRC" "$ROOT/extract"
  mkdir -p "$ROOT/extract"
  tar -xzf "$sdist" -C "$ROOT/extract" "llama_cpp_python-$LLAMA_PY_VERSION/vendor/llama.cpp"
  mv "$ROOT/extract/llama_cpp_python-$LLAMA_PY_VERSION/vendor/llama.cpp" "$SRC"
  rm -rf "$ROOT/extract"
  [ -f "$SRC/ggml/src/ggml-backend-impl.h" ] || die "the sdist has no vendored llama.cpp"
  touch "$SRC/.apex-complete"
fi

# ---- the patch. $SRC/.apex-patch holds the sha256 of the patch applied and
# .apex-patch.diff a copy of it: a source patched with another version is
# reverted with that copy first (the reverted files get a new time, so make
# rebuilds them). Only if that fails is the source extracted again, and the
# build dropped (extracted files keep the archive's old times).
if [ "$(cat "$SRC/.apex-patch" 2>/dev/null)" != "$PATCH_SHA" ]; then
  if [ -f "$SRC/.apex-patch.diff" ]; then
    if patch -d "$SRC" -p1 -R --forward --batch --quiet --no-backup-if-mismatch --dry-run <"$SRC/.apex-patch.diff" >/dev/null 2>&1; then
      patch -d "$SRC" -p1 -R --forward --batch --quiet --no-backup-if-mismatch <"$SRC/.apex-patch.diff" >&2
      rm -f "$SRC/.apex-patch" "$SRC/.apex-patch.diff"
    else
      log "the llama.cpp source in $SRC was changed by hand: extracting it again (full rebuild)"
      rm -rf "$SRC" "$ROOT/build" "$ROOT/build-cuda"
      exec bash "$0" "$@"
    fi
  fi
  if patch -d "$SRC" -p1 --forward --batch --quiet --no-backup-if-mismatch --dry-run <"$PATCH" >/dev/null 2>&1; then
    patch -d "$SRC" -p1 --forward --batch --quiet --no-backup-if-mismatch <"$PATCH" >&2
    log "patched llama.cpp: $(basename "$PATCH")"
  elif patch -d "$SRC" -p1 -R --forward --batch --quiet --no-backup-if-mismatch --dry-run <"$PATCH" >/dev/null 2>&1; then
    : # already applied (a run stopped before it wrote the stamp)
  else
    die "$(basename "$PATCH") does not apply to $SRC; delete $SRC and retry"
  fi
  cp "$PATCH" "$SRC/.apex-patch.diff"
  echo "$PATCH_SHA" >"$SRC/.apex-patch"
fi

# ---- build: shared ggml/llama libraries (the APEX backend links ggml-base, and
# must share the process's registry), backends linked in (GGML_BACKEND_DL off:
# GGML_BACKEND_PATH loading works without it).
if [ "${APEX_LLAMA_CUDA:-0}" = 1 ]; then
  BUILD=$ROOT/build-cuda
  extra=(-DGGML_CUDA=ON -DGGML_NATIVE=OFF "-DCMAKE_CUDA_ARCHITECTURES=${APEX_CUDA_ARCHS:-90}"
         -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
         # the driver (libcuda.so.1) is only where a GPU is: the tools link without it
         "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined")
else
  BUILD=$ROOT/build
  # -march=native, less two things a Xeon (Sapphire Rapids and later) adds:
  # - AMX: on a Xeon VM with AMX (cpuid and XCR0 both say yes) ggml's AMX
  #   matmul kills llama-batched -np 8 with SIGILL before any APEX code runs
  #   (ldtilecfg faults on the config it builds on the stack, the next tile
  #   instruction traps; upstream: ggml-org/llama.cpp PR 26954).
  # - AVX512-FP16: with it ggml-cpu's FLASH_ATTN_EXT accumulates V in fp16
  #   arithmetic (_mm512_fmadd_ph, the weight rounded to fp16) for head_dim
  #   >= 128, where the F16C build converts, FMAs in fp32 and rounds once.
  #   APEX's exact mode mirrors the F16C build (every x86 ggml without
  #   AVX512-FP16, Zen 4's native one included); see
  #   integration/llama_cpp/README.md, "Exactness".
  # GCC's explicit -mno-* flags win over -march=native whatever their order.
  nox86=(-mno-amx-tile -mno-amx-int8 -mno-amx-bf16 -mno-avx512fp16)
  extra=(-DGGML_CUDA=OFF -DGGML_NATIVE=ON
         "-DCMAKE_C_FLAGS=${nox86[*]}" "-DCMAKE_CXX_FLAGS=${nox86[*]}")
fi
targets=(llama llama-batched llama-bench llama-simple llama-server llama-cli ${APEX_LLAMA_TARGETS:-})
# LLAMA_USE_PREBUILT_UI=OFF: llama-server's web page is not fetched from the
# network at build time (its API, all APEX needs, is the same without it).
cfg=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON
     -DGGML_BACKEND_DL=OFF -DGGML_OPENMP=ON -DLLAMA_BUILD_TESTS=OFF
     -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF
     -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
     "${extra[@]}")
# The stamp: line 1 the configuration and the patch, line 2 the targets built
# with them. Complete when line 1 matches and every wanted target was built
# (and its file is there); otherwise build the union, incrementally.
key="${cfg[*]} | patch $PATCH_SHA"
built=()
if [ -f "$BUILD/.apex-complete" ] && [ "$(sed -n 1p "$BUILD/.apex-complete")" = "$key" ]; then
  read -r -a built <<<"$(sed -n 2p "$BUILD/.apex-complete")"
fi
target_file() { # the file a target makes
  case $1 in
    llama|ggml|ggml-base|ggml-cpu) echo "$BUILD/bin/lib$1.so" ;;
    *) echo "$BUILD/bin/$1" ;;
  esac
}
missing=()
for t in "${targets[@]}"; do
  if [[ " ${built[*]} " != *" $t "* ]] || [ ! -e "$(target_file "$t")" ]; then missing+=("$t"); fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "$BUILD"
  exit 0
fi
for t in "${built[@]}"; do [[ " ${targets[*]} " == *" $t "* ]] || targets+=("$t"); done
log "building llama.cpp $LLAMA_PY_VERSION in $BUILD (${missing[*]} missing or stale; -j$JOBS; a few minutes)"
rm -f "$BUILD/.apex-complete"
cmake -S "$SRC" -B "$BUILD" "${cfg[@]}" >"$ROOT/cmake-configure.log" 2>&1 \
  || { tail -20 "$ROOT/cmake-configure.log" >&2; die "configuring llama.cpp failed (log: $ROOT/cmake-configure.log)"; }
cmake --build "$BUILD" -j"$JOBS" --target "${targets[@]}" >"$ROOT/cmake-build.log" 2>&1 \
  || { tail -30 "$ROOT/cmake-build.log" >&2; die "building llama.cpp failed (log: $ROOT/cmake-build.log)"; }
printf '%s\n%s\n' "$key" "${targets[*]}" >"$BUILD/.apex-complete"
log "llama.cpp built: $BUILD/bin"
echo "$BUILD"
