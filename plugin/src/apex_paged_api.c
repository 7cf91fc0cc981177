/*
 * apex_paged_api.c - the engine-managed block-table entry points
 * (apex_paged.h). Same rules as apex_api.c: every argument is checked
 * before anything changes; failures are counted in the context's stats.
 * The work itself is the executor's (csrc/executor.c), as for apex.h.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "apex/apex_paged.h"
#include "cpu_attn/dtype_convert.h"
#include "csrc/context.h"
#include "csrc/error.h"
#include "csrc/config.h"
#include "csrc/trace.h"

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

/* The model check of the paged calls that use blocks: the engine claimed
 * them (apex_paged_claim), else APEX_ERR_INVALID_ARG saying what to do. */
static apex_status paged_model(const apex_context *ctx, const char *fn) {
    if (ctx->owner == CTX_OWNER_ENGINE) return APEX_OK;
    if (ctx->owner == CTX_OWNER_APEX)
        return apex_fail(APEX_ERR_INVALID_ARG,
                         "%s: this context's blocks belong to APEX's sequences (apex_seq_add): "
                         "%s is for contexts an engine claimed (apex_paged_claim)", fn, fn);
    return apex_fail(APEX_ERR_INVALID_ARG, "%s: call apex_paged_claim first", fn);
}

/* Resolves an engine block id to its tier and block there, or fails
 * without side effects. */
static apex_status paged_block(const apex_context *ctx, const char *fn, int64_t id,
                               apex_tier *tier, int32_t *block) {
    int64_t nd = ctx->pools[APEX_TIER_DEVICE].n_blocks;
    if (id < 0 || id >= paged_total(ctx))
        return apex_fail(APEX_ERR_OUT_OF_RANGE, "%s: block id %lld outside [0, %lld)", fn,
                         (long long)id, (long long)paged_total(ctx));
    *tier = id < nd ? APEX_TIER_DEVICE : APEX_TIER_HOST;
    *block = (int32_t)(id < nd ? id : id - nd);
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
    if (ctx->owner != CTX_OWNER_ENGINE) {
        if (ctx->owner == CTX_OWNER_APEX)
            return paged_counted(ctx, apex_fail(APEX_ERR_INVALID_ARG,
                                                "apex_paged_claim: %d sequences exist (this "
                                                "context's blocks belong to APEX's sequences); "
                                                "claim needs a context without sequences",
                                                ctx->seqs.n_active));
        pipeline_sync(ctx);
        for (int t = 0; t < 2; t++)
            while (block_pool_alloc(&ctx->pools[t]) >= 0) {}
        ctx->owner = CTX_OWNER_ENGINE;
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

/* 1 if the count elements of dtype t (a valid apex_dtype) at p are all
 * finite. By the bits (exponent all ones: Inf or NaN), without converting
 * each: a decode layer's q and rows are checked on every call. */
static int all_finite(const void *p, apex_dtype t, size_t count) {
    const uint8_t *b = p; /* memcpy loads: an engine's slice need not be aligned */
    const uint32_t m = t == APEX_DTYPE_F32 ? 0x7f800000u : t == APEX_DTYPE_F16 ? 0x7c00u : 0x7f80u;
    int bad = 0;
    for (size_t e = 0; e < count; e++) {
        uint32_t x;
        if (t == APEX_DTYPE_F32) {
            memcpy(&x, b + 4 * e, 4);
        } else {
            uint16_t h;
            memcpy(&h, b + 2 * e, 2);
            x = h;
        }
        bad |= (x & m) == m;
    }
    return !bad;
}

/* Row i's element e of an array of dtype t with the given row stride. */
static const uint8_t *row_at(const void *p, apex_dtype t, int64_t stride, int64_t i) {
    return (const uint8_t *)p + (size_t)i * (size_t)stride * apex_dtype_size(t);
}

/* Checks apex_paged_kv_write's rows (fn names the caller in messages);
 * *written gets the rows not skipped. */
static apex_status paged_check_rows(apex_context *ctx, const char *fn, int32_t layer, int64_t n,
                                    const int64_t *slots, const void *k, int64_t k_row_stride,
                                    const void *v, int64_t v_row_stride, apex_dtype src_dtype,
                                    uint64_t *written) {
    int32_t bt = ctx->cfg.block_tokens;
    int64_t row_el = (int64_t)ctx->cfg.n_kv_heads * ctx->cfg.head_dim;
    apex_status model = paged_model(ctx, fn);
    if (model) return model;
    if (layer < 0 || layer >= ctx->cfg.n_layers)
        return apex_fail(APEX_ERR_OUT_OF_RANGE, "%s: layer %d outside [0, %d)", fn, layer,
                         ctx->cfg.n_layers);
    if (n < 0 || (n > 0 && (!slots || !k || !v)))
        return apex_fail(APEX_ERR_INVALID_ARG, "%s: n %lld < 0 or slots, k, v NULL", fn,
                         (long long)n);
    if (!apex_dtype_valid(src_dtype))
        return apex_fail(APEX_ERR_INVALID_ARG, "%s: src_dtype %d is not an apex_dtype", fn,
                         (int)src_dtype);
    if (k_row_stride < row_el || v_row_stride < row_el)
        return apex_fail(APEX_ERR_INVALID_ARG,
                         "%s: row strides %lld, %lld below a row's %lld elements", fn,
                         (long long)k_row_stride, (long long)v_row_stride, (long long)row_el);
    for (int64_t i = 0; i < n; i++) {
        if (slots[i] < 0) continue;
        apex_tier tier = APEX_TIER_HOST;
        int32_t blk = 0;
        apex_status st = paged_block(ctx, fn, slots[i] / bt, &tier, &blk);
        if (st) return st;
        const uint8_t *kr = row_at(k, src_dtype, k_row_stride, i);
        const uint8_t *vr = row_at(v, src_dtype, v_row_stride, i);
        if (!all_finite(kr, src_dtype, (size_t)row_el) || !all_finite(vr, src_dtype, (size_t)row_el))
            return apex_fail(APEX_ERR_INVALID_ARG, "%s: row %lld (slot %lld) has a NaN or Inf", fn,
                             (long long)i, (long long)slots[i]);
        (*written)++;
    }
    return APEX_OK;
}

/* The paged calls other than submit finish a submission first
 * (pipeline_sync); a second submit is refused. */
static apex_status paged_idle(const apex_context *ctx, const char *fn) {
    if (!exec_in_flight(ctx)) return APEX_OK;
    return apex_fail(APEX_ERR_INVALID_ARG,
                     "%s: a submission is in flight: call apex_paged_wait first", fn);
}

APEX_API apex_status apex_paged_kv_write(apex_context *ctx, int32_t layer, int64_t n,
                                         const int64_t *slots, const void *k,
                                         int64_t k_row_stride, const void *v,
                                         int64_t v_row_stride, apex_dtype src_dtype) {
    static const char fn[] = "apex_paged_kv_write";
    PAGED_CTX(ctx);
    TRACE_SCOPE(APEX_TRACE_CALL, "apex_paged_kv_write", layer);
    double t0 = paged_now();
    uint64_t written = 0;
    apex_status st = paged_check_rows(ctx, fn, layer, n, slots, k, k_row_stride, v, v_row_stride,
                                      src_dtype, &written);
    if (st) return paged_counted(ctx, st);
    exec_rows r = {.layer = layer, .n = n, .slots = slots, .k = k, .k_stride = k_row_stride,
                   .v = v, .v_stride = v_row_stride, .dtype = src_dtype};
    st = exec_kv_write(ctx, &r);
    if (st) return paged_counted(ctx, st);
    ctx->stats.kv_rows_written += written;
    ctx->stats.kv_write_seconds += paged_now() - t0;
    return APEX_OK;
}

/* Checks the batch of apex_paged_attention and resolves opts into *o. */
static apex_status paged_check_attention(apex_context *ctx, const char *fn, int32_t layer,
                                         int32_t n_seqs, const int32_t *qsl,
                                         const int32_t *seq_lens, const int32_t *block_table,
                                         int32_t stride, const void *q, void *out,
                                         const apex_attn_opts *opts, apex_attn_opts *o) {
    apex_status st = paged_model(ctx, fn);
    if (st) return st;
    if (layer < 0 || layer >= ctx->cfg.n_layers)
        return apex_fail(APEX_ERR_OUT_OF_RANGE, "%s: layer %d outside [0, %d)", fn, layer,
                         ctx->cfg.n_layers);
    if (n_seqs < 0 || !qsl || (n_seqs > 0 && (!seq_lens || !block_table)))
        return apex_fail(APEX_ERR_INVALID_ARG, "%s: n_seqs %d < 0 or a NULL array", fn, n_seqs);
    if ((st = apex_attn_opts_resolve(&ctx->cfg, fn, opts, o))) return st;
    if (qsl[0] != 0)
        return apex_fail(APEX_ERR_INVALID_ARG, "%s: query_start_loc[0] is %d, not 0", fn, qsl[0]);
    int32_t bt = ctx->cfg.block_tokens;
    for (int32_t i = 0; i < n_seqs; i++) {
        /* 64-bit: arbitrary entries must not overflow before they are checked. */
        int64_t ql = (int64_t)qsl[i + 1] - qsl[i];
        int32_t len = seq_lens[i];
        if (ql < 0)
            return apex_fail(APEX_ERR_INVALID_ARG, "%s: query_start_loc decreases at %d", fn, i);
        if (ql == 0) continue;
        if (len < ql || len > ctx->cfg.max_seq_len)
            return apex_fail(APEX_ERR_OUT_OF_RANGE,
                             "%s: sequence %d: length %d outside [q_len %lld, max_seq_len %d]", fn,
                             i, len, (long long)ql, ctx->cfg.max_seq_len);
        int32_t nb = (len + bt - 1) / bt;
        if (stride < nb)
            return apex_fail(APEX_ERR_INVALID_ARG,
                             "%s: block_table_stride %d < the %d blocks of sequence %d", fn,
                             stride, nb, i);
        for (int32_t b = 0; b < nb; b++) {
            apex_tier tier = APEX_TIER_HOST;
            int32_t blk = 0;
            st = paged_block(ctx, fn, block_table[(size_t)i * stride + b], &tier, &blk);
            if (st) return st;
        }
    }
    int64_t rows = qsl[n_seqs];
    if (rows > 0 && (!q || !out))
        return apex_fail(APEX_ERR_INVALID_ARG, "%s: q and out must not be NULL", fn);
    size_t per_row = (size_t)ctx->cfg.n_q_heads * (size_t)ctx->cfg.head_dim;
    for (int64_t r = 0; r < rows; r++)
        if (!all_finite((const uint8_t *)q + (size_t)r * per_row * apex_dtype_size(o->q_dtype),
                        o->q_dtype, per_row))
            return apex_fail(APEX_ERR_INVALID_ARG, "%s: q row %lld has a NaN or Inf", fn,
                             (long long)r);
    return APEX_OK;
}

APEX_API apex_status apex_paged_attention(apex_context *ctx, int32_t layer, int32_t n_seqs,
                                          const int32_t *query_start_loc,
                                          const int32_t *seq_lens, const int32_t *block_table,
                                          int32_t block_table_stride, const void *q, void *out,
                                          const apex_attn_opts *opts) {
    PAGED_CTX(ctx);
    TRACE_SCOPE(APEX_TRACE_CALL_ATTN, "apex_paged_attention", layer);
    double t0 = paged_now();
    apex_attn_opts o;
    apex_status st = paged_check_attention(ctx, "apex_paged_attention", layer, n_seqs,
                                           query_start_loc, seq_lens,
                                           block_table, block_table_stride, q, out, opts, &o);
    if (st) return paged_counted(ctx, st);
    if (n_seqs == 0) return APEX_OK; /* an empty batch (apex.h): nothing to do */
    /* Every query row is a decode problem with its own causal length; the
     * executor runs each sequence where its blocks are. */
    exec_batch b = {
        .layer = layer, .n_seqs = n_seqs, .qsl = query_start_loc, .seq_lens = seq_lens,
        .table = block_table, .stride = block_table_stride, .q = q, .out = out, .o = o,
    };
    if ((st = exec_attention(ctx, &b, NULL))) return paged_counted(ctx, st);
    ctx->stats.attention_calls++;
    ctx->stats.attention_seconds += paged_now() - t0;
    context_metrics_tick(ctx, 0);
    return APEX_OK;
}

/* What apex_paged_submit cannot take (checked after the arguments): no
 * device, a row or sequence on the host tier, more than one staging slot. */
static apex_status paged_check_submit(const apex_context *ctx, const apex_paged_step *sp,
                                      uint64_t written) {
    static const char fn[] = "apex_paged_submit";
    if (!ctx->dev)
        return apex_fail(APEX_ERR_UNSUPPORTED, "%s: the context has no device", fn);
    int32_t bt = ctx->cfg.block_tokens, mb = ctx->cfg.max_batch;
    int64_t nd = ctx->pools[APEX_TIER_DEVICE].n_blocks;
    if (written > (uint64_t)mb)
        return apex_fail(APEX_ERR_UNSUPPORTED, "%s: %llu rows to store, at most max_batch %d "
                         "(apex_paged_kv_write takes more)", fn, (unsigned long long)written, mb);
    for (int64_t i = 0; i < sp->n_rows; i++)
        if (sp->slots[i] >= 0 && sp->slots[i] / bt >= nd)
            return apex_fail(APEX_ERR_UNSUPPORTED, "%s: row %lld's slot %lld is on the host tier "
                             "(only device-tier rows: apex_paged_kv_write stores it)", fn,
                             (long long)i, (long long)sp->slots[i]);
    int64_t rows = 0;
    for (int32_t i = 0; i < sp->n_seqs; i++) {
        int32_t ql = sp->query_start_loc[i + 1] - sp->query_start_loc[i];
        if (ql == 0) continue;
        rows += ql;
        int32_t nb = (sp->seq_lens[i] + bt - 1) / bt;
        const int32_t *ids = sp->block_table + (size_t)i * sp->block_table_stride;
        for (int32_t b = 0; b < nb; b++)
            if (ids[b] >= nd)
                return apex_fail(APEX_ERR_UNSUPPORTED, "%s: sequence %d has host-tier block %d "
                                 "(only device-tier sequences: the caller attends it on the "
                                 "CPU or with apex_paged_attention)", fn, i, ids[b]);
    }
    if (rows > mb)
        return apex_fail(APEX_ERR_UNSUPPORTED, "%s: %lld query rows, at most max_batch %d", fn,
                         (long long)rows, mb);
    return APEX_OK;
}

APEX_API apex_status apex_paged_submit(apex_context *ctx, const apex_paged_step *sp) {
    static const char fn[] = "apex_paged_submit";
    PAGED_CTX(ctx);
    TRACE_SCOPE(APEX_TRACE_CALL, "apex_paged_submit", sp ? sp->layer : -1);
    if (!sp) return paged_counted(ctx, apex_fail(APEX_ERR_INVALID_ARG, "%s: step is NULL", fn));
    uint64_t written = 0;
    apex_attn_opts o;
    apex_status st = paged_idle(ctx, fn);
    if (!st && !(st = paged_model(ctx, fn)) && (sp->layer < 0 || sp->layer >= ctx->cfg.n_layers))
        st = apex_fail(APEX_ERR_OUT_OF_RANGE, "%s: layer %d outside [0, %d)", fn, sp->layer,
                       ctx->cfg.n_layers);
    /* An empty half (no rows; no sequences and no query_start_loc) is not
     * described, so its pointers are not looked at. */
    if (!st && sp->n_rows != 0)
        st = paged_check_rows(ctx, fn, sp->layer, sp->n_rows, sp->slots, sp->k, sp->k_row_stride,
                              sp->v, sp->v_row_stride, sp->kv_src_dtype, &written);
    if (!st)
        st = sp->n_seqs != 0 || sp->query_start_loc
                 ? paged_check_attention(ctx, fn, sp->layer, sp->n_seqs, sp->query_start_loc,
                                         sp->seq_lens, sp->block_table, sp->block_table_stride,
                                         sp->q, sp->out, sp->opts, &o)
                 : apex_attn_opts_resolve(&ctx->cfg, fn, sp->opts, &o);
    if (!st) st = paged_check_submit(ctx, sp, written);
    if (st) return paged_counted(ctx, st);
    exec_rows r = {.layer = sp->layer, .n = sp->n_rows, .slots = sp->slots, .k = sp->k,
                   .k_stride = sp->k_row_stride, .v = sp->v, .v_stride = sp->v_row_stride,
                   .dtype = sp->kv_src_dtype};
    exec_batch b = {
        .layer = sp->layer, .n_seqs = sp->query_start_loc ? sp->n_seqs : 0,
        .qsl = sp->query_start_loc,
        .seq_lens = sp->seq_lens, .table = sp->block_table, .stride = sp->block_table_stride,
        .q = sp->q, .out = sp->out, .o = o,
    };
    if ((st = exec_submit(ctx, &r, &b))) return paged_counted(ctx, st);
    if (sp->n_seqs > 0) ctx->stats.attention_calls++;
    return APEX_OK;
}

APEX_API apex_status apex_paged_wait(apex_context *ctx) {
    PAGED_CTX(ctx);
    if (!exec_in_flight(ctx))
        return paged_counted(ctx, apex_fail(APEX_ERR_INVALID_ARG,
                                            "apex_paged_wait: no submission in flight"));
    TRACE_SCOPE(APEX_TRACE_WAIT, "apex_paged_wait", ctx->pipe.sub_layer);
    apex_status st = exec_wait(ctx);
    if (st == APEX_OK) context_metrics_tick(ctx, 0); /* as apex_paged_attention does */
    return paged_counted(ctx, st);
}
