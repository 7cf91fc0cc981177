/*
 * context.h - what an apex_context owns. Everything a context needs lives
 * here, so two contexts share nothing but read-only process facts (the
 * chosen CPU kernel variant).
 */
#ifndef APEX_CONTEXT_H
#define APEX_CONTEXT_H

#include "apex/apex.h"
#include "cpu_attn/cpu_attn.h"
#include "csrc/block_pool.h"
#include "csrc/cpu_workers.h"
#include "csrc/device.h"
#include "csrc/metrics.h"
#include "csrc/pipeline.h"
#include "csrc/seq_table.h"
#include "csrc/step_sched.h"

struct apex_context {
    apex_config cfg;            /* resolved; cfg.cpu_set points at cpu_set */
    char cpu_set[256];
    int host_mode;              /* no device: every sequence on the host  */
    apex_device *dev;           /* NULL in host mode                       */
    int host_pool_pinned;       /* runs of the host pool registered with the
                                   device for DMA (0: not pinned)          */
    pipeline pipe;              /* the async hybrid path (with a device)   */
    size_t block_bytes;         /* one block, one layer                    */
    cpu_workers workers;
    block_pool pools[2];        /* [APEX_TIER_DEVICE], [APEX_TIER_HOST]    */
    seq_table seqs;
    cpu_attn_geom geom;
    cpu_attn_ws *ws;
    int32_t *batch_lens;        /* [max_batch]                             */
    int32_t *batch_table;       /* [max_batch][max_blocks_per_seq]         */
    uint32_t *seq_mark;         /* [max_seqs]: batch stamps (repeat check) */
    uint32_t mark_epoch;
    apex_stats stats;           /* counters; pool figures filled on read   */
    step_sched sched;           /* the step scheduler, once enabled        */
    uint64_t fallbacks;         /* mixed-tier sequences gathered to the CPU */
    apex_metrics_sink metrics;  /* APEX_METRICS_FILE (csrc/metrics.h)      */
    int claimed;                /* apex_paged_claim took every block       */
};

apex_status context_create(const apex_config *cfg, apex_context **out);
/* context_create whose host tier is the engine's memory: layer l's
 * cfg->host_blocks blocks at host_layer_kv[l] (n_layers entries, checked by
 * the caller); NULL: APEX allocates its own host slab. */
apex_status context_create_on(const apex_config *cfg, void *const *host_layer_kv,
                              apex_context **out);
void context_destroy(apex_context *ctx);
/* Rewrites APEX_METRICS_FILE from the context's counters when a second has
 * passed since the last write (force: now). Called after attention calls. */
void context_metrics_tick(apex_context *ctx, int force);

/* Stores n K/V rows at pool slots (block * block_tokens + offset) of a
 * host-tier layer, converting from src. */
void context_write_rows(apex_context *ctx, apex_tier tier, int32_t layer, int32_t n,
                        const int64_t *slots, const void *k, const void *v, apex_dtype src);

/* Validated batches only (see plugin/src/apex_api.c). With a device, the
 * synchronous calls first wait for in-flight work and run device-tier rows
 * through the pipeline on the context's own stream. */
apex_status context_kv_write(apex_context *ctx, int32_t layer, int32_t n,
                      const int32_t *seqs, const int32_t *pos, const void *k,
                      const void *v, apex_dtype src);
apex_status context_kv_read(apex_context *ctx, int32_t layer, int32_t n,
                     const int32_t *seqs, const int32_t *pos, void *k, void *v,
                     apex_dtype dst);
/* Moves seq to tier (see apex_seq_migrate). */
apex_status context_migrate(apex_context *ctx, int32_t seq, apex_tier tier);

/* apex_seq_reserve, spilling a device-tier sequence to the host tier when
 * the device pool is out of blocks. */
apex_status context_reserve(apex_context *ctx, int32_t seq, int32_t n, int32_t *first_pos);

/* Index of the first entry of seqs (valid slots) naming a sequence an
 * earlier entry named, or -1: O(n) with per-slot stamps. */
int32_t context_first_repeat(apex_context *ctx, int32_t n, const int32_t *seqs);

apex_status context_attention(apex_context *ctx, int32_t layer, int32_t n,
                              const int32_t *seqs, const void *q, void *out,
                              const apex_attn_opts *opts);

#endif
