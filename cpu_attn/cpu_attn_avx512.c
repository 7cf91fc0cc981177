/* AVX-512 inner kernel (F/BW/VL/DQ; BF16 only for bf16 output, behind a
 * runtime check). Built with AVX-512 flags; run only where cpuid says so.
 *
 * Per span, tokens go in groups of >= 64 (whole blocks). For each group:
 *  QK  tiles of TT tokens x HT heads (TT*HT <= 16 accumulators), q from L1,
 *      K converted once per tile; the 16 accumulators are summed by one
 *      transpose-reduce into one vector of 16 scores.
 *  softmax  per head: max, rescale of the running sums if it grew, a
 *      polynomial exp over the row of scores.
 *  PV  per 16-wide slice of head_dim, all heads' accumulators in registers,
 *      V converted once per (token, slice), p broadcast from memory.
 * The next group's K and V are prefetched, a share after each head's QK or
 * PV, since blocks are scattered and the hardware prefetcher cannot guess
 * the next one; without it the kernel ran at about half the speed. */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "cpu_attn/cpu_attn_impl.h"
#include "cpu_attn/dtype_convert.h"
#include "cpu_attn/simd_avx512.h"

#define INL static inline __attribute__((always_inline))
/* Software prefetch hint: T1 (L2) measured ~1.5x faster from DRAM than T0
 * here (Zen 4): T0 fills hold L1 miss buffers the demand loads need. */
#define PF_HINT _MM_HINT_T1

/* ---------------------------------------------------------------- QK */

/* n consecutive rows of one block panel, HT heads. */
INL void qk_rows(const float *q, int D, const uint8_t *k, size_t rowb, int n, float *s, int dt,
                 int HT) {
    int j = 0;
    if (HT == 1) {
        for (; j + 16 <= n; j += 16) avx512_qk_tile(q, D, k + (size_t)j * rowb, rowb, s + j, CPU_ATTN_SROW, (apex_dtype)dt, 16, 1);
        for (; j + 8 <= n; j += 8) avx512_qk_tile(q, D, k + (size_t)j * rowb, rowb, s + j, CPU_ATTN_SROW, (apex_dtype)dt, 8, 1);
    } else {
        const int TT = 16 / HT;
        for (; j + TT <= n; j += TT) avx512_qk_tile(q, D, k + (size_t)j * rowb, rowb, s + j, CPU_ATTN_SROW, (apex_dtype)dt, TT, HT);
    }
    for (; j < n; j++) avx512_qk_tile(q, D, k + (size_t)j * rowb, rowb, s + j, CPU_ATTN_SROW, (apex_dtype)dt, 1, HT);
}

#define QK_CASE(DT, HT) \
    case (DT) * 16 + (HT): qk_rows(qh, D, k, rowb, n, sh, DT, HT); break;
#define QK_CASES(DT) \
    QK_CASE(DT, 1) QK_CASE(DT, 2) QK_CASE(DT, 3) QK_CASE(DT, 4) \
    QK_CASE(DT, 5) QK_CASE(DT, 6) QK_CASE(DT, 7) QK_CASE(DT, 8)

static void qk_block(const float *q, int D, const uint8_t *k, size_t rowb, int n, float *s,
                     int dt, int G) {
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
    }
}

/* ---------------------------------------------------------------- PV */

/* One piece of a group: n rows of one block's V panel, their probabilities
 * at column so of the score rows. */
typedef struct {
    const uint8_t *v;
    int n, so;
} pv_piece;

/* acc[h][c..c+16) += sum_t p[h][t] v[t][c..c+16) for HP heads, all pieces.
 * NS independent token sets keep >= 8 FMA chains in flight. */
INL void pv_slice(const pv_piece *pc, int npc, size_t rowb, const float *s, float *acc, int D,
                  int c, int dt, int HP) {
    const int NS = HP >= 8 ? 1 : HP >= 4 ? 2 : HP >= 2 ? 4 : 8;
    const size_t esz = dt == APEX_DTYPE_F32 ? 4 : 2;
    __m512 a[16];
#pragma GCC unroll 16
    for (int i = 0; i < NS * HP; i++) a[i] = _mm512_setzero_ps();
    for (int x = 0; x < npc; x++) {
        const uint8_t *v = pc[x].v + (size_t)c * esz;
        const float *p = s + pc[x].so;
        const int n = pc[x].n;
        int t = 0;
        for (; t + NS <= n; t += NS) {
#pragma GCC unroll 8
            for (int u = 0; u < NS; u++) {
                const __m512 vv = avx512_ld16(v + (size_t)(t + u) * rowb, dt);
#pragma GCC unroll 16
                for (int h = 0; h < HP; h++)
                    a[u * HP + h] = _mm512_fmadd_ps(
                        _mm512_set1_ps(p[(size_t)h * CPU_ATTN_SROW + t + u]), vv, a[u * HP + h]);
            }
        }
        for (; t < n; t++) {
            const __m512 vv = avx512_ld16(v + (size_t)t * rowb, dt);
#pragma GCC unroll 16
            for (int h = 0; h < HP; h++)
                a[h] = _mm512_fmadd_ps(_mm512_set1_ps(p[(size_t)h * CPU_ATTN_SROW + t]), vv, a[h]);
        }
    }
#pragma GCC unroll 16
    for (int h = 0; h < HP; h++) {
        __m512 sum = a[h];
#pragma GCC unroll 8
        for (int u = 1; u < NS; u++) sum = _mm512_add_ps(sum, a[u * HP + h]);
        float *o = acc + (size_t)h * D + c;
        _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), sum));
    }
}

INL void pv_heads(const pv_piece *pc, int npc, size_t rowb, const float *s, float *acc, int D,
                  int dt, int HP) {
    for (int c = 0; c < D; c += 16) pv_slice(pc, npc, rowb, s, acc, D, c, dt, HP);
}

#define PV_CASE(DT, HP) \
    case (DT) * 32 + (HP): pv_heads(pc, npc, rowb, sh, ah, D, DT, HP); break;
#define PV_CASES(DT)                                                                     \
    PV_CASE(DT, 1) PV_CASE(DT, 2) PV_CASE(DT, 3) PV_CASE(DT, 4) PV_CASE(DT, 5)           \
    PV_CASE(DT, 6) PV_CASE(DT, 7) PV_CASE(DT, 8) PV_CASE(DT, 9) PV_CASE(DT, 10)          \
    PV_CASE(DT, 11) PV_CASE(DT, 12) PV_CASE(DT, 13) PV_CASE(DT, 14) PV_CASE(DT, 15)      \
    PV_CASE(DT, 16)

static void pv_group(const pv_piece *pc, int npc, size_t rowb, const float *s, float *acc, int D,
                     int dt, int G) {
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
    }
}

/* ---------------------------------------------------------------- span */

/* Prefetch of the next group, spread over the current one so that only a
 * few misses are requested at a time: runs[] are the K and V runs (all of
 * the span's heads) of each block of the next group. */
typedef struct {
    const char *p[2 * CPU_ATTN_GROUP_TOKENS / 8];
    size_t len[2 * CPU_ATTN_GROUP_TOKENS / 8];
    int n, cur;
    size_t off;
} pf_cursor;

static void pf_plan(pf_cursor *pf, const cpu_attn_span *sp, int32_t t0, int32_t t1) {
    pf->n = pf->cur = 0;
    pf->off = 0;
    const size_t run = (size_t)sp->NH * sp->panel;
    for (int32_t t = t0; t < t1; t = (t / sp->bt + 1) * sp->bt) {
        const char *blk = (const char *)sp->kv + (size_t)sp->blocks[t / sp->bt] * sp->block_bytes;
        pf->p[pf->n] = blk + sp->k_off, pf->len[pf->n++] = run;
        pf->p[pf->n] = blk + sp->v_off, pf->len[pf->n++] = run;
    }
}

INL void pf_step(pf_cursor *pf, int lines) {
    while (lines > 0 && pf->cur < pf->n) {
        _mm_prefetch(pf->p[pf->cur] + pf->off, PF_HINT);
        lines--;
        if ((pf->off += 64) >= pf->len[pf->cur]) pf->cur++, pf->off = 0;
    }
}

static void span_avx512(const cpu_attn_span *sp, float *m, float *l, float *acc, float *scratch) {
    const int NH = sp->NH, G = sp->G, NQ = NH * G, D = sp->D, bt = sp->bt, dt = (int)sp->kv_dtype;
    const size_t rowb = (size_t)D * apex_dtype_size(sp->kv_dtype);
    /* Group: whole blocks, at most 256 KiB of K+V (stays in L2 between QK
     * and PV) and 64 tokens, or one block if blocks are bigger. */
    const size_t tok_bytes = 2 * (size_t)NH * rowb;
    int32_t nblk = (int32_t)(262144 / ((size_t)bt * tok_bytes));
    if (nblk > CPU_ATTN_GROUP_TOKENS / bt) nblk = CPU_ATTN_GROUP_TOKENS / bt;
    if (nblk < 1) nblk = 1;
    const int32_t gt = nblk * bt;
    float *sc = scratch + CPU_ATTN_SPAD; /* row h at sc + h*SROW, pad either side */
    for (int h = 0; h < NQ; h++) m[h] = -INFINITY, l[h] = 0.0f;
    memset(acc, 0, (size_t)NQ * (size_t)D * sizeof(float));
    const float cap = sp->softcap;
    const __m512 capv = _mm512_set1_ps(cap), inv_capv = _mm512_set1_ps(cap > 0.0f ? 1.0f / cap : 0.0f);
    struct {
        const uint8_t *blk;
        size_t off;
        int n, so;
    } pc[CPU_ATTN_GROUP_TOKENS / 8 + 1];
    pf_cursor pf;

    {
        const int32_t ge0 = (sp->t0 / gt + 1) * gt;
        pf_plan(&pf, sp, sp->t0, ge0 < sp->t1 ? ge0 : sp->t1);
        pf_step(&pf, 1 << 30);
    }
    for (int32_t gs = sp->t0; gs < sp->t1;) {
        const int32_t gend = (gs / gt + 1) * gt, ge = gend < sp->t1 ? gend : sp->t1;
        const int n = ge - gs;
        int npc = 0;
        for (int32_t t = gs; t < ge;) {
            const int32_t be = (t / bt + 1) * bt, e = be < ge ? be : ge;
            pc[npc].blk = sp->kv + (size_t)sp->blocks[t / bt] * sp->block_bytes;
            pc[npc].off = (size_t)(t % bt) * rowb;
            pc[npc].n = e - t;
            pc[npc++].so = t - gs;
            t = e;
        }
        /* Next group's lines, issued a share per head and piece below. */
        if (ge < sp->t1) pf_plan(&pf, sp, ge, gend + gt < sp->t1 ? gend + gt : sp->t1);
        else pf.n = 0;
        int pf_share = 0;
        for (int x = 0; x < pf.n; x++) pf_share += (int)(pf.len[x] / 64);
        pf_share = (pf_share + 2 * npc * NH - 1) / (2 * npc * NH);

        for (int x = 0; x < npc; x++)
            for (int hh = 0; hh < NH; hh++) {
                qk_block(sp->q + (size_t)hh * G * D, D,
                         pc[x].blk + sp->k_off + (size_t)hh * sp->panel + pc[x].off, rowb, pc[x].n,
                         sc + (size_t)hh * G * CPU_ATTN_SROW + pc[x].so, dt, G);
                pf_step(&pf, pf_share);
            }

        const __mmask16 tail = (__mmask16)((1u << (n & 15)) - 1);
        for (int h = 0; h < NQ; h++) {
            float *row = sc + (size_t)h * CPU_ATTN_SROW;
            __m512 vmax = _mm512_set1_ps(-INFINITY);
            int j = 0;
            for (; j < n; j += 16) {
                const __mmask16 k = j + 16 <= n ? (__mmask16)0xffff : tail;
                __m512 x = _mm512_maskz_loadu_ps(k, row + j);
                if (cap > 0.0f) {
                    x = _mm512_mul_ps(capv, avx512_tanh16(_mm512_mul_ps(x, inv_capv)));
                    _mm512_mask_storeu_ps(row + j, k, x);
                }
                vmax = _mm512_mask_max_ps(vmax, k, vmax, x);
            }
            const float mx = _mm512_reduce_max_ps(vmax);
            if (mx > m[h]) {
                /* The running max grew: rescale what was summed so far. */
                const float alpha = m[h] == -INFINITY ? 0.0f : expf(m[h] - mx);
                l[h] *= alpha;
                const __m512 av = _mm512_set1_ps(alpha);
                float *ah = acc + (size_t)h * D;
                for (int d = 0; d < D; d += 16)
                    _mm512_storeu_ps(ah + d, _mm512_mul_ps(av, _mm512_loadu_ps(ah + d)));
                m[h] = mx;
            }
            const __m512 mv = _mm512_set1_ps(m[h]);
            __m512 vsum = _mm512_setzero_ps();
            for (j = 0; j < n; j += 16) {
                const __mmask16 k = j + 16 <= n ? (__mmask16)0xffff : tail;
                const __m512 p = avx512_exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, row + j), mv));
                _mm512_mask_storeu_ps(row + j, k, p);
                vsum = _mm512_mask_add_ps(vsum, k, vsum, p);
            }
            l[h] += _mm512_reduce_add_ps(vsum);
        }

        for (int x = 0; x < npc; x++)
            for (int hh = 0; hh < NH; hh++) {
                const pv_piece one = {pc[x].blk + sp->v_off + (size_t)hh * sp->panel + pc[x].off,
                                      pc[x].n, pc[x].so};
                pv_group(&one, 1, rowb, sc + (size_t)hh * G * CPU_ATTN_SROW,
                         acc + (size_t)hh * G * D, D, dt, G);
                pf_step(&pf, pf_share);
            }
        pf_step(&pf, 1 << 30);
        gs = ge;
    }
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

static void store_avx512(void *out, apex_dtype dt, const float *src, float mul, int32_t n) {
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

const cpu_attn_kernel cpu_attn_kernel_avx512 = {span_avx512, store_avx512};
