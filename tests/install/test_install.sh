#!/usr/bin/env bash
# The install tree: cmake --install BUILD into a temporary prefix, then the
# consumer (consumer.c) built against it both ways - find_package(apex) and
# pkg-config - and run, with nothing of the source or build tree on its paths.
# Also checks the installed files (libapex.so.1 + symlink, headers, tools,
# and lib/apex/ when BUILD has the llama.cpp adapter).
#   tests/install/test_install.sh BUILD_DIR
set -euo pipefail
build=$(cd "$1" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d /tmp/apex_install_test.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
P=$tmp/prefix
fail() { echo "FAIL: install tree: $*" >&2; exit 1; }

cmake --install "$build" --prefix "$P" >"$tmp/install.log" || { cat "$tmp/install.log" >&2; fail "cmake --install"; }
for f in lib/libapex.so.1 include/apex/apex.h include/apex/apex_paged.h bin/apex-bench \
         lib/cmake/apex/apexConfig.cmake lib/cmake/apex/apexConfigVersion.cmake lib/pkgconfig/apex.pc; do
  [ -e "$P/$f" ] || fail "missing $f"
done
[ -L "$P/lib/libapex.so" ] && [ "$(readlink "$P/lib/libapex.so")" = libapex.so.1 ] \
  || fail "lib/libapex.so is not a link to libapex.so.1"
[ "$(objdump -p "$P/lib/libapex.so.1" | awk '/SONAME/ {print $2}')" = libapex.so.1 ] || fail "SONAME is not libapex.so.1"
if grep -q '^LLAMA_CPP_BUILD:PATH=..*' "$build/CMakeCache.txt"; then
  for f in lib/apex/libggml-apex.so lib/apex/libapex-preload.so; do [ -e "$P/$f" ] || fail "missing $f"; done
  # The backend is a client of the installed libapex.so.1 (rpath $ORIGIN/..).
  used=$(ldd "$P/lib/apex/libggml-apex.so" | awk '$1 == "libapex.so.1" {print $3}')
  [ -n "$used" ] && [ "$(realpath "$used")" = "$(realpath "$P/lib/libapex.so.1")" ] \
    || fail "lib/apex/libggml-apex.so does not use the installed libapex.so.1 (it finds '$used')"
fi
if grep -q 'apex-sim' "$build/CMakeCache.txt" 2>/dev/null || [ -x "$build/bin/apex-sim" ]; then
  [ -x "$P/bin/apex-sim" ] || fail "missing bin/apex-sim"
fi
for t in "$P"/bin/apex-*; do
  ldd "$t" >"$tmp/ldd0"; ! grep -q "not found" "$tmp/ldd0" || fail "$t: $(grep 'not found' "$tmp/ldd0")"
done

# 1. find_package(apex) -> apex::apex
cmake -S "$here" -B "$tmp/cm" -DCMAKE_PREFIX_PATH="$P" -DCMAKE_BUILD_TYPE=Release >"$tmp/cm.log" 2>&1 \
  || { cat "$tmp/cm.log" >&2; fail "configuring the consumer with find_package(apex)"; }
cmake --build "$tmp/cm" >"$tmp/cmb.log" 2>&1 || { cat "$tmp/cmb.log" >&2; fail "building the consumer (CMake)"; }
out=$(LD_LIBRARY_PATH= "$tmp/cm/consumer") || fail "consumer (CMake) exited $?"
echo "  find_package: $out"
ldd "$tmp/cm/consumer" >"$tmp/ldd1"; grep -q "$P/lib/libapex.so.1" "$tmp/ldd1" || fail "the CMake consumer does not use the installed libapex.so.1"

# 2. pkg-config
export PKG_CONFIG_PATH=$P/lib/pkgconfig
flags=$(pkg-config --cflags --libs apex) || fail "pkg-config apex"
# shellcheck disable=SC2086
cc -o "$tmp/pc-consumer" "$here/consumer.c" $flags -lm -Wl,-rpath,"$P/lib" || fail "building the consumer (pkg-config)"
out=$(LD_LIBRARY_PATH= "$tmp/pc-consumer") || fail "consumer (pkg-config) exited $?"
echo "  pkg-config:   $out ($(pkg-config --modversion apex))"
ldd "$tmp/pc-consumer" >"$tmp/ldd2"; grep -q "$P/lib/libapex.so.1" "$tmp/ldd2" || fail "the pkg-config consumer does not use the installed libapex.so.1"
echo "PASS: install tree (cmake --install, find_package(apex), pkg-config apex)"
