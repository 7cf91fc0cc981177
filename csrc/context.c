#include "csrc/context.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_attn/dtype_convert.h"
#include "csrc/error.h"
#include "plugin/src/config.h"

apex_status context_create(const apex_config *cfg, apex_context **out) {
    apex_context *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return apex_fail(APEX_ERR_NO_MEMORY, "out of memory for a context");
    ctx->cfg = *cfg;
    if (cfg->cpu_set) {
        if (strlen(cfg->cpu_set) >= sizeof ctx->cpu_set) {
            free(ctx);
            return apex_fail(APEX_ERR_INVALID_ARG, "cpu_set is longer than %zu characters",
                             sizeof ctx->cpu_set - 1);
        }
        strcpy(ctx->cpu_set, cfg->cpu_set);
    }
    ctx->cfg.cpu_set = ctx->cpu_set;
    ctx->block_bytes = apex_config_block_bytes(cfg);

    /* No GPU tier is built into this runtime yet: host mode. */
    ctx->host_mode = 1;
    if (cfg->device_blocks > 0)
        fprintf(stderr, "apex: host mode (no GPU tier): device_blocks %lld -> 0\n",
                (long long)cfg->device_blocks);
    ctx->cfg.device_blocks = 0;
    ctx->cfg.host_blocks = apex_config_host_blocks(cfg);
    ctx->pools[APEX_TIER_DEVICE].tier = APEX_TIER_DEVICE;

    apex_status st = cpu_workers_init(&ctx->workers, ctx->cpu_set, cfg->n_threads);
    if (st) goto fail;
    ctx->cfg.n_threads = ctx->workers.n_threads;
    st = block_pool_init_host(&ctx->pools[APEX_TIER_HOST], &ctx->workers,
                              (int32_t)ctx->cfg.host_blocks, cfg->n_layers, ctx->block_bytes);
    if (st) goto fail;
    st = seq_table_init(&ctx->seqs, cfg->max_seqs, cfg->max_seq_len, cfg->block_tokens,
                        &ctx->pools[APEX_TIER_DEVICE], &ctx->pools[APEX_TIER_HOST]);
    if (st) goto fail;

    ctx->geom = (cpu_attn_geom){
        .n_q_heads = cfg->n_q_heads,
        .n_kv_heads = cfg->n_kv_heads,
        .head_dim = cfg->head_dim,
        .block_tokens = cfg->block_tokens,
        .kv_dtype = cfg->kv_dtype,
    };
    ctx->ws = cpu_attn_ws_create(&ctx->geom, cfg->max_batch, cfg->max_seq_len,
                                 ctx->workers.n_threads);
    ctx->batch_lens = malloc((size_t)cfg->max_batch * sizeof *ctx->batch_lens);
    ctx->batch_table = malloc((size_t)cfg->max_batch * (size_t)ctx->seqs.max_blocks_per_seq *
                              sizeof *ctx->batch_table);
    if (!ctx->ws || !ctx->batch_lens || !ctx->batch_table) {
        st = apex_fail(APEX_ERR_NO_MEMORY, "out of memory for the attention workspace");
        goto fail;
    }
    cpu_workers_pin(&ctx->workers);
    *out = ctx;
    return APEX_OK;
fail:
    context_destroy(ctx);
    return st;
}

void context_destroy(apex_context *ctx) {
    if (!ctx) return;
    cpu_attn_ws_destroy(ctx->ws);
    free(ctx->batch_lens);
    free(ctx->batch_table);
    seq_table_destroy(&ctx->seqs);
    block_pool_destroy(&ctx->pools[APEX_TIER_HOST]);
    cpu_workers_destroy(&ctx->workers);
    free(ctx);
}

/* Address of row (seq, pos), kv head 0, of K (which = 0) or V (which = 1)
 * in layer; head h is h * block_tokens * head_dim elements further. */
static uint8_t *kv_row(const apex_context *ctx, int32_t layer, int32_t seq, int32_t pos,
                       int which) {
    const seq_entry *e = &ctx->seqs.seqs[seq];
    int32_t bt = ctx->cfg.block_tokens;
    int32_t b = seq_table_row(&ctx->seqs, seq)[pos / bt];
    size_t el = apex_dtype_size(ctx->cfg.kv_dtype);
    size_t panel = (size_t)bt * (size_t)ctx->cfg.head_dim;
    size_t off = ((size_t)which * (size_t)ctx->cfg.n_kv_heads * panel +
                  (size_t)(pos % bt) * (size_t)ctx->cfg.head_dim) * el;
    return block_pool_at(seq_table_pool(&ctx->seqs, e), layer, b) + off;
}

/* Converts count elements from (src, st) to (dst, dt). */
static void convert(void *dst, apex_dtype dt, const void *src, apex_dtype st, size_t count) {
    if (dt == st) {
        memcpy(dst, src, count * apex_dtype_size(dt));
        return;
    }
    for (size_t i = 0; i < count; i++) apex_store_f32(dst, dt, i, apex_load_f32(src, st, i));
}

void context_kv_write(apex_context *ctx, int32_t layer, int32_t n, const int32_t *seqs,
                      const int32_t *pos, const void *k, const void *v, apex_dtype src) {
    int32_t hk = ctx->cfg.n_kv_heads, d = ctx->cfg.head_dim;
    size_t row_el = (size_t)hk * (size_t)d;
    size_t sel = apex_dtype_size(src), kel = apex_dtype_size(ctx->cfg.kv_dtype);
    size_t head_stride = (size_t)ctx->cfg.block_tokens * (size_t)d * kel;
    for (int32_t i = 0; i < n; i++) {
        uint8_t *kd = kv_row(ctx, layer, seqs[i], pos[i], 0);
        uint8_t *vd = kv_row(ctx, layer, seqs[i], pos[i], 1);
        const uint8_t *ks = (const uint8_t *)k + (size_t)i * row_el * sel;
        const uint8_t *vs = (const uint8_t *)v + (size_t)i * row_el * sel;
        for (int32_t h = 0; h < hk; h++) {
            convert(kd + h * head_stride, ctx->cfg.kv_dtype, ks + (size_t)h * d * sel, src, d);
            convert(vd + h * head_stride, ctx->cfg.kv_dtype, vs + (size_t)h * d * sel, src, d);
        }
    }
}

void context_kv_read(const apex_context *ctx, int32_t layer, int32_t n, const int32_t *seqs,
                     const int32_t *pos, void *k, void *v, apex_dtype dst) {
    int32_t hk = ctx->cfg.n_kv_heads, d = ctx->cfg.head_dim;
    size_t row_el = (size_t)hk * (size_t)d;
    size_t del = apex_dtype_size(dst), kel = apex_dtype_size(ctx->cfg.kv_dtype);
    size_t head_stride = (size_t)ctx->cfg.block_tokens * (size_t)d * kel;
    for (int32_t i = 0; i < n; i++) {
        const uint8_t *ks = kv_row(ctx, layer, seqs[i], pos[i], 0);
        const uint8_t *vs = kv_row(ctx, layer, seqs[i], pos[i], 1);
        uint8_t *kd = (uint8_t *)k + (size_t)i * row_el * del;
        uint8_t *vd = (uint8_t *)v + (size_t)i * row_el * del;
        for (int32_t h = 0; h < hk; h++) {
            convert(kd + (size_t)h * d * del, dst, ks + h * head_stride, ctx->cfg.kv_dtype, d);
            convert(vd + (size_t)h * d * del, dst, vs + h * head_stride, ctx->cfg.kv_dtype, d);
        }
    }
}

apex_status context_attention(apex_context *ctx, int32_t layer, int32_t n,
                              const int32_t *seqs, const void *q, void *out,
                              const apex_attn_opts *opts) {
    const seq_table *t = &ctx->seqs;
    int32_t stride = t->max_blocks_per_seq;
    uint64_t tokens = 0;
    for (int32_t i = 0; i < n; i++) {
        const seq_entry *e = &t->seqs[seqs[i]];
        ctx->batch_lens[i] = e->len;
        memcpy(ctx->batch_table + (size_t)i * stride, seq_table_row(t, seqs[i]),
               (size_t)e->n_blocks * sizeof(int32_t));
        int32_t start = opts->window > 0 && e->len > opts->window ? e->len - opts->window : 0;
        tokens += (uint64_t)(e->len - start);
    }
    cpu_attn_batch b = {
        .n_seqs = n,
        .q = q,
        .q_dtype = opts->q_dtype,
        .out = out,
        .out_dtype = opts->out_dtype,
        .seq_lens = ctx->batch_lens,
        .block_table = ctx->batch_table,
        .block_table_stride = stride,
        .kv = block_pool_layer(&ctx->pools[APEX_TIER_HOST], layer),
        .block_bytes = ctx->block_bytes,
        .scale = opts->scale,
        .softcap = opts->softcap,
        .window = opts->window,
    };
    cpu_workers_pin(&ctx->workers);
    if (cpu_attn_decode(&ctx->geom, &b, ctx->ws, ctx->workers.n_threads) != 0)
        return apex_fail(APEX_ERR_INTERNAL, "CPU attention kernel failed");
    ctx->stats.seqs_attended_host += (uint64_t)n;
    ctx->stats.kv_tokens_attended += tokens;
    return APEX_OK;
}
