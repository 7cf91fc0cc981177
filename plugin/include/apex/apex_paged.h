/*
 * apex_paged.h - APEX for engines that manage their own block tables.
 *
 * Engines such as vLLM allocate KV blocks, build block tables and a slot
 * mapping themselves. This part of the ABI lets such an engine use APEX's
 * KV pools and kernels without APEX's sequence model:
 *
 *   apex_paged_context_create(...)  (optional) a context whose host tier is
 *                                   the engine's own per-layer KV memory
 *   apex_paged_claim(ctx, &n)       the engine takes every block of both
 *                                   tiers; its block ids are [0, n)
 *   apex_paged_kv_write(...)        per layer: new K/V rows by slot
 *   apex_paged_attention(...)       per layer: attention over the engine's
 *                                   block tables and lengths
 *   apex_paged_submit(...),         per layer, asynchronously: a few rows
 *   apex_paged_wait(ctx)            and a device-tier attention enqueued;
 *                                   the wait writes the outputs
 *   apex_paged_copy_blocks(...)     whole blocks, all layers, between ids
 *                                   (a request moved between tiers)
 *
 * Block ids: id < device_blocks is block `id` of the device tier; id >=
 * device_blocks is block `id - device_blocks` of the host tier (pinned host
 * memory). An engine whose pool is device_blocks + host_blocks large thus
 * holds more KV than the GPU. slot = id * block_tokens + offset, as in vLLM.
 * The KV layout is apex.h's: per layer and tier a slab [n_blocks][block],
 * a block is K [n_kv_heads][block_tokens][head_dim] then V likewise (in a
 * context without a device with bf16 KV, the elements inside each panel in
 * the CPU pair order: apex_context_kv_layout).
 *
 * Both tiers work (device-tier ids exist only in a context with a device).
 * The calls are synchronous (apex_paged_submit/_wait below are the
 * asynchronous form of one layer's kv_write + attention): q, out, k, v,
 * slots and block tables are host
 * memory; each call first waits for the context's earlier work (its async
 * calls included), does its device work on APEX's own stream of the context
 * (never an engine stream) through the device pipeline's pinned and device
 * staging buffers (max_batch rows at a time), and waits for it before
 * returning.
 * A batch touching no device-tier block enqueues no device work.
 *
 * Errors: bad input (ids, slots, lengths, NaN/Inf, options) is found before
 * anything changes. A device failure after that (a copy or kernel launch the
 * device refuses) is returned as is; kv_write has then stored none of the
 * host-tier rows but possibly some device-tier ones, attention has written
 * part of out.
 */
#ifndef APEX_PAGED_H
#define APEX_PAGED_H

#include "apex/apex.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Each layer region of apex_paged_context_create must start at a multiple
 * of this many bytes (a cache line: the CPU kernel's loads never straddle
 * one; torch's CPU allocator and page-aligned mappings satisfy it). */
#define APEX_PAGED_HOST_KV_ALIGN 64

/* Like apex_context_create, but the host tier lives in memory the engine
 * already holds (vLLM's per-layer KV tensors), so the KV is held once: APEX
 * allocates no host slab of its own.
 *   host_layer_kv: cfg->n_layers pointers; layer l's host blocks are
 *       [host_layer_kv[l] + b * block_bytes, + block_bytes) for b in
 *       [0, host_blocks), in apex.h's block layout, with block_bytes =
 *       2 * n_kv_heads * block_tokens * head_dim * sizeof(kv_dtype).
 *   bytes_per_layer: the bytes usable at each pointer. cfg->host_blocks > 0
 *       asks for that many blocks (bytes_per_layer must hold them);
 *       cfg->host_blocks == 0 takes as many whole blocks as fit (at least 1).
 *       Bytes past host_blocks * block_bytes are never touched.
 * Memory: ordinary host memory the process can read and write (not device
 * memory), each pointer a multiple of APEX_PAGED_HOST_KV_ALIGN, the layers'
 * used ranges pairwise disjoint. Its content at creation does not matter.
 * Lifetime: the engine keeps it alive and in place until
 * apex_context_destroy returns; APEX never frees it (destroying the context
 * releases only APEX's own tables), and frees nothing of it on any error.
 * What the engine may do meanwhile: zero or copy whole blocks (vLLM zeroes
 * newly allocated blocks and copies blocks for copy-on-write between steps)
 * while no apex_paged_* call on this context runs; a block's bytes are the
 * same block id for both. Writing K/V inside a live block other than through
 * apex_paged_kv_write gives attention results APEX did not compute.
 * Pinning: with a device that pins host memory (CUDA), each run of adjacent
 * layer ranges is registered (cudaHostRegister) as APEX's own pool is, and
 * unregistered by destroy; APEX_PIN_HOST_POOL=0 skips it. Memory the engine
 * pinned itself cannot be registered again: APEX says so on stderr and goes
 * on unregistered (only copy speed is at stake).
 * Errors (*out = NULL, nothing allocated or registered, the memory not
 * touched): APEX_ERR_INVALID_ARG for out, host_layer_kv or an entry of it
 * NULL, a misaligned entry, bytes_per_layer too small for the blocks asked
 * for (or for one block), overlapping layer ranges; otherwise what
 * apex_context_create returns for cfg. */
APEX_API apex_status apex_paged_context_create(const apex_config *cfg, void *const *host_layer_kv,
                                               size_t bytes_per_layer, apex_context **out);

/* Where the host tier's memory comes from: *own_bytes (host KV memory APEX
 * allocated itself), *external_bytes (engine memory in use as the host tier:
 * n_layers * host_blocks * block_bytes, 0 for an ordinary context) and
 * *pinned (1 when it is registered with the device). Any may be NULL. */
APEX_API apex_status apex_paged_host_kv(const apex_context *ctx, uint64_t *own_bytes,
                                        uint64_t *external_bytes, int *pinned);

/* Hands every block of both tiers to the engine; *n_blocks (may be NULL)
 * gets device_blocks + host_blocks. Needs a context with no sequences
 * (while apex_seq_add'ed ones exist: APEX_ERR_INVALID_ARG, "sequences
 * exist"; once the last is freed the claim works). Afterwards the blocks are
 * the engine's for good: every call of apex.h's sequence model (apex_seq_*,
 * apex_kv_write/read, apex_attention, their async forms, apex_prefill_async,
 * apex_sched_step) is refused with APEX_ERR_INVALID_ARG ("this context's blocks
 * belong to the engine"), changing nothing; apex_sched_enable and
 * apex_sched_observe stay, for apex_sched_place. Calling it again returns the
 * same count. apex_paged_kv_write and apex_paged_attention before a claim
 * are refused the same way ("call apex_paged_claim first", or, while
 * sequences exist, "belong to APEX's sequences"). */
APEX_API apex_status apex_paged_claim(apex_context *ctx, int64_t *n_blocks);

/* Where layer's blocks of one tier live: *base (host memory for the host
 * tier, device memory for the device tier) and *n_blocks. */
APEX_API apex_status apex_paged_layer_kv(apex_context *ctx, int32_t layer, apex_tier tier,
                                         void **base, int64_t *n_blocks);

/* Stores n K/V rows of layer at slots[i] (< 0: skipped, an engine's padding).
 * Row i of k is at k + i * k_row_stride elements of src_dtype and holds
 * [n_kv_heads][head_dim] contiguously (likewise v), so slices of a fused QKV
 * tensor need no copy. Validates everything (slots, NaN/Inf) first.
 * Host-tier rows are converted and stored by the host. Device-tier rows are
 * packed into pinned staging, copied to the device (the rows and their
 * slots, max_batch rows a copy) and stored by the device's KV-append kernel,
 * converted to kv_dtype there; they are in place when the call returns. */
APEX_API apex_status apex_paged_kv_write(apex_context *ctx, int32_t layer, int64_t n,
                                         const int64_t *slots, const void *k,
                                         int64_t k_row_stride, const void *v,
                                         int64_t v_row_stride, apex_dtype src_dtype);

/* Causal attention of layer for n_seqs sequences of mixed query lengths
 * (decode rows and prefill chunks in one batch).
 *   query_start_loc: [n_seqs + 1], non-decreasing from 0; sequence i's
 *       queries are rows [query_start_loc[i], query_start_loc[i+1]) of q
 *   seq_lens: [n_seqs]; the queries are its last q_len positions, whose K/V
 *       must already be written; row j (0-based) attends positions
 *       [start, seq_len - q_len + j + 1), start from opts->window as in
 *       apex_attention
 *   block_table: row i at block_table + i * block_table_stride, holding
 *       ceil(seq_len / block_tokens) block ids
 *   q, out: [query_start_loc[n_seqs]][n_q_heads][head_dim], contiguous
 * Each query row is one decode-attention problem, run in batches of at most
 * max_batch rows; a sequence with q_len 0 is skipped. Where a sequence runs
 * depends on the ids in its ceil(seq_len / block_tokens) table entries:
 *   all host-tier: APEX's CPU kernel over the host tier, in place;
 *   all device-tier: the device's paged-decode kernel. Its q rows, lengths
 *       and table rows are copied to the device, its output rows back;
 *   both tiers: its blocks that a row's window reaches (all without a
 *       window) are copied to pinned host scratch, device-tier ones from the
 *       device, in table order, and the CPU kernel runs over that copy:
 *       correct, but it moves the sequence's KV of the layer across the bus
 *       each call. An engine that wants speed keeps a sequence on one tier.
 * The device's last batch overlaps the CPU kernel's work on the others. */
APEX_API apex_status apex_paged_attention(apex_context *ctx, int32_t layer, int32_t n_seqs,
                                          const int32_t *query_start_loc,
                                          const int32_t *seq_lens, const int32_t *block_table,
                                          int32_t block_table_stride, const void *q, void *out,
                                          const apex_attn_opts *opts);

/* ------------------------------------------------ one layer, asynchronously
 *
 * For an engine whose calling thread has other work while the device
 * attends (llama.cpp's GPU tier: the CPU kernel runs the host sequences
 * meanwhile). apex_paged_submit enqueues, on APEX's own stream of the
 * context, the store of a few K/V rows (apex_paged_kv_write's) and then a
 * decode/extend attention (apex_paged_attention's) of the same layer, and
 * returns without waiting; apex_paged_wait waits for it and writes the
 * outputs into out. No APEX thread other than the device's is involved:
 * the device starts on the enqueue, the engine blocks only in the wait and
 * only if the device is not done yet. */
typedef struct apex_paged_step {
    int32_t layer;
    /* Rows stored before the attention reads them, as apex_paged_kv_write
     * takes them (slots < 0 skipped); n_rows 0: none (slots, k, v unused). */
    int64_t n_rows;
    const int64_t *slots;
    const void *k, *v;
    int64_t k_row_stride, v_row_stride;
    apex_dtype kv_src_dtype;
    /* The attention, as apex_paged_attention takes it; n_seqs 0: none. */
    int32_t n_seqs;
    const int32_t *query_start_loc; /* [n_seqs + 1] */
    const int32_t *seq_lens;        /* [n_seqs]     */
    const int32_t *block_table;
    int32_t block_table_stride;
    const void *q;
    void *out; /* written by apex_paged_wait */
    const apex_attn_opts *opts; /* NULL: defaults */
} apex_paged_step;

/* Enqueues step (see above) and returns. At submit every argument is
 * checked before anything is enqueued, then the rows, slots, q, lengths and
 * table rows are copied into the context's pinned staging: the caller may
 * reuse every buffer of step as soon as the call returns, except out, which
 * must stay valid (and unread) until the submission is finished (below).
 * Limits (APEX_ERR_UNSUPPORTED, nothing enqueued; the synchronous calls
 * take such batches): only the device tier - every stored row's slot and
 * every table entry a sequence uses must be a device-tier id (a sequence
 * with a host-tier block runs on the CPU: the caller attends it, or uses
 * apex_paged_attention); at most max_batch stored rows and max_batch query
 * rows (one staging slot; no splitting); a context without a device.
 * One submission per context from apex_paged_submit to apex_paged_wait: a
 * second submit meanwhile is refused (APEX_ERR_INVALID_ARG, "a submission
 * is in flight: call apex_paged_wait first"), changing nothing. Any other
 * call on the context that uses the device (apex_paged_kv_write,
 * apex_paged_attention, apex_paged_copy_blocks, apex_context_destroy, ...)
 * first finishes the submission as apex_paged_wait would - waits for it
 * and writes out - and keeps its status for apex_paged_wait, which then
 * returns it at once; so out must stay valid until apex_paged_wait or
 * apex_context_destroy, whichever comes first.
 * Errors: bad input as the synchronous calls report it (APEX_ERR_INVALID_ARG
 * for step NULL), before anything is staged: nothing changes. A device
 * failure while enqueueing is returned after waiting for what was enqueued:
 * nothing is in flight, out is not written, some of the rows may be
 * stored (store them again). */
APEX_API apex_status apex_paged_submit(apex_context *ctx, const apex_paged_step *step);

/* Waits for the submission in flight, writes its outputs into its out and
 * returns the device's status (a device failure: out not written, some of
 * the rows may be stored). Afterwards nothing is in flight, whatever the
 * status. Nothing in flight: APEX_ERR_INVALID_ARG. */
APEX_API apex_status apex_paged_wait(apex_context *ctx);

/* Copies n whole blocks, all layers: block src_ids[i] onto dst_ids[i]
 * (engine ids, either tier to either tier). An engine that moves a request
 * between tiers gives it new block ids and moves its KV with this call
 * (host->device promotes, device->host spills). Ordered like the other
 * paged calls: after the context's earlier work (its async calls
 * included); the copies are in place when it returns. Device copies run on
 * APEX's own stream, host->host copies on the calling thread.
 * Errors (nothing copied): APEX_ERR_INVALID_ARG for ctx NULL, a context not
 * claimed, n < 0, a NULL array with n > 0, a block copied onto itself, a
 * destination named twice or also named as a source (the result would
 * depend on the order); APEX_ERR_OUT_OF_RANGE for an id outside
 * [0, device_blocks + host_blocks). A device failure after that is
 * returned as is, with some of the copies done. n == 0 does nothing. */
APEX_API apex_status apex_paged_copy_blocks(apex_context *ctx, int64_t n, const int64_t *src_ids,
                                            const int64_t *dst_ids);

/* ------------------------------------------------ placement by the scheduler
 *
 * For an engine that owns its tables and keeps some sequences' KV on the
 * device tier and the rest on the host (llama.cpp's GPU tier does, and
 * vLLM's ApexScheduler, docs/vllm.md): each decode step it asks which of
 * its sequences hold their KV on the device.
 * APEX builds the scheduler's state from the engine's items (not from its
 * own sequence tables: a claimed context has none), runs apex_sched_plan
 * (docs/sched.md) with the profile of apex_sched_enable and the online
 * correction (apex_sched_observe), and answers one tier per item. The
 * engine moves the KV itself (APEX moves nothing). Works on a claimed
 * context (apex_paged_claim); apex_sched_enable must have run. */

typedef enum apex_place_state {
    APEX_PLACE_DECODING = 0, /* decodes one token this step                 */
    APEX_PLACE_IDLE = 1,     /* holds KV but does not decode this step      */
    APEX_PLACE_FINISHED = 2  /* done; its KV is no longer needed on a tier  */
} apex_place_state;

/* One of the engine's sequences, in priority order (the first is promoted
 * first and spilled last). */
typedef struct apex_place_item {
    int64_t id;     /* the engine's sequence id, unique within the call     */
    int32_t len;    /* tokens in its KV now, 0..max_seq_len                 */
    apex_tier tier; /* where its KV is now                                  */
    int32_t state;  /* apex_place_state                                     */
} apex_place_item;

typedef struct apex_place_plan {
    const char *strategy;   /* the step form the model chose ("overlap", ...) */
    int32_t n_device;       /* decoding items placed on the device tier       */
    int32_t n_host;         /* decoding items placed on the host tier         */
    int32_t n_to_device;    /* items whose tier goes host -> device           */
    int32_t n_to_host;      /* items whose tier goes device -> host (idle and
                               finished ones on the device free their room)  */
    double predicted_step_ms;
    int32_t n_host_idle;    /* decoding items on the host tier (counted in
                               n_host, not moved) that the plan's step form
                               leaves out of the CPU cohort: running them too
                               would lower the step's decode rate or miss the
                               latency target. The cohort is taken in priority
                               order, so these are the last host decoders    */
} apex_place_plan;

/* Places n items for this step: out_tier[i] is where item i's KV is to be.
 * The device holds device_blocks blocks of cfg.block_tokens tokens for the
 * engine's sequences (a device sequence of len tokens takes
 * ceil(len / block_tokens) of them) and at most device_seqs sequences (0:
 * no limit beyond the blocks). Idle and finished items go to (stay on) the
 * host tier, so their room goes to waiting decoders; a decoding item stays
 * where it is unless the plan spills it (device room short) or promotes it
 * (room free, in priority order). plan may be NULL. Deterministic: the same
 * items, capacity, profile and correction give the same answer.
 * Errors (nothing changes, out_tier untouched): APEX_ERR_INVALID_ARG for no
 * apex_sched_enable yet, NULL items/out_tier with n > 0, an item with a bad
 * tier, state or len, a repeated id, device items holding more than
 * device_blocks blocks or device_seqs sequences, negative capacities;
 * APEX_ERR_OUT_OF_RANGE for n < 0. */
APEX_API apex_status apex_sched_place(apex_context *ctx, int32_t n, const apex_place_item *items,
                                      int64_t device_blocks, int32_t device_seqs,
                                      apex_tier *out_tier, apex_place_plan *plan);

#ifdef __cplusplus
}
#endif
#endif /* APEX_PAGED_H */
