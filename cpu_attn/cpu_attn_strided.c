/* cpu_attn_strided: attention over a token-major strided KV cache (the
 * layout of ggml's FLASH_ATTN_EXT operands); see cpu_attn_strided.h.
 *
 * Work is split into units (stream, tile of query tokens, KV head); a unit
 * holds every query head of its KV head for every token of its tile, so each
 * K/V row is read and converted once for all of them (ggml-cpu re-reads it per
 * query head and per token). A unit streams only the rows its mask leaves
 * visible, and is cut into KV chunks when there are too few units for the
 * threads; chunk partials (max, sum, acc) are merged by log-sum-exp. */
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
#define TILE_T 8           /* query tokens per unit                             */
#define MIN_CHUNK 256      /* fewer rows per chunk cost more to merge than gained */
#define ITEMS_PER_THREAD 4 /* items aimed for per thread, for dynamic balance   */
#define MAX_D 512
#define F16_NEG_INF 0xfc00u

typedef struct unit {
    int32_t s, t0, tt, kvh; /* stream, first token, tokens, KV head */
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
    return (size_t)nq * D          /* q       */
           + 2 * (size_t)BR * D    /* K, V    */
           + (size_t)TILE_T * BR   /* mask    */
           + 2 * (size_t)BR        /* scores  */
           + 16;
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
/* S = S*ms + vs as ggml-cpu's compiled code evaluates it. */
#ifndef COMPAT_SUM
#define COMPAT_SUM(S, ms, vs) fmaf((S), (ms), (vs))
#endif

/* e^x, relative error ~2e-7: Cephes expf polynomial on x - n ln2, scaled by
 * 2^n with scalef (which underflows cleanly to 0). */
T512 static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    x = _mm512_min_ps(x, _mm512_set1_ps(88.7f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
}

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

/* item_scalar's contract, head_dim a multiple of 16. */
T512 static void item_avx512(const cpu_attn_strided_desc *d, const unit *u, int32_t r0, int32_t r1,
                             float *scr, float *m, float *l, float *acc) {
    const int32_t D = d->head_dim, NV = D / 16, G = d->n_q_heads / d->n_kv_heads, tt = u->tt;
    const int32_t nq = G * tt;
    float *qb = scr, *kb = qb + (size_t)nq * D, *vb = kb + (size_t)BR * D, *mv = vb + (size_t)BR * D;
    float *sc = mv + (size_t)TILE_T * BR, *pf = sc + BR;
    for (int32_t g = 0; g < G; g++)
        for (int32_t t = 0; t < tt; t++)
            load_q(d, q_row(d, u->s, u->t0 + t, u->kvh * G + g), qb + (size_t)(g * tt + t) * D);
    for (int32_t qi = 0; qi < nq; qi++) m[qi] = -INFINITY, l[qi] = 0.0f;
    memset(acc, 0, (size_t)nq * D * sizeof(float));
    const float scale = d->softcap != 0.0f ? d->scale / d->softcap : d->scale;
    for (int32_t r = r0; r < r1; r += BR) {
        const int32_t nr = r1 - r < BR ? r1 - r : BR;
        if (!load_mask_block(d, u, r, nr, mv)) continue;
        for (int32_t rr = 0; rr < nr; rr++) {
            load_row16(d, kv_row(d->k, d->k_nb_stream, d->k_nb_head, d->k_nb_row, u->s, u->kvh, r + rr),
                       kb + (size_t)rr * D);
            load_row16(d, kv_row(d->v, d->v_nb_stream, d->v_nb_head, d->v_nb_row, u->s, u->kvh, r + rr),
                       vb + (size_t)rr * D);
        }
        for (int32_t qi = 0; qi < nq; qi++) {
            const float *q = qb + (size_t)qi * D;
            const __m512 mrow = _mm512_loadu_ps(mv + (size_t)(qi % tt) * BR);
            const __mmask16 vis = _mm512_cmp_ps_mask(mrow, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
            if (!vis) continue;
            for (int32_t rr = 0; rr < nr; rr++) {
                const float *k = kb + (size_t)rr * D;
                __m512 s = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(k));
                for (int32_t v = 1; v < NV; v++)
                    s = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * v), _mm512_loadu_ps(k + 16 * v), s);
                sc[rr] = _mm512_reduce_add_ps(s) * scale;
            }
            for (int32_t rr = nr; rr < BR; rr++) sc[rr] = 0.0f;
            if (d->softcap != 0.0f)
                for (int32_t rr = 0; rr < nr; rr++) sc[rr] = d->softcap * tanhf(sc[rr]);
            const __m512 s = _mm512_mask_add_ps(_mm512_set1_ps(-INFINITY), vis, _mm512_loadu_ps(sc), mrow);
            const float bmax = _mm512_mask_reduce_max_ps(vis, s);
            if (bmax == -INFINITY) continue;
            const float mnew = bmax > m[qi] ? bmax : m[qi];
            const float alpha = m[qi] == -INFINITY ? 0.0f : expf(m[qi] - mnew);
            const __m512 p = _mm512_maskz_mov_ps(vis, exp16(_mm512_sub_ps(s, _mm512_set1_ps(mnew))));
            _mm512_storeu_ps(pf, p);
            l[qi] = l[qi] * alpha + _mm512_reduce_add_ps(p);
            m[qi] = mnew;
            float *a = acc + (size_t)qi * D;
            const __m512 va = _mm512_set1_ps(alpha);
            for (int32_t v = 0; v < NV; v++) {
                __m512 x = _mm512_mul_ps(_mm512_loadu_ps(a + 16 * v), va);
                for (int32_t rr = 0; rr < nr; rr++)
                    x = _mm512_fmadd_ps(_mm512_set1_ps(pf[rr]), _mm512_loadu_ps(vb + (size_t)rr * D + 16 * v), x);
                _mm512_storeu_ps(a + 16 * v, x);
            }
        }
    }
}

/* ggml-cpu's row-by-row FLASH_ATTN_EXT (ggml_compute_forward_flash_attn_ext_
 * f16_one_chunk) for f16 KV on AVX-512, operation for operation: q rounded to
 * f16; the K.q dot in four 16-lane FMA accumulators reduced as
 * GGML_F32x16_REDUCE does; online softmax with libm expf; the output
 * accumulated in f16 (each update rounded to f16, as ggml_vec_mad_f16 and
 * ggml_vec_scale_f16 store it). Each query keeps its own sequential state;
 * the K/V rows are converted once per block for all queries of the unit. */
T512 static void item_compat512(const cpu_attn_strided_desc *d, const unit *u, int32_t r0, int32_t r1,
                                float *scr, float *m, float *l, float *acc) {
    const int32_t D = d->head_dim, NV = D / 16, G = d->n_q_heads / d->n_kv_heads, tt = u->tt;
    const int32_t nq = G * tt;
    float *qb = scr, *kb = qb + (size_t)nq * D, *vb = kb + (size_t)BR * D, *mv = vb + (size_t)BR * D;
    for (int32_t g = 0; g < G; g++)
        for (int32_t t = 0; t < tt; t++)
            load_q(d, q_row(d, u->s, u->t0 + t, u->kvh * G + g), qb + (size_t)(g * tt + t) * D);
    for (int32_t qi = 0; qi < nq; qi++) m[qi] = -INFINITY, l[qi] = 0.0f;
    memset(acc, 0, (size_t)nq * D * sizeof(float));
    float scale = d->scale;
    if (d->softcap != 0.0f) scale /= d->softcap;
    for (int32_t r = r0; r < r1; r += BR) {
        const int32_t nr = r1 - r < BR ? r1 - r : BR;
        if (!load_mask_block(d, u, r, nr, mv)) continue;
        for (int32_t rr = 0; rr < nr; rr++) {
            load_row16(d, kv_row(d->k, d->k_nb_stream, d->k_nb_head, d->k_nb_row, u->s, u->kvh, r + rr),
                       kb + (size_t)rr * D);
            load_row16(d, kv_row(d->v, d->v_nb_stream, d->v_nb_head, d->v_nb_row, u->s, u->kvh, r + rr),
                       vb + (size_t)rr * D);
        }
        for (int32_t qi = 0; qi < nq; qi++) {
            const float *q = qb + (size_t)qi * D, *mrow = mv + (size_t)(qi % tt) * BR;
            float *a = acc + (size_t)qi * D;
            float M = m[qi], S = l[qi];
            for (int32_t rr = 0; rr < nr; rr++) {
                const float mval = mrow[rr];
                if (mval == -INFINITY) continue;
                const float *k = kb + (size_t)rr * D, *v = vb + (size_t)rr * D;
                __m512 s4[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                                _mm512_setzero_ps()};
                for (int32_t i = 0; i < D; i += 64)
                    for (int j = 0; j < 4; j++)
                        s4[j] = _mm512_fmadd_ps(_mm512_loadu_ps(k + i + 16 * j), _mm512_loadu_ps(q + i + 16 * j),
                                                s4[j]);
                s4[0] = _mm512_add_ps(s4[0], s4[2]);
                s4[1] = _mm512_add_ps(s4[1], s4[3]);
                s4[0] = _mm512_add_ps(s4[0], s4[1]);
                float sc = (float)(double)_mm512_reduce_add_ps(s4[0]);
                sc = sc * scale;
                if (d->softcap != 0.0f) sc = d->softcap * tanhf(sc);
                sc = sc + mval;
                const float Mold = M;
                float ms = 1.0f, vs = 1.0f;
                if (sc > M) {
                    M = sc;
                    ms = expf(Mold - M);
                    const __m512 vms = _mm512_set1_ps(ms);
                    for (int32_t i = 0; i < NV; i++)
                        _mm512_storeu_ps(a + 16 * i, _mm512_cvtph_ps(_mm512_cvtps_ph(
                                                         _mm512_mul_ps(_mm512_loadu_ps(a + 16 * i), vms), 0)));
                } else {
                    vs = expf(sc - M);
                }
                const __m512 vvs = _mm512_set1_ps(vs);
                for (int32_t i = 0; i < NV; i++)
                    _mm512_storeu_ps(a + 16 * i,
                                     _mm512_cvtph_ps(_mm512_cvtps_ph(
                                         _mm512_fmadd_ps(_mm512_loadu_ps(v + 16 * i), vvs, _mm512_loadu_ps(a + 16 * i)),
                                         0)));
                S = COMPAT_SUM(S, ms, vs);
            }
            m[qi] = M, l[qi] = S;
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
    const int32_t D = d->head_dim, G = d->n_q_heads / d->n_kv_heads;
    for (int32_t g = 0; g < G; g++)
        for (int32_t t = 0; t < u->tt; t++) {
            const int32_t qi = g * u->tt + t;
            float *o = out_row(d, u->s, u->t0 + t, u->kvh * G + g);
            const float inv = l[qi] == 0.0f ? 0.0f : 1.0f / l[qi];
            for (int32_t i = 0; i < D; i++) o[i] = acc[(size_t)qi * D + i] * inv;
        }
}

int cpu_attn_strided(const cpu_attn_strided_desc *d, int32_t n_threads) {
    if (cpu_attn_strided_check(d) != 0) return -1;
    const int32_t D = d->head_dim, G = d->n_q_heads / d->n_kv_heads;
    const int32_t nth = n_threads > 0 ? n_threads : omp_get_max_threads();
    const int32_t ntiles = (d->n_tokens + TILE_T - 1) / TILE_T;
    const int32_t nunits = d->n_streams * ntiles * d->n_kv_heads;
    const int32_t nq_max = G * TILE_T;

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
            for (int32_t h = 0; h < d->n_kv_heads; h++, ui++) {
                units[ui] = (unit){.s = s, .t0 = t0, .tt = tt, .kvh = h, .lo = lo, .hi = hi};
            }
        }

    /* Split units into chunks only when there are too few for the threads. */
    const int32_t target = ITEMS_PER_THREAD * nth;
    int32_t nitems = 0, nparts = 0;
    for (int32_t ui = 0; ui < nunits; ui++) {
        unit *u = &units[ui];
        const int32_t len = u->hi - u->lo;
        int32_t ns = 1;
        if (nunits < target && len > MIN_CHUNK && !d->ggml_compat) {
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
            it->r0 = u->lo + (int32_t)((int64_t)len * c / u->nsplit);
            it->r1 = u->lo + (int32_t)((int64_t)len * (c + 1) / u->nsplit);
            it->part = u->nsplit > 1 ? p++ : -1;
        }
    }

    const item_fn fn = pick(d);
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
            const int32_t nq = G * u->tt;
            float *m = own, *l = own + nq_max, *acc = own + 2 * nq_max;
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
