#!/usr/bin/env bash
# The engine adapters are clients of libapex (issue 11): none of them may
# define a symbol of the core's internals. Reads each library's full symbol
# table (nm --defined-only: static and hidden functions included, not only
# the exported ones; the dynamic table when the library is stripped) and
# fails on any name of:
#   block_pool_* host_mem_* cpu_workers_* cpu_attn_* seq_table_* context_*
#   pipeline_* metrics_* apex_metrics_* fault_* apex_fail apex_clear_error
#   tests/install/check_adapter_symbols.sh LIB...   (libggml-apex.so,
#   libapex-preload.so, libapex_torch.so; a missing LIB is an error)
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: $0 LIB..." >&2; exit 2; }
pat='^(block_pool_|host_mem_|cpu_workers_|cpu_attn_|seq_table_|context_|pipeline_|metrics_|apex_metrics_|fault_|apex_fail$|apex_clear_error$)'
bad=0
for lib in "$@"; do
  [ -f "$lib" ] || { echo "FAIL: adapter symbols: no $lib" >&2; exit 1; }
  table=full
  syms=$(nm --defined-only "$lib" 2>/dev/null | awk 'NF >= 3 {print $3}')
  if [ -z "$syms" ]; then
    table=dynamic
    syms=$(nm -D --defined-only "$lib" | awk 'NF >= 3 {print $3}')
  fi
  hits=$(grep -E "$pat" <<<"$syms" || true)
  n=$(grep -c . <<<"$hits" || true)
  echo "  $(basename "$lib"): $n core internals defined ($table symbol table, $(grep -c . <<<"$syms") symbols)"
  if [ "$n" != 0 ]; then
    echo "$hits" | sed 's/^/    /' >&2
    bad=1
  fi
done
[ $bad = 0 ] || { echo "FAIL: adapter symbols: an adapter defines core internals (link libapex.so.1 instead)" >&2; exit 1; }
echo "PASS: adapter symbols: no core internals in $# adapter librar$([ $# = 1 ] && echo y || echo ies)"
