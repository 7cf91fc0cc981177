/* cpu_attn_strided_exact.c - the strided kernel's exact mode (see
 * cpu_attn_strided.h): ggml-cpu's FLASH_ATTN_EXT arithmetic bit for bit.
 * It keeps ggml's per-row order and f16 output accumulator (that order is
 * its rounding) and optimises around it; see cpu_attn_strided_item_exact.
 * AVX-512 only (target attribute, chosen at run time). */
#include "cpu_attn/cpu_attn_strided_impl.h"

#if HAVE_X86
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

/* ggml's accumulator updates for nqp (1 to 3) queries of one token over a
 * block, held in NV registers each: acc = r16(acc * ms) where the max grew
 * (ms < 1; ggml scales only then), then acc = r16(v * vs + acc). Each query
 * is its own dependency chain (FMA and two conversions per row); more
 * queries share each V slice load and fill the chain's latency (GQA 3, as
 * SmolLM2's, runs as one triple rather than a pair and a lone query). */
T512 INL void compat_apply(const float *vb, int D, const uint8_t *idx, const float *ms, const float *vs, int n,
                           float *const *accp, int NV, int nqp) {
    __m512 a[3][16];
#pragma GCC unroll 3
    for (int j = 0; j < nqp; j++)
#pragma GCC unroll 16
        for (int i = 0; i < NV; i++) a[j][i] = _mm512_loadu_ps(accp[j] + 16 * i);
    for (int x = 0; x < n; x++) {
        const float *v = vb + (size_t)idx[x] * D;
#pragma GCC unroll 3
        for (int j = 0; j < nqp; j++)
            if (ms[j * BR + x] != 1.0f) {
                const __m512 w = _mm512_set1_ps(ms[j * BR + x]);
#pragma GCC unroll 16
                for (int i = 0; i < NV; i++) a[j][i] = r16(_mm512_mul_ps(a[j][i], w));
            }
        __m512 w[3];
#pragma GCC unroll 3
        for (int j = 0; j < nqp; j++) w[j] = _mm512_set1_ps(vs[j * BR + x]);
#pragma GCC unroll 16
        for (int i = 0; i < NV; i++) {
            const __m512 y = _mm512_loadu_ps(v + 16 * i);
#pragma GCC unroll 3
            for (int j = 0; j < nqp; j++) a[j][i] = r16(_mm512_fmadd_ps(y, w[j], a[j][i]));
        }
    }
#pragma GCC unroll 3
    for (int j = 0; j < nqp; j++)
#pragma GCC unroll 16
        for (int i = 0; i < NV; i++) _mm512_storeu_ps(accp[j] + 16 * i, a[j][i]);
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
                          float *const *accp) {                                                              \
        compat_apply(vb, 16 * (NV), idx, ms, vs, n, accp, NV, NQP);                                          \
    }
COMPAT_APPLY(compat_apply_64x1, 4, 1)
COMPAT_APPLY(compat_apply_128x1, 8, 1)
COMPAT_APPLY(compat_apply_256x1, 16, 1)
COMPAT_APPLY(compat_apply_64x2, 4, 2)
COMPAT_APPLY(compat_apply_128x2, 8, 2)
COMPAT_APPLY(compat_apply_64x3, 4, 3)

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
T512 void cpu_attn_strided_item_exact(const cpu_attn_strided_desc *d, const unit *u, int32_t r0, int32_t r1,
                                      float *scr, float *m, float *l, float *acc) {
    const int32_t D = d->head_dim, G = d->n_q_heads / d->n_kv_heads, tt = u->tt;
    const int32_t nq = G * tt;
    float *qb = scr, *kb = qb + (size_t)nq * D, *vb = kb + (size_t)BR * D, *mv = vb + (size_t)BR * D;
    float *scq = mv + (size_t)TILE_T * BR; /* [nq][BR] the block's scores */
    for (int32_t g = 0; g < G; g++)
        for (int32_t t = 0; t < tt; t++)
            load_q16(d, q_row(d, u->s, u->t0 + t, u->kvh * G + g), qb + (size_t)(g * tt + t) * D);
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
                /* Queries of the token that advance together: three for
                 * D 64 (GQA 3), two for D 64 and 128, else one. */
                const int32_t nqp = D == 64 && g + 2 < G && G % 2 ? 3 : g + 1 < G && (D == 64 || D == 128) ? 2 : 1;
                uint8_t idx[BR];
                float ms[3 * BR], vs[3 * BR];
                float *accp[3];
                int n = 0;
                for (int32_t j = 0; j < nqp; j++) {
                    const int32_t qj = (g + j) * tt + t;
                    /* Every query of the token sees the same mask row: the same idx. */
                    n = compat_weights(scq + (size_t)qj * BR, mrow, nr, &m[qj], &l[qj], ms + j * BR, vs + j * BR, idx);
                    accp[j] = acc + (size_t)qj * D;
                }
                switch (D * 4 + nqp) {
                case 64 * 4 + 1: compat_apply_64x1(vb, idx, ms, vs, n, accp); break;
                case 64 * 4 + 2: compat_apply_64x2(vb, idx, ms, vs, n, accp); break;
                case 64 * 4 + 3: compat_apply_64x3(vb, idx, ms, vs, n, accp); break;
                case 128 * 4 + 1: compat_apply_128x1(vb, idx, ms, vs, n, accp); break;
                case 128 * 4 + 2: compat_apply_128x2(vb, idx, ms, vs, n, accp); break;
                case 256 * 4 + 1: compat_apply_256x1(vb, idx, ms, vs, n, accp); break;
                default: compat_apply_any(vb, D, idx, ms, vs, n, accp[0]); break;
                }
                g += nqp;
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
