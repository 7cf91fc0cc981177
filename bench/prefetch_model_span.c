/* prefetch_model_span.c - apex-bench prefetch-model's AVX-512 half: the
 * span driver with synthetic q.K and P.V stages (see bench_prefetch_model.c).
 * Compiled with AVX-512 flags; called only where cpuid has them. */
#include <immintrin.h>
#include <omp.h>

#include "bench/prefetch_model.h"
#include "cpu_attn/avx512_span.h"

#define PM_ROWB ((size_t)PM_D * 2) /* bytes of a K or V row */

typedef struct {
    int fma; /* FMAs per 64-byte line */
} model_ctx;

/* Reads n rows of rowb bytes from p, fma FMAs per line over 8 chains; a
 * share of the prefetch list after every 16 rows, as the real stages. */
static inline __attribute__((always_inline)) __m512 read_rows(const uint8_t *p, int n, int fma,
                                                              pf_list *pf, int *left, int per) {
    __m512 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm512_setzero_ps();
    const __m512 c = _mm512_set1_ps(0.5f);
    for (int r0 = 0; r0 < n; r0 += 16) {
        const int rows = n - r0 < 16 ? n - r0 : 16;
        const uint8_t *t = p + (size_t)r0 * PM_ROWB;
        for (size_t off = 0; off < (size_t)rows * PM_ROWB; off += 64) {
            const __m512 x = _mm512_loadu_ps(t + off);
            const int j = (int)(off / 64) & 7;
            a[j] = _mm512_add_ps(a[j], x);
            for (int f = 0; f < fma; f++) a[(j + f) & 7] = _mm512_fmadd_ps(x, c, a[(j + f) & 7]);
        }
        pf_share(pf, left, per);
    }
    for (int i = 1; i < 8; i++) a[0] = _mm512_add_ps(a[0], a[i]);
    return a[0];
}

static void qk_model(const void *ctx, int hh, const uint8_t *k, int r, int n, float *s,
                     pf_list *pf, int pf_lines) {
    (void)hh, (void)r;
    const model_ctx *m = ctx;
    int left = pf_lines;
    const int per = (pf_lines + (n + 15) / 16 - 1) / ((n + 15) / 16);
    const float z = _mm512_reduce_add_ps(read_rows(k, n, m->fma, pf, &left, per)) * 0.0f;
    for (int g = 0; g < PM_G; g++)
        for (int j = 0; j < n; j++) s[(size_t)g * CPU_ATTN_SROW + j] = z; /* z is 0: equal weights */
    pf_list_some(pf, left);
}

static void pv_model(const void *ctx, int hh, const pv_piece *pc, int npc, const float *p,
                     float *acc, pf_list *pf, int pf_lines) {
    (void)hh, (void)p;
    const model_ctx *m = ctx;
    int runs = 0;
    for (int x = 0; x < npc; x++) runs += (pc[x].n + 15) / 16;
    const int per = (pf_lines + runs - 1) / runs;
    int left = pf_lines;
    __m512 sum = _mm512_setzero_ps();
    for (int x = 0; x < npc; x++)
        sum = _mm512_add_ps(sum, read_rows(pc[x].v, pc[x].n, m->fma, pf, &left, per));
    acc[0] += _mm512_reduce_add_ps(sum);
    pf_list_some(pf, left);
}

double prefetch_model_run(const uint8_t *kv, const int32_t *table, int n_seqs, int ctx,
                          int threads, int fma, int pairs, float *scratch, size_t scratch_floats) {
    const model_ctx mc = {fma}, *m = &mc;
    const apex_kv_layout lay = apex_kv_layout_of(PM_H, PM_BT, PM_D, 2);
    const int nb = ctx / PM_BT;
    const double t0 = omp_get_wtime();
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int i = 0; i < n_seqs; i++) {
        float *ts = scratch + (size_t)omp_get_thread_num() * scratch_floats;
        float *q = ts, *acc = q + PM_H * PM_G * PM_D, *ml = acc + PM_H * PM_G * PM_D;
        float *l = ml + PM_H * PM_G;
        const cpu_attn_span sp = {
            .q = q, .q_scale = 1.0f, .kv = kv, .blocks = table + (size_t)i * nb,
            .block_bytes = lay.block, .k_off = apex_kv_offset(&lay, 0, 0, 0),
            .v_off = apex_kv_offset(&lay, 1, 0, 0), .panel = lay.panel,
            .NH = PM_H, .G = PM_G, .D = PM_D, .bt = PM_BT, .t0 = 0, .t1 = ctx,
            .kv_dtype = APEX_DTYPE_BF16, .softcap = 0.0f,
        };
        avx512_span_run(&sp, ml, l, acc, l + PM_H * PM_G, 1, pairs, qk_model, pv_model, m);
    }
    return omp_get_wtime() - t0;
}
