/*
 * apex_paged_api.c - the engine-managed block-table entry points
 * (apex_paged.h). Same rules as apex_api.c: every argument is checked
 * before anything changes; failures are counted in the context's stats.
 */
#include <math.h>
#include <string.h>
#include <time.h>

#include "apex/apex_paged.h"
#include "cpu_attn/dtype_convert.h"
#include "csrc/context.h"
#include "csrc/error.h"
#include "plugin/src/config.h"

static double paged_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static apex_status paged_counted(apex_context *ctx, apex_status st) {
    if (st != APEX_OK) ctx->stats.errors++;
    return st;
}

#define PAGED_CTX(ctx)                                                              \
    do {                                                                            \
        if (!(ctx)) return apex_fail(APEX_ERR_INVALID_ARG, "%s: context is NULL",   \
                                     __func__);                                     \
    } while (0)

static int64_t paged_total(const apex_context *ctx) {
    return (int64_t)ctx->pools[APEX_TIER_DEVICE].n_blocks + ctx->pools[APEX_TIER_HOST].n_blocks;
}

/* Claimed: no sequence exists, yet no block is free (only a claim does that). */
static int paged_claimed(const apex_context *ctx) {
    return ctx->seqs.n_active == 0 && ctx->pools[APEX_TIER_DEVICE].n_free == 0 &&
           ctx->pools[APEX_TIER_HOST].n_free == 0;
}

/* Resolves an engine block id to a host-tier block, or fails without side effects. */
static apex_status paged_host_block(const apex_context *ctx, const char *fn, int64_t id,
                                    int32_t *host_block) {
    int64_t nd = ctx->pools[APEX_TIER_DEVICE].n_blocks;
    if (id < 0 || id >= paged_total(ctx))
        return apex_fail(APEX_ERR_OUT_OF_RANGE, "%s: block id %lld outside [0, %lld)", fn,
                         (long long)id, (long long)paged_total(ctx));
    if (id < nd)
        return apex_fail(APEX_ERR_UNSUPPORTED,
                         "%s: block id %lld is on the device tier; this ABI version attends "
                         "host-tier blocks only", fn, (long long)id);
    *host_block = (int32_t)(id - nd);
    return APEX_OK;
}

APEX_API apex_status apex_paged_context_create(const apex_config *cfg, void *const *host_layer_kv,
                                               size_t bytes_per_layer, apex_context **out) {
    static const char fn[] = "apex_paged_context_create";
    if (!out) return apex_fail(APEX_ERR_INVALID_ARG, "%s: out is NULL", fn);
    *out = NULL;
    apex_status st = apex_config_validate(cfg);
    if (st) return st;
    if (!host_layer_kv)
        return apex_fail(APEX_ERR_INVALID_ARG, "%s: host_layer_kv is NULL", fn);
    size_t bb = apex_config_block_bytes(cfg);
    int64_t fit = (int64_t)(bytes_per_layer / bb);
    if (fit > INT32_MAX) fit = INT32_MAX;
    int64_t want = cfg->host_blocks > 0 ? cfg->host_blocks : fit;
    if (want < 1 || want > fit)
        return apex_fail(APEX_ERR_INVALID_ARG,
                         "%s: bytes_per_layer %zu holds %lld blocks of %zu bytes; %s", fn,
                         bytes_per_layer, (long long)fit, bb,
                         cfg->host_blocks > 0 ? "fewer than host_blocks asks for"
                                              : "a host tier needs at least one");
    size_t used = (size_t)want * bb; /* <= bytes_per_layer: no overflow */
    for (int32_t l = 0; l < cfg->n_layers; l++) {
        uintptr_t a = (uintptr_t)host_layer_kv[l];
        if (!a) return apex_fail(APEX_ERR_INVALID_ARG, "%s: host_layer_kv[%d] is NULL", fn, l);
        if (a % APEX_PAGED_HOST_KV_ALIGN)
            return apex_fail(APEX_ERR_INVALID_ARG,
                             "%s: host_layer_kv[%d] = %p is not a multiple of %d bytes", fn, l,
                             host_layer_kv[l], APEX_PAGED_HOST_KV_ALIGN);
        if (a > UINTPTR_MAX - used)
            return apex_fail(APEX_ERR_INVALID_ARG,
                             "%s: host_layer_kv[%d] + %zu bytes wraps the address space", fn, l,
                             used);
        for (int32_t m = 0; m < l; m++) {
            uintptr_t b = (uintptr_t)host_layer_kv[m];
            if (a < b + used && b < a + used)
                return apex_fail(APEX_ERR_INVALID_ARG,
                                 "%s: the %zu bytes of layers %d and %d overlap (%p, %p)", fn,
                                 used, m, l, host_layer_kv[m], host_layer_kv[l]);
        }
    }
    apex_config c = *cfg;
    c.host_blocks = want;
    st = context_create_on(&c, host_layer_kv, out);
    if (st == APEX_OK) apex_clear_error();
    return st;
}

APEX_API apex_status apex_paged_host_kv(const apex_context *ctx, uint64_t *own_bytes,
                                        uint64_t *external_bytes, int *pinned) {
    PAGED_CTX(ctx);
    const block_pool *hp = &ctx->pools[APEX_TIER_HOST];
    if (own_bytes) *own_bytes = hp->external ? 0 : hp->mem_bytes;
    if (external_bytes)
        *external_bytes = hp->external ? (uint64_t)hp->n_layers * block_pool_layer_bytes(hp) : 0;
    if (pinned) *pinned = ctx->host_pool_pinned > 0;
    return APEX_OK;
}

APEX_API apex_status apex_paged_claim(apex_context *ctx, int64_t *n_blocks) {
    PAGED_CTX(ctx);
    if (!paged_claimed(ctx)) {
        if (ctx->seqs.n_active != 0)
            return paged_counted(ctx, apex_fail(APEX_ERR_INVALID_ARG,
                                                "apex_paged_claim: %d sequences exist; claim "
                                                "needs a context without sequences",
                                                ctx->seqs.n_active));
        pipeline_sync(ctx);
        for (int t = 0; t < 2; t++)
            while (block_pool_alloc(&ctx->pools[t]) >= 0) {}
    }
    if (n_blocks) *n_blocks = paged_total(ctx);
    return APEX_OK;
}

APEX_API apex_status apex_paged_layer_kv(apex_context *ctx, int32_t layer, apex_tier tier,
                                         void **base, int64_t *n_blocks) {
    PAGED_CTX(ctx);
    if (layer < 0 || layer >= ctx->cfg.n_layers)
        return paged_counted(ctx, apex_fail(APEX_ERR_OUT_OF_RANGE,
                                            "apex_paged_layer_kv: layer %d outside [0, %d)",
                                            layer, ctx->cfg.n_layers));
    if (tier != APEX_TIER_DEVICE && tier != APEX_TIER_HOST)
        return paged_counted(ctx, apex_fail(APEX_ERR_INVALID_ARG,
                                            "apex_paged_layer_kv: tier %d is not DEVICE or HOST",
                                            (int)tier));
    if (!base)
        return paged_counted(ctx, apex_fail(APEX_ERR_INVALID_ARG,
                                            "apex_paged_layer_kv: base is NULL"));
    const block_pool *p = &ctx->pools[tier];
    *base = p->n_blocks ? (void *)block_pool_layer(p, layer) : NULL;
    if (n_blocks) *n_blocks = p->n_blocks;
    return APEX_OK;
}

/* Row i's element e of an array of dtype t with the given row stride. */
static const uint8_t *row_at(const void *p, apex_dtype t, int64_t stride, int64_t i) {
    return (const uint8_t *)p + (size_t)i * (size_t)stride * apex_dtype_size(t);
}

APEX_API apex_status apex_paged_kv_write(apex_context *ctx, int32_t layer, int64_t n,
                                         const int64_t *slots, const void *k,
                                         int64_t k_row_stride, const void *v,
                                         int64_t v_row_stride, apex_dtype src_dtype) {
    static const char fn[] = "apex_paged_kv_write";
    PAGED_CTX(ctx);
    double t0 = paged_now();
    int32_t bt = ctx->cfg.block_tokens;
    int64_t row_el = (int64_t)ctx->cfg.n_kv_heads * ctx->cfg.head_dim;
    if (!paged_claimed(ctx))
        return paged_counted(ctx, apex_fail(APEX_ERR_INVALID_ARG,
                                            "%s: call apex_paged_claim first", fn));
    if (layer < 0 || layer >= ctx->cfg.n_layers)
        return paged_counted(ctx, apex_fail(APEX_ERR_OUT_OF_RANGE, "%s: layer %d outside [0, %d)",
                                            fn, layer, ctx->cfg.n_layers));
    if (n < 0 || (n > 0 && (!slots || !k || !v)))
        return paged_counted(ctx, apex_fail(APEX_ERR_INVALID_ARG,
                                            "%s: n %lld < 0 or slots, k, v NULL", fn,
                                            (long long)n));
    if (!apex_dtype_valid(src_dtype))
        return paged_counted(ctx, apex_fail(APEX_ERR_INVALID_ARG, "%s: src_dtype %d is not an "
                                            "apex_dtype", fn, (int)src_dtype));
    if (k_row_stride < row_el || v_row_stride < row_el)
        return paged_counted(ctx, apex_fail(APEX_ERR_INVALID_ARG,
                                            "%s: row strides %lld, %lld below a row's %lld "
                                            "elements", fn, (long long)k_row_stride,
                                            (long long)v_row_stride, (long long)row_el));
    for (int64_t i = 0; i < n; i++) {
        if (slots[i] < 0) continue;
        int32_t hb = 0;
        apex_status st = paged_host_block(ctx, fn, slots[i] / bt, &hb);
        if (st) return paged_counted(ctx, st);
        const uint8_t *kr = row_at(k, src_dtype, k_row_stride, i);
        const uint8_t *vr = row_at(v, src_dtype, v_row_stride, i);
        for (int64_t e = 0; e < row_el; e++)
            if (!isfinite(apex_load_f32(kr, src_dtype, (size_t)e)) ||
                !isfinite(apex_load_f32(vr, src_dtype, (size_t)e)))
                return paged_counted(ctx, apex_fail(APEX_ERR_INVALID_ARG,
                                                    "%s: row %lld (slot %lld) has a NaN or Inf",
                                                    fn, (long long)i, (long long)slots[i]));
    }
    pipeline_sync(ctx);
    uint64_t written = 0;
    for (int64_t i = 0; i < n; i++) {
        if (slots[i] < 0) continue;
        int32_t hb = 0;
        paged_host_block(ctx, fn, slots[i] / bt, &hb); /* checked above */
        int64_t slot = (int64_t)hb * bt + slots[i] % bt;
        context_write_rows(ctx, APEX_TIER_HOST, layer, 1, &slot,
                           row_at(k, src_dtype, k_row_stride, i),
                           row_at(v, src_dtype, v_row_stride, i), src_dtype);
        written++;
    }
    ctx->stats.kv_rows_written += written;
    ctx->stats.kv_write_seconds += paged_now() - t0;
    return APEX_OK;
}

/* Checks the batch of apex_paged_attention and resolves opts into *o. */
static apex_status paged_check_attention(apex_context *ctx, int32_t layer, int32_t n_seqs,
                                         const int32_t *qsl, const int32_t *seq_lens,
                                         const int32_t *block_table, int32_t stride,
                                         const void *q, void *out, const apex_attn_opts *opts,
                                         apex_attn_opts *o) {
    static const char fn[] = "apex_paged_attention";
    *o = opts ? *opts : apex_attn_opts_default(ctx);
    if (!paged_claimed(ctx))
        return apex_fail(APEX_ERR_INVALID_ARG, "%s: call apex_paged_claim first", fn);
    if (layer < 0 || layer >= ctx->cfg.n_layers)
        return apex_fail(APEX_ERR_OUT_OF_RANGE, "%s: layer %d outside [0, %d)", fn, layer,
                         ctx->cfg.n_layers);
    if (n_seqs < 0 || !qsl || (n_seqs > 0 && (!seq_lens || !block_table)))
        return apex_fail(APEX_ERR_INVALID_ARG, "%s: n_seqs %d < 0 or a NULL array", fn, n_seqs);
    if (!apex_dtype_valid(o->q_dtype) || !apex_dtype_valid(o->out_dtype))
        return apex_fail(APEX_ERR_INVALID_ARG, "%s: q_dtype %d / out_dtype %d: not an apex_dtype",
                         fn, (int)o->q_dtype, (int)o->out_dtype);
    if (!isfinite(o->scale) || o->scale < 0 || !isfinite(o->softcap) || o->softcap < 0 ||
        o->window < 0)
        return apex_fail(APEX_ERR_INVALID_ARG,
                         "%s: scale %g, softcap %g and window %d must be finite and >= 0", fn,
                         o->scale, o->softcap, o->window);
    if (o->scale == 0) o->scale = 1.0f / sqrtf((float)ctx->cfg.head_dim);
    if (qsl[0] != 0)
        return apex_fail(APEX_ERR_INVALID_ARG, "%s: query_start_loc[0] is %d, not 0", fn, qsl[0]);
    int32_t bt = ctx->cfg.block_tokens;
    for (int32_t i = 0; i < n_seqs; i++) {
        int32_t ql = qsl[i + 1] - qsl[i], len = seq_lens[i];
        if (ql < 0)
            return apex_fail(APEX_ERR_INVALID_ARG, "%s: query_start_loc decreases at %d", fn, i);
        if (ql == 0) continue;
        if (len < ql || len > ctx->cfg.max_seq_len)
            return apex_fail(APEX_ERR_OUT_OF_RANGE,
                             "%s: sequence %d: length %d outside [q_len %d, max_seq_len %d]", fn,
                             i, len, ql, ctx->cfg.max_seq_len);
        int32_t nb = (len + bt - 1) / bt;
        if (stride < nb)
            return apex_fail(APEX_ERR_INVALID_ARG,
                             "%s: block_table_stride %d < the %d blocks of sequence %d", fn,
                             stride, nb, i);
        for (int32_t b = 0; b < nb; b++) {
            int32_t hb = 0;
            apex_status st = paged_host_block(ctx, fn, block_table[(size_t)i * stride + b], &hb);
            if (st) return st;
        }
    }
    int64_t rows = qsl[n_seqs];
    if (rows > 0 && (!q || !out))
        return apex_fail(APEX_ERR_INVALID_ARG, "%s: q and out must not be NULL", fn);
    size_t count = (size_t)rows * (size_t)ctx->cfg.n_q_heads * (size_t)ctx->cfg.head_dim;
    for (size_t e = 0; e < count; e++)
        if (!isfinite(apex_load_f32(q, o->q_dtype, e)))
            return apex_fail(APEX_ERR_INVALID_ARG, "%s: q row %lld has a NaN or Inf", fn,
                             (long long)(e / (count / (size_t)rows)));
    return APEX_OK;
}

/* Runs the rows gathered in ctx->batch_lens / batch_table. */
static apex_status paged_run(apex_context *ctx, int32_t layer, int32_t rows, int64_t row0,
                             const void *q, void *out, const apex_attn_opts *o) {
    size_t hd = (size_t)ctx->cfg.n_q_heads * (size_t)ctx->cfg.head_dim;
    cpu_attn_batch b = {
        .n_seqs = rows,
        .q = (const uint8_t *)q + (size_t)row0 * hd * apex_dtype_size(o->q_dtype),
        .q_dtype = o->q_dtype,
        .out = (uint8_t *)out + (size_t)row0 * hd * apex_dtype_size(o->out_dtype),
        .out_dtype = o->out_dtype,
        .seq_lens = ctx->batch_lens,
        .block_table = ctx->batch_table,
        .block_table_stride = ctx->seqs.max_blocks_per_seq,
        .kv = block_pool_layer(&ctx->pools[APEX_TIER_HOST], layer),
        .block_bytes = ctx->block_bytes,
        .scale = o->scale,
        .softcap = o->softcap,
        .window = o->window,
    };
    if (cpu_attn_decode(&ctx->geom, &b, ctx->ws, ctx->workers.n_threads) != 0)
        return apex_fail(APEX_ERR_INTERNAL, "apex_paged_attention: CPU attention kernel failed");
    ctx->stats.seqs_attended_host += (uint64_t)rows;
    return APEX_OK;
}

APEX_API apex_status apex_paged_attention(apex_context *ctx, int32_t layer, int32_t n_seqs,
                                          const int32_t *query_start_loc,
                                          const int32_t *seq_lens, const int32_t *block_table,
                                          int32_t block_table_stride, const void *q, void *out,
                                          const apex_attn_opts *opts) {
    PAGED_CTX(ctx);
    double t0 = paged_now();
    apex_attn_opts o;
    apex_status st = paged_check_attention(ctx, layer, n_seqs, query_start_loc, seq_lens,
                                           block_table, block_table_stride, q, out, opts, &o);
    if (st) return paged_counted(ctx, st);
    pipeline_sync(ctx);
    cpu_workers_pin(&ctx->workers);
    /* Every query row is a decode problem with its own causal length; rows
     * are packed max_batch at a time into the context's batch scratch, their
     * block ids translated to host-pool ids. */
    int32_t bt = ctx->cfg.block_tokens, cap = ctx->cfg.max_batch;
    int32_t tstride = ctx->seqs.max_blocks_per_seq;
    int64_t nd = ctx->pools[APEX_TIER_DEVICE].n_blocks;
    int32_t filled = 0;
    int64_t row0 = 0;
    for (int32_t i = 0; i < n_seqs; i++) {
        int32_t ql = query_start_loc[i + 1] - query_start_loc[i];
        const int32_t *src = block_table + (size_t)i * block_table_stride;
        for (int32_t j = 0; j < ql; j++) {
            int32_t len = seq_lens[i] - ql + j + 1;
            int32_t start = o.window > 0 && len > o.window ? len - o.window : 0;
            int32_t *dst = ctx->batch_table + (size_t)filled * tstride;
            for (int32_t b = 0; b < (len + bt - 1) / bt; b++)
                dst[b] = (int32_t)(src[b] - nd);
            ctx->batch_lens[filled++] = len;
            ctx->stats.kv_tokens_attended += (uint64_t)(len - start);
            if (filled == cap) {
                if ((st = paged_run(ctx, layer, filled, row0, q, out, &o)))
                    return paged_counted(ctx, st);
                row0 += filled;
                filled = 0;
            }
        }
    }
    if (filled && (st = paged_run(ctx, layer, filled, row0, q, out, &o)))
        return paged_counted(ctx, st);
    ctx->stats.attention_calls++;
    ctx->stats.attention_seconds += paged_now() - t0;
    return APEX_OK;
}
