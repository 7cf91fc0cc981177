#include "csrc/context.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_attn/dtype_convert.h"
#include "cpu_attn/kv_layout.h"
#include "csrc/error.h"
#include "csrc/config.h"
#include "csrc/fault.h"
#include "csrc/host_mem.h"
#include "csrc/trace.h"
#include "csrc/env.h"

/* seq_table's copy-on-write hook: host blocks are copied once the CPU
 * worker (which may still be writing them) is idle; device blocks on the
 * context's own stream, ordered after the engine stream's work. */
static apex_status copy_block(void *user, apex_tier tier, int32_t dst, int32_t src) {
    apex_context *ctx = user;
    if (tier == APEX_TIER_DEVICE) return pipeline_copy_device_block(ctx, dst, src);
    if (ctx->dev) cpu_jobs_drain(&ctx->pipe.jobs);
    block_pool_copy(&ctx->pools[APEX_TIER_HOST], dst, src);
    return APEX_OK;
}

static apex_status copy_blocks(void *user, apex_tier from, const int32_t *src,
                               const int32_t *dst, int32_t n) {
    return pipeline_copy_between_tiers(user, from, src, dst, n);
}

apex_status context_migrate(apex_context *ctx, int32_t seq, apex_tier tier) {
    if (!ctx->dev)
        return apex_fail(APEX_ERR_UNSUPPORTED, "no device in this context (host mode): "
                                               "nothing to migrate to");
    const seq_entry *e = seq_table_get(&ctx->seqs, seq);
    if (!e) return APEX_ERR_UNKNOWN_SEQ;
    apex_tier was = e->tier;
    apex_status st = seq_table_move(&ctx->seqs, seq, tier, copy_blocks, ctx);
    if (st == APEX_OK && was != tier) ctx->stats.migrations[tier]++;
    return st;
}

apex_status context_reserve(apex_context *ctx, int32_t seq, int32_t n, int32_t *first_pos) {
    apex_status st = seq_table_reserve(&ctx->seqs, seq, n, first_pos);
    if (st != APEX_ERR_OUT_OF_BLOCKS || !ctx->dev) return st;
    const seq_entry *e = &ctx->seqs.seqs[seq];
    if (e->tier != APEX_TIER_DEVICE) return st;
    /* Spill only if the host can take the sequence and its growth. */
    int32_t bt = ctx->cfg.block_tokens;
    int32_t need = (e->len + n + bt - 1) / bt;
    if (need > ctx->pools[APEX_TIER_HOST].n_free) return st;
    if (context_migrate(ctx, seq, APEX_TIER_HOST) != APEX_OK) return st;
    return seq_table_reserve(&ctx->seqs, seq, n, first_pos);
}

/* Opens the configured device, or none (host mode). */
static apex_status open_device(apex_context *ctx) {
    apex_device_kind kind = ctx->cfg.device;
    if (kind == APEX_DEVICE_AUTO) {
#ifdef APEX_HAVE_CUDA_DEVICE
        kind = apex_cuda_device_count() > 0 ? APEX_DEVICE_CUDA : APEX_DEVICE_NONE;
#else
        kind = APEX_DEVICE_NONE;
#endif
    }
    if (kind == APEX_DEVICE_EMULATED) {
        const char *mb = apex_env_get(APEX_ENV_EMU_DEVICE_MB);
        size_t bytes = (size_t)(mb && atol(mb) > 0 ? atol(mb) : 256) << 20;
        return device_emulated_create(bytes, &ctx->dev);
    }
    if (kind == APEX_DEVICE_CUDA) {
#ifdef APEX_HAVE_CUDA_DEVICE
        apex_status st = device_cuda_create(0, &ctx->dev);
        if (st == APEX_OK) return APEX_OK;
        fprintf(stderr, "apex: no usable CUDA device (%s): host mode\n", apex_last_error());
#else
        fprintf(stderr, "apex: built without the CUDA device: host mode\n");
#endif
    }
    ctx->dev = NULL;
    return APEX_OK;
}

static void pin_host_pool(apex_context *ctx);

/* The device side of a context: the pipeline's staging (first: it is
 * needed at all), then the device pool, which takes what is left. */
static apex_status open_device_tier(apex_context *ctx) {
    apex_status st = pipeline_init(ctx);
    if (st) return st;
    int32_t want = (int32_t)ctx->cfg.device_blocks, got = want;
    st = block_pool_init_device(&ctx->pools[APEX_TIER_DEVICE], ctx->dev, &got,
                                ctx->cfg.n_layers, ctx->block_bytes);
    if (st) return st;
    if (got < want)
        fprintf(stderr, "apex: the %s device holds %d of the %d device blocks asked for\n",
                ctx->dev->iface->name, got, want);
    ctx->cfg.device_blocks = got;
    pin_host_pool(ctx);
    return APEX_OK;
}

/* The host pool's memory as maximal runs of adjacent layers: the pool's own
 * slab is one run; engine memory is one run per group of layers that follow
 * each other without a gap (vLLM's layer-outer tensor: one run), so no page
 * is registered twice. Calls fn(base, bytes) for each run until it fails. */
static apex_status host_pool_runs(apex_context *ctx,
                                  apex_status (*fn)(apex_context *, void *, size_t)) {
    const block_pool *hp = &ctx->pools[APEX_TIER_HOST];
    if (!hp->external) return hp->mem ? fn(ctx, hp->mem, hp->mem_bytes) : APEX_OK;
    size_t lb = block_pool_layer_bytes(hp);
    if (lb == 0) return APEX_OK;
    for (int32_t l = 0; l < hp->n_layers;) {
        int32_t e = l + 1;
        while (e < hp->n_layers && hp->layer_mem[e] == hp->layer_mem[e - 1] + lb) e++;
        apex_status st = fn(ctx, hp->layer_mem[l], (size_t)(e - l) * lb);
        if (st) return st;
        l = e;
    }
    return APEX_OK;
}

static apex_status pin_run(apex_context *ctx, void *p, size_t bytes) {
    apex_status st = fault_fail(FAULT_PIN)
                         ? apex_fail(APEX_ERR_INTERNAL, "cudaHostRegister of %zu bytes: "
                                                        "cudaErrorMemoryAllocation (injected)",
                                     bytes)
                         : ctx->dev->iface->host_register(ctx->dev, p, bytes);
    if (st == APEX_OK) ctx->host_pool_pinned++;
    return st;
}

static apex_status unpin_run(apex_context *ctx, void *p, size_t bytes) {
    (void)bytes;
    if (ctx->host_pool_pinned == 0) return APEX_ERR_INTERNAL; /* stop: the rest was never pinned */
    ctx->dev->iface->host_unregister(ctx->dev, p);
    ctx->host_pool_pinned--;
    return APEX_OK;
}

static void unpin_host_pool(apex_context *ctx) {
    if (!ctx->host_pool_pinned) return;
    host_pool_runs(ctx, unpin_run); /* the first host_pool_pinned runs, in order */
    ctx->host_pool_pinned = 0;
}

/* Pins the host pool (own slab or engine memory) so tier moves are true
 * async DMA; a failure (too much to lock, memory the engine pinned itself)
 * only costs copy speed and leaves nothing registered.
 * APEX_PIN_HOST_POOL=0 skips it. */
static void pin_host_pool(apex_context *ctx) {
    const char *pin = apex_env_get(APEX_ENV_PIN_HOST_POOL);
    if (!ctx->dev->iface->host_register || (pin && !strcmp(pin, "0"))) return;
    if (host_pool_runs(ctx, pin_run) != APEX_OK) {
        fprintf(stderr, "apex: host KV pool%s not pinned (%s): tier moves copy slower\n",
                ctx->pools[APEX_TIER_HOST].external ? " (engine memory)" : "",
                apex_last_error());
        unpin_host_pool(ctx);
    }
}

static void close_device_tier(apex_context *ctx) {
    unpin_host_pool(ctx);
    pipeline_destroy(ctx);
    block_pool_destroy(&ctx->pools[APEX_TIER_DEVICE]);
    ctx->pools[APEX_TIER_DEVICE].tier = APEX_TIER_DEVICE;
    ctx->dev->iface->destroy(ctx->dev);
    ctx->dev = NULL;
}

apex_status context_create(const apex_config *cfg, apex_context **out) {
    return context_create_on(cfg, NULL, out);
}

static apex_status huge_run(apex_context *ctx, void *p, size_t bytes) {
    (void)ctx;
    host_mem_huge(p, bytes);
    return APEX_OK;
}

/* With APEX_HUGE_ENGINE_KV=1, the engine's host KV on transparent huge
 * pages, as APEX's own pool is: the CPU kernel reads scattered blocks, and
 * on vLLM's 4 KiB pages a cold call runs 4-5 % slower. Opt-in: collapsing
 * touched memory ran at 0.4-4.4 GB/s here, seconds per GB of KV at start
 * (docs/cpu_kernel.md). */
static void huge_engine_kv(apex_context *ctx) {
    const char *e = apex_env_get(APEX_ENV_HUGE_ENGINE_KV);
    if (!e || strcmp(e, "1") != 0) return;
    host_pool_runs(ctx, huge_run);
}

/* Without a device, bf16 KV is held in the CPU pair layout (kv_layout.h)
 * when the kernel reads it: 8-42 % more in-cache speed than rows, by geometry
 * (docs/cpu_kernel.md, kern6). With a device both tiers keep the row
 * layout, so that a block moves between them as a copy. APEX_KV_LAYOUT=rows
 * keeps rows. */
static void choose_kv_layout(apex_context *ctx) {
    const char *e = apex_env_get(APEX_ENV_KV_LAYOUT);
    cpu_attn_geom g = ctx->geom;
    g.kv_pairs = 1;
    ctx->geom.kv_pairs = ctx->host_mode && !(e && strcmp(e, "rows") == 0) && cpu_attn_pairs_ok(&g);
    ctx->layout.pairs = ctx->geom.kv_pairs;
}

apex_status context_create_on(const apex_config *cfg, void *const *host_layer_kv,
                              apex_context **out) {
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
    ctx->layout = apex_kv_layout_of(cfg->n_kv_heads, cfg->block_tokens, cfg->head_dim,
                                    apex_dtype_size(cfg->kv_dtype));
    ctx->cfg.host_blocks = apex_config_host_blocks(cfg);
    ctx->pools[APEX_TIER_DEVICE].tier = APEX_TIER_DEVICE;

    /* The device first: its PCI locality picks the worker cores (unless
     * cpu_set says otherwise) and so the host pool's NUMA node. */
    apex_status st = open_device(ctx);
    if (st) goto fail;
    char busid[32] = "";
    if (ctx->dev && ctx->dev->iface->pci_bus_id &&
        ctx->dev->iface->pci_bus_id(ctx->dev, busid, (int)sizeof busid) != APEX_OK)
        busid[0] = '\0';
    st = cpu_workers_init(&ctx->workers, ctx->cpu_set, cfg->n_threads, busid[0] ? busid : NULL);
    if (st) goto fail;
    ctx->cfg.n_threads = ctx->workers.n_threads;
    if (host_layer_kv) { /* the engine's memory (checked by apex_paged_context_create) */
        st = block_pool_init_host_external(&ctx->pools[APEX_TIER_HOST], host_layer_kv,
                                           (int32_t)ctx->cfg.host_blocks, cfg->n_layers,
                                           ctx->block_bytes);
        if (st == APEX_OK) huge_engine_kv(ctx); /* before pinning: pinned pages stay put */
    } else
        st = block_pool_init_host(&ctx->pools[APEX_TIER_HOST], &ctx->workers,
                                  (int32_t)ctx->cfg.host_blocks, cfg->n_layers, ctx->block_bytes);
    if (st) goto fail;
    st = seq_table_init(&ctx->seqs, cfg->max_seqs, cfg->max_seq_len, cfg->block_tokens,
                        &ctx->pools[APEX_TIER_DEVICE], &ctx->pools[APEX_TIER_HOST]);
    if (st) goto fail;
    ctx->seqs.copy_block = copy_block;
    ctx->seqs.copy_user = ctx;

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
    size_t tbl = (size_t)cfg->max_batch * (size_t)ctx->seqs.max_blocks_per_seq;
    ctx->exec_rows = malloc((size_t)cfg->max_batch * sizeof *ctx->exec_rows);
    ctx->call_lens = malloc((size_t)cfg->max_batch * sizeof *ctx->call_lens);
    ctx->call_slots = malloc((size_t)cfg->max_batch * sizeof *ctx->call_slots);
    ctx->call_table = malloc(tbl * sizeof *ctx->call_table);
    ctx->seq_mark = calloc((size_t)cfg->max_seqs, sizeof *ctx->seq_mark);
    if (!ctx->ws || !ctx->batch_lens || !ctx->batch_table || !ctx->seq_mark || !ctx->exec_rows ||
        !ctx->call_lens || !ctx->call_table || !ctx->call_slots) {
        st = apex_fail(APEX_ERR_NO_MEMORY, "out of memory for the attention workspace");
        goto fail;
    }

    int said = 0; /* the fallback is reported once, in one line */
    if (ctx->dev && (st = open_device_tier(ctx)) != APEX_OK) {
        /* Pinned staging or device memory could not be had: carry on in
         * host mode rather than fail the engine. */
        fprintf(stderr, "apex: %s device unusable (%s): host mode\n", ctx->dev->iface->name,
                apex_last_error());
        close_device_tier(ctx);
        said = 1;
    }
    ctx->host_mode = ctx->dev == NULL;
    choose_kv_layout(ctx);
    if (!ctx->dev) {
        if (cfg->device_blocks > 0 && !said)
            fprintf(stderr, "apex: host mode (no device): device_blocks %lld -> 0\n",
                    (long long)cfg->device_blocks);
        ctx->cfg.device_blocks = 0;
    }
    cpu_workers_pin(&ctx->workers);
    if (apex_metrics_sink_open(&ctx->metrics, "an apex_context")) context_metrics_tick(ctx, 1);
    *out = ctx;
    return APEX_OK;
fail:
    context_destroy(ctx);
    return st;
}

void context_destroy(apex_context *ctx) {
    if (!ctx) return;
    context_metrics_tick(ctx, 1); /* the final figures */
    apex_metrics_sink_close(&ctx->metrics);
    pipeline_destroy(ctx);
    if (ctx->dev) unpin_host_pool(ctx);
    cpu_attn_ws_destroy(ctx->ws);
    free(ctx->batch_lens);
    free(ctx->batch_table);
    free(ctx->seq_mark);
    free(ctx->exec_rows);
    free(ctx->call_lens);
    free(ctx->call_table);
    free(ctx->call_slots);
    exec_destroy(ctx);
    seq_table_destroy(&ctx->seqs);
    block_pool_destroy(&ctx->pools[APEX_TIER_DEVICE]);
    block_pool_destroy(&ctx->pools[APEX_TIER_HOST]);
    if (ctx->dev) ctx->dev->iface->destroy(ctx->dev);
    cpu_workers_destroy(&ctx->workers);
    free(ctx);
}

void context_metrics_tick(apex_context *ctx, int force) {
    if (!ctx->metrics.path[0] || (!force && !apex_metrics_due(&ctx->metrics))) return;
    apex_metrics m;
    apex_metrics_init(&m, "libapex");
    const apex_stats *s = &ctx->stats;
    m.attention_calls = s->attention_calls;
    m.kv_rows_written = s->kv_rows_written;
    m.seq_attentions[APEX_TIER_DEVICE] = s->seqs_attended_device;
    m.seq_attentions[APEX_TIER_HOST] = s->seqs_attended_host;
    m.migrations[APEX_TIER_DEVICE] = s->migrations[APEX_TIER_DEVICE];
    m.migrations[APEX_TIER_HOST] = s->migrations[APEX_TIER_HOST];
    m.fallbacks = ctx->fallbacks;
    m.errors = s->errors;
    m.attention_seconds = s->attention_seconds;
    int64_t seqs[2] = {0, 0};
    for (int32_t i = 0; i < ctx->seqs.max_seqs; i++)
        if (ctx->seqs.seqs[i].active) seqs[ctx->seqs.seqs[i].tier]++;
    /* An engine that owns its block tables keeps its sequences to itself. */
    int claimed = ctx->owner == CTX_OWNER_ENGINE;
    for (int t = 0; t < 2; t++) {
        m.blocks_free[t] = ctx->pools[t].n_free;
        m.blocks_used[t] = ctx->pools[t].n_blocks - ctx->pools[t].n_free;
        m.kv_bytes[t] = (int64_t)ctx->pools[t].n_blocks * (int64_t)ctx->block_bytes * ctx->cfg.n_layers;
        m.seqs[t] = claimed ? -1 : seqs[t];
    }
    /* The summary exists only while tracing (asked first: a refused
     * apex_step_summary_get would replace the caller's error message). */
    m.has_step_summary = apex_trace_level() > 0 && apex_step_summary_get(&m.step) == APEX_OK;
    apex_metrics_tick(&ctx->metrics, &m, 1);
}

/* Byte offset of pool slot (block * bt + row), kv head 0, K (which 0) or V
 * (which 1) within its layer slab; head h is layout.panel further. */
static size_t slot_offset(const apex_context *ctx, int64_t slot, int which) {
    const apex_kv_layout l = ctx->layout;
    return (size_t)apex_kv_slot_block(slot, l.block_tokens) * ctx->block_bytes +
           apex_kv_offset(&l, which, 0, apex_kv_slot_row(slot, l.block_tokens));
}

static int64_t pos_slot(const apex_context *ctx, int32_t seq, int32_t pos) {
    return apex_kv_slot_of(seq_table_row(&ctx->seqs, seq), pos, ctx->cfg.block_tokens);
}

apex_status context_seq_model(const apex_context *ctx, const char *fn) {
    if (ctx->owner != CTX_OWNER_ENGINE) return APEX_OK;
    return apex_fail(APEX_ERR_INVALID_ARG,
                     "%s: this context's blocks belong to the engine (apex_paged_claim claimed "
                     "them): %s is for contexts whose sequences APEX owns (apex_seq_add)",
                     fn, fn);
}

void context_owner_update(apex_context *ctx) {
    if (ctx->owner != CTX_OWNER_ENGINE)
        ctx->owner = ctx->seqs.n_active > 0 ? CTX_OWNER_APEX : CTX_OWNER_NONE;
}

apex_status context_kv_write(apex_context *ctx, int32_t layer, int32_t n, const int32_t *seqs,
                             const int32_t *pos, const void *k, const void *v, apex_dtype src) {
    /* Engine slots: host slots follow the device tier's. */
    int64_t dev_slots = (int64_t)ctx->pools[APEX_TIER_DEVICE].n_blocks * ctx->cfg.block_tokens;
    for (int32_t i = 0; i < n; i++)
        ctx->call_slots[i] = pos_slot(ctx, seqs[i], pos[i]) +
                             (ctx->seqs.seqs[seqs[i]].tier == APEX_TIER_HOST ? dev_slots : 0);
    int64_t row = (int64_t)ctx->cfg.n_kv_heads * ctx->cfg.head_dim;
    exec_rows r = {.layer = layer, .n = n, .slots = ctx->call_slots, .k = k, .k_stride = row,
                   .v = v, .v_stride = row, .dtype = src};
    return exec_kv_write(ctx, &r);
}

/* context_kv_read for the pair layout (host tier only: no device),
 * element by element. */
static apex_status kv_read_pairs(apex_context *ctx, int32_t layer, int32_t n, const int32_t *seqs,
                                 const int32_t *pos, void *k, void *v, apex_dtype dst) {
    const int32_t hk = ctx->cfg.n_kv_heads, d = ctx->cfg.head_dim, bt = ctx->layout.block_tokens;
    const size_t kel = apex_dtype_size(ctx->cfg.kv_dtype), del = apex_dtype_size(dst);
    uint8_t tmp[APEX_MAX_HEAD_DIM * 4];
    for (int32_t i = 0; i < n; i++) {
        const int64_t slot = pos_slot(ctx, seqs[i], pos[i]);
        const uint8_t *blk = block_pool_layer(&ctx->pools[APEX_TIER_HOST], layer) +
                             (size_t)apex_kv_slot_block(slot, bt) * ctx->block_bytes;
        const int32_t t = apex_kv_slot_row(slot, bt);
        for (int32_t h = 0; h < hk; h++)
            for (int w = 0; w < 2; w++) {
                for (int32_t e = 0; e < d; e++)
                    memcpy(tmp + (size_t)e * kel,
                           blk + apex_kv_elem_offset(&ctx->layout, w, h, t, e, kel), kel);
                apex_dtype_convert((uint8_t *)(w ? v : k) + ((size_t)i * hk + (size_t)h) * d * del,
                                   dst, tmp, ctx->cfg.kv_dtype, (size_t)d);
            }
    }
    return APEX_OK;
}

apex_status context_kv_read(apex_context *ctx, int32_t layer, int32_t n, const int32_t *seqs,
                            const int32_t *pos, void *k, void *v, apex_dtype dst) {
    pipeline_sync(ctx);
    int32_t hk = ctx->cfg.n_kv_heads, d = ctx->cfg.head_dim;
    size_t kel = apex_dtype_size(ctx->cfg.kv_dtype), del = apex_dtype_size(dst);
    size_t head_stride = ctx->layout.panel;
    uint8_t tmp[2][256 * 4];
    if (ctx->layout.pairs) return kv_read_pairs(ctx, layer, n, seqs, pos, k, v, dst);
    for (int32_t i = 0; i < n; i++) {
        const seq_entry *e = &ctx->seqs.seqs[seqs[i]];
        int64_t slot = pos_slot(ctx, seqs[i], pos[i]);
        const uint8_t *slab = block_pool_layer(&ctx->pools[e->tier], layer);
        for (int32_t h = 0; h < hk; h++) {
            const uint8_t *src[2] = {slab + slot_offset(ctx, slot, 0) + h * head_stride,
                                     slab + slot_offset(ctx, slot, 1) + h * head_stride};
            for (int w = 0; w < 2; w++) {
                if (e->tier == APEX_TIER_DEVICE) {
                    const device_iface *f = ctx->dev->iface;
                    apex_status st = f->memcpy_async(ctx->dev, tmp[w], src[w], (size_t)d * kel,
                                                     ctx->pipe.own_stream);
                    if (!st) st = f->stream_sync(ctx->dev, ctx->pipe.own_stream);
                    if (st) {
                        pipeline_sync(ctx);
                        return st;
                    }
                    src[w] = tmp[w];
                }
            }
            size_t at = ((size_t)i * hk + (size_t)h) * (size_t)d * del;
            apex_dtype_convert((uint8_t *)k + at, dst, src[0], ctx->cfg.kv_dtype, (size_t)d);
            apex_dtype_convert((uint8_t *)v + at, dst, src[1], ctx->cfg.kv_dtype, (size_t)d);
        }
    }
    return APEX_OK;
}

int32_t context_first_repeat(apex_context *ctx, int32_t n, const int32_t *seqs) {
    if (++ctx->mark_epoch == 0) { /* wrapped: old stamps could alias */
        memset(ctx->seq_mark, 0, (size_t)ctx->cfg.max_seqs * sizeof *ctx->seq_mark);
        ctx->mark_epoch = 1;
    }
    for (int32_t i = 0; i < n; i++) {
        if (ctx->seq_mark[seqs[i]] == ctx->mark_epoch) return i;
        ctx->seq_mark[seqs[i]] = ctx->mark_epoch;
    }
    return -1;
}

apex_status context_attention(apex_context *ctx, int32_t layer, int32_t n,
                              const int32_t *seqs, const void *q, void *out,
                              const apex_attn_opts *opts, device_stream *s) {
    const seq_table *t = &ctx->seqs;
    int32_t mb = t->max_blocks_per_seq;
    int32_t nd = ctx->pools[APEX_TIER_DEVICE].n_blocks; /* host ids follow device ids */
    for (int32_t i = 0; i < n; i++) {
        const seq_entry *e = &t->seqs[seqs[i]];
        const int32_t *row = seq_table_row(t, seqs[i]);
        int32_t *dst = ctx->call_table + (size_t)i * mb, off = e->tier == APEX_TIER_HOST ? nd : 0;
        ctx->call_lens[i] = e->len;
        if (off == 0)
            memcpy(dst, row, (size_t)e->n_blocks * sizeof *dst);
        else
            for (int32_t b = 0; b < e->n_blocks; b++) dst[b] = row[b] + off;
    }
    exec_batch b = {
        .layer = layer, .n_seqs = n, .qsl = NULL, .seq_lens = ctx->call_lens,
        .table = ctx->call_table, .stride = mb, .q = q, .out = out, .o = *opts,
    };
    return exec_attention(ctx, &b, s);
}
