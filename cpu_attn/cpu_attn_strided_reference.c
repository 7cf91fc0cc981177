/* cpu_attn_strided_reference.c - the strided kernel's definition (see
 * cpu_attn_strided.h): the descriptor check, plain scalar loops that the
 * fast paths are held to, and the scalar item the driver runs where no
 * SIMD variant applies (another ISA, APEX_ISA=scalar, head_dim not a
 * multiple of 16). */
#include "cpu_attn/cpu_attn_strided_impl.h"

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

/* The scalar variant's item (strided_item_fn): blocks of BR rows, every
 * query of the unit over each, online softmax per block. */
void cpu_attn_strided_item_scalar(const cpu_attn_strided_desc *d, const unit *u, int32_t r0, int32_t r1,
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
