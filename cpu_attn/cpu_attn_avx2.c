/* AVX2+FMA+F16C inner kernel: the structure of the AVX-512 one (see
 * cpu_attn_avx512.c) with 8-wide vectors: QK tiles of TT tokens x HT heads
 * (TT*HT <= 8) summed by one transpose-reduce, online softmax per group of
 * tokens, PV per 8-wide slice of head_dim with the heads' accumulators in
 * registers, next group prefetched. Built with AVX2 flags; run only where
 * cpuid says so. */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "cpu_attn/cpu_attn_impl.h"
#include "cpu_attn/dtype_convert.h"
#include "cpu_attn/simd_avx2.h"

#define INL static inline __attribute__((always_inline))
/* Software prefetch hint: T1 (L2) measured ~1.5x faster from DRAM than T0
 * here (Zen 4): T0 fills hold L1 miss buffers the demand loads need. */
#define PF_HINT _MM_HINT_T1

/* Lane j = sum of the lanes of x[j], x[n..7] counting as 0. The network
 * puts input P[j] in lane j (P is its own inverse). */
INL __m256 hsum8(const __m256 *x, int n) {
    static const int P[8] = {0, 2, 1, 3, 4, 6, 5, 7};
    __m256 y[8], a[4], b[2];
#pragma GCC unroll 8
    for (int k = 0; k < 8; k++) y[k] = P[k] < n ? x[P[k]] : _mm256_setzero_ps();
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++)
        a[i] = _mm256_add_ps(_mm256_permute2f128_ps(y[i], y[i + 4], 0x20),
                             _mm256_permute2f128_ps(y[i], y[i + 4], 0x31));
#pragma GCC unroll 2
    for (int i = 0; i < 2; i++)
        b[i] = _mm256_add_ps(_mm256_shuffle_ps(a[i], a[i + 2], 0x44),
                             _mm256_shuffle_ps(a[i], a[i + 2], 0xEE));
    return _mm256_add_ps(_mm256_shuffle_ps(b[0], b[1], 0x88), _mm256_shuffle_ps(b[0], b[1], 0xDD));
}

INL float hsum8v(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INL float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* e^x as in exp16 (Cephes polynomial), with 2^n built in the exponent
 * field: x is clamped to [-87.3, 88.3] so n stays a normal exponent. */
INL __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    x = _mm256_min_ps(x, _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

INL __m256 tanh8(__m256 y) {
    const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
    const __m256 e = exp8(_mm256_mul_ps(_mm256_andnot_ps(sign, y), _mm256_set1_ps(-2.0f)));
    const __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
    return _mm256_or_ps(t, _mm256_and_ps(sign, y));
}

/* ---------------------------------------------------------------- QK */

INL void qk_tile(const float *q, int D, const uint8_t *k, size_t rowb, float *s, int dt,
                 int TT, int HT) {
    __m256 a[8];
    avx2_qk_dots(a, q, D, k, rowb, (apex_dtype)dt, TT, HT);
    const __m256 r = hsum8(a, TT * HT);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
#pragma GCC unroll 4
    for (int h = 0; h < HT; h++) {
        const __m256i msk = _mm256_and_si256(_mm256_cmpgt_epi32(lane, _mm256_set1_epi32(h * TT - 1)),
                                             _mm256_cmpgt_epi32(_mm256_set1_epi32(h * TT + TT), lane));
        _mm256_maskstore_ps(s + (ptrdiff_t)h * CPU_ATTN_SROW - h * TT, msk, r);
    }
}

INL void qk_rows(const float *q, int D, const uint8_t *k, size_t rowb, int n, float *s, int dt,
                 int HT) {
    const int TT = 8 / HT;
    int j = 0;
    for (; j + TT <= n; j += TT) qk_tile(q, D, k + (size_t)j * rowb, rowb, s + j, dt, TT, HT);
    for (; j < n; j++) qk_tile(q, D, k + (size_t)j * rowb, rowb, s + j, dt, 1, HT);
}

#define QK_CASE(DT, HT) \
    case (DT) * 16 + (HT): qk_rows(qh, D, k, rowb, n, sh, DT, HT); break;
#define QK_CASES(DT) QK_CASE(DT, 1) QK_CASE(DT, 2) QK_CASE(DT, 3) QK_CASE(DT, 4)

static void qk_block(const float *q, int D, const uint8_t *k, size_t rowb, int n, float *s,
                     int dt, int G) {
    for (int h0 = 0; h0 < G; h0 += 4) {
        const int HT = G - h0 < 4 ? G - h0 : 4;
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

typedef struct {
    const uint8_t *v;
    int n, so;
} pv_piece;

INL void pv_slice(const pv_piece *pc, int npc, size_t rowb, const float *s, float *acc, int D,
                  int c, int dt, int HP) {
    const int NS = HP >= 5 ? 1 : HP >= 3 ? 2 : HP == 2 ? 4 : 8;
    const size_t esz = apex_dtype_size((apex_dtype)dt);
    __m256 a[12];
#pragma GCC unroll 12
    for (int i = 0; i < NS * HP; i++) a[i] = _mm256_setzero_ps();
    for (int x = 0; x < npc; x++) {
        const uint8_t *v = pc[x].v + (size_t)c * esz;
        const float *p = s + pc[x].so;
        const int n = pc[x].n;
        int t = 0;
        for (; t + NS <= n; t += NS) {
#pragma GCC unroll 8
            for (int u = 0; u < NS; u++) {
                const __m256 vv = avx2_ld8(v + (size_t)(t + u) * rowb, dt);
#pragma GCC unroll 8
                for (int h = 0; h < HP; h++)
                    a[u * HP + h] = _mm256_fmadd_ps(
                        _mm256_broadcast_ss(p + (size_t)h * CPU_ATTN_SROW + t + u), vv, a[u * HP + h]);
            }
        }
        for (; t < n; t++) {
            const __m256 vv = avx2_ld8(v + (size_t)t * rowb, dt);
#pragma GCC unroll 8
            for (int h = 0; h < HP; h++)
                a[h] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + (size_t)h * CPU_ATTN_SROW + t), vv, a[h]);
        }
    }
#pragma GCC unroll 8
    for (int h = 0; h < HP; h++) {
        __m256 sum = a[h];
#pragma GCC unroll 8
        for (int u = 1; u < NS; u++) sum = _mm256_add_ps(sum, a[u * HP + h]);
        float *o = acc + (size_t)h * D + c;
        _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), sum));
    }
}

INL void pv_heads(const pv_piece *pc, int npc, size_t rowb, const float *s, float *acc, int D,
                  int dt, int HP) {
    for (int c = 0; c < D; c += 8) pv_slice(pc, npc, rowb, s, acc, D, c, dt, HP);
}

#define PV_CASE(DT, HP) \
    case (DT) * 16 + (HP): pv_heads(pc, npc, rowb, sh, ah, D, DT, HP); break;
#define PV_CASES(DT)                                                             \
    PV_CASE(DT, 1) PV_CASE(DT, 2) PV_CASE(DT, 3) PV_CASE(DT, 4) PV_CASE(DT, 5)   \
    PV_CASE(DT, 6) PV_CASE(DT, 7) PV_CASE(DT, 8)

static void pv_group(const pv_piece *pc, int npc, size_t rowb, const float *s, float *acc, int D,
                     int dt, int G) {
    for (int h0 = 0; h0 < G; h0 += 8) {
        const int HP = G - h0 < 8 ? G - h0 : 8;
        const float *sh = s + (size_t)h0 * CPU_ATTN_SROW;
        float *ah = acc + (size_t)h0 * D;
        switch (dt * 16 + HP) {
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

static void span_avx2(const cpu_attn_span *sp, float *m, float *l, float *acc, float *scratch) {
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
    const __m256 capv = _mm256_set1_ps(cap), inv_capv = _mm256_set1_ps(cap > 0.0f ? 1.0f / cap : 0.0f);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
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

        for (int h = 0; h < NQ; h++) {
            float *row = sc + (size_t)h * CPU_ATTN_SROW;
            /* Whole vectors; lanes past n (inside the row's padding) are
             * masked to -inf for the max and to 0 for the sum. */
            __m256 vmax = ninf;
            for (int j = 0; j < n; j += 8) {
                const __m256 k = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n - j), lane));
                __m256 x = _mm256_loadu_ps(row + j);
                if (cap > 0.0f) {
                    x = _mm256_mul_ps(capv, tanh8(_mm256_mul_ps(x, inv_capv)));
                    _mm256_storeu_ps(row + j, x);
                }
                vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(ninf, x, k));
            }
            const float mx = hmax8(vmax);
            if (mx > m[h]) {
                /* The running max grew: rescale what was summed so far. */
                const float alpha = m[h] == -INFINITY ? 0.0f : expf(m[h] - mx);
                l[h] *= alpha;
                const __m256 av = _mm256_set1_ps(alpha);
                float *ah = acc + (size_t)h * D;
                for (int d = 0; d < D; d += 8)
                    _mm256_storeu_ps(ah + d, _mm256_mul_ps(av, _mm256_loadu_ps(ah + d)));
                m[h] = mx;
            }
            const __m256 mv = _mm256_set1_ps(m[h]);
            __m256 vsum = _mm256_setzero_ps();
            for (int j = 0; j < n; j += 8) {
                const __m256 k = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n - j), lane));
                const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), mv));
                _mm256_storeu_ps(row + j, p);
                vsum = _mm256_add_ps(vsum, _mm256_and_ps(p, k));
            }
            l[h] += hsum8v(vsum);
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

static void store_avx2(void *out, apex_dtype dt, const float *src, float mul, int32_t n) {
    const __m256 mv = _mm256_set1_ps(mul);
    int32_t i = 0;
    if (dt == APEX_DTYPE_F32) {
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps((float *)out + i, _mm256_mul_ps(_mm256_loadu_ps(src + i), mv));
    } else if (dt == APEX_DTYPE_F16) {
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)((uint16_t *)out + i),
                             _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(src + i), mv),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    for (; i < n; i++) apex_store_f32(out, dt, (size_t)i, src[i] * mul);
}

const cpu_attn_kernel cpu_attn_kernel_avx2 = {span_avx2, store_avx2, NULL, 0, NULL};
