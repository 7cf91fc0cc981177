/* product_peak.c - see product_peak.h. x86-64 inline assembly: the
 * compiler may neither fold the chains nor keep accumulators in memory. */
#include "bench/product_peak.h"

#include <omp.h>
#include <string.h>

#define ROUNDS 2000000L /* x 12 instructions: ~7-10 ms a thread */

#if defined(__x86_64__)
#define X12(OP) OP(0) OP(1) OP(2) OP(3) OP(4) OP(5) OP(6) OP(7) OP(8) OP(9) OP(10) OP(11)
#define DPBF16(i) "vdpbf16ps %%zmm12, %%zmm13, %%zmm" #i "\n\t"
#define FMA(i) "vfmadd231ps %%zmm12, %%zmm13, %%zmm" #i "\n\t"
#define ZERO(i) "vpxord %%zmm" #i ", %%zmm" #i ", %%zmm" #i "\n\t"
#define CLOBBER "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", \
                "xmm9", "xmm10", "xmm11", "xmm12", "xmm13"

__attribute__((target("avx512f,avx512bf16"))) static void run_dpbf16(long rounds) {
    __asm__ volatile(X12(ZERO) ZERO(12) ZERO(13) ::: CLOBBER);
    for (long i = 0; i < rounds; i++) __asm__ volatile(X12(DPBF16) ::: CLOBBER);
}

__attribute__((target("avx512f"))) static void run_fma(long rounds) {
    __asm__ volatile(X12(ZERO) ZERO(12) ZERO(13) ::: CLOBBER);
    for (long i = 0; i < rounds; i++) __asm__ volatile(X12(FMA) ::: CLOBBER);
}
#endif

double product_peak_macs_per_s(const char *isa, apex_dtype kv_dtype, int n_threads) {
#if defined(__x86_64__)
    const int bf16 = strcmp(isa, "avx512bf16") == 0;
    if (!bf16 && strcmp(isa, "avx512") != 0) return 0.0;
    const int dp = bf16 && kv_dtype == APEX_DTYPE_BF16;
    double best = 0.0;
    for (int rep = 0; rep < 3; rep++) { /* best of 3: a descheduled thread is not the rate */
        double slowest = 0.0;
#pragma omp parallel num_threads(n_threads) reduction(max : slowest)
        {
            const double t0 = omp_get_wtime();
            if (dp) run_dpbf16(ROUNDS);
            else run_fma(ROUNDS);
            slowest = omp_get_wtime() - t0;
        }
        const double rate = (double)n_threads * ROUNDS * 12 * (dp ? 32 : 16) / slowest;
        if (rate > best) best = rate;
    }
    return best;
#else
    (void)isa, (void)kv_dtype, (void)n_threads;
    return 0.0;
#endif
}
