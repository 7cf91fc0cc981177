/*
 * apex_paged_api.c - the engine-managed block-table entry points
 * (apex_paged.h). Same rules as apex_api.c: every argument is checked
 * before anything changes; failures are counted in the context's stats.
 */
#include <math.h>
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

/* Claimed: apex_paged_claim ran (apex_seq_add refuses from then on). */
static int paged_claimed(const apex_context *ctx) { return ctx->claimed; }

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

/* The staging buffers of the synchronous device-tier paths: the pipeline's
 * first slot (pinned and device halves, max_batch rows each). Every caller
 * has run pipeline_sync and paged_stage_wait first and syncs the context's
 * own stream before returning, so no other work uses the slot meanwhile. */
static stage_slot *paged_stage(apex_context *ctx) { return &ctx->pipe.slots[0]; }

/* Waits for the slot's last asynchronous use (pipeline_sync waits for the
 * latest one, which on another engine stream need not imply this one). */
static apex_status paged_stage_wait(apex_context *ctx) {
    stage_slot *sl = paged_stage(ctx);
    return sl->used ? ctx->dev->iface->event_sync(ctx->dev, sl->done) : APEX_OK;
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
        ctx->claimed = 1;
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

/* Stores one staged chunk of device-tier rows (h_slots, h_k, h_v of the
 * staging slot) with the device's kv_append kernel, and waits for it. */
static apex_status paged_append_chunk(apex_context *ctx, int32_t layer, int32_t m,
                                      apex_dtype src) {
    apex_device *dev = ctx->dev;
    const device_iface *f = dev->iface;
    device_stream *s = ctx->pipe.own_stream;
    stage_slot *sl = paged_stage(ctx);
    size_t row = (size_t)ctx->cfg.n_kv_heads * ctx->cfg.head_dim * apex_dtype_size(src);
    apex_cuda_kv_append a = {
        .n_rows = m, .n_kv_heads = ctx->cfg.n_kv_heads, .head_dim = ctx->cfg.head_dim,
        .block_tokens = ctx->cfg.block_tokens, .k = sl->d_k, .v = sl->d_v, .src_dtype = src,
        .slots = sl->d_slots, .kv = block_pool_layer(&ctx->pools[APEX_TIER_DEVICE], layer),
        .block_bytes = ctx->block_bytes, .kv_dtype = ctx->cfg.kv_dtype,
    };
    apex_status st;
    if ((st = f->memcpy_async(dev, sl->d_slots, sl->h_slots, (size_t)m * 8, s)) ||
        (st = f->memcpy_async(dev, sl->d_k, sl->h_k, (size_t)m * row, s)) ||
        (st = f->memcpy_async(dev, sl->d_v, sl->h_v, (size_t)m * row, s)) ||
        (st = f->kv_append(dev, &a, s)))
        return st;
    return f->stream_sync(dev, s);
}

/* The device-tier rows of a validated kv_write: packed max_batch at a time
 * into the staging slot (slots are engine slots: block id < device_blocks
 * is the device block itself), copied up and stored by kv_append. */
static apex_status paged_write_device(apex_context *ctx, int32_t layer, int64_t n,
                                      const int64_t *slots, const void *k, int64_t ks,
                                      const void *v, int64_t vs, apex_dtype src) {
    stage_slot *sl = paged_stage(ctx);
    int64_t dev_slots = (int64_t)ctx->pools[APEX_TIER_DEVICE].n_blocks * ctx->cfg.block_tokens;
    size_t row = (size_t)ctx->cfg.n_kv_heads * ctx->cfg.head_dim * apex_dtype_size(src);
    int32_t m = 0;
    apex_status st = paged_stage_wait(ctx);
    if (st) return st;
    for (int64_t i = 0; i < n; i++) {
        if (slots[i] < 0 || slots[i] >= dev_slots) continue;
        memcpy((uint8_t *)sl->h_k + (size_t)m * row, row_at(k, src, ks, i), row);
        memcpy((uint8_t *)sl->h_v + (size_t)m * row, row_at(v, src, vs, i), row);
        sl->h_slots[m++] = slots[i];
        if (m == ctx->cfg.max_batch) {
            if ((st = paged_append_chunk(ctx, layer, m, src))) return st;
            m = 0;
        }
    }
    return m ? paged_append_chunk(ctx, layer, m, src) : APEX_OK;
}

APEX_API apex_status apex_paged_kv_write(apex_context *ctx, int32_t layer, int64_t n,
                                         const int64_t *slots, const void *k,
                                         int64_t k_row_stride, const void *v,
                                         int64_t v_row_stride, apex_dtype src_dtype) {
    static const char fn[] = "apex_paged_kv_write";
    PAGED_CTX(ctx);
    TRACE_SCOPE(APEX_TRACE_CALL, "apex_paged_kv_write", layer);
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
    uint64_t written = 0, on_device = 0;
    for (int64_t i = 0; i < n; i++) {
        if (slots[i] < 0) continue;
        apex_tier tier = APEX_TIER_HOST;
        int32_t blk = 0;
        apex_status st = paged_block(ctx, fn, slots[i] / bt, &tier, &blk);
        if (st) return paged_counted(ctx, st);
        const uint8_t *kr = row_at(k, src_dtype, k_row_stride, i);
        const uint8_t *vr = row_at(v, src_dtype, v_row_stride, i);
        for (int64_t e = 0; e < row_el; e++)
            if (!isfinite(apex_load_f32(kr, src_dtype, (size_t)e)) ||
                !isfinite(apex_load_f32(vr, src_dtype, (size_t)e)))
                return paged_counted(ctx, apex_fail(APEX_ERR_INVALID_ARG,
                                                    "%s: row %lld (slot %lld) has a NaN or Inf",
                                                    fn, (long long)i, (long long)slots[i]));
        written++;
        on_device += tier == APEX_TIER_DEVICE;
    }
    pipeline_sync(ctx);
    /* Device rows first: a device error then leaves the host tier as it was. */
    if (on_device) {
        TRACE_SCOPE(APEX_TRACE_COPY, "device rows", layer);
        apex_status st = paged_write_device(ctx, layer, n, slots, k, k_row_stride, v,
                                            v_row_stride, src_dtype);
        if (st) return paged_counted(ctx, st);
    }
    TRACE_BEGIN(APEX_TRACE_COPY, "host rows", layer);
    for (int64_t i = 0; written > on_device && i < n; i++) {
        if (slots[i] < 0) continue;
        apex_tier tier = APEX_TIER_HOST;
        int32_t blk = 0;
        paged_block(ctx, fn, slots[i] / bt, &tier, &blk); /* checked above */
        if (tier == APEX_TIER_DEVICE) continue;
        int64_t slot = (int64_t)blk * bt + slots[i] % bt;
        context_write_rows(ctx, APEX_TIER_HOST, layer, 1, &slot,
                           row_at(k, src_dtype, k_row_stride, i),
                           row_at(v, src_dtype, v_row_stride, i), src_dtype);
    }
    TRACE_END();
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
    if (!paged_claimed(ctx))
        return apex_fail(APEX_ERR_INVALID_ARG, "%s: call apex_paged_claim first", fn);
    if (layer < 0 || layer >= ctx->cfg.n_layers)
        return apex_fail(APEX_ERR_OUT_OF_RANGE, "%s: layer %d outside [0, %d)", fn, layer,
                         ctx->cfg.n_layers);
    if (n_seqs < 0 || !qsl || (n_seqs > 0 && (!seq_lens || !block_table)))
        return apex_fail(APEX_ERR_INVALID_ARG, "%s: n_seqs %d < 0 or a NULL array", fn, n_seqs);
    apex_status st = apex_attn_opts_resolve(&ctx->cfg, fn, opts, o);
    if (st) return st;
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
    size_t count = (size_t)rows * (size_t)ctx->cfg.n_q_heads * (size_t)ctx->cfg.head_dim;
    for (size_t e = 0; e < count; e++)
        if (!isfinite(apex_load_f32(q, o->q_dtype, e)))
            return apex_fail(APEX_ERR_INVALID_ARG, "%s: q row %lld has a NaN or Inf", fn,
                             (long long)(e / (count / (size_t)rows)));
    return APEX_OK;
}

/* Row j of a sequence with q_len ql and length len attends this many
 * positions (causal), counting those its window keeps in *tokens. */
static int32_t paged_row_len(int32_t len, int32_t ql, int32_t j, const apex_attn_opts *o,
                             uint64_t *tokens) {
    int32_t n = len - ql + j + 1;
    int32_t start = o->window > 0 && n > o->window ? n - o->window : 0;
    *tokens += (uint64_t)(n - start);
    return n;
}

/* Which tiers a sequence's blocks are on: PAGED_HOST, PAGED_DEVICE or both. */
enum { PAGED_HOST = 1, PAGED_DEVICE = 2, PAGED_MIXED = 3 };
static int paged_seq_tiers(const apex_context *ctx, const int32_t *ids, int32_t nb) {
    int64_t nd = ctx->pools[APEX_TIER_DEVICE].n_blocks;
    int m = 0;
    if (nd == 0) return PAGED_HOST;
    for (int32_t b = 0; b < nb; b++) m |= ids[b] < nd ? PAGED_DEVICE : PAGED_HOST;
    return m;
}

/* A CPU batch being packed into ctx->batch_lens / batch_table: query rows
 * [row0, row0 + filled) of q and out, their blocks in the slab kv. */
typedef struct paged_cpu {
    const uint8_t *kv;
    int64_t row0;
    int32_t filled;
} paged_cpu;

/* Runs the packed CPU batch, if any. */
static apex_status paged_cpu_flush(apex_context *ctx, paged_cpu *p, const void *q, void *out,
                                   const apex_attn_opts *o) {
    if (!p->filled) return APEX_OK;
    TRACE_SCOPE(APEX_TRACE_CPU_ATTN, "cpu_attn_decode", -1);
    size_t hd = (size_t)ctx->cfg.n_q_heads * (size_t)ctx->cfg.head_dim;
    cpu_attn_batch b = {
        .n_seqs = p->filled,
        .q = (const uint8_t *)q + (size_t)p->row0 * hd * apex_dtype_size(o->q_dtype),
        .q_dtype = o->q_dtype,
        .out = (uint8_t *)out + (size_t)p->row0 * hd * apex_dtype_size(o->out_dtype),
        .out_dtype = o->out_dtype,
        .seq_lens = ctx->batch_lens,
        .block_table = ctx->batch_table,
        .block_table_stride = ctx->seqs.max_blocks_per_seq,
        .kv = p->kv,
        .block_bytes = ctx->block_bytes,
        .scale = o->scale,
        .softcap = o->softcap,
        .window = o->window,
    };
    if (cpu_attn_decode(&ctx->geom, &b, ctx->ws, ctx->workers.n_threads) != 0)
        return apex_fail(APEX_ERR_INTERNAL, "apex_paged_attention: CPU attention kernel failed");
    ctx->stats.seqs_attended_host += (uint64_t)p->filled;
    p->row0 += p->filled;
    p->filled = 0;
    return APEX_OK;
}

/* Packs the ql query rows of one sequence (rows row0.. of q) into the CPU
 * batch over slab kv, block b of its table being ids[b] - off there; runs
 * the batch when it is full, or first when these rows do not continue it. */
static apex_status paged_cpu_seq(apex_context *ctx, paged_cpu *p, const uint8_t *kv,
                                 int64_t row0, int32_t ql, int32_t len, const int32_t *ids,
                                 int64_t off, const void *q, void *out, const apex_attn_opts *o) {
    apex_status st;
    if (p->filled && (p->kv != kv || p->row0 + p->filled != row0) &&
        (st = paged_cpu_flush(ctx, p, q, out, o)))
        return st;
    if (!p->filled) {
        p->kv = kv;
        p->row0 = row0;
    }
    int32_t bt = ctx->cfg.block_tokens, tstride = ctx->seqs.max_blocks_per_seq;
    for (int32_t j = 0; j < ql; j++) {
        int32_t n = paged_row_len(len, ql, j, o, &ctx->stats.kv_tokens_attended);
        int32_t *dst = ctx->batch_table + (size_t)p->filled * tstride;
        for (int32_t b = 0; b < (n + bt - 1) / bt; b++) dst[b] = (int32_t)(ids[b] - off);
        ctx->batch_lens[p->filled++] = n;
        if (p->filled == ctx->cfg.max_batch && (st = paged_cpu_flush(ctx, p, q, out, o)))
            return st;
    }
    return APEX_OK;
}

/* A device batch being packed into the staging slot: row r is query row
 * h_idx_g[r], its length h_lens[r], its table h_table row r, its q h_q row
 * r. launched: the batch is on the context's own stream, not yet waited for. */
typedef struct paged_dev {
    int32_t filled, max_len, launched;
    int32_t layer, timed; /* timed: the kernel is between the timing events */
} paged_dev;

/* The tracer's GPU span of the device batch: timing events around the
 * kernel when tracing is on and the device has them (CUDA). */
static int paged_timer(apex_context *ctx) {
    pipeline *pl = &ctx->pipe;
    const device_iface *f = ctx->dev->iface;
    if (!trace_on() || !f->timer_create || !f->event_elapsed_ms) return 0;
    if (!pl->tm_start && f->timer_create(ctx->dev, &pl->tm_start)) return 0;
    if (!pl->tm_end && f->timer_create(ctx->dev, &pl->tm_end)) return 0;
    return 1;
}

/* Enqueues the packed device batch on the context's own stream: q, lengths
 * and tables up, paged_decode, outputs down into the staging slot. */
static apex_status paged_dev_launch(apex_context *ctx, int32_t layer, paged_dev *p,
                                    const apex_attn_opts *o) {
    if (!p->filled) return APEX_OK;
    apex_device *dev = ctx->dev;
    const device_iface *f = dev->iface;
    pipeline *pl = &ctx->pipe;
    device_stream *s = pl->own_stream;
    stage_slot *sl = paged_stage(ctx);
    int32_t m = p->filled, mb = ctx->seqs.max_blocks_per_seq;
    size_t hd = (size_t)ctx->cfg.n_q_heads * ctx->cfg.head_dim;
    size_t qrow = hd * apex_dtype_size(o->q_dtype), orow = hd * apex_dtype_size(o->out_dtype);
    apex_cuda_decode a = {
        .n_seqs = m, .n_q_heads = ctx->cfg.n_q_heads, .n_kv_heads = ctx->cfg.n_kv_heads,
        .head_dim = ctx->cfg.head_dim, .block_tokens = ctx->cfg.block_tokens,
        .kv_dtype = ctx->cfg.kv_dtype, .q_dtype = o->q_dtype, .out_dtype = o->out_dtype,
        .q = sl->d_q_g, .out = sl->d_out_g, .seq_lens = sl->d_lens, .block_table = sl->d_table,
        .block_table_stride = mb,
        .kv = block_pool_layer(&ctx->pools[APEX_TIER_DEVICE], layer),
        .block_bytes = ctx->block_bytes, .scale = o->scale, .softcap = o->softcap,
        .window = o->window, .max_seq_len = p->max_len, .workspace = pl->decode_ws,
        .workspace_bytes = pl->decode_ws_bytes,
    };
    apex_status st;
    p->layer = layer;
    p->timed = paged_timer(ctx);
    if ((st = f->memcpy_async(dev, sl->d_lens, sl->h_lens, (size_t)m * 4, s)) ||
        (st = f->memcpy_async(dev, sl->d_table, sl->h_table, (size_t)m * mb * 4, s)) ||
        (st = f->memcpy_async(dev, sl->d_q_g, sl->h_q, (size_t)m * qrow, s)) ||
        (p->timed && (st = f->event_record(dev, pl->tm_start, s))) ||
        (st = f->paged_decode(dev, &a, s)) ||
        (p->timed && (st = f->event_record(dev, pl->tm_end, s))) ||
        (st = f->memcpy_async(dev, sl->h_out, sl->d_out_g, (size_t)m * orow, s)))
        return st;
    p->launched = 1;
    return APEX_OK;
}

/* Waits for a launched device batch and scatters its outputs into out. */
static apex_status paged_dev_finish(apex_context *ctx, paged_dev *p, void *out,
                                    const apex_attn_opts *o) {
    if (!p->launched) return APEX_OK;
    TRACE_SCOPE(APEX_TRACE_WAIT, "device batch", -1);
    stage_slot *sl = paged_stage(ctx);
    size_t orow = (size_t)ctx->cfg.n_q_heads * ctx->cfg.head_dim * apex_dtype_size(o->out_dtype);
    apex_status st = ctx->dev->iface->stream_sync(ctx->dev, ctx->pipe.own_stream);
    if (st) return st;
    float ms = 0;
    if (p->timed &&
        ctx->dev->iface->event_elapsed_ms(ctx->dev, ctx->pipe.tm_start, ctx->pipe.tm_end, &ms) == APEX_OK) {
        /* Device time from the events; placed on the timeline to end when
         * the host saw the batch finish (the output copy follows it). */
        const uint64_t dur = (uint64_t)((double)ms * 1e6), end = trace_now_ns();
        trace_device_span_("GPU (CUDA events)", "paged_decode", p->layer, end > dur ? end - dur : 0, dur);
    }
    for (int32_t r = 0; r < p->filled; r++)
        memcpy((uint8_t *)out + (size_t)sl->h_idx_g[r] * orow, (uint8_t *)sl->h_out + r * orow,
               orow);
    ctx->stats.seqs_attended_device += (uint64_t)p->filled;
    *p = (paged_dev){0};
    return APEX_OK;
}

/* Packs the ql query rows of a device-tier sequence (rows row0.. of q, its
 * engine ids being device blocks) into the device batch; runs it when full. */
static apex_status paged_dev_seq(apex_context *ctx, int32_t layer, paged_dev *p, int64_t row0,
                                 int32_t ql, int32_t len, const int32_t *ids, const void *q,
                                 void *out, const apex_attn_opts *o) {
    stage_slot *sl = paged_stage(ctx);
    int32_t bt = ctx->cfg.block_tokens, mb = ctx->seqs.max_blocks_per_seq;
    size_t qrow = (size_t)ctx->cfg.n_q_heads * ctx->cfg.head_dim * apex_dtype_size(o->q_dtype);
    apex_status st;
    for (int32_t j = 0; j < ql; j++) {
        if (!p->filled && (st = paged_stage_wait(ctx))) return st;
        int32_t n = paged_row_len(len, ql, j, o, &ctx->stats.kv_tokens_attended);
        int32_t r = p->filled++;
        sl->h_idx_g[r] = (int32_t)(row0 + j);
        sl->h_lens[r] = n;
        memcpy(sl->h_table + (size_t)r * mb, ids, (size_t)((n + bt - 1) / bt) * 4);
        memcpy((uint8_t *)sl->h_q + (size_t)r * qrow,
               (const uint8_t *)q + (size_t)(row0 + j) * qrow, qrow);
        if (n > p->max_len) p->max_len = n;
        if (p->filled == ctx->cfg.max_batch &&
            ((st = paged_dev_launch(ctx, layer, p, o)) || (st = paged_dev_finish(ctx, p, out, o))))
            return st;
    }
    return APEX_OK;
}

/* Blocks [first, nb) of a mixed-tier sequence copied, in table order, into
 * the pinned scratch (device blocks D2H on the context's own stream, host
 * blocks by memcpy), so the CPU kernel reads block b of the sequence at
 * scratch block b; the blocks before first lie before every row's window. */
static apex_status paged_gather(apex_context *ctx, int32_t layer, const int32_t *ids,
                                int32_t first, int32_t nb, uint8_t *scratch) {
    apex_device *dev = ctx->dev;
    int64_t nd = ctx->pools[APEX_TIER_DEVICE].n_blocks;
    size_t bb = ctx->block_bytes;
    for (int32_t b = first; b < nb; b++) {
        if (ids[b] >= nd) {
            memcpy(scratch + b * bb, block_pool_at(&ctx->pools[APEX_TIER_HOST], layer,
                                                   (int32_t)(ids[b] - nd)), bb);
            continue;
        }
        apex_status st = dev->iface->memcpy_async(
            dev, scratch + b * bb, block_pool_at(&ctx->pools[APEX_TIER_DEVICE], layer, ids[b]),
            bb, ctx->pipe.own_stream);
        if (st) return st;
    }
    return dev->iface->stream_sync(dev, ctx->pipe.own_stream);
}

/* Pinned scratch for one sequence's blocks (max_blocks_per_seq of them)
 * and the identity block table over it. */
static apex_status paged_scratch(apex_context *ctx, uint8_t **scratch, int32_t **ident) {
    int32_t mb = ctx->seqs.max_blocks_per_seq;
    *ident = malloc((size_t)mb * sizeof **ident);
    if (!*ident) return apex_fail(APEX_ERR_NO_MEMORY, "apex_paged_attention: no memory");
    for (int32_t b = 0; b < mb; b++) (*ident)[b] = b;
    return ctx->dev->iface->host_alloc(ctx->dev, (size_t)mb * ctx->block_bytes,
                                       (void **)scratch);
}

/* The mixed-tier sequences of a validated batch, one at a time: blocks
 * gathered into host scratch, then the CPU kernel over an identity table. */
static apex_status paged_attend_mixed(apex_context *ctx, int32_t layer, int32_t n_seqs,
                                      const int32_t *qsl, const int32_t *seq_lens,
                                      const int32_t *table, int32_t stride, const void *q,
                                      void *out, const apex_attn_opts *o) {
    apex_device *dev = ctx->dev;
    int32_t bt = ctx->cfg.block_tokens;
    uint8_t *scratch = NULL; /* taken at the first mixed sequence */
    int32_t *ident = NULL;
    paged_cpu p = {0};
    apex_status st = APEX_OK;
    for (int32_t i = 0; !st && i < n_seqs; i++) {
        int32_t ql = qsl[i + 1] - qsl[i];
        if (ql == 0) continue; /* skipped: its length was not checked (fuzz_paged) */
        int32_t nb = (seq_lens[i] + bt - 1) / bt;
        const int32_t *ids = table + (size_t)i * stride;
        if (paged_seq_tiers(ctx, ids, nb) != PAGED_MIXED) continue;
        if (!scratch && (st = paged_scratch(ctx, &scratch, &ident))) break;
        ctx->fallbacks++; /* the slow path: reported in APEX_METRICS_FILE */
        uint64_t unused = 0; /* the first row starts the earliest */
        int32_t len0 = paged_row_len(seq_lens[i], ql, 0, o, &unused);
        int32_t first = o->window > 0 && len0 > o->window ? (len0 - o->window) / bt : 0;
        if (!(st = paged_gather(ctx, layer, ids, first, nb, scratch)) &&
            !(st = paged_cpu_seq(ctx, &p, scratch, qsl[i], ql, seq_lens[i], ident, 0, q, out,
                                 o)))
            st = paged_cpu_flush(ctx, &p, q, out, o); /* before the scratch is reused */
    }
    if (scratch) dev->iface->host_free(dev, scratch);
    free(ident);
    return st;
}

/* The single-tier sequences of a validated batch: host-tier ones on the
 * CPU kernel (want PAGED_HOST), or device-tier ones packed into pd (want
 * PAGED_DEVICE), whose last batch is left launched for paged_dev_finish. */
static apex_status paged_attend_tier(apex_context *ctx, int32_t layer, int want, paged_dev *pd,
                                     int32_t n_seqs, const int32_t *qsl, const int32_t *seq_lens,
                                     const int32_t *table, int32_t stride, const void *q,
                                     void *out, const apex_attn_opts *o) {
    int32_t bt = ctx->cfg.block_tokens;
    int64_t nd = ctx->pools[APEX_TIER_DEVICE].n_blocks;
    const uint8_t *host_kv = block_pool_layer(&ctx->pools[APEX_TIER_HOST], layer);
    paged_cpu pc = {0};
    apex_status st = APEX_OK;
    for (int32_t i = 0; !st && i < n_seqs; i++) {
        int32_t ql = qsl[i + 1] - qsl[i], len = seq_lens[i];
        const int32_t *ids = table + (size_t)i * stride;
        if (ql == 0 || paged_seq_tiers(ctx, ids, (len + bt - 1) / bt) != want) continue;
        st = want == PAGED_HOST
                 ? paged_cpu_seq(ctx, &pc, host_kv, qsl[i], ql, len, ids, nd, q, out, o)
                 : paged_dev_seq(ctx, layer, pd, qsl[i], ql, len, ids, q, out, o);
    }
    if (st) return st;
    return want == PAGED_HOST ? paged_cpu_flush(ctx, &pc, q, out, o)
                              : paged_dev_launch(ctx, layer, pd, o);
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
    apex_status st = paged_check_attention(ctx, layer, n_seqs, query_start_loc, seq_lens,
                                           block_table, block_table_stride, q, out, opts, &o);
    if (st) return paged_counted(ctx, st);
    if (n_seqs == 0) return APEX_OK; /* an empty batch (apex.h): nothing to do */
    pipeline_sync(ctx);
    cpu_workers_pin(&ctx->workers);
    /* Every query row is a decode problem with its own causal length. A
     * sequence whose blocks are all on one tier runs there, a mixed one is
     * gathered to the host (none exist without a device tier). The device's
     * last batch runs while the CPU attends the host-tier sequences. */
    const int32_t *qsl = query_start_loc;
    int32_t bs = block_table_stride;
    int has_device = ctx->pools[APEX_TIER_DEVICE].n_blocks > 0;
    paged_dev pd = {0};
    if ((has_device && (st = paged_attend_tier(ctx, layer, PAGED_DEVICE, &pd, n_seqs, qsl,
                                               seq_lens, block_table, bs, q, out, &o))) ||
        (st = paged_attend_tier(ctx, layer, PAGED_HOST, NULL, n_seqs, qsl, seq_lens,
                                block_table, bs, q, out, &o)) ||
        (has_device && (st = paged_attend_mixed(ctx, layer, n_seqs, qsl, seq_lens, block_table,
                                                bs, q, out, &o))) ||
        (st = paged_dev_finish(ctx, &pd, out, &o)))
        return paged_counted(ctx, st);
    ctx->stats.attention_calls++;
    ctx->stats.attention_seconds += paged_now() - t0;
    context_metrics_tick(ctx, 0);
    return APEX_OK;
}
