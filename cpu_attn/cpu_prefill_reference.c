#include "cpu_attn/cpu_prefill.h"

#include <math.h>
#include <stdlib.h>

#include "cpu_attn/dtype_convert.h"

int cpu_prefill_reference(const cpu_prefill_batch *b) {
    const int32_t d = b->head_dim, group = b->n_q_heads / b->n_kv_heads;
    const int64_t qs = b->q_stride ? b->q_stride : (int64_t)b->n_q_heads * d;
    const int64_t ks = b->k_stride ? b->k_stride : (int64_t)b->n_kv_heads * d;
    const int64_t vs = b->v_stride ? b->v_stride : (int64_t)b->n_kv_heads * d;
    int32_t longest = 0;
    for (int32_t s = 0; s < b->n_seqs; s++) {
        int32_t n = b->cu_seqlens[s + 1] - b->cu_seqlens[s];
        if (n > longest) longest = n;
    }
    double *w = malloc(sizeof *w * (size_t)(longest ? longest : 1));
    double *acc = malloc(sizeof *acc * (size_t)d);
    if (!w || !acc) {
        free(w);
        free(acc);
        return -1;
    }
    for (int32_t s = 0; s < b->n_seqs; s++) {
        const int64_t first = b->cu_seqlens[s];
        const int32_t n = b->cu_seqlens[s + 1] - b->cu_seqlens[s];
        for (int32_t i = 0; i < n; i++)
            for (int32_t h = 0; h < b->n_q_heads; h++) {
                const int32_t hk = h / group;
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
    }
    free(w);
    free(acc);
    return 0;
}
