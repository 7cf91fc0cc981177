/* cpu_attn_strided_avx512.c - the strided kernel's fp32 mode on AVX-512
 * (see cpu_attn_strided.h): per group of rows, scores in tiles of rows x
 * query heads reduced by one transpose (hsum16), online softmax per query
 * with a vector exp, P.V with up to 16 queries' accumulators in registers,
 * the next group prefetched. A unit takes adjacent KV heads (up to whole
 * cache rows) so that it reads memory in long runs. No ISA flags: every
 * function carries the AVX-512 target attribute, and the driver runs it
 * only on a CPU that has it. */
#include "cpu_attn/cpu_attn_strided_impl.h"

#if HAVE_X86
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

/* cpu_attn_strided_item_scalar's contract, head_dim a multiple of 16. Per group of GROUP
 * rows: every query's scores by qk tiles (K read once per 8 queries), then
 * per query the softmax update with a vector exp, then P.V with up to 16
 * queries' accumulators in registers (V read once per 16 queries). q holds
 * the scale (or scale / softcap), so the scores need no multiply. */
T512 void cpu_attn_strided_item_avx512(const cpu_attn_strided_desc *d, const unit *u, int32_t r0, int32_t r1,
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
            load_q16(d, q_row(d, u->s, u->t0 + t, u->kvh * G0 + g), dst);
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
#endif
