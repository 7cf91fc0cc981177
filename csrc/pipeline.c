#include "csrc/pipeline.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cpu_attn/dtype_convert.h"
#include "cpu_attn/kv_layout.h"
#include "csrc/context.h"
#include "csrc/error.h"
#include "csrc/trace.h"
#include "csrc/env.h"
#include "csrc/executor.h"

#define ALIGN 256

/* Next piece of `bytes` from a buffer walk: offset *p from base, rounded
 * up to ALIGN. Offsets, not addresses, are aligned, so the pinned and the
 * device half put like pieces at like offsets whatever their bases (both
 * allocators return at least ALIGN-aligned memory on CUDA); base 0 only
 * measures (no pointer arithmetic on a null pointer, which is undefined). */
static void *carve(uintptr_t base, uintptr_t *p, size_t bytes) {
    uintptr_t a = (*p + ALIGN - 1) & ~(uintptr_t)(ALIGN - 1);
    *p = a + bytes;
    return (void *)(base + a);
}

/* Lays out one slot's pinned (host=1) or device (host=0) buffers from base
 * (NULL: just measure); returns the bytes needed. The first six pieces are
 * the same on both sides (lens, slots, table, q, k, v), so
 * apex_paged_submit moves its staged inputs up in one copy
 * (exec_submit). */
static size_t layout(stage_slot *sl, uint8_t *base, int host, size_t B, size_t mb,
                     size_t row_q, size_t row_kv) {
    stage_slot dummy;
    if (!base) sl = &dummy;
    uintptr_t b = (uintptr_t)base, p = 0;
    if (host) {
        sl->h_lens = carve(b, &p, B * 4);
        sl->h_slots = carve(b, &p, B * 8);
        sl->h_table = carve(b, &p, (B * mb + 1) * 4); /* +1: prefill's cu_seqlens */
        sl->h_q = carve(b, &p, B * row_q);
        sl->h_k = carve(b, &p, B * row_kv);
        sl->h_v = carve(b, &p, B * row_kv);
        sl->h_out = carve(b, &p, B * row_q);
        sl->h_idx_g = carve(b, &p, B * 4);
        sl->h_idx_c = carve(b, &p, B * 4);
        sl->c_slots = carve(b, &p, B * 8);
        sl->c_lens = carve(b, &p, B * 4);
        sl->c_table = carve(b, &p, B * mb * 4);
    } else {
        sl->d_lens = carve(b, &p, B * 4);
        sl->d_slots = carve(b, &p, B * 8);
        sl->d_table = carve(b, &p, (B * mb + 1) * 4);
        sl->d_q_g = carve(b, &p, B * row_q);
        sl->d_k = carve(b, &p, B * row_kv);
        sl->d_v = carve(b, &p, B * row_kv);
        sl->d_out_g = carve(b, &p, B * row_q);
        sl->d_idx_g = carve(b, &p, B * 4);
        sl->d_idx_c = carve(b, &p, B * 4);
        sl->d_q_c = carve(b, &p, B * row_q);
        sl->d_out_c = carve(b, &p, B * row_q);
    }
    return (size_t)p + ALIGN;
}

apex_status pipeline_init(apex_context *ctx) {
    pipeline *pl = &ctx->pipe;
    apex_device *dev = ctx->dev;
    const device_iface *f = dev->iface;
    pl->dev = dev;
    const apex_config *c = &ctx->cfg;
    /* fp32 rows: staging fits every q/out/k/v dtype. */
    pl->row_q_bytes = (size_t)c->n_q_heads * c->head_dim * 4;
    pl->row_kv_bytes = (size_t)c->n_kv_heads * c->head_dim * 4;
    int32_t n = 2 * c->n_layers;
    const char *env = apex_env_get(APEX_ENV_STAGING_SLOTS);
    if (env && atoi(env) >= 2) n = atoi(env);
    if (n > 64) n = 64;
    apex_status st;
    if ((st = f->stream_create(dev, &pl->copy_stream)) ||
        (st = f->stream_create(dev, &pl->own_stream)) ||
        (st = f->event_create(dev, &pl->ev_copies)))
        return st;
    pl->chunk_seqs = malloc((size_t)c->max_batch * sizeof *pl->chunk_seqs);
    pl->chunk_pos = malloc((size_t)c->max_batch * sizeof *pl->chunk_pos);
    pl->slots = calloc((size_t)n, sizeof *pl->slots);
    if (!pl->slots || !pl->chunk_seqs || !pl->chunk_pos)
        return apex_fail(APEX_ERR_NO_MEMORY, "out of memory for staging slots");
    pl->n_slots = n;
    size_t B = (size_t)c->max_batch, mb = (size_t)ctx->seqs.max_blocks_per_seq;
    size_t hb = layout(NULL, NULL, 1, B, mb, pl->row_q_bytes, pl->row_kv_bytes);
    size_t db = layout(NULL, NULL, 0, B, mb, pl->row_q_bytes, pl->row_kv_bytes);
    for (int32_t i = 0; i < n; i++) {
        stage_slot *sl = &pl->slots[i];
        sl->ctx = ctx;
        if ((st = f->event_create(dev, &sl->ev_a)) || (st = f->event_create(dev, &sl->ev_down)) ||
            (st = f->event_create(dev, &sl->ev_up)) || (st = f->event_create(dev, &sl->done)) ||
            (st = f->host_alloc(dev, hb, &sl->h_mem)) || (st = f->mem_alloc(dev, db, &sl->d_mem)))
            return st;
        layout(sl, sl->h_mem, 1, B, mb, pl->row_q_bytes, pl->row_kv_bytes);
        layout(sl, sl->d_mem, 0, B, mb, pl->row_q_bytes, pl->row_kv_bytes);
    }
    if (f->decode_workspace_bytes) {
        pl->decode_ws_bytes = f->decode_workspace_bytes(dev, c->max_batch, c->n_q_heads,
                                                        c->head_dim);
        if (pl->decode_ws_bytes && (st = f->mem_alloc(dev, pl->decode_ws_bytes, &pl->decode_ws)))
            return st;
    }
    return cpu_jobs_start(&pl->jobs, dev);
}

void pipeline_destroy(apex_context *ctx) {
    pipeline *pl = &ctx->pipe;
    if (!pl->dev) return;
    const device_iface *f = pl->dev->iface;
    apex_device *dev = pl->dev;
    pipeline_sync(ctx);
    cpu_jobs_stop(&pl->jobs);
    for (int32_t i = 0; i < pl->n_slots; i++) {
        stage_slot *sl = &pl->slots[i];
        device_event *evs[] = {sl->ev_a, sl->ev_down, sl->ev_up, sl->done};
        for (int e = 0; e < 4; e++)
            if (evs[e]) f->event_destroy(dev, evs[e]);
        if (sl->h_mem) f->host_free(dev, sl->h_mem);
        if (sl->d_mem) f->mem_free(dev, sl->d_mem);
    }
    free(pl->slots);
    free(pl->chunk_seqs);
    free(pl->chunk_pos);
    if (pl->decode_ws) f->mem_free(dev, pl->decode_ws);
    if (pl->ev_copies) f->event_destroy(dev, pl->ev_copies);
    if (pl->tm_start) f->event_destroy(dev, pl->tm_start);
    if (pl->tm_end) f->event_destroy(dev, pl->tm_end);
    if (pl->copy_stream) f->stream_destroy(dev, pl->copy_stream);
    if (pl->own_stream) f->stream_destroy(dev, pl->own_stream);
    memset(pl, 0, sizeof *pl);
}

void pipeline_sync(apex_context *ctx) {
    pipeline *pl = &ctx->pipe;
    if (!pl->dev) return;
    TRACE_SCOPE(APEX_TRACE_WAIT, "pipeline_sync", -1);
    cpu_jobs_drain(&pl->jobs);
    if (pl->last_done) pl->dev->iface->event_sync(pl->dev, pl->last_done);
    if (pl->copy_stream) pl->dev->iface->stream_sync(pl->dev, pl->copy_stream);
    if (pl->own_stream) pl->dev->iface->stream_sync(pl->dev, pl->own_stream);
    if (pl->sub_state == 1) exec_complete(ctx); /* after the wait above: no block */
}

stage_slot *pipeline_sync_slot(apex_context *ctx) { return &ctx->pipe.slots[0]; }

apex_status pipeline_sync_slot_wait(apex_context *ctx) {
    stage_slot *sl = pipeline_sync_slot(ctx);
    return sl->used ? ctx->dev->iface->event_sync(ctx->dev, sl->done) : APEX_OK;
}

/* The next slot of the ring, once its previous use is over. This is the
 * only place the engine thread can block: when it runs a whole ring of
 * calls ahead of the device. */
stage_slot *pipeline_acquire(pipeline *pl) {
    stage_slot *sl = &pl->slots[pl->next_slot];
    pl->next_slot = (pl->next_slot + 1) % pl->n_slots;
    TRACE_SCOPE(APEX_TRACE_WAIT, "staging slot", -1);
    if (sl->used) pl->dev->iface->event_sync(pl->dev, sl->done);
    if (sl->job) cpu_jobs_wait(&pl->jobs, sl->job);
    sl->job = 0;
    return sl;
}

apex_status pipeline_finish(pipeline *pl, stage_slot *sl, device_stream *s) {
    apex_status st = pl->dev->iface->event_record(pl->dev, sl->done, s);
    if (st) return st; /* the caller abandons: waits for s itself */
    sl->used = 1;
    pl->last_done = sl->done;
    return APEX_OK;
}

/* A call the device refused midway: waits for everything it enqueued (on
 * s, the copy stream and the CPU worker) so that nothing it started can
 * still touch its staging slot or the caller's memory; returns st. */
apex_status pipeline_abandon(pipeline *pl, device_stream *s, apex_status st) {
    const device_iface *f = pl->dev->iface;
    cpu_jobs_drain(&pl->jobs);
    if (s) f->stream_sync(pl->dev, s);
    f->stream_sync(pl->dev, pl->copy_stream);
    f->stream_sync(pl->dev, pl->own_stream);
    return st;
}

/* ---- CPU jobs (run on the worker thread) */

static void job_kv_write(void *arg) {
    stage_slot *sl = arg;
    TRACE_SCOPE(APEX_TRACE_COPY, "host kv rows", sl->layer);
    apex_context *ctx = sl->ctx;
    block_pool_store_rows(&ctx->pools[APEX_TIER_HOST], &ctx->layout, ctx->cfg.kv_dtype,
                          ctx->cfg.n_kv_heads, sl->layer, sl->n_c, sl->c_slots, sl->h_k, sl->h_v,
                          sl->dtype_in);
}

/* ---- enqueue paths (engine thread) */

#define TRY(call)                      \
    do {                               \
        apex_status st_ = (call);      \
        if (st_) return st_;           \
    } while (0)

static apex_status kv_write_enqueue(apex_context *ctx, int32_t layer, int32_t n,
                                   const int32_t *seqs, const int32_t *pos, const void *k,
                                   const void *v, apex_dtype dt, device_stream *s) {
    pipeline *pl = &ctx->pipe;
    apex_device *dev = pl->dev;
    const device_iface *f = dev->iface;
    stage_slot *sl = pipeline_acquire(pl);
    int32_t bt = ctx->cfg.block_tokens, n_g = 0, n_c = 0;
    for (int32_t i = 0; i < n; i++) {
        const seq_entry *e = &ctx->seqs.seqs[seqs[i]];
        int64_t slot = apex_kv_slot_of(seq_table_row(&ctx->seqs, seqs[i]), pos[i], bt);
        if (e->tier == APEX_TIER_DEVICE) {
            sl->h_slots[i] = slot;
            n_g++;
        } else {
            sl->h_slots[i] = -1; /* the device kernel skips host rows */
            sl->h_idx_c[n_c] = i;
            sl->c_slots[n_c++] = slot;
        }
    }
    TRY(f->event_wait(dev, s, pl->ev_copies));
    size_t row = (size_t)ctx->cfg.n_kv_heads * ctx->cfg.head_dim * apex_dtype_size(dt);
    if (n_g) {
        TRY(f->memcpy_async(dev, sl->d_slots, sl->h_slots, (size_t)n * 8, s));
        apex_cuda_kv_append a = {
            .n_rows = n, .n_kv_heads = ctx->cfg.n_kv_heads, .head_dim = ctx->cfg.head_dim,
            .block_tokens = bt, .k = k, .v = v, .src_dtype = dt, .slots = sl->d_slots,
            .kv = block_pool_layer(&ctx->pools[APEX_TIER_DEVICE], layer),
            .block_bytes = ctx->block_bytes, .kv_dtype = ctx->cfg.kv_dtype,
        };
        TRY(f->kv_append(dev, &a, s));
    }
    if (n_c) {
        TRY(f->memcpy_async(dev, sl->d_idx_c, sl->h_idx_c, (size_t)n_c * 4, s));
        apex_cuda_rows t[2] = {
            {.src = k, .dst = sl->d_k, .src_stride = row, .dst_stride = row, .row_bytes = row},
            {.src = v, .dst = sl->d_v, .src_stride = row, .dst_stride = row, .row_bytes = row},
        };
        TRY(f->gather_rows(dev, t, 2, sl->d_idx_c, n_c, s));
        TRY(f->event_record(dev, sl->ev_a, s));
        TRY(f->event_wait(dev, pl->copy_stream, sl->ev_a));
        TRY(f->memcpy_async(dev, sl->h_k, sl->d_k, (size_t)n_c * row, pl->copy_stream));
        TRY(f->memcpy_async(dev, sl->h_v, sl->d_v, (size_t)n_c * row, pl->copy_stream));
        TRY(f->event_record(dev, sl->ev_down, pl->copy_stream));
        sl->layer = layer;
        sl->n_c = n_c;
        sl->dtype_in = dt;
        sl->job = cpu_jobs_submit(&pl->jobs, (cpu_job){job_kv_write, sl, sl->ev_down});
    }
    return pipeline_finish(pl, sl, s);
}

apex_status pipeline_kv_write(apex_context *ctx, int32_t layer, int32_t n, const int32_t *seqs,
                              const int32_t *pos, const void *k, const void *v, apex_dtype dt,
                              device_stream *s) {
    apex_status st = kv_write_enqueue(ctx, layer, n, seqs, pos, k, v, dt, s);
    return st ? pipeline_abandon(&ctx->pipe, s, st) : APEX_OK;
}

static apex_status prefill_enqueue(apex_context *ctx, int32_t layer, int32_t n,
                                   const int32_t *seqs, const int32_t *n_tokens, const void *q,
                                   const void *k, const void *v, void *out,
                                   const apex_attn_opts *o, device_stream *s) {
    pipeline *pl = &ctx->pipe;
    apex_device *dev = pl->dev;
    const device_iface *f = dev->iface;
    size_t kv_row = (size_t)ctx->cfg.n_kv_heads * ctx->cfg.head_dim * apex_dtype_size(o->q_dtype);
    /* K/V to each sequence's tier, max_batch rows a call. */
    int32_t rows = 0, done = 0;
    for (int32_t i = 0; i < n; i++)
        for (int32_t p = 0; p < n_tokens[i]; p++) {
            pl->chunk_seqs[rows] = seqs[i];
            pl->chunk_pos[rows++] = p;
            if (rows == ctx->cfg.max_batch || (i == n - 1 && p == n_tokens[i] - 1)) {
                TRY(pipeline_kv_write(ctx, layer, rows, pl->chunk_seqs, pl->chunk_pos,
                                      (const uint8_t *)k + (size_t)done * kv_row,
                                      (const uint8_t *)v + (size_t)done * kv_row, o->q_dtype, s));
                done += rows;
                rows = 0;
            }
        }
    /* Causal attention over the activations, on the device. */
    stage_slot *sl = pipeline_acquire(pl);
    sl->h_table[0] = 0;
    for (int32_t i = 0; i < n; i++) sl->h_table[i + 1] = sl->h_table[i] + n_tokens[i];
    int32_t longest = 0;
    for (int32_t i = 0; i < n; i++) longest = n_tokens[i] > longest ? n_tokens[i] : longest;
    TRY(f->memcpy_async(dev, sl->d_table, sl->h_table, (size_t)(n + 1) * 4, s));
    apex_cuda_prefill a = {
        .n_seqs = n, .n_tokens = done, .n_q_heads = ctx->cfg.n_q_heads,
        .n_kv_heads = ctx->cfg.n_kv_heads, .head_dim = ctx->cfg.head_dim,
        .cu_seqlens = sl->d_table, .max_seq_len = longest, .q = q, .k = k, .v = v,
        .act_dtype = o->q_dtype, .out = out, .out_dtype = o->out_dtype, .scale = o->scale,
        .softcap = o->softcap, .window = o->window, .kv = NULL,
    };
    TRY(f->prefill(dev, &a, s));
    return pipeline_finish(pl, sl, s);
}

apex_status pipeline_prefill(apex_context *ctx, int32_t layer, int32_t n, const int32_t *seqs,
                             const int32_t *n_tokens, const void *q, const void *k,
                             const void *v, void *out, const apex_attn_opts *o,
                             device_stream *s) {
    apex_status st = prefill_enqueue(ctx, layer, n, seqs, n_tokens, q, k, v, out, o, s);
    return st ? pipeline_abandon(&ctx->pipe, s, st) : APEX_OK;
}

static apex_status copy_device_block(apex_context *ctx, int32_t dst, int32_t src) {
    pipeline *pl = &ctx->pipe;
    const device_iface *f = pl->dev->iface;
    block_pool *p = &ctx->pools[APEX_TIER_DEVICE];
    if (pl->last_done) TRY(f->event_wait(pl->dev, pl->own_stream, pl->last_done));
    for (int32_t l = 0; l < p->n_layers; l++)
        TRY(f->memcpy_async(pl->dev, block_pool_at(p, l, dst), block_pool_at(p, l, src),
                            p->block_bytes, pl->own_stream));
    return f->event_record(pl->dev, pl->ev_copies, pl->own_stream);
}

apex_status pipeline_copy_device_block(apex_context *ctx, int32_t dst, int32_t src) {
    apex_status st = copy_device_block(ctx, dst, src);
    return st ? pipeline_abandon(&ctx->pipe, NULL, st) : APEX_OK;
}

static void job_barrier(void *arg) { (void)arg; }

static apex_status copy_between_tiers(apex_context *ctx, apex_tier from, const int32_t *src,
                                      const int32_t *dst, int32_t n) {
    pipeline *pl = &ctx->pipe;
    apex_device *dev = pl->dev;
    const device_iface *f = dev->iface;
    const block_pool *ps = &ctx->pools[from], *pd = &ctx->pools[1 - from];
    /* A slot of its own: the barrier job below waits on the slot's event,
     * which nothing re-records before that job ran (a shared event could be
     * re-recorded by the next migration, behind a wait for this very job). */
    stage_slot *sl = pipeline_acquire(pl);
    /* Host blocks may still be written by queued CPU jobs, device blocks by
     * the engine stream's queued work: the copy waits for both. */
    TRY(f->wait_flag(dev, pl->own_stream, pl->jobs.flag, pl->jobs.submitted));
    if (pl->last_done) TRY(f->event_wait(dev, pl->own_stream, pl->last_done));
    for (int32_t l = 0; l < ps->n_layers; l++)
        for (int32_t i = 0; i < n; i++)
            TRY(f->memcpy_async(dev, block_pool_at(pd, l, dst[i]), block_pool_at(ps, l, src[i]),
                                ps->block_bytes, pl->own_stream));
    TRY(f->event_record(dev, pl->ev_copies, pl->own_stream)); /* later calls wait on it */
    TRY(f->event_record(dev, sl->ev_down, pl->own_stream));
    /* Later CPU jobs may reuse the freed host blocks: they start after it. */
    sl->job = cpu_jobs_submit(&pl->jobs, (cpu_job){job_barrier, NULL, sl->ev_down});
    return pipeline_finish(pl, sl, pl->own_stream);
}

apex_status pipeline_copy_between_tiers(apex_context *ctx, apex_tier from, const int32_t *src,
                                        const int32_t *dst, int32_t n) {
    apex_status st = copy_between_tiers(ctx, from, src, dst, n);
    return st ? pipeline_abandon(&ctx->pipe, NULL, st) : APEX_OK;
}
