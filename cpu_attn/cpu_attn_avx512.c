/* AVX-512 inner kernel (F/BW/VL/DQ; BF16 only for bf16 output, behind a
 * runtime check). Built with AVX-512 flags; run only where cpuid says so.
 * The span driver (groups, prefetch, online softmax) is avx512_span.h's;
 * this file's two stages:
 *  QK  tiles of TT tokens x HT heads (TT*HT <= 16 accumulators), q from L1,
 *      K converted to fp32 once per tile; the 16 accumulators are summed by
 *      one transpose-reduce into one vector of 16 scores.
 *  PV  per KV head and 16-wide slice of head_dim over the whole group, all
 *      q heads' accumulators in registers, V converted once per (token,
 *      slice), p broadcast from memory. */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "cpu_attn/avx512_span.h"
#include "cpu_attn/cpu_attn_impl.h"
#include "cpu_attn/dtype_convert.h"
#include "cpu_attn/simd_avx512.h"

#define INL static inline __attribute__((always_inline))

/* ---------------------------------------------------------------- QK */

/* n consecutive rows of one block panel, HT heads; pf_lines of pf spread
 * over the tiles. */
INL void qk_rows(const float *q, int D, const uint8_t *k, size_t rowb, int n, float *s, int dt,
                 int HT, int ymm, pf_list *pf, int pf_lines) {
    int j = 0, left = pf_lines;
    if (HT == 1) {
        const int per = (pf_lines + (n + 15) / 16 - 1) / ((n + 15) / 16);
        for (; j + 16 <= n; j += 16) {
            avx512_qk_tile(q, D, k + (size_t)j * rowb, rowb, s + j, CPU_ATTN_SROW, (apex_dtype)dt, 16, 1);
            pf_share(pf, &left, per);
        }
        for (; j + 8 <= n; j += 8) avx512_qk_tile(q, D, k + (size_t)j * rowb, rowb, s + j, CPU_ATTN_SROW, (apex_dtype)dt, 8, 1);
    } else {
        const int TT = 16 / HT, per = (pf_lines + (n + TT - 1) / TT - 1) / ((n + TT - 1) / TT);
        for (; j + TT <= n; j += TT) {
            /* f16 KV, 3-4 heads: 256-bit tiles where cpu_attn_qk_ymm says
             * (Zen 4: q.K 5-7 % faster in cache; a Xeon: 1.5x slower). */
            if (ymm && dt == APEX_DTYPE_F16 && (HT == 3 || HT == 4))
                avx512_qk_tile_ymm(q, D, k + (size_t)j * rowb, rowb, s + j, CPU_ATTN_SROW, (apex_dtype)dt, TT, HT);
            else
                avx512_qk_tile(q, D, k + (size_t)j * rowb, rowb, s + j, CPU_ATTN_SROW, (apex_dtype)dt, TT, HT);
            pf_share(pf, &left, per);
        }
    }
    for (; j < n; j++) avx512_qk_tile(q, D, k + (size_t)j * rowb, rowb, s + j, CPU_ATTN_SROW, (apex_dtype)dt, 1, HT);
    pf_list_some(pf, left);
}

#define QK_CASE(DT, HT) \
    case (DT) * 16 + (HT): qk_rows(qh, D, k, rowb, n, sh, DT, HT, ymm, pf, pf_lines); break;
#define QK_CASES(DT) \
    QK_CASE(DT, 1) QK_CASE(DT, 2) QK_CASE(DT, 3) QK_CASE(DT, 4) \
    QK_CASE(DT, 5) QK_CASE(DT, 6) QK_CASE(DT, 7) QK_CASE(DT, 8)

static void qk_block(const float *q, int D, const uint8_t *k, size_t rowb, int n, float *s,
                     int dt, int G, int ymm, pf_list *pf, int pf_lines) {
    for (int h0 = 0; h0 < G; h0 += 8) {
        const int HT = G - h0 < 8 ? G - h0 : 8;
        const float *qh = q + (size_t)h0 * D;
        float *sh = s + (size_t)h0 * CPU_ATTN_SROW;
        switch (dt * 16 + HT) {
            QK_CASES(APEX_DTYPE_F32)
            QK_CASES(APEX_DTYPE_F16)
            QK_CASES(APEX_DTYPE_BF16)
        default: break;
        }
        pf_lines = 0;
    }
}

/* ---------------------------------------------------------------- PV */

/* acc[h][c..c+16) += sum_t p[h][t] v[t][c..c+16) for HP heads, all pieces,
 * a share of the prefetch list after each. */
INL void pv_slice(const pv_piece *pc, int npc, size_t rowb, const float *s, float *acc, int D,
                  int c, int dt, int HP, pf_list *pf, int *pf_left, int pf_per) {
    const int NS = avx512_pv_sets(HP);
    const size_t esz = apex_dtype_size((apex_dtype)dt);
    __m512 a[16];
#pragma GCC unroll 16
    for (int i = 0; i < NS * HP; i++) a[i] = _mm512_setzero_ps();
    for (int x = 0; x < npc; x++) {
        avx512_pv_run(a, pc[x].v + (size_t)c * esz, rowb, pc[x].n, s + pc[x].so, CPU_ATTN_SROW,
                      (apex_dtype)dt, HP, NS);
        pf_share(pf, pf_left, pf_per);
    }
    avx512_pv_add(a, acc + c, D, HP, NS);
}

INL void pv_heads(const pv_piece *pc, int npc, size_t rowb, const float *s, float *acc, int D,
                  int dt, int HP, pf_list *pf, int pf_lines) {
    const int parts = D / 16 * npc, per = (pf_lines + parts - 1) / parts;
    int left = pf_lines;
    for (int c = 0; c < D; c += 16) pv_slice(pc, npc, rowb, s, acc, D, c, dt, HP, pf, &left, per);
    pf_list_some(pf, left);
}

#define PV_CASE(DT, HP) \
    case (DT) * 32 + (HP): pv_heads(pc, npc, rowb, sh, ah, D, DT, HP, pf, pf_lines); break;
#define PV_CASES(DT)                                                                     \
    PV_CASE(DT, 1) PV_CASE(DT, 2) PV_CASE(DT, 3) PV_CASE(DT, 4) PV_CASE(DT, 5)           \
    PV_CASE(DT, 6) PV_CASE(DT, 7) PV_CASE(DT, 8) PV_CASE(DT, 9) PV_CASE(DT, 10)          \
    PV_CASE(DT, 11) PV_CASE(DT, 12) PV_CASE(DT, 13) PV_CASE(DT, 14) PV_CASE(DT, 15)      \
    PV_CASE(DT, 16)

static void pv_group(const pv_piece *pc, int npc, size_t rowb, const float *s, float *acc, int D,
                     int dt, int G, pf_list *pf, int pf_lines) {
    for (int h0 = 0; h0 < G; h0 += 16) {
        const int HP = G - h0 < 16 ? G - h0 : 16;
        const float *sh = s + (size_t)h0 * CPU_ATTN_SROW;
        float *ah = acc + (size_t)h0 * D;
        switch (dt * 32 + HP) {
            PV_CASES(APEX_DTYPE_F32)
            PV_CASES(APEX_DTYPE_F16)
            PV_CASES(APEX_DTYPE_BF16)
        default: break;
        }
        pf_lines = 0;
    }
}

/* ---------------------------------------------------------------- span */

typedef struct {
    const float *q; /* [NH*G][D], prescaled */
    int D, G, dt;
    size_t rowb;
    int ymm;        /* cpu_attn_qk_ymm() */
} fma_ctx;

static void qk_fma(const void *ctx, int hh, const uint8_t *k, int r, int n, float *s,
                   pf_list *pf, int pf_lines) {
    const fma_ctx *c = ctx;
    (void)r;
    qk_block(c->q + (size_t)hh * c->G * c->D, c->D, k, c->rowb, n, s, c->dt, c->G, c->ymm, pf,
             pf_lines);
}

static void pv_fma(const void *ctx, int hh, const pv_piece *pc, int npc, const float *p, float *acc,
                   pf_list *pf, int pf_lines) {
    const fma_ctx *c = ctx;
    (void)hh;
    pv_group(pc, npc, c->rowb, p, acc, c->D, c->dt, c->G, pf, pf_lines);
}

/* Also the avx512bf16 kernel's path for f16 and f32 KV. */
void cpu_attn_span_avx512(const cpu_attn_span *sp, float *m, float *l, float *acc, float *scratch) {
    const fma_ctx c = {sp->q, sp->D, sp->G, (int)sp->kv_dtype,
                       (size_t)sp->D * apex_dtype_size(sp->kv_dtype), cpu_attn_qk_ymm()};
    avx512_span_run(sp, m, l, acc, scratch, 0, 0, qk_fma, pv_fma, &c);
}

/* ---------------------------------------------------------------- store */

__attribute__((target("avx512bf16"))) static void store_bf16_native(uint16_t *o, const float *src,
                                                                      __m512 mv, int32_t n) {
    int32_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(o + i),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(src + i), mv)));
    const float mul = _mm512_cvtss_f32(mv);
    for (; i < n; i++) o[i] = apex_f32_to_bf16(src[i] * mul);
}

/* Also the avx512bf16 kernel's store. */
void cpu_attn_store_avx512(void *out, apex_dtype dt, const float *src, float mul, int32_t n) {
    const __m512 mv = _mm512_set1_ps(mul);
    int32_t i = 0;
    if (dt == APEX_DTYPE_F32) {
        for (; i + 16 <= n; i += 16)
            _mm512_storeu_ps((float *)out + i, _mm512_mul_ps(_mm512_loadu_ps(src + i), mv));
    } else if (dt == APEX_DTYPE_F16) {
        for (; i + 16 <= n; i += 16)
            _mm256_storeu_si256((__m256i *)((uint16_t *)out + i),
                                _mm512_cvtps_ph(_mm512_mul_ps(_mm512_loadu_ps(src + i), mv),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else if (cpu_attn_have_avx512bf16()) {
        store_bf16_native((uint16_t *)out, src, mv, n);
        return;
    }
    for (; i < n; i++) apex_store_f32(out, dt, (size_t)i, src[i] * mul);
}

/* Also the avx512bf16 kernel's q load. */
void cpu_attn_load_avx512(float *dst, const void *src, apex_dtype dt, size_t n, float mul) {
    const __m512 mv = _mm512_set1_ps(mul);
    const size_t esz = apex_dtype_size(dt);
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_mul_ps(avx512_ld16((const uint8_t *)src + i * esz, dt), mv));
    for (; i < n; i++) dst[i] = apex_load_f32(src, dt, i) * mul;
}

const cpu_attn_kernel cpu_attn_kernel_avx512 = {cpu_attn_span_avx512, cpu_attn_store_avx512,
                                                cpu_attn_load_avx512, 0, NULL};
