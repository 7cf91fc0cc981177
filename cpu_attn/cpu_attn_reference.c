/* The definition of decode attention that the optimised kernel is held to:
 * plain loops, whole-sequence softmax (max, then sum), one q head at a time.
 * Inputs are converted to fp32 exactly as stored; the arithmetic is done in
 * double so that the reference's own rounding is far below any tolerance the
 * tests apply to the fp32-accumulating kernels. */
#include <math.h>

#include "cpu_attn/cpu_attn.h"
#include "cpu_attn/kv_layout.h"

/* Element (token t, dim d) of head h's K (which = 0) or V (which = 1). */
static float kv_at(const cpu_attn_geom *g, const cpu_attn_batch *b, const int32_t *table,
                   int32_t t, int32_t h, int which, int32_t d) {
    apex_kv_layout lay = apex_kv_layout_of(g->n_kv_heads, g->block_tokens, g->head_dim,
                                           apex_dtype_size(g->kv_dtype));
    lay.pairs = g->kv_pairs;
    int32_t blk = table[t / g->block_tokens];
    const uint8_t *base = (const uint8_t *)b->kv + (size_t)blk * b->block_bytes;
    const size_t esz = apex_dtype_size(g->kv_dtype);
    return apex_load_f32(base + apex_kv_elem_offset(&lay, which, h, t % g->block_tokens, d, esz),
                         g->kv_dtype, 0);
}

static double score(const cpu_attn_geom *g, const cpu_attn_batch *b, const int32_t *table,
                    const void *q, size_t q_idx, int32_t t, int32_t kvh) {
    double dot = 0.0;
    for (int32_t d = 0; d < g->head_dim; d++)
        dot += (double)apex_load_f32(q, b->q_dtype, q_idx + (size_t)d) *
               (double)kv_at(g, b, table, t, kvh, 0, d);
    double s = dot * (double)b->scale;
    if (b->softcap > 0.0f) s = (double)b->softcap * tanh(s / (double)b->softcap);
    return s;
}

int cpu_attn_reference(const cpu_attn_geom *g, const cpu_attn_batch *b) {
    /* The pair layout is defined for 2-byte elements and whole 16-token tiles. */
    if (g->kv_pairs && (apex_dtype_size(g->kv_dtype) != 2 || g->block_tokens < APEX_KV_PAIR_TILE))
        return -1;
    const int32_t D = g->head_dim;
    const int32_t group = g->n_q_heads / g->n_kv_heads;
    for (int32_t i = 0; i < b->n_seqs; i++) {
        const int32_t len = b->seq_lens[i];
        const int32_t start = b->window > 0 && len > b->window ? len - b->window : 0;
        const int32_t *table = b->block_table + (size_t)i * (size_t)b->block_table_stride;
        for (int32_t h = 0; h < g->n_q_heads; h++) {
            const int32_t kvh = h / group;
            const size_t q_idx = ((size_t)i * (size_t)g->n_q_heads + (size_t)h) * (size_t)D;
            double m = -INFINITY;
            for (int32_t t = start; t < len; t++) {
                double s = score(g, b, table, b->q, q_idx, t, kvh);
                if (s > m) m = s;
            }
            double acc[APEX_MAX_HEAD_DIM] = {0};
            double l = 0.0;
            for (int32_t t = start; t < len; t++) {
                double p = exp(score(g, b, table, b->q, q_idx, t, kvh) - m);
                l += p;
                for (int32_t d = 0; d < D; d++) acc[d] += p * (double)kv_at(g, b, table, t, kvh, 1, d);
            }
            for (int32_t d = 0; d < D; d++)
                apex_store_f32(b->out, b->out_dtype, q_idx + (size_t)d, (float)(acc[d] / l));
        }
    }
    return 0;
}
