/*
 * context.h - what an apex_context owns. Everything a context needs lives
 * here, so two contexts share nothing but read-only process facts (the
 * chosen CPU kernel variant). Its blocks belong to one model at a time
 * (ctx_owner).
 */
#ifndef APEX_CONTEXT_H
#define APEX_CONTEXT_H

#include "apex/apex.h"
#include "cpu_attn/cpu_attn.h"
#include "csrc/block_pool.h"
#include "csrc/cpu_workers.h"
#include "csrc/device.h"
#include "csrc/executor.h"
#include "csrc/metrics.h"
#include "csrc/pipeline.h"
#include "csrc/seq_table.h"

/* Who owns the context's blocks. APEX's sequence model (apex.h) and an
 * engine's own block tables (apex_paged.h) cannot share them: a call of the
 * other model is refused with APEX_ERR_INVALID_ARG. */
typedef enum ctx_owner {
    CTX_OWNER_NONE = 0, /* no sequence yet: either model may start        */
    CTX_OWNER_APEX,     /* sequences exist (apex_seq_add); back to NONE
                           when the last one is freed                    */
    CTX_OWNER_ENGINE,   /* apex_paged_claim took every block, for good    */
} ctx_owner;

struct apex_context {
    apex_config cfg;            /* resolved; cfg.cpu_set points at cpu_set */
    char cpu_set[256];
    int host_mode;              /* no device: every sequence on the host  */
    apex_device *dev;           /* NULL in host mode                       */
    int host_pool_pinned;       /* runs of the host pool registered with the
                                   device for DMA (0: not pinned)          */
    pipeline pipe;              /* the async hybrid path (with a device)   */
    size_t block_bytes;         /* one block, one layer                    */
    apex_kv_layout layout;      /* offsets inside a block (kv_layout.h)    */
    cpu_workers workers;
    block_pool pools[2];        /* [APEX_TIER_DEVICE], [APEX_TIER_HOST]    */
    seq_table seqs;
    cpu_attn_geom geom;
    cpu_attn_ws *ws;
    int32_t *batch_lens;        /* [max_batch]: the executor's CPU batch   */
    int32_t *batch_table;       /* [max_batch][max_blocks_per_seq]         */
    int64_t *exec_rows;         /* [max_batch]: its rows' places in q, out */
    void *exec_q, *exec_out;    /* [max_batch] rows: the executor's scratch
                                   (taken when first needed)               */
    int32_t *call_lens;         /* [max_batch]: a sequence-model call's    */
    int32_t *call_table;        /* batch, as executor tables (engine ids)  */
    int64_t *call_slots;        /* [max_batch]: its K/V rows' engine slots */
    uint32_t *seq_mark;         /* [max_seqs]: batch stamps (repeat check) */
    uint32_t mark_epoch;
    apex_stats stats;           /* counters; pool figures filled on read   */
    struct step_sched *sched;   /* csrc/step_sched.c; NULL until enabled   */
    uint64_t fallbacks;         /* mixed-tier sequences gathered to the CPU */
    apex_metrics_sink metrics;  /* APEX_METRICS_FILE (csrc/metrics.h)      */
    ctx_owner owner;            /* which model owns the blocks             */
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

/* The model check of every apex.h sequence call: APEX_ERR_INVALID_ARG
 * (with a message naming fn) once the engine claimed the blocks. */
apex_status context_seq_model(const apex_context *ctx, const char *fn);
/* After a call that adds or frees sequences: the owner follows n_active. */
void context_owner_update(apex_context *ctx);

/* Validated batches only (see plugin/src/apex_api.c). kv_write: the rows'
 * slots in the executor's form, then exec_kv_write (synchronous: waits for
 * in-flight work, device-tier rows on the context's own stream). */
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

/* Attention of a validated batch of distinct sequences (one decode row
 * each): their tables in the executor's form, then exec_attention. s NULL:
 * synchronous (host q, out); else enqueued on the engine stream s. */
apex_status context_attention(apex_context *ctx, int32_t layer, int32_t n,
                              const int32_t *seqs, const void *q, void *out,
                              const apex_attn_opts *opts, device_stream *s);

#endif
