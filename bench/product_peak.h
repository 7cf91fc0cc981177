/* product_peak.h - the issue rate of the CPU kernel's dot-product
 * instruction, measured in the same process as the kernel: the compute
 * bound that apex-bench attn's in-cache ceiling is read against (the
 * clock of this VM has been seen at 2.5 and 3.65 GHz in different
 * sessions, so a bound written down once does not hold). */
#ifndef APEX_BENCH_PRODUCT_PEAK_H
#define APEX_BENCH_PRODUCT_PEAK_H

#include "apex/apex.h"

/* Multiply-adds per second, all n_threads threads issuing at once, of the
 * instruction the selected kernel uses for kv_dtype: 512-bit vdpbf16ps
 * (32 multiply-adds) for bf16 KV on avx512bf16, 512-bit FMA (16) for the
 * other dtypes on avx512 and avx512bf16. 12 independent accumulators per
 * thread, register operands: the issue rate, nothing else. Returns 0 for
 * the other ISAs (not measured). */
double product_peak_macs_per_s(const char *isa, apex_dtype kv_dtype, int n_threads);

#endif
