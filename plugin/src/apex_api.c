/*
 * apex_api.c - the exported ABI: argument checks, then the core. Every check
 * happens before any state changes, so a failing call changes nothing.
 */
#include <math.h>
#include <string.h>
#include <time.h>

#include "cpu_attn/dtype_convert.h"
#include "csrc/context.h"
#include "csrc/error.h"
#include "csrc/config.h"
#include "csrc/step_sched.h"
#include "csrc/trace.h"

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Counts a failure in the context's stats and passes the status through.
 * Takes const contexts too: the error counter is the one thing a query
 * (kv_read, seq_get_info, stats_get) may change, as apex.h says. */
static apex_status counted(const apex_context *ctx, apex_status st) {
    if (st != APEX_OK && ctx) ((apex_context *)ctx)->stats.errors++;
    return st;
}

#define CHECK_CTX(ctx)                                                            \
    do {                                                                          \
        if (!(ctx)) return apex_fail(APEX_ERR_INVALID_ARG, "%s: context is NULL", \
                                     __func__);                                   \
    } while (0)

/* CHECK_CTX, and the context's blocks are APEX's sequence model's (not
 * claimed by an engine, apex_paged.h): every sequence call starts so. */
#define CHECK_SEQ_CTX(ctx)                                                   \
    do {                                                                     \
        CHECK_CTX(ctx);                                                      \
        apex_status model_ = context_seq_model((ctx), __func__);            \
        if (model_) return counted((ctx), model_);                          \
    } while (0)

/* ------------------------------------------------------------- context */

APEX_API int apex_abi_version(void) { return APEX_ABI_VERSION; }
APEX_API const char *apex_version(void) { return APEX_VERSION_STRING; }

APEX_API apex_status apex_context_create(const apex_config *cfg, apex_context **out) {
    if (!out) return apex_fail(APEX_ERR_INVALID_ARG, "apex_context_create: out is NULL");
    *out = NULL;
    apex_status st = apex_config_validate(cfg);
    if (st) return st;
    st = context_create(cfg, out);
    if (st == APEX_OK) apex_clear_error();
    return st;
}

APEX_API apex_status apex_context_destroy(apex_context *ctx) {
    step_sched_free(ctx);
    context_destroy(ctx);
    return APEX_OK;
}

APEX_API apex_status apex_context_config(const apex_context *ctx, apex_config *out) {
    CHECK_CTX(ctx);
    if (!out) return counted(ctx, apex_fail(APEX_ERR_INVALID_ARG, "apex_context_config: out is NULL"));
    *out = ctx->cfg;
    return APEX_OK;
}

APEX_API int apex_context_host_mode(const apex_context *ctx) { return ctx ? ctx->host_mode : 1; }
APEX_API apex_kv_order apex_context_kv_layout(const apex_context *ctx) {
    return ctx && ctx->layout.pairs ? APEX_KV_PAIRS : APEX_KV_ROWS;
}

APEX_API const char *apex_cpu_isa(void) { return cpu_attn_isa_name(cpu_attn_isa_selected()); }

/* ----------------------------------------------------------- sequences */

APEX_API apex_status apex_seq_add(apex_context *ctx, int32_t seq, apex_tier tier) {
    CHECK_SEQ_CTX(ctx);
    apex_status st = seq_table_add(&ctx->seqs, seq, tier);
    if (st == APEX_OK) step_sched_forget(ctx, seq); /* a new request */
    context_owner_update(ctx);
    return counted(ctx, st);
}

APEX_API apex_status apex_seq_reserve(apex_context *ctx, int32_t seq, int32_t n,
                                      int32_t *first_pos) {
    CHECK_SEQ_CTX(ctx);
    return counted(ctx, context_reserve(ctx, seq, n, first_pos));
}

APEX_API apex_status apex_seq_fork(apex_context *ctx, int32_t src, int32_t dst) {
    CHECK_SEQ_CTX(ctx);
    apex_status st = seq_table_fork(&ctx->seqs, src, dst);
    if (st == APEX_OK) step_sched_forget(ctx, dst);
    context_owner_update(ctx);
    return counted(ctx, st);
}

APEX_API apex_status apex_seq_free(apex_context *ctx, int32_t seq) {
    CHECK_SEQ_CTX(ctx);
    apex_status st = seq_table_free(&ctx->seqs, seq);
    context_owner_update(ctx);
    return counted(ctx, st);
}

APEX_API apex_status apex_seq_get_info(const apex_context *ctx, int32_t seq,
                                       apex_seq_info *out) {
    CHECK_SEQ_CTX(ctx);
    if (!out) return counted(ctx, apex_fail(APEX_ERR_INVALID_ARG, "apex_seq_get_info: out is NULL"));
    const seq_entry *e = seq_table_get(&ctx->seqs, seq);
    if (!e) return counted(ctx, APEX_ERR_UNKNOWN_SEQ);
    const block_pool *p = seq_table_pool(&ctx->seqs, e);
    const int32_t *row = seq_table_row(&ctx->seqs, seq);
    int32_t shared = 0;
    for (int32_t i = 0; i < e->n_blocks; i++) shared += p->refcount[row[i]] > 1;
    *out = (apex_seq_info){.len = e->len, .n_blocks = e->n_blocks, .n_shared = shared,
                           .tier = e->tier};
    return APEX_OK;
}

APEX_API apex_status apex_seq_migrate(apex_context *ctx, int32_t seq, apex_tier tier) {
    CHECK_SEQ_CTX(ctx);
    return counted(ctx, context_migrate(ctx, seq, tier));
}

/* ------------------------------------------------------------ KV write */

/* Checks a (layer, batch) against the context; writing = positions must be
 * in private blocks. */
static apex_status check_rows(const apex_context *ctx, const char *fn, int32_t layer,
                              int32_t n, const int32_t *seqs, const int32_t *pos,
                              const void *k, const void *v, apex_dtype dt, int writing) {
    if (layer < 0 || layer >= ctx->cfg.n_layers)
        return apex_fail(APEX_ERR_OUT_OF_RANGE, "%s: layer %d outside [0, %d)", fn, layer,
                         ctx->cfg.n_layers);
    if (n < 0 || n > ctx->cfg.max_batch)
        return apex_fail(APEX_ERR_OUT_OF_RANGE, "%s: batch of %d rows, max_batch is %d", fn, n,
                         ctx->cfg.max_batch);
    if (n > 0 && (!seqs || !pos || !k || !v))
        return apex_fail(APEX_ERR_INVALID_ARG, "%s: seqs, pos, k and v must not be NULL", fn);
    if (!apex_dtype_valid(dt))
        return apex_fail(APEX_ERR_INVALID_ARG, "%s: dtype %d is not an apex_dtype", fn, (int)dt);
    const seq_table *t = &ctx->seqs;
    for (int32_t i = 0; i < n; i++) {
        const seq_entry *e = seq_table_get(t, seqs[i]);
        if (!e) return APEX_ERR_UNKNOWN_SEQ;
        if (pos[i] < 0 || pos[i] >= e->len)
            return apex_fail(APEX_ERR_OUT_OF_RANGE,
                             "%s: row %d: position %d of sequence %d is not reserved (len %d)",
                             fn, i, pos[i], seqs[i], e->len);
        if (writing) {
            int32_t b = seq_table_row(t, seqs[i])[pos[i] / ctx->cfg.block_tokens];
            if (seq_table_pool(t, e)->refcount[b] > 1)
                return apex_fail(APEX_ERR_INVALID_ARG,
                                 "%s: row %d: position %d of sequence %d is in a block shared "
                                 "with another sequence (reserve new positions instead)",
                                 fn, i, pos[i], seqs[i]);
        }
    }
    return APEX_OK;
}

/* First non-finite element of an array, or -1. */
static int64_t first_nonfinite(const void *p, apex_dtype t, size_t count) {
    for (size_t i = 0; i < count; i++)
        if (!isfinite(apex_load_f32(p, t, i))) return (int64_t)i;
    return -1;
}

APEX_API apex_status apex_kv_write(apex_context *ctx, int32_t layer, int32_t n,
                                   const int32_t *seqs, const int32_t *pos, const void *k,
                                   const void *v, apex_dtype src_dtype) {
    CHECK_SEQ_CTX(ctx);
    TRACE_SCOPE(APEX_TRACE_CALL, "apex_kv_write", layer);
    double t0 = now_seconds();
    apex_status st = check_rows(ctx, __func__, layer, n, seqs, pos, k, v, src_dtype, 1);
    if (st) return counted(ctx, st);
    if (n == 0) return APEX_OK; /* an empty batch: nothing to do */
    size_t count = (size_t)n * (size_t)ctx->cfg.n_kv_heads * (size_t)ctx->cfg.head_dim;
    int64_t bad_k = first_nonfinite(k, src_dtype, count);
    int64_t bad = bad_k >= 0 ? bad_k : first_nonfinite(v, src_dtype, count);
    if (bad >= 0) {
        int64_t row_el = (int64_t)ctx->cfg.n_kv_heads * ctx->cfg.head_dim;
        return counted(ctx, apex_fail(APEX_ERR_INVALID_ARG,
                                      "apex_kv_write: %s row %lld has a NaN or Inf",
                                      bad_k >= 0 ? "k" : "v", (long long)(bad / row_el)));
    }
    st = context_kv_write(ctx, layer, n, seqs, pos, k, v, src_dtype);
    if (st) return counted(ctx, st);
    ctx->stats.kv_rows_written += (uint64_t)n;
    ctx->stats.kv_write_seconds += now_seconds() - t0;
    return APEX_OK;
}

APEX_API apex_status apex_kv_read(const apex_context *ctx, int32_t layer, int32_t n,
                                  const int32_t *seqs, const int32_t *pos, void *k, void *v,
                                  apex_dtype dst_dtype) {
    CHECK_SEQ_CTX(ctx);
    apex_status st = check_rows(ctx, __func__, layer, n, seqs, pos, k, v, dst_dtype, 0);
    if (st) return counted(ctx, st);
    if (n == 0) return APEX_OK;
    /* Logically const: it only waits for in-flight work before reading. */
    return counted(ctx, context_kv_read((apex_context *)ctx, layer, n, seqs, pos, k, v, dst_dtype));
}

/* ----------------------------------------------------------- attention */

APEX_API apex_attn_opts apex_attn_opts_default(const apex_context *ctx) {
    apex_dtype act = ctx ? ctx->cfg.act_dtype : APEX_DTYPE_F32;
    return (apex_attn_opts){.scale = 0, .softcap = 0, .window = 0, .q_dtype = act,
                            .out_dtype = act};
}

/* Checks an attention batch and resolves its options into *o. */
static apex_status check_attention(apex_context *ctx, const char *fn, int32_t layer, int32_t n,
                                   const int32_t *seqs, const void *q, void *out,
                                   const apex_attn_opts *opts, apex_attn_opts *o) {
    if (layer < 0 || layer >= ctx->cfg.n_layers)
        return apex_fail(APEX_ERR_OUT_OF_RANGE, "%s: layer %d outside [0, %d)", fn, layer,
                         ctx->cfg.n_layers);
    if (n < 0 || n > ctx->cfg.max_batch)
        return apex_fail(APEX_ERR_OUT_OF_RANGE,
                         "%s: batch of %d sequences outside [0, max_batch %d]", fn, n,
                         ctx->cfg.max_batch);
    if (n > 0 && (!seqs || !q || !out))
        return apex_fail(APEX_ERR_INVALID_ARG, "%s: seqs, q and out must not be NULL", fn);
    apex_status st = apex_attn_opts_resolve(&ctx->cfg, fn, opts, o);
    if (st) return st;
    for (int32_t i = 0; i < n; i++) {
        const seq_entry *e = seq_table_get(&ctx->seqs, seqs[i]);
        if (!e) return APEX_ERR_UNKNOWN_SEQ;
        if (e->len < 1)
            return apex_fail(APEX_ERR_OUT_OF_RANGE, "%s: sequence %d has no tokens to attend",
                             fn, seqs[i]);
    }
    int32_t rep = context_first_repeat(ctx, n, seqs);
    if (rep >= 0)
        return apex_fail(APEX_ERR_INVALID_ARG,
                         "%s: sequence %d is listed twice (batch rows must be distinct "
                         "sequences; row %d repeats it)", fn, seqs[rep], rep);
    return APEX_OK;
}

APEX_API apex_status apex_attention(apex_context *ctx, int32_t layer, int32_t n,
                                    const int32_t *seqs, const void *q, void *out,
                                    const apex_attn_opts *opts) {
    CHECK_SEQ_CTX(ctx);
    TRACE_SCOPE(APEX_TRACE_CALL_ATTN, "apex_attention", layer);
    double t0 = now_seconds();
    apex_attn_opts o;
    apex_status st = check_attention(ctx, __func__, layer, n, seqs, q, out, opts, &o);
    if (st) return counted(ctx, st);
    if (n == 0) return APEX_OK; /* an empty batch: nothing to do */
    size_t row_el = (size_t)ctx->cfg.n_q_heads * (size_t)ctx->cfg.head_dim;
    int64_t bad = first_nonfinite(q, o.q_dtype, (size_t)n * row_el);
    if (bad >= 0)
        return counted(ctx, apex_fail(APEX_ERR_INVALID_ARG,
                                      "%s: q of sequence %d (batch row %lld) has a NaN or Inf",
                                      __func__, seqs[bad / (int64_t)row_el],
                                      (long long)(bad / (int64_t)row_el)));
    st = context_attention(ctx, layer, n, seqs, q, out, &o, NULL);
    if (st) return counted(ctx, st);
    ctx->stats.attention_calls++;
    ctx->stats.attention_seconds += now_seconds() - t0;
    context_metrics_tick(ctx, 0);
    return APEX_OK;
}

/* ------------------------------------------------------ device pipeline */

#define CHECK_DEV(ctx)                                                                  \
    do {                                                                                \
        CHECK_CTX(ctx);                                                                 \
        if (!(ctx)->dev)                                                                \
            return counted((ctx), apex_fail(APEX_ERR_UNSUPPORTED,                       \
                                            "%s: no device in this context (host mode)", \
                                            __func__));                                 \
    } while (0)

#define STREAM(s) ((device_stream *)(s))

APEX_API apex_status apex_stream_create(apex_context *ctx, apex_stream *out) {
    CHECK_DEV(ctx);
    if (!out) return counted(ctx, apex_fail(APEX_ERR_INVALID_ARG, "apex_stream_create: out is NULL"));
    return counted(ctx, ctx->dev->iface->stream_create(ctx->dev, (device_stream **)out));
}

APEX_API apex_status apex_stream_destroy(apex_context *ctx, apex_stream s) {
    CHECK_DEV(ctx);
    if (s) ctx->dev->iface->stream_destroy(ctx->dev, STREAM(s));
    return APEX_OK;
}

APEX_API apex_status apex_stream_sync(apex_context *ctx, apex_stream s) {
    CHECK_DEV(ctx);
    if (!s) return counted(ctx, apex_fail(APEX_ERR_INVALID_ARG, "apex_stream_sync: stream is NULL"));
    return counted(ctx, ctx->dev->iface->stream_sync(ctx->dev, STREAM(s)));
}

APEX_API apex_status apex_device_alloc(apex_context *ctx, size_t bytes, void **out) {
    CHECK_DEV(ctx);
    if (!out) return counted(ctx, apex_fail(APEX_ERR_INVALID_ARG, "apex_device_alloc: out is NULL"));
    return counted(ctx, ctx->dev->iface->mem_alloc(ctx->dev, bytes, out));
}

APEX_API apex_status apex_device_free(apex_context *ctx, void *p) {
    CHECK_DEV(ctx);
    if (p) ctx->dev->iface->mem_free(ctx->dev, p);
    return APEX_OK;
}

APEX_API apex_status apex_memcpy_async(apex_context *ctx, void *dst, const void *src,
                                       size_t bytes, apex_stream s) {
    CHECK_DEV(ctx);
    if (!dst || !src || !s)
        return counted(ctx, apex_fail(APEX_ERR_INVALID_ARG,
                                      "apex_memcpy_async: dst, src and stream must not be NULL"));
    return counted(ctx, ctx->dev->iface->memcpy_async(ctx->dev, dst, src, bytes, STREAM(s)));
}

APEX_API apex_status apex_kv_write_async(apex_context *ctx, int32_t layer, int32_t n,
                                         const int32_t *seqs, const int32_t *pos,
                                         const void *k, const void *v, apex_dtype src_dtype,
                                         apex_stream s) {
    CHECK_DEV(ctx);
    apex_status model = context_seq_model(ctx, __func__);
    if (model) return counted(ctx, model);
    TRACE_SCOPE(APEX_TRACE_CALL, "apex_kv_write_async", layer);
    double t0 = now_seconds();
    if (!s) return counted(ctx, apex_fail(APEX_ERR_INVALID_ARG, "%s: stream is NULL", __func__));
    apex_status st = check_rows(ctx, __func__, layer, n, seqs, pos, k, v, src_dtype, 1);
    if (st) return counted(ctx, st);
    if (n == 0) return APEX_OK;
    st = pipeline_kv_write(ctx, layer, n, seqs, pos, k, v, src_dtype, STREAM(s));
    if (st) return counted(ctx, st);
    ctx->stats.kv_rows_written += (uint64_t)n;
    ctx->stats.kv_write_seconds += now_seconds() - t0;
    return APEX_OK;
}

APEX_API apex_status apex_attention_async(apex_context *ctx, int32_t layer, int32_t n,
                                          const int32_t *seqs, const void *q, void *out,
                                          const apex_attn_opts *opts, apex_stream s) {
    CHECK_DEV(ctx);
    apex_status model = context_seq_model(ctx, __func__);
    if (model) return counted(ctx, model);
    TRACE_SCOPE(APEX_TRACE_CALL_ATTN, "apex_attention_async", layer);
    double t0 = now_seconds();
    if (!s) return counted(ctx, apex_fail(APEX_ERR_INVALID_ARG, "%s: stream is NULL", __func__));
    apex_attn_opts o;
    apex_status st = check_attention(ctx, __func__, layer, n, seqs, q, out, opts, &o);
    if (st) return counted(ctx, st);
    if (n == 0) return APEX_OK;
    st = context_attention(ctx, layer, n, seqs, q, out, &o, STREAM(s));
    if (st) return counted(ctx, st);
    ctx->stats.attention_calls++;
    /* Enqueue time only: the work itself overlaps the engine. */
    ctx->stats.attention_seconds += now_seconds() - t0;
    context_metrics_tick(ctx, 0);
    return APEX_OK;
}

APEX_API apex_status apex_prefill_async(apex_context *ctx, int32_t layer, int32_t n,
                                        const int32_t *seqs, const int32_t *n_tokens,
                                        const void *q, const void *k, const void *v, void *out,
                                        const apex_attn_opts *opts, apex_stream s) {
    CHECK_DEV(ctx);
    apex_status model = context_seq_model(ctx, __func__);
    if (model) return counted(ctx, model);
    const char *fn = __func__;
    if (!s || (n > 0 && (!n_tokens || !k || !v)))
        return counted(ctx, apex_fail(APEX_ERR_INVALID_ARG,
                                      "%s: stream, n_tokens, k and v must not be NULL", fn));
    apex_attn_opts o;
    apex_status st = check_attention(ctx, fn, layer, n, seqs, q, out, opts, &o);
    if (st) return counted(ctx, st);
    if (n == 0) return APEX_OK;
    for (int32_t i = 0; i < n; i++) {
        const seq_entry *e = &ctx->seqs.seqs[seqs[i]];
        if (n_tokens[i] < 1 || n_tokens[i] != e->len)
            return counted(ctx, apex_fail(APEX_ERR_INVALID_ARG,
                                          "%s: sequence %d: %d tokens, but a prefill covers "
                                          "its whole reserved length %d from position 0",
                                          fn, seqs[i], n_tokens[i], e->len));
        const int32_t *row = seq_table_row(&ctx->seqs, seqs[i]);
        for (int32_t b = 0; b < e->n_blocks; b++)
            if (seq_table_pool(&ctx->seqs, e)->refcount[row[b]] > 1)
                return counted(ctx, apex_fail(APEX_ERR_INVALID_ARG,
                                              "%s: sequence %d shares blocks (forked): prefill "
                                              "writes only fresh sequences", fn, seqs[i]));
    }
    st = pipeline_prefill(ctx, layer, n, seqs, n_tokens, q, k, v, out, &o, STREAM(s));
    if (st) return counted(ctx, st);
    for (int32_t i = 0; i < n; i++) ctx->stats.kv_rows_written += (uint64_t)n_tokens[i];
    return APEX_OK;
}

/* ----------------------------------------------------------- scheduler */

/* enable and observe serve both models: apex_sched_step (APEX's sequences)
 * and apex_sched_place (an engine's, apex_place_api.c). */
APEX_API apex_status apex_sched_enable(apex_context *ctx, const apex_sched_options *o) {
    CHECK_CTX(ctx);
    if (!o) return counted(ctx, apex_fail(APEX_ERR_INVALID_ARG, "apex_sched_enable: options are NULL"));
    return counted(ctx, step_sched_enable(ctx, o));
}

APEX_API apex_status apex_sched_step(apex_context *ctx, int32_t n, const apex_step_item *items,
                                     apex_step_decision *out, apex_step_plan *plan) {
    CHECK_SEQ_CTX(ctx);
    apex_status st = step_sched_step(ctx, n, items, out, plan);
    context_owner_update(ctx);
    return counted(ctx, st);
}

APEX_API apex_status apex_sched_observe(apex_context *ctx, double step_seconds) {
    CHECK_CTX(ctx);
    return counted(ctx, step_sched_observe(ctx, step_seconds));
}

/* ---------------------------------------------------------- statistics */

APEX_API apex_status apex_stats_get(const apex_context *ctx, apex_stats *out) {
    CHECK_CTX(ctx);
    if (!out) return counted(ctx, apex_fail(APEX_ERR_INVALID_ARG, "apex_stats_get: out is NULL"));
    *out = ctx->stats;
    out->cow_copies = ctx->seqs.cow_copies;
    for (int t = 0; t < 2; t++) {
        out->blocks_free[t] = ctx->pools[t].n_free;
        out->blocks_used[t] = ctx->pools[t].n_blocks - ctx->pools[t].n_free;
    }
    out->seqs_active = ctx->seqs.n_active;
    return APEX_OK;
}

APEX_API apex_status apex_stats_reset(apex_context *ctx) {
    CHECK_CTX(ctx);
    memset(&ctx->stats, 0, sizeof ctx->stats);
    ctx->seqs.cow_copies = 0;
    return APEX_OK;
}
