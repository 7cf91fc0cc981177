/* cpu_attn_strided: attention over a token-major strided KV cache (the
 * layout of ggml's FLASH_ATTN_EXT operands); see cpu_attn_strided.h.
 *
 * Work is split into units (stream, tile of query tokens, KV heads); a unit
 * holds every query head of its KV heads for every token of its tile, so each
 * K/V row is read and converted once for all of them (ggml-cpu re-reads it per
 * query head and per token). A unit streams only the rows its mask leaves
 * visible, and is cut into KV chunks when there are too few units for the
 * threads; chunk partials (max, sum, acc) are merged by log-sum-exp.
 *
 * fp32 mode (AVX-512): per group of rows, scores in tiles of rows x query
 * heads reduced by one transpose (hsum16), online softmax per query with a
 * vector exp, P.V with up to 16 queries' accumulators in registers, the next
 * group prefetched. A unit takes adjacent KV heads (up to whole cache rows)
 * so that it reads memory in long runs.
 * Exact mode keeps ggml's per-row order and f16 accumulator (that order is
 * its rounding) and optimises around it; see item_compat512. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define HAVE_X86 1
#else
#define HAVE_X86 0
#endif

#include "cpu_attn/cpu_attn_strided.h"
#include "cpu_attn/dtype_convert.h"

#define BR 16              /* KV rows per block (one AVX-512 vector of scores) */
#define GROUP 64           /* fp32 mode: rows scored per softmax update        */
#define SPAD 16            /* padding either side of a row of scores           */
#define SROW (GROUP + 2 * SPAD)
#define TILE_T 8           /* query tokens per unit                             */
#define MIN_CHUNK 256      /* fewer rows per chunk cost more to merge than gained */
#define ITEMS_PER_THREAD 4 /* items aimed for per thread, for dynamic balance   */
#define MAX_D 512
#define MAX_Q_UNIT 64      /* queries (heads x tokens) of one multi-head unit  */
#define GROUP_BYTES 262144 /* K+V bytes of a group: stays in L2 until P.V      */
#define F16_NEG_INF 0xfc00u

typedef struct unit {
    int32_t s, t0, tt, kvh; /* stream, first token, tokens, first KV head */
    int32_t nh;             /* KV heads (adjacent in each row; > 1 only
                             * on the fp32 SIMD path)                  */
    int32_t lo, hi;         /* visible row range of the tile         */
    int32_t nsplit, first;  /* chunks, index of the first item       */
} unit;

typedef struct item {
    int32_t u, r0, r1;
    int32_t part; /* slot in the partials, -1 = write the output directly */
} item;

int cpu_attn_strided_check(const cpu_attn_strided_desc *d) {
    if (!d || !d->q || !d->k || !d->v || !d->out) return -1;
    if (d->head_dim <= 0 || d->head_dim > MAX_D || d->n_q_heads <= 0 || d->n_kv_heads <= 0 ||
        d->n_tokens <= 0 || d->n_streams <= 0 || d->n_kv < 0)
        return -1;
    if (d->n_q_heads % d->n_kv_heads != 0) return -1;
    if (d->kv_dtype != APEX_DTYPE_F16 && d->kv_dtype != APEX_DTYPE_F32) return -1;
    if (!(d->scale != 0.0f) || !isfinite(d->scale) || !(d->softcap >= 0.0f) || !isfinite(d->softcap))
        return -1;
    if (d->ggml_compat && !cpu_attn_strided_compat_ok(d->head_dim, d->kv_dtype)) return -1;
    return 0;
}

static inline const char *kv_row(const void *base, size_t nb_stream, size_t nb_head, size_t nb_row,
                                 int32_t s, int32_t h, int32_t r) {
    return (const char *)base + (size_t)s * nb_stream + (size_t)h * nb_head + (size_t)r * nb_row;
}

static inline float mask_at(const cpu_attn_strided_desc *d, int32_t s, int32_t t, int32_t j) {
    if (!d->mask) return 0.0f;
    const uint16_t *row = (const uint16_t *)((const char *)d->mask + (size_t)s * d->mask_nb_stream +
                                             (size_t)t * d->mask_nb_tok);
    return apex_f16_to_f32(row[j]);
}

static inline float *out_row(const cpu_attn_strided_desc *d, int32_t s, int32_t t, int32_t h) {
    return (float *)((char *)d->out + (size_t)s * d->out_nb_stream + (size_t)t * d->out_nb_tok +
                     (size_t)h * d->out_nb_head);
}

static inline const float *q_row(const cpu_attn_strided_desc *d, int32_t s, int32_t t, int32_t h) {
    return (const float *)((const char *)d->q + (size_t)s * d->q_nb_stream + (size_t)t * d->q_nb_tok +
                           (size_t)h * d->q_nb_head);
}

/* q as the dot product sees it: rounded to f16 when K is f16 (as ggml-cpu
 * converts q to K's vec-dot type). */
static void load_q(const cpu_attn_strided_desc *d, const float *src, float *dst) {
    for (int32_t i = 0; i < d->head_dim; i++)
        dst[i] = d->kv_dtype == APEX_DTYPE_F16 ? apex_f16_to_f32(apex_f32_to_f16(src[i])) : src[i];
}

static void load_row(const cpu_attn_strided_desc *d, const char *src, float *dst) {
    if (d->kv_dtype == APEX_DTYPE_F16) {
        const uint16_t *h = (const uint16_t *)src;
        for (int32_t i = 0; i < d->head_dim; i++) dst[i] = apex_f16_to_f32(h[i]);
    } else {
        memcpy(dst, src, (size_t)d->head_dim * sizeof(float));
    }
}

static inline float finish_score(const cpu_attn_strided_desc *d, float dot) {
    if (d->softcap != 0.0f) return d->softcap * tanhf(dot * (d->scale / d->softcap));
    return dot * d->scale;
}

int cpu_attn_strided_reference(const cpu_attn_strided_desc *d) {
    if (cpu_attn_strided_check(d) != 0) return -1;
    const int32_t D = d->head_dim, G = d->n_q_heads / d->n_kv_heads;
    float q[MAX_D], kf[MAX_D], vf[MAX_D], acc[MAX_D];
    for (int32_t s = 0; s < d->n_streams; s++)
        for (int32_t t = 0; t < d->n_tokens; t++)
            for (int32_t h = 0; h < d->n_q_heads; h++) {
                const int32_t kvh = h / G;
                load_q(d, q_row(d, s, t, h), q);
                float m = -INFINITY, l = 0.0f;
                memset(acc, 0, (size_t)D * sizeof(float));
                for (int32_t j = 0; j < d->n_kv; j++) {
                    const float mv = mask_at(d, s, t, j);
                    if (mv == -INFINITY) continue;
                    load_row(d, kv_row(d->k, d->k_nb_stream, d->k_nb_head, d->k_nb_row, s, kvh, j), kf);
                    load_row(d, kv_row(d->v, d->v_nb_stream, d->v_nb_head, d->v_nb_row, s, kvh, j), vf);
                    float dot = 0.0f;
                    for (int32_t i = 0; i < D; i++) dot += q[i] * kf[i];
                    const float sc = finish_score(d, dot) + mv;
                    float p = 1.0f;
                    if (sc > m) {
                        const float alpha = m == -INFINITY ? 0.0f : expf(m - sc);
                        for (int32_t i = 0; i < D; i++) acc[i] *= alpha;
                        l *= alpha;
                        m = sc;
                    } else {
                        p = expf(sc - m);
                    }
                    l += p;
                    for (int32_t i = 0; i < D; i++) acc[i] += p * vf[i];
                }
                float *o = out_row(d, s, t, h);
                const float inv = l == 0.0f ? 0.0f : 1.0f / l;
                for (int32_t i = 0; i < D; i++) o[i] = acc[i] * inv;
            }
    return 0;
}

/* ------------------------------------------------------------- one item */

/* Scratch floats one thread needs for an item. */
static size_t scratch_floats(int32_t D, int32_t nq) {
    return (size_t)nq * D              /* q                          */
           + (size_t)nq * SROW         /* scores (fp32 mode)         */
           + (size_t)TILE_T * GROUP    /* mask                       */
           + 2 * (size_t)BR * D        /* K, V block (scalar, exact) */
           + 2 * (size_t)BR + 16;
}

/* Loads the mask of block [r, r+nr) for the tile into mv[t][BR]; returns
 * whether any entry is visible. */
static int load_mask_block(const cpu_attn_strided_desc *d, const unit *u, int32_t r, int32_t nr,
                           float *mv) {
    int any = 0;
    for (int32_t t = 0; t < u->tt; t++) {
        float *row = mv + (size_t)t * BR;
        if (!d->mask) {
            for (int32_t rr = 0; rr < nr; rr++) row[rr] = 0.0f;
            any = 1;
        } else {
            const uint16_t *m = (const uint16_t *)((const char *)d->mask +
                                                   (size_t)u->s * d->mask_nb_stream +
                                                   (size_t)(u->t0 + t) * d->mask_nb_tok) + r;
            for (int32_t rr = 0; rr < nr; rr++) {
                row[rr] = m[rr] == F16_NEG_INF ? -INFINITY : apex_f16_to_f32(m[rr]);
                any |= m[rr] != F16_NEG_INF;
            }
        }
        for (int32_t rr = nr; rr < BR; rr++) row[rr] = -INFINITY;
    }
    return any;
}

/* Runs rows [r0, r1) of unit u: m[nq], l[nq], acc[nq][D] unnormalised.
 * Query qi = g * tt + t is head kvh * G + g at token t0 + t. */
static void item_scalar(const cpu_attn_strided_desc *d, const unit *u, int32_t r0, int32_t r1,
                        float *scr, float *m, float *l, float *acc) {
    const int32_t D = d->head_dim, G = d->n_q_heads / d->n_kv_heads, tt = u->tt, nq = G * tt;
    float *qb = scr, *kb = qb + (size_t)nq * D, *vb = kb + (size_t)BR * D, *mv = vb + (size_t)BR * D;
    float *sc = mv + (size_t)TILE_T * BR;
    for (int32_t g = 0; g < G; g++)
        for (int32_t t = 0; t < tt; t++)
            load_q(d, q_row(d, u->s, u->t0 + t, u->kvh * G + g), qb + (size_t)(g * tt + t) * D);
    for (int32_t qi = 0; qi < nq; qi++) m[qi] = -INFINITY, l[qi] = 0.0f;
    memset(acc, 0, (size_t)nq * D * sizeof(float));
    for (int32_t r = r0; r < r1; r += BR) {
        const int32_t nr = r1 - r < BR ? r1 - r : BR;
        if (!load_mask_block(d, u, r, nr, mv)) continue;
        for (int32_t rr = 0; rr < nr; rr++) {
            load_row(d, kv_row(d->k, d->k_nb_stream, d->k_nb_head, d->k_nb_row, u->s, u->kvh, r + rr),
                     kb + (size_t)rr * D);
            load_row(d, kv_row(d->v, d->v_nb_stream, d->v_nb_head, d->v_nb_row, u->s, u->kvh, r + rr),
                     vb + (size_t)rr * D);
        }
        for (int32_t qi = 0; qi < nq; qi++) {
            const float *q = qb + (size_t)qi * D, *mrow = mv + (size_t)(qi % tt) * BR;
            float bmax = -INFINITY;
            for (int32_t rr = 0; rr < nr; rr++) {
                if (mrow[rr] == -INFINITY) {
                    sc[rr] = -INFINITY;
                    continue;
                }
                float dot = 0.0f;
                for (int32_t i = 0; i < D; i++) dot += q[i] * kb[(size_t)rr * D + i];
                sc[rr] = finish_score(d, dot) + mrow[rr];
                if (sc[rr] > bmax) bmax = sc[rr];
            }
            if (bmax == -INFINITY) continue;
            const float mnew = bmax > m[qi] ? bmax : m[qi];
            const float alpha = m[qi] == -INFINITY ? 0.0f : expf(m[qi] - mnew);
            float *a = acc + (size_t)qi * D, ls = 0.0f;
            for (int32_t i = 0; i < D; i++) a[i] *= alpha;
            for (int32_t rr = 0; rr < nr; rr++) {
                if (sc[rr] == -INFINITY) continue;
                const float p = expf(sc[rr] - mnew);
                ls += p;
                for (int32_t i = 0; i < D; i++) a[i] += p * vb[(size_t)rr * D + i];
            }
            l[qi] = l[qi] * alpha + ls;
            m[qi] = mnew;
        }
    }
}

#if HAVE_X86
#define T512 __attribute__((target("avx512f,avx2,fma,f16c")))
#include "cpu_attn/simd_avx512.h"
/* The strided kernel knows f16 and f32 KV: a flag picks the type. */
#define F16_DT(f16) ((f16) ? APEX_DTYPE_F16 : APEX_DTYPE_F32)
/* S = S*ms + vs as ggml-cpu's compiled code evaluates it. */
#ifndef COMPAT_SUM
#define COMPAT_SUM(S, ms, vs) fmaf((S), (ms), (vs))
#endif

T512 static inline void load_row16(const cpu_attn_strided_desc *d, const char *src, float *dst) {
    const int32_t nv = d->head_dim / 16;
    if (d->kv_dtype == APEX_DTYPE_F16) {
        for (int32_t v = 0; v < nv; v++)
            _mm512_storeu_ps(dst + 16 * v,
                             _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + 32 * v))));
    } else {
        memcpy(dst, src, (size_t)d->head_dim * sizeof(float));
    }
}

#define INL static inline __attribute__((always_inline))

/* Software prefetch over the rows [row, end) of one KV head: the rows are a
 * stride apart (other heads' rows between), which the hardware prefetcher
 * does not follow across pages, so the next group is fetched in shares
 * while the current one computes. T1 (to L2) leaves the L1 fill buffers to
 * the demand loads. */
typedef struct pf_cursor {
    const char *base;
    size_t stride;
    int32_t row, end, line, lines;
} pf_cursor;

static void pf_init(pf_cursor *c, const char *base, size_t stride, size_t row_bytes, int32_t r0, int32_t r1) {
    c->base = base, c->stride = stride, c->row = r0, c->end = r1, c->line = 0;
    /* One more line when rows do not start on a line. */
    c->lines = (int32_t)((row_bytes + 63) / 64) + ((((uintptr_t)base | stride) & 63) != 0);
    c->base = (const char *)((uintptr_t)base & ~(uintptr_t)63);
}

/* A row's lines in one tight loop: a cursor step per line cost about as
 * much as the prefetches saved. */
T512 INL void pf_step(pf_cursor *c, int32_t n) {
    while (n > 0 && c->row < c->end) {
        const char *p = c->base + (size_t)c->row * c->stride + (size_t)c->line * 64;
        const int32_t take = c->lines - c->line < n ? c->lines - c->line : n;
        for (int32_t i = 0; i < take; i++) _mm_prefetch(p + (size_t)i * 64, _MM_HINT_T1);
        n -= take;
        if ((c->line += take) == c->lines) c->line = 0, c->row++;
    }
}

/* --- fp32 mode: tiles of rows x query heads, one transpose-reduce each */

T512 INL void qk_rows(const float *q, int D, const char *k, size_t kr, int n, float *s, int f16, int HT,
                      pf_cursor *pf, int32_t share) {
    int j = 0;
    /* One query: 8 rows a tile, not 16: rows a power-of-two stride apart
     * share L1 sets, and 16 of them overflow the 8 ways between chunks. */
    const int TT = HT == 1 ? 8 : 16 / HT;
    for (; j + TT <= n; j += TT) {
        avx512_qk_tile(q, D, k + (size_t)j * kr, kr, s + j, SROW, F16_DT(f16), TT, HT);
        pf_step(pf, share);
    }
    if (HT == 1)
        for (; j + 4 <= n; j += 4) avx512_qk_tile(q, D, k + (size_t)j * kr, kr, s + j, SROW, F16_DT(f16), 4, 1);
    for (; j < n; j++) avx512_qk_tile(q, D, k + (size_t)j * kr, kr, s + j, SROW, F16_DT(f16), 1, HT);
}

#define QK_CASE(F, HT) \
    case (F) * 8 + (HT): qk_rows(q, D, k, kr, n, s, F, HT, pf, share); break;
#define QK_CASES(F) \
    QK_CASE(F, 1) QK_CASE(F, 2) QK_CASE(F, 3) QK_CASE(F, 4) QK_CASE(F, 5) QK_CASE(F, 6) QK_CASE(F, 7) QK_CASE(F, 8)

T512 static void qk_group(const float *q, int D, const char *k, size_t kr, int n, float *s, int f16, int HT,
                          pf_cursor *pf, int32_t share) {
    switch (f16 * 8 + HT) {
        QK_CASES(0)
        QK_CASES(1)
    default: break;
    }
}

/* acc[h][c, c+16) += sum_t p[h][t] v[t][c, c+16) for HP queries. */
T512 INL void pv_slice(const char *v, size_t vr, int n, const float *p, float *acc, int D, int c, int f16,
                       int HP) {
    const int NS = avx512_pv_sets(HP);
    __m512 a[16];
#pragma GCC unroll 16
    for (int i = 0; i < NS * HP; i++) a[i] = _mm512_setzero_ps();
    avx512_pv_run(a, (const uint8_t *)v + (size_t)c * (f16 ? 2 : 4), vr, n, p, SROW, F16_DT(f16), HP, NS);
    avx512_pv_add(a, acc + c, D, HP, NS);
}

T512 INL void pv_rows(const char *v, size_t vr, int n, const float *p, float *acc, int D, int f16, int HP,
                      pf_cursor *pf, int32_t share) {
    for (int c = 0; c < D; c += 16) {
        pv_slice(v, vr, n, p, acc, D, c, f16, HP);
        pf_step(pf, share);
    }
}

#define PV_CASE(F, HP) \
    case (F) * 16 + (HP) - 1: pv_rows(v, vr, n, p, acc, D, F, HP, pf, share); break;
#define PV_CASES(F)                                                                                      \
    PV_CASE(F, 1) PV_CASE(F, 2) PV_CASE(F, 3) PV_CASE(F, 4) PV_CASE(F, 5) PV_CASE(F, 6) PV_CASE(F, 7)     \
    PV_CASE(F, 8) PV_CASE(F, 9) PV_CASE(F, 10) PV_CASE(F, 11) PV_CASE(F, 12) PV_CASE(F, 13) PV_CASE(F, 14) \
    PV_CASE(F, 15) PV_CASE(F, 16)

T512 static void pv_group(const char *v, size_t vr, int n, const float *p, float *acc, int D, int f16, int HP,
                          pf_cursor *pf, int32_t share) {
    switch (f16 * 16 + HP - 1) {
        PV_CASES(0)
        PV_CASES(1)
    default: break;
    }
}

/* Mask rows of the tile for rows [r, r+n) into mv[t][GROUP] (-inf past n);
 * returns whether any entry is visible. */
T512 static int load_mask_group(const cpu_attn_strided_desc *d, const unit *u, int32_t r, int32_t n, float *mv) {
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __mmask16 any = 0;
    for (int32_t t = 0; t < u->tt; t++) {
        float *row = mv + (size_t)t * GROUP;
        for (int32_t j = 0; j < GROUP; j += 16) _mm512_storeu_ps(row + j, ninf);
        if (!d->mask) {
            for (int32_t j = 0; j < n; j++) row[j] = 0.0f;
            any = 1;
            continue;
        }
        const uint16_t *m = (const uint16_t *)((const char *)d->mask + (size_t)u->s * d->mask_nb_stream +
                                               (size_t)(u->t0 + t) * d->mask_nb_tok) + r;
        int32_t j = 0;
        for (; j + 16 <= n; j += 16) {
            const __m512 x = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(m + j)));
            _mm512_storeu_ps(row + j, x);
            any |= _mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ);
        }
        for (; j < n; j++) {
            row[j] = m[j] == F16_NEG_INF ? -INFINITY : apex_f16_to_f32(m[j]);
            any |= m[j] != F16_NEG_INF;
        }
    }
    return any != 0;
}

/* item_scalar's contract, head_dim a multiple of 16. Per group of GROUP
 * rows: every query's scores by qk tiles (K read once per 8 queries), then
 * per query the softmax update with a vector exp, then P.V with up to 16
 * queries' accumulators in registers (V read once per 16 queries). q holds
 * the scale (or scale / softcap), so the scores need no multiply. */
T512 static void item_avx512(const cpu_attn_strided_desc *d, const unit *u, int32_t r0, int32_t r1,
                             float *scr, float *m, float *l, float *acc) {
    /* The unit's nh KV heads act as one with nh*G query heads; query qi
     * reads KV head kvh + qi / (G0 * tt). */
    const int32_t D = d->head_dim, G0 = d->n_q_heads / d->n_kv_heads, G = G0 * u->nh, tt = u->tt;
    const int32_t nq = G * tt, nqh = G0 * tt;
    const int f16 = d->kv_dtype == APEX_DTYPE_F16;
    const size_t es = f16 ? 2 : 4;
    float *qb = scr, *sc = qb + (size_t)nq * D + SPAD, *mv = qb + (size_t)nq * D + (size_t)nq * SROW;
    const float cap = d->softcap, qs = cap != 0.0f ? d->scale / cap : d->scale;
    for (int32_t g = 0; g < G; g++)
        for (int32_t t = 0; t < tt; t++) {
            float *dst = qb + (size_t)(g * tt + t) * D;
            load_q(d, q_row(d, u->s, u->t0 + t, u->kvh * G0 + g), dst);
            for (int32_t i = 0; i < D; i++) dst[i] *= qs;
        }
    for (int32_t qi = 0; qi < nq; qi++) m[qi] = -INFINITY, l[qi] = 0.0f;
    memset(acc, 0, (size_t)nq * D * sizeof(float));
    const char *kb = kv_row(d->k, d->k_nb_stream, d->k_nb_head, d->k_nb_row, u->s, u->kvh, 0);
    const char *vb = kv_row(d->v, d->v_nb_stream, d->v_nb_head, d->v_nb_row, u->s, u->kvh, 0);
    const size_t kr = d->k_nb_row, vr = d->v_nb_row;
    const __m512 capv = _mm512_set1_ps(cap), ninf = _mm512_set1_ps(-INFINITY);
    /* Rows per group: GROUP, fewer when the unit's rows are wide, so that
     * K and V stay in L2 from QK to P.V. */
    const size_t ub = (size_t)u->nh * D * es; /* bytes of the unit's heads in a row */
    int32_t gr = (int32_t)(GROUP_BYTES / (2 * ub)) / 16 * 16;
    gr = gr < 16 ? 16 : gr > GROUP ? GROUP : gr;
    /* Software prefetch, except for one query head per KV head over whole
     * rows: that streams one sequential run at the most bytes per FMA,
     * which the hardware prefetcher serves better (measured 1.4x); with
     * GQA's compute per byte, or pieces a stride apart, it is needed
     * (measured 1.2-2.3x). */
    const int swpf = kr != ub || vr != ub || G0 > 1;
    pf_cursor pk, pv;
    {
        const int32_t e = r1 - r0 < gr ? r1 : r0 + gr;
        pf_init(&pk, kb, kr, ub, r0, swpf ? e : r0);
        pf_init(&pv, vb, vr, ub, r0, swpf ? e : r0);
        pf_step(&pk, 1 << 30);
        pf_step(&pv, 1 << 30);
    }
    for (int32_t gs = r0; gs < r1; gs += gr) {
        const int32_t n = r1 - gs < gr ? r1 - gs : gr;
        /* The next group's rows, in shares over this group's tiles. */
        const int32_t ns = gs + n, ne = !swpf ? ns : r1 - ns < gr ? r1 : ns + gr;
        pf_init(&pk, kb, kr, ub, ns, ne);
        pf_init(&pv, vb, vr, ub, ns, ne);
        const int32_t nqk = u->nh * ((nqh + 7) / 8), npv = u->nh * ((nqh + 15) / 16);
        const int32_t tt0 = nqh == 1 ? 8 : 16 / (nqh < 8 ? nqh : 8);
        const int32_t ktiles = nqk * (n / tt0 > 1 ? n / tt0 : 1), vslices = npv * (D / 16);
        const int32_t kshare = (pk.lines * (ne - ns) + ktiles - 1) / ktiles;
        const int32_t vshare = (pv.lines * (ne - ns) + vslices - 1) / vslices;
        if (!load_mask_group(d, u, gs, n, mv)) continue;

        for (int32_t hh = 0; hh < u->nh; hh++)
            for (int32_t h0 = 0; h0 < nqh; h0 += 8)
                qk_group(qb + (size_t)(hh * nqh + h0) * D, D, kb + hh * d->k_nb_head + (size_t)gs * kr, kr, n,
                         sc + (size_t)(hh * nqh + h0) * SROW, f16, nqh - h0 < 8 ? nqh - h0 : 8, &pk, kshare);
        pf_step(&pk, 1 << 30);

        for (int32_t qi = 0; qi < nq; qi++) {
            float *row = sc + (size_t)qi * SROW;
            const float *mrow = mv + (size_t)(qi % tt) * GROUP;
            __m512 vmax = ninf;
            for (int32_t j = 0; j < n; j += 16) {
                /* Lanes past n hold no score (qk_group writes n), only
                 * whatever the scratch held, NaN included: read them as 0,
                 * which the mask row's -inf there then hides. */
                const __mmask16 in = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1u);
                __m512 x = _mm512_maskz_loadu_ps(in, row + j);
                if (cap != 0.0f) x = _mm512_mul_ps(capv, avx512_tanh16(x));
                x = _mm512_add_ps(x, _mm512_loadu_ps(mrow + j));
                _mm512_storeu_ps(row + j, x);
                vmax = _mm512_max_ps(vmax, x);
            }
            const float mx = _mm512_reduce_max_ps(vmax);
            if (mx == -INFINITY) {
                for (int32_t j = 0; j < n; j += 16) _mm512_storeu_ps(row + j, _mm512_setzero_ps());
                continue;
            }
            if (mx > m[qi]) {
                /* The running max grew: rescale what was summed so far. */
                const float alpha = m[qi] == -INFINITY ? 0.0f : expf(m[qi] - mx);
                l[qi] *= alpha;
                const __m512 av = _mm512_set1_ps(alpha);
                float *a = acc + (size_t)qi * D;
                for (int32_t i = 0; i < D; i += 16) _mm512_storeu_ps(a + i, _mm512_mul_ps(av, _mm512_loadu_ps(a + i)));
                m[qi] = mx;
            }
            const __m512 mvec = _mm512_set1_ps(m[qi]);
            __m512 vsum = _mm512_setzero_ps();
            for (int32_t j = 0; j < n; j += 16) {
                const __m512 x = _mm512_loadu_ps(row + j);
                const __mmask16 vis = _mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ);
                const __m512 p = _mm512_maskz_mov_ps(vis, avx512_exp16(_mm512_sub_ps(x, mvec)));
                _mm512_storeu_ps(row + j, p);
                vsum = _mm512_add_ps(vsum, p);
            }
            l[qi] += _mm512_reduce_add_ps(vsum);
        }

        for (int32_t hh = 0; hh < u->nh; hh++)
            for (int32_t h0 = 0; h0 < nqh; h0 += 16)
                pv_group(vb + hh * d->v_nb_head + (size_t)gs * vr, vr, n, sc + (size_t)(hh * nqh + h0) * SROW,
                         acc + (size_t)(hh * nqh + h0) * D, D, f16, nqh - h0 < 16 ? nqh - h0 : 16, &pv, vshare);
        pf_step(&pv, 1 << 30);
    }
}

/* --- exact mode */

/* The softmax side of ggml's row loop for one query over a block: per
 * visible row j, ms[j] (the rescale when the max grows, else 1) and vs[j]
 * (the row's weight), with M and S carried as ggml carries them. Done
 * before touching the accumulator because expf is a call, and every call
 * would spill the accumulator's registers. Returns the rows to apply, in
 * order, in idx[]. */
T512 INL int compat_weights(const float *sc, const float *mrow, int nr, float *Mp, float *Sp, float *ms, float *vs,
                            uint8_t *idx) {
    float M = *Mp, S = *Sp;
    int n = 0;
    for (int j = 0; j < nr; j++) {
        if (mrow[j] == -INFINITY) continue;
        const float s = sc[j], Mold = M;
        float a = 1.0f, b = 1.0f;
        if (s > M) {
            M = s;
            a = expf(Mold - M);
        } else {
            b = expf(s - M);
        }
        S = COMPAT_SUM(S, a, b);
        ms[n] = a, vs[n] = b, idx[n++] = (uint8_t)j;
    }
    *Mp = M, *Sp = S;
    return n;
}

/* ggml_vec_dot_f16 of q with rows [0, nr) of kb (f32, D apart): four
 * accumulators over 64-element steps, folded (0+2)+(1+3), the 16 rows'
 * final reductions done at once by hsum16 (the same tree). q stays in
 * registers when NV (= D/16) is a constant. */
T512 INL __m512 compat_dots(const float *q, const float *kb, int nr, int D, int NV) {
    __m512 qv[16], y[BR];
#pragma GCC unroll 16
    for (int i = 0; i < NV; i++) qv[i] = _mm512_loadu_ps(q + 16 * i);
    for (int rr = 0; rr < nr; rr++) {
        const float *k = kb + (size_t)rr * D;
        __m512 s[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
#pragma GCC unroll 16
        for (int i = 0; i < NV; i++) s[i & 3] = _mm512_fmadd_ps(_mm512_loadu_ps(k + 16 * i), qv[i], s[i & 3]);
        y[rr] = _mm512_add_ps(_mm512_add_ps(s[0], s[2]), _mm512_add_ps(s[1], s[3]));
    }
    return avx512_hsum16(y, nr);
}

T512 static __m512 compat_dots_64(const float *q, const float *kb, int nr) { return compat_dots(q, kb, nr, 64, 4); }
T512 static __m512 compat_dots_128(const float *q, const float *kb, int nr) { return compat_dots(q, kb, nr, 128, 8); }

/* The same for any head dim (a multiple of 64), q from memory. */
T512 static __m512 compat_dots_any(const float *q, const float *kb, int nr, int D) {
    __m512 y[BR];
    for (int32_t rr = 0; rr < nr; rr++) {
        const float *k = kb + (size_t)rr * D;
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (int32_t i = 0; i < D; i += 64) {
            s0 = _mm512_fmadd_ps(_mm512_loadu_ps(k + i), _mm512_loadu_ps(q + i), s0);
            s1 = _mm512_fmadd_ps(_mm512_loadu_ps(k + i + 16), _mm512_loadu_ps(q + i + 16), s1);
            s2 = _mm512_fmadd_ps(_mm512_loadu_ps(k + i + 32), _mm512_loadu_ps(q + i + 32), s2);
            s3 = _mm512_fmadd_ps(_mm512_loadu_ps(k + i + 48), _mm512_loadu_ps(q + i + 48), s3);
        }
        y[rr] = _mm512_add_ps(_mm512_add_ps(s0, s2), _mm512_add_ps(s1, s3));
    }
    return avx512_hsum16(y, nr);
}

/* x rounded to f16 and back, as ggml stores its f16 accumulator. */
T512 INL __m512 r16(__m512 x) { return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT)); }

/* ggml's accumulator updates for nqp (1 or 2) queries of one token over a
 * block, held in NV registers each: acc = r16(acc * ms) where the max grew
 * (ms < 1; ggml scales only then), then acc = r16(v * vs + acc). Two
 * queries make two independent chains and share each V slice load. */
T512 INL void compat_apply(const float *vb, int D, const uint8_t *idx, const float *ms, const float *vs, int n,
                           float *acc0, float *acc1, int NV, int nqp) {
    __m512 a[16], b[16];
#pragma GCC unroll 16
    for (int i = 0; i < NV; i++) {
        a[i] = _mm512_loadu_ps(acc0 + 16 * i);
        if (nqp == 2) b[i] = _mm512_loadu_ps(acc1 + 16 * i);
    }
    for (int x = 0; x < n; x++) {
        const float *v = vb + (size_t)idx[x] * D;
        if (ms[x] != 1.0f) {
            const __m512 w = _mm512_set1_ps(ms[x]);
#pragma GCC unroll 16
            for (int i = 0; i < NV; i++) a[i] = r16(_mm512_mul_ps(a[i], w));
        }
        if (nqp == 2 && ms[BR + x] != 1.0f) {
            const __m512 w = _mm512_set1_ps(ms[BR + x]);
#pragma GCC unroll 16
            for (int i = 0; i < NV; i++) b[i] = r16(_mm512_mul_ps(b[i], w));
        }
        const __m512 w0 = _mm512_set1_ps(vs[x]), w1 = _mm512_set1_ps(nqp == 2 ? vs[BR + x] : 0.0f);
#pragma GCC unroll 16
        for (int i = 0; i < NV; i++) {
            const __m512 y = _mm512_loadu_ps(v + 16 * i);
            a[i] = r16(_mm512_fmadd_ps(y, w0, a[i]));
            if (nqp == 2) b[i] = r16(_mm512_fmadd_ps(y, w1, b[i]));
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < NV; i++) {
        _mm512_storeu_ps(acc0 + 16 * i, a[i]);
        if (nqp == 2) _mm512_storeu_ps(acc1 + 16 * i, b[i]);
    }
}

/* The same for any head dim, the accumulator in memory. */
T512 static void compat_apply_any(const float *vb, int D, const uint8_t *idx, const float *ms, const float *vs, int n,
                                  float *acc) {
    for (int x = 0; x < n; x++) {
        const float *v = vb + (size_t)idx[x] * D;
        const __m512 w = _mm512_set1_ps(ms[x]), w0 = _mm512_set1_ps(vs[x]);
        for (int i = 0; i < D; i += 16) {
            __m512 y = _mm512_loadu_ps(acc + i);
            if (ms[x] != 1.0f) y = r16(_mm512_mul_ps(y, w));
            _mm512_storeu_ps(acc + i, r16(_mm512_fmadd_ps(_mm512_loadu_ps(v + i), w0, y)));
        }
    }
}

#define COMPAT_APPLY(NAME, NV, NQP)                                                                          \
    T512 static void NAME(const float *vb, const uint8_t *idx, const float *ms, const float *vs, int n,      \
                          float *acc0, float *acc1) {                                                        \
        compat_apply(vb, 16 * (NV), idx, ms, vs, n, acc0, acc1, NV, NQP);                                    \
    }
COMPAT_APPLY(compat_apply_64x1, 4, 1)
COMPAT_APPLY(compat_apply_128x1, 8, 1)
COMPAT_APPLY(compat_apply_256x1, 16, 1)
COMPAT_APPLY(compat_apply_64x2, 4, 2)
COMPAT_APPLY(compat_apply_128x2, 8, 2)

/* ggml-cpu's row-by-row FLASH_ATTN_EXT (ggml_compute_forward_flash_attn_ext_
 * f16_one_chunk) for f16 KV on AVX-512, operation for operation: q rounded to
 * f16; each K.q dot in four 16-lane FMA accumulators reduced as
 * GGML_F32x16_REDUCE does (the last step, _mm512_reduce_add_ps, done for 16
 * rows at once by hsum16's identical tree); online softmax with libm expf,
 * row by row; the output accumulated in f16. Each query keeps its own
 * sequential state (that order is ggml's rounding, so it cannot be tiled:
 * every row costs each query an expf and D/16 FMA + f16 round trips on one
 * dependency chain). What is shared is the K/V rows, converted once per
 * block of 16 for all the queries of the unit and prefetched two blocks
 * ahead; per block the expf weights come first (no calls in the vector
 * pass) and two queries' accumulators advance together. */
T512 static void item_compat512(const cpu_attn_strided_desc *d, const unit *u, int32_t r0, int32_t r1,
                                float *scr, float *m, float *l, float *acc) {
    const int32_t D = d->head_dim, G = d->n_q_heads / d->n_kv_heads, tt = u->tt;
    const int32_t nq = G * tt;
    float *qb = scr, *kb = qb + (size_t)nq * D, *vb = kb + (size_t)BR * D, *mv = vb + (size_t)BR * D;
    float *scq = mv + (size_t)TILE_T * BR; /* [nq][BR] the block's scores */
    for (int32_t g = 0; g < G; g++)
        for (int32_t t = 0; t < tt; t++)
            load_q(d, q_row(d, u->s, u->t0 + t, u->kvh * G + g), qb + (size_t)(g * tt + t) * D);
    for (int32_t qi = 0; qi < nq; qi++) m[qi] = -INFINITY, l[qi] = 0.0f;
    memset(acc, 0, (size_t)nq * D * sizeof(float));
    const float cap = d->softcap, scale = cap != 0.0f ? d->scale / cap : d->scale;
    const char *kbase = kv_row(d->k, d->k_nb_stream, d->k_nb_head, d->k_nb_row, u->s, u->kvh, 0);
    const char *vbase = kv_row(d->v, d->v_nb_stream, d->v_nb_head, d->v_nb_row, u->s, u->kvh, 0);
    const size_t kr = d->k_nb_row, vr = d->v_nb_row;
    pf_cursor pk, pv;
    const int32_t ahead = 2 * BR;
    pf_init(&pk, kbase, kr, (size_t)D * 2, r0, r1 - r0 < ahead ? r1 : r0 + ahead);
    pf_init(&pv, vbase, vr, (size_t)D * 2, r0, r1 - r0 < ahead ? r1 : r0 + ahead);
    pf_step(&pk, 1 << 30);
    pf_step(&pv, 1 << 30);
    for (int32_t r = r0; r < r1; r += BR) {
        const int32_t nr = r1 - r < BR ? r1 - r : BR;
        if (r + ahead < r1) {
            const int32_t e = r1 - (r + ahead) < BR ? r1 : r + ahead + BR;
            pf_init(&pk, kbase, kr, (size_t)D * 2, r + ahead, e);
            pf_init(&pv, vbase, vr, (size_t)D * 2, r + ahead, e);
            pf_step(&pk, 1 << 30);
            pf_step(&pv, 1 << 30);
        }
        if (!load_mask_block(d, u, r, nr, mv)) continue;
        for (int32_t rr = 0; rr < nr; rr++) {
            load_row16(d, kbase + (size_t)(r + rr) * kr, kb + (size_t)rr * D);
            load_row16(d, vbase + (size_t)(r + rr) * vr, vb + (size_t)rr * D);
        }
        /* Scores of every query first, then the sequential updates, two
         * queries of a token at a time. */
        uint32_t tvis = 0; /* tokens with a visible row in the block */
        for (int32_t t = 0; t < tt; t++)
            if (_mm512_cmp_ps_mask(_mm512_loadu_ps(mv + (size_t)t * BR), _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ))
                tvis |= 1u << t;
        for (int32_t qi = 0; qi < nq; qi++) {
            const float *q = qb + (size_t)qi * D, *mrow = mv + (size_t)(qi % tt) * BR;
            const __m512 mvec = _mm512_loadu_ps(mrow);
            float *sc = scq + (size_t)qi * BR;
            if (!(tvis >> (qi % tt) & 1)) continue;
            const __m512 dots = D == 64    ? compat_dots_64(q, kb, nr)
                                : D == 128 ? compat_dots_128(q, kb, nr)
                                           : compat_dots_any(q, kb, nr, D);
            __m512 s = _mm512_mul_ps(dots, _mm512_set1_ps(scale));
            if (cap != 0.0f) {
                _mm512_storeu_ps(sc, s);
                for (int32_t rr = 0; rr < nr; rr++) sc[rr] = cap * tanhf(sc[rr]);
                s = _mm512_loadu_ps(sc);
            }
            _mm512_storeu_ps(sc, _mm512_add_ps(s, mvec));
        }
        for (int32_t t = 0; t < tt; t++) {
            if (!(tvis >> t & 1)) continue;
            const float *mrow = mv + (size_t)t * BR;
            for (int32_t g = 0; g < G;) {
                const int32_t q0 = g * tt + t, q1 = q0 + tt;
                const int pair = g + 1 < G && (D == 64 || D == 128);
                uint8_t idx[BR];
                float ms[2 * BR], vs[2 * BR];
                const int n = compat_weights(scq + (size_t)q0 * BR, mrow, nr, &m[q0], &l[q0], ms, vs, idx);
                if (pair) compat_weights(scq + (size_t)q1 * BR, mrow, nr, &m[q1], &l[q1], ms + BR, vs + BR, idx);
                float *a0 = acc + (size_t)q0 * D, *a1 = acc + (size_t)q1 * D;
                switch (D * 4 + pair) {
                case 64 * 4: compat_apply_64x1(vb, idx, ms, vs, n, a0, NULL); break;
                case 64 * 4 + 1: compat_apply_64x2(vb, idx, ms, vs, n, a0, a1); break;
                case 128 * 4: compat_apply_128x1(vb, idx, ms, vs, n, a0, NULL); break;
                case 128 * 4 + 1: compat_apply_128x2(vb, idx, ms, vs, n, a0, a1); break;
                case 256 * 4: compat_apply_256x1(vb, idx, ms, vs, n, a0, NULL); break;
                default: compat_apply_any(vb, D, idx, ms, vs, n, a0); break;
                }
                g += 1 + pair;
            }
        }
    }
}
#endif

int cpu_attn_strided_compat_ok(int32_t head_dim, apex_dtype kv_dtype) {
#if HAVE_X86
    return kv_dtype == APEX_DTYPE_F16 && head_dim > 0 && head_dim % 64 == 0 && head_dim <= MAX_D &&
           __builtin_cpu_supports("avx512f");
#else
    (void)head_dim, (void)kv_dtype;
    return 0;
#endif
}

typedef void (*item_fn)(const cpu_attn_strided_desc *, const unit *, int32_t, int32_t, float *,
                        float *, float *, float *);

static int use_avx512(void) {
#if HAVE_X86
    static int cached = -1;
    if (cached < 0) {
        const char *isa = getenv("APEX_ISA");
        const int forced = isa && (strcmp(isa, "scalar") == 0 || strcmp(isa, "avx2") == 0);
        cached = __builtin_cpu_supports("avx512f") && !forced;
    }
    return cached;
#else
    return 0;
#endif
}

const char *cpu_attn_strided_isa(void) { return use_avx512() ? "avx512" : "scalar"; }

static item_fn pick(const cpu_attn_strided_desc *d) {
#if HAVE_X86
    if (d->ggml_compat) return item_compat512;
    if (use_avx512() && d->head_dim % 16 == 0) return item_avx512;
#endif
    (void)d;
    return item_scalar;
}

/* Writes acc / l (0 where l is 0) for every query of unit u. */
static void write_out(const cpu_attn_strided_desc *d, const unit *u, const float *l, const float *acc) {
    const int32_t D = d->head_dim, G0 = d->n_q_heads / d->n_kv_heads, G = G0 * u->nh;
    for (int32_t g = 0; g < G; g++)
        for (int32_t t = 0; t < u->tt; t++) {
            const int32_t qi = g * u->tt + t;
            float *o = out_row(d, u->s, u->t0 + t, u->kvh * G0 + g);
            const float inv = l[qi] == 0.0f ? 0.0f : 1.0f / l[qi];
            for (int32_t i = 0; i < D; i++) o[i] = acc[(size_t)qi * D + i] * inv;
        }
}

/* ggml_flash_attn_ext_reduce_partials: chunks in order, skipping empty
 * ones, each folded in as ggml's compiled loop does it (the first product
 * fused: VKQ = fma(VKQ, scale_old, VKQ_c * scale_new), S likewise). */
static void merge_ggml(const item *items, const unit *u, const float *parts, size_t part_floats,
                       int32_t nq, int32_t nq_max, int32_t D, float *l, float *acc) {
    for (int32_t qi = 0; qi < nq; qi++) {
        float M = -INFINITY, S = 0.0f, *a = acc + (size_t)qi * D;
        memset(a, 0, (size_t)D * sizeof(float));
        for (int32_t c = 0; c < u->nsplit; c++) {
            const float *pp = parts + (size_t)items[u->first + c].part * part_floats;
            const float Mc = pp[qi], Sc = pp[nq_max + qi];
            if (Sc == 0.0f) continue;
            const float Mn = fmaxf(M, Mc), so = expf(M - Mn), sn = expf(Mc - Mn);
            const float *pa = pp + 2 * (size_t)nq_max + (size_t)qi * D;
            for (int32_t i = 0; i < D; i++) a[i] = fmaf(a[i], so, pa[i] * sn);
            S = fmaf(S, so, Sc * sn);
            M = Mn;
        }
        l[qi] = S;
    }
}

int cpu_attn_strided(const cpu_attn_strided_desc *d, int32_t n_threads) {
    if (cpu_attn_strided_check(d) != 0) return -1;
    const int32_t D = d->head_dim, G = d->n_q_heads / d->n_kv_heads;
    const int32_t nth = n_threads > 0 ? n_threads : omp_get_max_threads();
    const int32_t ntiles = (d->n_tokens + TILE_T - 1) / TILE_T;
    const int32_t tt_max = d->n_tokens < TILE_T ? d->n_tokens : TILE_T;
    const item_fn fn = pick(d);
    /* KV heads per unit: on the fp32 SIMD path, adjacent heads whose rows
     * touch (ggml's cache) go together, up to all of them, so a group of
     * tokens is one contiguous run of memory instead of 128-256 B pieces a
     * row stride apart, which neither DRAM nor the hardware prefetcher
     * serve well (MHA ran at half the bandwidth). Bounded by the queries a
     * unit holds; prefill tiles already reuse each row tt times. */
    int32_t nh = 1;
#if HAVE_X86
    const size_t es = d->kv_dtype == APEX_DTYPE_F16 ? 2 : 4;
    if (fn == item_avx512 && d->k_nb_head == (size_t)D * es && d->v_nb_head == (size_t)D * es)
        for (nh = d->n_kv_heads; nh > 1; nh--)
            if (d->n_kv_heads % nh == 0 && nh * G * tt_max <= MAX_Q_UNIT) break;
#endif
    const int32_t nunits = d->n_streams * ntiles * (d->n_kv_heads / nh);
    const int32_t nq_max = nh * G * (nh > 1 ? tt_max : TILE_T);

    unit *units = malloc((size_t)nunits * sizeof *units);
    if (!units) return -1;

    /* Visible range of each tile: the union over its tokens of [first, last]
     * finite mask entry; rows outside it are never read. */
    for (int32_t s = 0, ui = 0; s < d->n_streams; s++)
        for (int32_t ti = 0; ti < ntiles; ti++) {
            const int32_t t0 = ti * TILE_T;
            const int32_t tt = d->n_tokens - t0 < TILE_T ? d->n_tokens - t0 : TILE_T;
            int32_t lo = d->n_kv, hi = 0;
            if (!d->mask) {
                lo = 0, hi = d->n_kv;
            } else {
                for (int32_t t = t0; t < t0 + tt; t++) {
                    const uint16_t *mr = (const uint16_t *)((const char *)d->mask +
                                                            (size_t)s * d->mask_nb_stream +
                                                            (size_t)t * d->mask_nb_tok);
                    int32_t a = 0, b = d->n_kv;
                    while (a < b && mr[a] == F16_NEG_INF) a++;
                    while (b > a && mr[b - 1] == F16_NEG_INF) b--;
                    if (a < b) {
                        if (a < lo) lo = a;
                        if (b > hi) hi = b;
                    }
                }
                if (lo >= hi) lo = hi = 0;
            }
            for (int32_t h = 0; h < d->n_kv_heads; h += nh, ui++)
                units[ui] = (unit){.s = s, .t0 = t0, .tt = tt, .kvh = h, .nh = nh, .lo = lo, .hi = hi};
        }

    /* Split units into chunks only when there are too few for the threads;
     * in exact mode only where ggml does (its split-KV decode), into its
     * chunks of gcs rows. */
    const int32_t target = ITEMS_PER_THREAD * nth;
    const int32_t op_streams = d->ggml_streams > 0 ? d->ggml_streams : d->n_streams;
    const int ggml_split = d->ggml_compat && d->n_tokens == 1 && op_streams == 1 && d->n_kv >= 512;
    const int32_t gnth = d->ggml_n_threads > 0 ? d->ggml_n_threads : nth;
    const int32_t gcs = (d->n_kv + gnth - 1) / gnth;
    int32_t nitems = 0, nparts = 0;
    for (int32_t ui = 0; ui < nunits; ui++) {
        unit *u = &units[ui];
        const int32_t len = u->hi - u->lo;
        int32_t ns = 1;
        if (ggml_split) {
            ns = (d->n_kv + gcs - 1) / gcs;
        } else if (nunits < target && len > MIN_CHUNK && !d->ggml_compat) {
            ns = (target + nunits - 1) / nunits;
            if (ns > len / MIN_CHUNK) ns = len / MIN_CHUNK;
            if (ns < 1) ns = 1;
        }
        u->nsplit = ns;
        u->first = nitems;
        nitems += ns;
        if (ns > 1) nparts += ns;
    }

    item *items = malloc((size_t)nitems * sizeof *items);
    const size_t part_floats = (size_t)nq_max * (D + 2);
    float *parts = nparts ? malloc((size_t)nparts * part_floats * sizeof(float)) : NULL;
    const size_t scr_floats = scratch_floats(D, nq_max) + part_floats;
    float *scratch = malloc((size_t)nth * scr_floats * sizeof(float));
    if (!items || (nparts && !parts) || !scratch) {
        free(units), free(items), free(parts), free(scratch);
        return -1;
    }
    for (int32_t ui = 0, p = 0; ui < nunits; ui++) {
        const unit *u = &units[ui];
        const int32_t len = u->hi - u->lo;
        for (int32_t c = 0; c < u->nsplit; c++) {
            item *it = &items[u->first + c];
            it->u = ui;
            if (ggml_split) {
                /* ggml's chunk c, less the rows the mask hides (ggml skips
                 * them); an empty one leaves m = -inf, l = 0. */
                const int32_t c0 = c * gcs, c1 = c0 + gcs < d->n_kv ? c0 + gcs : d->n_kv;
                it->r0 = c0 > u->lo ? c0 : u->lo;
                it->r1 = c1 < u->hi ? c1 : u->hi;
                if (it->r1 < it->r0) it->r1 = it->r0;
            } else {
                it->r0 = u->lo + (int32_t)((int64_t)len * c / u->nsplit);
                it->r1 = u->lo + (int32_t)((int64_t)len * (c + 1) / u->nsplit);
            }
            it->part = u->nsplit > 1 ? p++ : -1;
        }
    }

#pragma omp parallel num_threads(nth)
    {
        float *scr = scratch + (size_t)omp_get_thread_num() * scr_floats;
        float *own = scr + scratch_floats(D, nq_max); /* m, l, acc of a direct item */
#pragma omp for schedule(dynamic, 1)
        for (int32_t i = 0; i < nitems; i++) {
            const item *it = &items[i];
            const unit *u = &units[it->u];
            float *dst = it->part >= 0 ? parts + (size_t)it->part * part_floats : own;
            float *m = dst, *l = dst + nq_max, *acc = dst + 2 * nq_max;
            fn(d, u, it->r0, it->r1, scr, m, l, acc);
            if (it->part < 0) write_out(d, u, l, acc);
        }
        /* Merge the chunks of split units by log-sum-exp. */
#pragma omp for schedule(dynamic, 1)
        for (int32_t ui = 0; ui < nunits; ui++) {
            const unit *u = &units[ui];
            if (u->nsplit <= 1) continue;
            const int32_t nq = nh * G * u->tt;
            float *m = own, *l = own + nq_max, *acc = own + 2 * nq_max;
            if (ggml_split) {
                merge_ggml(items, u, parts, part_floats, nq, nq_max, D, l, acc);
                write_out(d, u, l, acc);
                continue;
            }
            for (int32_t qi = 0; qi < nq; qi++) {
                float mx = -INFINITY;
                for (int32_t c = 0; c < u->nsplit; c++) {
                    const float *pp = parts + (size_t)items[u->first + c].part * part_floats;
                    if (pp[qi] > mx) mx = pp[qi];
                }
                m[qi] = mx;
                l[qi] = 0.0f;
                float *a = acc + (size_t)qi * D;
                memset(a, 0, (size_t)D * sizeof(float));
                if (mx == -INFINITY) continue;
                for (int32_t c = 0; c < u->nsplit; c++) {
                    const float *pp = parts + (size_t)items[u->first + c].part * part_floats;
                    if (pp[qi] == -INFINITY) continue;
                    const float w = expf(pp[qi] - mx);
                    l[qi] += w * pp[nq_max + qi];
                    const float *pa = pp + 2 * nq_max + (size_t)qi * D;
                    for (int32_t i2 = 0; i2 < D; i2++) a[i2] += w * pa[i2];
                }
            }
            write_out(d, u, l, acc);
        }
    }
    free(units), free(items), free(parts), free(scratch);
    return 0;
}
