/*
 * executor.c - attention over APEX's paged KV for both ABIs (executor.h):
 * classifies each sequence of a batch by the tiers of its blocks, then runs
 * it synchronously (exec_sync: device batches on APEX's own stream through
 * the pipeline's synchronous staging slot, host rows on the calling thread,
 * mixed ones over a pinned gather) or enqueues it on an engine stream
 * (exec_enqueue: the async pipeline's host/device cohort split); and
 * stores K/V rows synchronously on their tiers (exec_kv_write).
 *
 * Host rows are one CPU batch (cpu_attn_decode plans its split-K over the
 * whole batch): run in place when they are adjacent rows of q, else gathered
 * into host scratch in row order, so the synchronous and the asynchronous
 * path hand the CPU kernel the same batch and give the same bits.
 */
#include "csrc/executor.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cpu_attn/dtype_convert.h"
#include "csrc/context.h"
#include "csrc/error.h"
#include "csrc/trace.h"

/* ---- a batch's rows and tiers */

/* Sequence i's query rows: returns q_len, *row0 its first row. */
static int32_t seq_rows(const exec_batch *b, int32_t i, int64_t *row0) {
    if (!b->qsl) {
        *row0 = i;
        return 1;
    }
    *row0 = b->qsl[i];
    return b->qsl[i + 1] - b->qsl[i];
}

/* Row j of a sequence with q_len ql and length len attends this many
 * positions (causal), counting those its window keeps in *tokens. */
static int32_t row_len(int32_t len, int32_t ql, int32_t j, int32_t window, uint64_t *tokens) {
    int32_t n = len - ql + j + 1;
    int32_t start = window > 0 && n > window ? n - window : 0;
    *tokens += (uint64_t)(n - start);
    return n;
}

static int32_t n_blocks_of(const apex_context *ctx, int32_t len) {
    return (len + ctx->cfg.block_tokens - 1) / ctx->cfg.block_tokens;
}

static const int32_t *seq_ids(const exec_batch *b, int32_t i) {
    return b->table + (size_t)i * (size_t)b->stride;
}

/* Which tiers a sequence's blocks are on. */
enum { ON_HOST = 1, ON_DEVICE = 2, ON_BOTH = 3 };
static int seq_tiers(const apex_context *ctx, const int32_t *ids, int32_t nb) {
    int64_t nd = ctx->pools[APEX_TIER_DEVICE].n_blocks;
    int m = 0;
    if (nd == 0) return ON_HOST;
    for (int32_t b = 0; b < nb; b++) m |= ids[b] < nd ? ON_DEVICE : ON_HOST;
    return m;
}

static size_t q_row_bytes(const apex_context *ctx, apex_dtype t) {
    return (size_t)ctx->cfg.n_q_heads * (size_t)ctx->cfg.head_dim * apex_dtype_size(t);
}

/* ---- synchronous: host rows, one CPU batch at a time */

/* A CPU batch being packed: row r is query row exec_rows[r], its length
 * batch_lens[r], its table batch_table row r (blocks of the slab kv). */
typedef struct cpu_pack {
    const uint8_t *kv;
    int32_t filled;
    int adjacent; /* exec_rows[r] == exec_rows[0] + r for every r */
} cpu_pack;

/* Host scratch for a batch of non-adjacent rows: q in, out back (fp32 rows
 * fit every dtype); taken the first time a batch needs it. */
static apex_status scratch_rows(apex_context *ctx) {
    if (ctx->exec_q) return APEX_OK;
    size_t bytes = (size_t)ctx->cfg.max_batch * q_row_bytes(ctx, APEX_DTYPE_F32);
    ctx->exec_q = malloc(bytes);
    ctx->exec_out = malloc(bytes);
    if (ctx->exec_q && ctx->exec_out) return APEX_OK;
    exec_destroy(ctx);
    return apex_fail(APEX_ERR_NO_MEMORY, "out of memory for the attention scratch");
}

/* Runs the packed CPU batch, if any. */
static apex_status cpu_flush(apex_context *ctx, const exec_batch *b, cpu_pack *p) {
    if (!p->filled) return APEX_OK;
    size_t qrow = q_row_bytes(ctx, b->o.q_dtype), orow = q_row_bytes(ctx, b->o.out_dtype);
    const int64_t *rows = ctx->exec_rows;
    const uint8_t *q = (const uint8_t *)b->q + (size_t)rows[0] * qrow;
    uint8_t *out = (uint8_t *)b->out + (size_t)rows[0] * orow;
    if (!p->adjacent) {
        apex_status st = scratch_rows(ctx);
        if (st) return st;
        for (int32_t r = 0; r < p->filled; r++)
            memcpy((uint8_t *)ctx->exec_q + (size_t)r * qrow,
                   (const uint8_t *)b->q + (size_t)rows[r] * qrow, qrow);
        q = ctx->exec_q;
        out = ctx->exec_out;
    }
    cpu_attn_batch cb = {
        .n_seqs = p->filled,
        .q = q,
        .q_dtype = b->o.q_dtype,
        .out = out,
        .out_dtype = b->o.out_dtype,
        .seq_lens = ctx->batch_lens,
        .block_table = ctx->batch_table,
        .block_table_stride = ctx->seqs.max_blocks_per_seq,
        .kv = p->kv,
        .block_bytes = ctx->block_bytes,
        .scale = b->o.scale,
        .softcap = b->o.softcap,
        .window = b->o.window,
    };
    {
        TRACE_SCOPE(APEX_TRACE_CPU_ATTN, "cpu_attn_decode", b->layer);
        if (cpu_attn_decode(&ctx->geom, &cb, ctx->ws, ctx->workers.n_threads) != 0)
            return apex_fail(APEX_ERR_INTERNAL, "CPU attention kernel failed");
    }
    if (!p->adjacent)
        for (int32_t r = 0; r < p->filled; r++)
            memcpy((uint8_t *)b->out + (size_t)rows[r] * orow,
                   (const uint8_t *)ctx->exec_out + (size_t)r * orow, orow);
    ctx->stats.seqs_attended_host += (uint64_t)p->filled;
    p->filled = 0;
    return APEX_OK;
}

/* Packs the ql query rows of one sequence (rows row0.. of q) into the CPU
 * batch over slab kv, block j of its table being ids[j] - off there; runs
 * the batch when it is full, or first when it is over another slab. */
static apex_status cpu_seq(apex_context *ctx, const exec_batch *b, cpu_pack *p,
                           const uint8_t *kv, int64_t row0, int32_t ql, int32_t len,
                           const int32_t *ids, int64_t off, uint64_t *tokens) {
    apex_status st;
    if (p->filled && p->kv != kv && (st = cpu_flush(ctx, b, p))) return st;
    p->kv = kv;
    int32_t tstride = ctx->seqs.max_blocks_per_seq;
    for (int32_t j = 0; j < ql; j++) {
        int32_t n = row_len(len, ql, j, b->o.window, tokens);
        int32_t r = p->filled++;
        ctx->exec_rows[r] = row0 + j;
        p->adjacent = r == 0 || (p->adjacent && ctx->exec_rows[r] == ctx->exec_rows[r - 1] + 1);
        int32_t *dst = ctx->batch_table + (size_t)r * tstride;
        if (off == 0)
            memcpy(dst, ids, (size_t)n_blocks_of(ctx, n) * sizeof *dst);
        else
            for (int32_t k = 0; k < n_blocks_of(ctx, n); k++) dst[k] = (int32_t)(ids[k] - off);
        ctx->batch_lens[r] = n;
        if (p->filled == ctx->cfg.max_batch && (st = cpu_flush(ctx, b, p))) return st;
    }
    return APEX_OK;
}

/* ---- synchronous: device rows, packed into the pipeline's sync slot */

/* A device batch being packed into the staging slot: row r is query row
 * h_idx_g[r], its length h_lens[r], its table h_table row r, its q h_q row
 * r. launched: on the context's own stream, not yet waited for. */
typedef struct dev_pack {
    int32_t filled, max_len, launched;
    int32_t timed; /* the kernel is between the tracer's timing events */
} dev_pack;

/* The tracer's GPU span of the device batch: timing events around the
 * kernel when tracing is on and the device has them (CUDA). */
static int dev_timer(apex_context *ctx) {
    pipeline *pl = &ctx->pipe;
    const device_iface *f = ctx->dev->iface;
    if (!trace_on() || !f->timer_create || !f->event_elapsed_ms) return 0;
    if (!pl->tm_start && f->timer_create(ctx->dev, &pl->tm_start)) return 0;
    if (!pl->tm_end && f->timer_create(ctx->dev, &pl->tm_end)) return 0;
    return 1;
}

/* Enqueues the packed device batch on the context's own stream: q, lengths
 * and tables up (unless up is 0: the caller copied them), paged_decode,
 * outputs down into the staging slot. */
static apex_status dev_launch(apex_context *ctx, const exec_batch *b, dev_pack *p, int up) {
    if (!p->filled) return APEX_OK;
    apex_device *dev = ctx->dev;
    const device_iface *f = dev->iface;
    pipeline *pl = &ctx->pipe;
    device_stream *s = pl->own_stream;
    stage_slot *sl = pipeline_sync_slot(ctx);
    int32_t m = p->filled, mb = ctx->seqs.max_blocks_per_seq;
    size_t qrow = q_row_bytes(ctx, b->o.q_dtype), orow = q_row_bytes(ctx, b->o.out_dtype);
    apex_cuda_decode a = {
        .n_seqs = m, .n_q_heads = ctx->cfg.n_q_heads, .n_kv_heads = ctx->cfg.n_kv_heads,
        .head_dim = ctx->cfg.head_dim, .block_tokens = ctx->cfg.block_tokens,
        .kv_dtype = ctx->cfg.kv_dtype, .q_dtype = b->o.q_dtype, .out_dtype = b->o.out_dtype,
        .q = sl->d_q_g, .out = sl->d_out_g, .seq_lens = sl->d_lens, .block_table = sl->d_table,
        .block_table_stride = mb,
        .kv = block_pool_layer(&ctx->pools[APEX_TIER_DEVICE], b->layer),
        .block_bytes = ctx->block_bytes, .scale = b->o.scale, .softcap = b->o.softcap,
        .window = b->o.window, .max_seq_len = p->max_len, .workspace = pl->decode_ws,
        .workspace_bytes = pl->decode_ws_bytes,
    };
    apex_status st;
    p->timed = dev_timer(ctx);
    if ((up && (st = f->memcpy_async(dev, sl->d_lens, sl->h_lens, (size_t)m * 4, s))) ||
        (up && (st = f->memcpy_async(dev, sl->d_table, sl->h_table, (size_t)m * mb * 4, s))) ||
        (up && (st = f->memcpy_async(dev, sl->d_q_g, sl->h_q, (size_t)m * qrow, s))) ||
        (p->timed && (st = f->event_record(dev, pl->tm_start, s))) ||
        (st = f->paged_decode(dev, &a, s)) ||
        (p->timed && (st = f->event_record(dev, pl->tm_end, s))) ||
        (st = f->memcpy_async(dev, sl->h_out, sl->d_out_g, (size_t)m * orow, s)))
        return st;
    p->launched = 1;
    return APEX_OK;
}

/* Waits for a launched device batch and scatters its outputs into out. */
static apex_status dev_finish(apex_context *ctx, const exec_batch *b, dev_pack *p) {
    if (!p->launched) return APEX_OK;
    TRACE_SCOPE(APEX_TRACE_WAIT, "device batch", -1);
    const device_iface *f = ctx->dev->iface;
    stage_slot *sl = pipeline_sync_slot(ctx);
    size_t orow = q_row_bytes(ctx, b->o.out_dtype);
    apex_status st = f->stream_sync(ctx->dev, ctx->pipe.own_stream);
    if (st) return st;
    float ms = 0;
    if (p->timed &&
        f->event_elapsed_ms(ctx->dev, ctx->pipe.tm_start, ctx->pipe.tm_end, &ms) == APEX_OK) {
        /* Device time from the events; placed on the timeline to end when
         * the host saw the batch finish (the output copy follows it). */
        const uint64_t dur = (uint64_t)((double)ms * 1e6), end = trace_now_ns();
        trace_device_span_("GPU (CUDA events)", "paged_decode", b->layer,
                           end > dur ? end - dur : 0, dur);
    }
    for (int32_t r = 0; r < p->filled; r++)
        memcpy((uint8_t *)b->out + (size_t)sl->h_idx_g[r] * orow,
               (uint8_t *)sl->h_out + (size_t)r * orow, orow);
    ctx->stats.seqs_attended_device += (uint64_t)p->filled;
    *p = (dev_pack){0};
    return APEX_OK;
}

/* Packs the ql query rows of a device-tier sequence (rows row0.. of q, its
 * ids device blocks) into the device batch; runs it when full. */
static apex_status dev_seq(apex_context *ctx, const exec_batch *b, dev_pack *p, int64_t row0,
                           int32_t ql, int32_t len, const int32_t *ids, uint64_t *tokens) {
    int32_t mb = ctx->seqs.max_blocks_per_seq;
    size_t qrow = q_row_bytes(ctx, b->o.q_dtype);
    apex_status st;
    for (int32_t j = 0; j < ql; j++) {
        if (!p->filled && (st = pipeline_sync_slot_wait(ctx))) return st;
        stage_slot *sl = pipeline_sync_slot(ctx);
        int32_t n = row_len(len, ql, j, b->o.window, tokens);
        int32_t r = p->filled++;
        sl->h_idx_g[r] = (int32_t)(row0 + j);
        sl->h_lens[r] = n;
        memcpy(sl->h_table + (size_t)r * mb, ids, (size_t)n_blocks_of(ctx, n) * 4);
        memcpy((uint8_t *)sl->h_q + (size_t)r * qrow,
               (const uint8_t *)b->q + (size_t)(row0 + j) * qrow, qrow);
        if (n > p->max_len) p->max_len = n;
        if (p->filled == ctx->cfg.max_batch &&
            ((st = dev_launch(ctx, b, p, 1)) || (st = dev_finish(ctx, b, p))))
            return st;
    }
    return APEX_OK;
}

/* ---- synchronous: sequences on both tiers */

/* Blocks [first, nb) of a mixed-tier sequence copied, in table order, into
 * the pinned scratch (device blocks D2H on the context's own stream, host
 * blocks by memcpy), so the CPU kernel reads block j of the sequence at
 * scratch block j; the blocks before first lie before every row's window. */
static apex_status gather_blocks(apex_context *ctx, int32_t layer, const int32_t *ids,
                                 int32_t first, int32_t nb, uint8_t *scratch) {
    apex_device *dev = ctx->dev;
    int64_t nd = ctx->pools[APEX_TIER_DEVICE].n_blocks;
    size_t bb = ctx->block_bytes;
    for (int32_t j = first; j < nb; j++) {
        if (ids[j] >= nd) {
            memcpy(scratch + j * bb,
                   block_pool_at(&ctx->pools[APEX_TIER_HOST], layer, (int32_t)(ids[j] - nd)), bb);
            continue;
        }
        apex_status st = dev->iface->memcpy_async(
            dev, scratch + j * bb, block_pool_at(&ctx->pools[APEX_TIER_DEVICE], layer, ids[j]),
            bb, ctx->pipe.own_stream);
        if (st) return st;
    }
    return dev->iface->stream_sync(dev, ctx->pipe.own_stream);
}

/* Pinned scratch for one sequence's blocks (max_blocks_per_seq of them)
 * and the identity block table over it. */
static apex_status gather_scratch(apex_context *ctx, uint8_t **scratch, int32_t **ident) {
    int32_t mb = ctx->seqs.max_blocks_per_seq;
    *ident = malloc((size_t)mb * sizeof **ident);
    if (!*ident) return apex_fail(APEX_ERR_NO_MEMORY, "attention: no memory for a gather");
    for (int32_t j = 0; j < mb; j++) (*ident)[j] = j;
    return ctx->dev->iface->host_alloc(ctx->dev, (size_t)mb * ctx->block_bytes,
                                       (void **)scratch);
}

/* The mixed-tier sequences, one at a time: blocks gathered into host
 * scratch, then the CPU kernel over an identity table. */
static apex_status run_mixed(apex_context *ctx, const exec_batch *b, uint64_t *tokens) {
    apex_device *dev = ctx->dev;
    int32_t bt = ctx->cfg.block_tokens;
    uint8_t *scratch = NULL; /* taken at the first mixed sequence */
    int32_t *ident = NULL;
    cpu_pack p = {0};
    apex_status st = APEX_OK;
    for (int32_t i = 0; !st && i < b->n_seqs; i++) {
        int64_t row0;
        int32_t ql = seq_rows(b, i, &row0), len = b->seq_lens[i];
        if (ql == 0) continue; /* skipped: its length was not checked (fuzz_paged) */
        int32_t nb = n_blocks_of(ctx, len);
        const int32_t *ids = seq_ids(b, i);
        if (seq_tiers(ctx, ids, nb) != ON_BOTH) continue;
        if (!scratch && (st = gather_scratch(ctx, &scratch, &ident))) break;
        ctx->fallbacks++; /* the slow path: reported in APEX_METRICS_FILE */
        uint64_t unused = 0; /* the first row starts the earliest */
        int32_t len0 = row_len(len, ql, 0, b->o.window, &unused);
        int32_t first = b->o.window > 0 && len0 > b->o.window ? (len0 - b->o.window) / bt : 0;
        if (!(st = gather_blocks(ctx, b->layer, ids, first, nb, scratch)) &&
            !(st = cpu_seq(ctx, b, &p, scratch, row0, ql, len, ident, 0, tokens)))
            st = cpu_flush(ctx, b, &p); /* before the scratch is reused */
    }
    if (scratch) dev->iface->host_free(dev, scratch);
    free(ident);
    return st;
}

/* The single-tier sequences: host-tier ones on the CPU kernel (want
 * ON_HOST), or device-tier ones packed into pd (want ON_DEVICE), whose last
 * batch is left launched for dev_finish. */
static apex_status run_tier(apex_context *ctx, const exec_batch *b, int want, dev_pack *pd,
                            uint64_t *tokens) {
    int64_t nd = ctx->pools[APEX_TIER_DEVICE].n_blocks;
    const uint8_t *host_kv = block_pool_layer(&ctx->pools[APEX_TIER_HOST], b->layer);
    cpu_pack pc = {0};
    apex_status st = APEX_OK;
    for (int32_t i = 0; !st && i < b->n_seqs; i++) {
        int64_t row0;
        int32_t ql = seq_rows(b, i, &row0), len = b->seq_lens[i];
        const int32_t *ids = seq_ids(b, i);
        if (ql == 0 || seq_tiers(ctx, ids, n_blocks_of(ctx, len)) != want) continue;
        st = want == ON_HOST ? cpu_seq(ctx, b, &pc, host_kv, row0, ql, len, ids, nd, tokens)
                             : dev_seq(ctx, b, pd, row0, ql, len, ids, tokens);
    }
    if (st) return st;
    return want == ON_HOST ? cpu_flush(ctx, b, &pc) : dev_launch(ctx, b, pd, 1);
}

/* Device-tier sequences first (their last batch runs on the device while
 * the CPU attends the host-tier ones), then the mixed ones. */
static apex_status exec_sync(apex_context *ctx, const exec_batch *b, uint64_t *tokens) {
    pipeline_sync(ctx);
    cpu_workers_pin(&ctx->workers);
    int has_device = ctx->pools[APEX_TIER_DEVICE].n_blocks > 0;
    dev_pack pd = {0};
    apex_status st;
    if ((has_device && (st = run_tier(ctx, b, ON_DEVICE, &pd, tokens))) ||
        (st = run_tier(ctx, b, ON_HOST, NULL, tokens)) ||
        (has_device && (st = run_mixed(ctx, b, tokens))) || (st = dev_finish(ctx, b, &pd)))
        return st;
    return APEX_OK;
}

/* ---- asynchronous: the pipeline's cohort split on an engine stream */

/* The host cohort's CPU job (on the worker thread). */
static void job_attention(void *arg) {
    stage_slot *sl = arg;
    apex_context *ctx = sl->ctx;
    cpu_attn_batch b = {
        .n_seqs = sl->n_c,
        .q = sl->h_q,
        .q_dtype = sl->dtype_in,
        .out = sl->h_out,
        .out_dtype = sl->dtype_out,
        .seq_lens = sl->c_lens,
        .block_table = sl->c_table,
        .block_table_stride = ctx->seqs.max_blocks_per_seq,
        .kv = block_pool_layer(&ctx->pools[APEX_TIER_HOST], sl->layer),
        .block_bytes = ctx->block_bytes,
        .scale = sl->scale,
        .softcap = sl->softcap,
        .window = sl->window,
    };
    cpu_workers_pin(&ctx->workers);
    TRACE_SCOPE(APEX_TRACE_CPU_ATTN, "cpu_attn_decode", sl->layer);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    cpu_attn_decode(&ctx->geom, &b, ctx->ws, ctx->workers.n_threads);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    uint64_t ns = (uint64_t)((t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec));
    __atomic_fetch_add(&ctx->pipe.catt_ns, ns, __ATOMIC_RELAXED);
}

/* What the stream path cannot take: more rows than a staging slot holds,
 * or a sequence on both tiers (no gather is enqueued). */
static apex_status check_enqueue(const apex_context *ctx, const exec_batch *b) {
    int64_t rows = 0;
    for (int32_t i = 0; i < b->n_seqs; i++) {
        int64_t row0;
        int32_t ql = seq_rows(b, i, &row0);
        if (ql == 0) continue;
        rows += ql;
        if (seq_tiers(ctx, seq_ids(b, i), n_blocks_of(ctx, b->seq_lens[i])) == ON_BOTH)
            return apex_fail(APEX_ERR_UNSUPPORTED, "attention on a stream: sequence %d has "
                             "blocks on both tiers (only the synchronous path gathers them)", i);
    }
    if (rows > ctx->cfg.max_batch)
        return apex_fail(APEX_ERR_UNSUPPORTED, "attention on a stream: %lld rows, max_batch "
                         "is %d", (long long)rows, ctx->cfg.max_batch);
    return APEX_OK;
}

#define TRY(call)                      \
    do {                               \
        apex_status st_ = (call);      \
        if (st_) return st_;           \
    } while (0)

/* Enqueues a checked batch on the engine stream s (see pipeline.h). */
static apex_status exec_enqueue(apex_context *ctx, const exec_batch *b, device_stream *s,
                                uint64_t *tokens) {
    pipeline *pl = &ctx->pipe;
    apex_device *dev = pl->dev;
    const device_iface *f = dev->iface;
    const apex_attn_opts *o = &b->o;
    stage_slot *sl = pipeline_acquire(pl);
    int64_t nd = ctx->pools[APEX_TIER_DEVICE].n_blocks;
    int32_t mb = ctx->seqs.max_blocks_per_seq, n_g = 0, n_c = 0, max_len_g = 1;
    for (int32_t i = 0; i < b->n_seqs; i++) {
        int64_t row0;
        int32_t ql = seq_rows(b, i, &row0), len = b->seq_lens[i];
        if (ql == 0) continue;
        const int32_t *ids = seq_ids(b, i);
        int dev_seq = seq_tiers(ctx, ids, n_blocks_of(ctx, len)) == ON_DEVICE;
        for (int32_t j = 0; j < ql; j++) {
            int32_t n = row_len(len, ql, j, o->window, tokens), nb = n_blocks_of(ctx, n);
            if (dev_seq) {
                sl->h_idx_g[n_g] = (int32_t)(row0 + j);
                sl->h_lens[n_g] = n;
                memcpy(sl->h_table + (size_t)n_g * mb, ids, (size_t)nb * 4);
                if (n > max_len_g) max_len_g = n;
                n_g++;
            } else {
                int32_t *dst = sl->c_table + (size_t)n_c * mb;
                sl->h_idx_c[n_c] = (int32_t)(row0 + j);
                sl->c_lens[n_c] = n;
                for (int32_t k = 0; k < nb; k++) dst[k] = (int32_t)(ids[k] - nd);
                n_c++;
            }
        }
    }
    size_t qrow = q_row_bytes(ctx, o->q_dtype), orow = q_row_bytes(ctx, o->out_dtype);
    TRY(f->event_wait(dev, s, pl->ev_copies));
    if (n_c) {
        TRY(f->memcpy_async(dev, sl->d_idx_c, sl->h_idx_c, (size_t)n_c * 4, s));
        apex_cuda_rows t = {.src = b->q, .dst = sl->d_q_c, .src_stride = qrow,
                            .dst_stride = qrow, .row_bytes = qrow};
        TRY(f->gather_rows(dev, &t, 1, sl->d_idx_c, n_c, s));
        TRY(f->event_record(dev, sl->ev_a, s));
        TRY(f->event_wait(dev, pl->copy_stream, sl->ev_a));
        TRY(f->memcpy_async(dev, sl->h_q, sl->d_q_c, (size_t)n_c * qrow, pl->copy_stream));
        TRY(f->event_record(dev, sl->ev_down, pl->copy_stream));
        sl->layer = b->layer;
        sl->n_c = n_c;
        sl->dtype_in = o->q_dtype;
        sl->dtype_out = o->out_dtype;
        sl->scale = o->scale;
        sl->softcap = o->softcap;
        sl->window = o->window;
        sl->job = cpu_jobs_submit(&pl->jobs, (cpu_job){job_attention, sl, sl->ev_down});
        TRY(f->wait_flag(dev, pl->copy_stream, pl->jobs.flag, sl->job));
        TRY(f->memcpy_async(dev, sl->d_out_c, sl->h_out, (size_t)n_c * orow, pl->copy_stream));
        TRY(f->event_record(dev, sl->ev_up, pl->copy_stream));
    }
    if (n_g) {
        TRY(f->memcpy_async(dev, sl->d_lens, sl->h_lens, (size_t)n_g * 4, s));
        TRY(f->memcpy_async(dev, sl->d_table, sl->h_table, (size_t)n_g * mb * 4, s));
        const void *qg = b->q;
        void *outg = b->out;
        if (n_c) { /* the device cohort's rows are not contiguous: gather them */
            TRY(f->memcpy_async(dev, sl->d_idx_g, sl->h_idx_g, (size_t)n_g * 4, s));
            apex_cuda_rows t = {.src = b->q, .dst = sl->d_q_g, .src_stride = qrow,
                                .dst_stride = qrow, .row_bytes = qrow};
            TRY(f->gather_rows(dev, &t, 1, sl->d_idx_g, n_g, s));
            qg = sl->d_q_g;
            outg = sl->d_out_g;
        }
        apex_cuda_decode a = {
            .n_seqs = n_g, .n_q_heads = ctx->cfg.n_q_heads, .n_kv_heads = ctx->cfg.n_kv_heads,
            .head_dim = ctx->cfg.head_dim, .block_tokens = ctx->cfg.block_tokens,
            .kv_dtype = ctx->cfg.kv_dtype, .q_dtype = o->q_dtype, .out_dtype = o->out_dtype,
            .q = qg, .out = outg, .seq_lens = sl->d_lens, .block_table = sl->d_table,
            .block_table_stride = mb,
            .kv = block_pool_layer(&ctx->pools[APEX_TIER_DEVICE], b->layer),
            .block_bytes = ctx->block_bytes, .scale = o->scale, .softcap = o->softcap,
            .window = o->window, .max_seq_len = max_len_g, .workspace = pl->decode_ws,
            .workspace_bytes = pl->decode_ws_bytes,
        };
        TRY(f->paged_decode(dev, &a, s));
        if (n_c) {
            apex_cuda_rows t = {.src = sl->d_out_g, .dst = b->out, .src_stride = orow,
                                .dst_stride = orow, .row_bytes = orow};
            TRY(f->scatter_rows(dev, &t, 1, sl->d_idx_g, n_g, s));
        }
    }
    if (n_c) {
        TRY(f->event_wait(dev, s, sl->ev_up));
        apex_cuda_rows t = {.src = sl->d_out_c, .dst = b->out, .src_stride = orow,
                            .dst_stride = orow, .row_bytes = orow};
        TRY(f->scatter_rows(dev, &t, 1, sl->d_idx_c, n_c, s));
    }
    TRY(pipeline_finish(pl, sl, s));
    ctx->stats.seqs_attended_device += (uint64_t)n_g;
    ctx->stats.seqs_attended_host += (uint64_t)n_c;
    return APEX_OK;
}

/* ---- K/V rows, synchronously */

static const uint8_t *row_at(const void *p, apex_dtype t, int64_t stride, int64_t i) {
    return (const uint8_t *)p + (size_t)i * (size_t)stride * apex_dtype_size(t);
}

/* Enqueues the store of one staged chunk of device-tier rows (h_slots,
 * h_k, h_v of the sync slot, copied up unless up is 0) with the device's
 * kv_append kernel. */
static apex_status append_enqueue(apex_context *ctx, int32_t layer, int32_t m, apex_dtype src,
                                  int up) {
    apex_device *dev = ctx->dev;
    const device_iface *f = dev->iface;
    device_stream *s = ctx->pipe.own_stream;
    stage_slot *sl = pipeline_sync_slot(ctx);
    size_t row = (size_t)ctx->cfg.n_kv_heads * ctx->cfg.head_dim * apex_dtype_size(src);
    apex_cuda_kv_append a = {
        .n_rows = m, .n_kv_heads = ctx->cfg.n_kv_heads, .head_dim = ctx->cfg.head_dim,
        .block_tokens = ctx->cfg.block_tokens, .k = sl->d_k, .v = sl->d_v, .src_dtype = src,
        .slots = sl->d_slots, .kv = block_pool_layer(&ctx->pools[APEX_TIER_DEVICE], layer),
        .block_bytes = ctx->block_bytes, .kv_dtype = ctx->cfg.kv_dtype,
    };
    apex_status st;
    if ((up && (st = f->memcpy_async(dev, sl->d_slots, sl->h_slots, (size_t)m * 8, s))) ||
        (up && (st = f->memcpy_async(dev, sl->d_k, sl->h_k, (size_t)m * row, s))) ||
        (up && (st = f->memcpy_async(dev, sl->d_v, sl->h_v, (size_t)m * row, s))) ||
        (st = f->kv_append(dev, &a, s)))
        return st;
    return APEX_OK;
}

/* The same, waited for. */
static apex_status append_chunk(apex_context *ctx, int32_t layer, int32_t m, apex_dtype src) {
    apex_status st = append_enqueue(ctx, layer, m, src, 1);
    return st ? st : ctx->dev->iface->stream_sync(ctx->dev, ctx->pipe.own_stream);
}

/* The device-tier rows (slots below dev_slots: the device slot itself). */
static apex_status write_device(apex_context *ctx, const exec_rows *r, int64_t dev_slots) {
    TRACE_SCOPE(APEX_TRACE_COPY, "device rows", r->layer);
    stage_slot *sl = pipeline_sync_slot(ctx);
    size_t row = (size_t)ctx->cfg.n_kv_heads * ctx->cfg.head_dim * apex_dtype_size(r->dtype);
    int32_t m = 0;
    apex_status st = pipeline_sync_slot_wait(ctx);
    if (st) return st;
    for (int64_t i = 0; i < r->n; i++) {
        if (r->slots[i] < 0 || r->slots[i] >= dev_slots) continue;
        memcpy((uint8_t *)sl->h_k + (size_t)m * row, row_at(r->k, r->dtype, r->k_stride, i), row);
        memcpy((uint8_t *)sl->h_v + (size_t)m * row, row_at(r->v, r->dtype, r->v_stride, i), row);
        sl->h_slots[m++] = r->slots[i];
        if (m == ctx->cfg.max_batch) {
            if ((st = append_chunk(ctx, r->layer, m, r->dtype))) return st;
            m = 0;
        }
    }
    return m ? append_chunk(ctx, r->layer, m, r->dtype) : APEX_OK;
}

apex_status exec_kv_write(apex_context *ctx, const exec_rows *r) {
    int64_t dev_slots = (int64_t)ctx->pools[APEX_TIER_DEVICE].n_blocks * ctx->cfg.block_tokens;
    int64_t on_device = 0, on_host = 0;
    for (int64_t i = 0; i < r->n; i++) {
        on_device += r->slots[i] >= 0 && r->slots[i] < dev_slots;
        on_host += r->slots[i] >= dev_slots;
    }
    pipeline_sync(ctx);
    apex_status st;
    if (on_device && (st = write_device(ctx, r, dev_slots))) return st;
    if (!on_host) return APEX_OK;
    TRACE_SCOPE(APEX_TRACE_COPY, "host rows", r->layer);
    for (int64_t i = 0; i < r->n; i++) {
        if (r->slots[i] < dev_slots) continue;
        int64_t slot = r->slots[i] - dev_slots;
        block_pool_store_rows(&ctx->pools[APEX_TIER_HOST], &ctx->layout, ctx->cfg.kv_dtype,
                              ctx->cfg.n_kv_heads, r->layer, 1, &slot,
                              row_at(r->k, r->dtype, r->k_stride, i),
                              row_at(r->v, r->dtype, r->v_stride, i), r->dtype);
    }
    return APEX_OK;
}

/* ---- one layer asynchronously: apex_paged_submit / apex_paged_wait */

int exec_in_flight(const apex_context *ctx) { return ctx->pipe.sub_state != 0; }

apex_status exec_submit(apex_context *ctx, const exec_rows *r, const exec_batch *b) {
    TRACE_SCOPE(APEX_TRACE_CALL, "exec_submit", b->layer);
    const device_iface *f = ctx->dev->iface;
    pipeline *pl = &ctx->pipe;
    stage_slot *sl = pipeline_sync_slot(ctx);
    pipeline_sync(ctx);
    apex_status st = pipeline_sync_slot_wait(ctx);
    if (st) return st;
    /* Everything is staged before the first enqueue, so the caller's
     * buffers (but out) are free on return. The rows (h_slots, h_k, h_v)
     * and the attention (h_lens, h_table, h_q, h_out, h_idx_g) are disjoint
     * pieces of the slot (pipeline.c's layout): one slot holds both. */
    size_t row = (size_t)ctx->cfg.n_kv_heads * ctx->cfg.head_dim * apex_dtype_size(r->dtype);
    int32_t m = 0; /* rows stored */
    for (int64_t i = 0; i < r->n; i++) {
        if (r->slots[i] < 0) continue;
        memcpy((uint8_t *)sl->h_k + (size_t)m * row, row_at(r->k, r->dtype, r->k_stride, i), row);
        memcpy((uint8_t *)sl->h_v + (size_t)m * row, row_at(r->v, r->dtype, r->v_stride, i), row);
        sl->h_slots[m++] = r->slots[i];
    }
    int32_t mb = ctx->seqs.max_blocks_per_seq;
    size_t qrow = q_row_bytes(ctx, b->o.q_dtype);
    dev_pack p = {0};
    uint64_t tokens = 0;
    for (int32_t i = 0; i < b->n_seqs; i++) {
        int64_t row0;
        int32_t ql = seq_rows(b, i, &row0), len = b->seq_lens[i];
        const int32_t *ids = seq_ids(b, i);
        for (int32_t j = 0; j < ql; j++) {
            int32_t n = row_len(len, ql, j, b->o.window, &tokens);
            int32_t k = p.filled++;
            sl->h_idx_g[k] = (int32_t)(row0 + j);
            sl->h_lens[k] = n;
            memcpy(sl->h_table + (size_t)k * mb, ids, (size_t)n_blocks_of(ctx, n) * 4);
            memcpy((uint8_t *)sl->h_q + (size_t)k * qrow,
                   (const uint8_t *)b->q + (size_t)(row0 + j) * qrow, qrow);
            if (n > p.max_len) p.max_len = n;
        }
    }
    /* Inputs up in one copy when the pieces lie alike in both halves
     * (pipeline.c's layout) and the span is mostly used bytes: fewer
     * commands, and on the emulated device fewer wake-ups of its thread. */
    const uint8_t *h0 = (const uint8_t *)sl->h_lens;
    uint8_t *d0 = (uint8_t *)sl->d_lens;
    const int alike = (uint8_t *)sl->d_slots - d0 == (const uint8_t *)sl->h_slots - h0 &&
                      (uint8_t *)sl->d_table - d0 == (const uint8_t *)sl->h_table - h0 &&
                      (uint8_t *)sl->d_q_g - d0 == (const uint8_t *)sl->h_q - h0 &&
                      (uint8_t *)sl->d_k - d0 == (const uint8_t *)sl->h_k - h0 &&
                      (uint8_t *)sl->d_v - d0 == (const uint8_t *)sl->h_v - h0;
    const size_t used = (size_t)p.filled * (4 + (size_t)mb * 4 + qrow) + (size_t)m * (8 + 2 * row);
    const size_t span = m ? (size_t)((const uint8_t *)sl->h_v - h0) + (size_t)m * row
                          : (size_t)((const uint8_t *)sl->h_q - h0) + (size_t)p.filled * qrow;
    const int one = alike && (m || p.filled) && span <= 2 * used + 16384;
    /* The rows first: the kernel reads them (one stream: in order). */
    if ((one && (st = f->memcpy_async(ctx->dev, d0, h0, span, pl->own_stream))) ||
        (m && (st = append_enqueue(ctx, r->layer, m, r->dtype, !one))) ||
        (st = dev_launch(ctx, b, &p, !one))) {
        f->stream_sync(ctx->dev, pl->own_stream); /* nothing outlives a failed submit */
        return st;
    }
    pl->sub_state = 1;
    pl->sub_timed = p.timed;
    pl->sub_rows = p.filled;
    pl->sub_layer = b->layer;
    pl->sub_out = b->out;
    pl->sub_out_dtype = b->o.out_dtype;
    pl->sub_tokens = tokens;
    pl->sub_written = (uint64_t)m;
    return APEX_OK;
}

void exec_complete(apex_context *ctx) {
    pipeline *pl = &ctx->pipe;
    exec_batch b = {.layer = pl->sub_layer, .out = pl->sub_out};
    b.o.out_dtype = pl->sub_out_dtype;
    dev_pack p = {.filled = pl->sub_rows, .launched = pl->sub_rows > 0, .timed = pl->sub_timed};
    apex_status st = p.launched
                         ? dev_finish(ctx, &b, &p)
                         : ctx->dev->iface->stream_sync(ctx->dev, pl->own_stream); /* rows only */
    if (st == APEX_OK) {
        ctx->stats.kv_tokens_attended += pl->sub_tokens;
        ctx->stats.kv_rows_written += pl->sub_written;
    }
    pl->sub_status = st;
    pl->sub_state = 2;
}

apex_status exec_wait(apex_context *ctx) {
    pipeline *pl = &ctx->pipe;
    if (pl->sub_state == 1) exec_complete(ctx);
    pl->sub_state = 0; /* whatever the status: a failed wait leaves nothing in flight */
    return pl->sub_status;
}

/* ---- the entry point */

apex_status exec_attention(apex_context *ctx, const exec_batch *b, device_stream *s) {
    uint64_t tokens = 0;
    apex_status st;
    if (!s) {
        st = exec_sync(ctx, b, &tokens);
    } else if (!ctx->dev) {
        st = apex_fail(APEX_ERR_UNSUPPORTED, "attention on a stream: no device (host mode)");
    } else if ((st = check_enqueue(ctx, b)) == APEX_OK &&
               (st = exec_enqueue(ctx, b, s, &tokens)) != APEX_OK) {
        st = pipeline_abandon(&ctx->pipe, s, st);
    }
    if (st == APEX_OK) ctx->stats.kv_tokens_attended += tokens;
    return st;
}

void exec_destroy(apex_context *ctx) {
    free(ctx->exec_q);
    free(ctx->exec_out);
    ctx->exec_q = ctx->exec_out = NULL;
}
