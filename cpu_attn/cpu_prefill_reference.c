#include "cpu_attn/cpu_prefill.h"

#include <math.h>
#include <stdlib.h>

#include "cpu_attn/dtype_convert.h"

/* Token i of one sequence (rows from `first`), query head h. w: [i + 1]. */
static void one_query(const cpu_prefill_batch *b, int64_t first, int32_t i, int32_t h,
                      double *w, double *acc) {
    const int32_t d = b->head_dim, hk = h / (b->n_q_heads / b->n_kv_heads);
    const int64_t qs = b->q_stride ? b->q_stride : (int64_t)b->n_q_heads * d;
    const int64_t ks = b->k_stride ? b->k_stride : (int64_t)b->n_kv_heads * d;
    const int64_t vs = b->v_stride ? b->v_stride : (int64_t)b->n_kv_heads * d;
    const int32_t start = b->window > 0 && i + 1 > b->window ? i + 1 - b->window : 0;
    const int64_t qrow = (first + i) * qs + (int64_t)h * d;
    double mx = -INFINITY, sum = 0;
    for (int32_t t = start; t <= i; t++) {
        const int64_t krow = (first + t) * ks + (int64_t)hk * d;
        double dot = 0;
        for (int32_t e = 0; e < d; e++)
            dot += (double)apex_load_f32(b->q, b->act_dtype, (size_t)(qrow + e)) *
                   apex_load_f32(b->k, b->act_dtype, (size_t)(krow + e));
        dot *= b->scale;
        if (b->softcap > 0) dot = b->softcap * tanh(dot / b->softcap);
        w[t] = dot;
        if (dot > mx) mx = dot;
    }
    for (int32_t t = start; t <= i; t++) sum += (w[t] = exp(w[t] - mx));
    for (int32_t e = 0; e < d; e++) acc[e] = 0;
    for (int32_t t = start; t <= i; t++) {
        const int64_t vrow = (first + t) * vs + (int64_t)hk * d;
        for (int32_t e = 0; e < d; e++)
            acc[e] += w[t] * apex_load_f32(b->v, b->act_dtype, (size_t)(vrow + e));
    }
    const size_t orow = ((size_t)(first + i) * b->n_q_heads + (size_t)h) * (size_t)d;
    for (int32_t e = 0; e < d; e++)
        apex_store_f32(b->out, b->out_dtype, orow + (size_t)e, (float)(acc[e] / sum));
}

int cpu_prefill_reference(const cpu_prefill_batch *b) {
    int failed = 0;
    /* Independent (sequence, head) pairs: spread over threads, each with its
     * own scratch, so the reference stays usable on long device tests. */
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
    for (int64_t sh = 0; sh < (int64_t)b->n_seqs * b->n_q_heads; sh++) {
        const int32_t s = (int32_t)(sh / b->n_q_heads), h = (int32_t)(sh % b->n_q_heads);
        const int64_t first = b->cu_seqlens[s];
        const int32_t n = b->cu_seqlens[s + 1] - b->cu_seqlens[s];
        double *w = malloc(sizeof *w * (size_t)(n ? n : 1));
        double *acc = malloc(sizeof *acc * (size_t)b->head_dim);
        if (!w || !acc) {
            failed = 1;
        } else {
            for (int32_t i = 0; i < n; i++) one_query(b, first, i, h, w, acc);
        }
        free(w);
        free(acc);
    }
    return failed ? -1 : 0;
}
