/*
 * pipeline.h - the hybrid decode pipeline on a device (see apex.h, "the
 * device pipeline"). One call of kv_write or attention takes a staging slot
 * (pinned + device buffers) from a ring, splits its batch into the device
 * cohort and the host cohort, and enqueues:
 *
 *   engine stream : [gather host-cohort rows]─ev_a  [device-cohort kernels]
 *                   ...wait ev_up─[scatter host-cohort outputs]─done
 *   copy stream   : wait ev_a─[D2H rows → pinned]─ev_down
 *                   wait flag ≥ job─[H2D outputs]─ev_up
 *   CPU worker    : event_sync ev_down─[append K/V | CPU attention]─flag = job
 *
 * so device attention, both copies and CPU attention overlap, and no host
 * thread of the engine waits. A slot is reused only after its done event
 * and its CPU job finished.
 */
#ifndef APEX_PIPELINE_H
#define APEX_PIPELINE_H

#include "apex/apex.h"
#include "csrc/cpu_jobs.h"
#include "csrc/device.h"

typedef struct apex_context apex_context;

typedef struct stage_slot {
    apex_context *ctx;
    device_event *ev_a, *ev_down, *ev_up, *done;
    int used;               /* done has been recorded at least once   */
    uint32_t job;           /* CPU job of the last use (0 = none)     */
    /* What the CPU job of this use does. */
    int32_t layer, n_c;
    apex_dtype dtype_in, dtype_out;
    float scale, softcap;
    int32_t window;
    /* Pinned host buffers. */
    void *h_mem;
    int32_t *h_lens, *h_table, *h_idx_g, *h_idx_c;
    int64_t *h_slots, *c_slots;
    int32_t *c_lens, *c_table;
    void *h_q, *h_out, *h_k, *h_v;
    /* Device buffers. */
    void *d_mem;
    int32_t *d_lens, *d_table, *d_idx_g, *d_idx_c;
    int64_t *d_slots;
    void *d_q_g, *d_out_g, *d_q_c, *d_out_c, *d_k, *d_v;
} stage_slot;

typedef struct pipeline {
    apex_device *dev;
    device_stream *copy_stream;
    device_stream *own_stream;  /* sync calls, copy-on-write copies */
    cpu_jobs jobs;
    stage_slot *slots;
    int32_t n_slots, next_slot;
    void *decode_ws;
    size_t decode_ws_bytes;
    device_event *ev_copies;    /* recorded after own-stream block copies */
    device_event *last_done;    /* latest done event; implies all earlier */
    device_event *tm_start, *tm_end; /* timing events of the tracer's GPU spans
                                        (made when tracing, if the device can) */
    size_t row_q_bytes, row_kv_bytes;
    uint64_t catt_ns;           /* CPU attention time (worker; atomic)    */
    int32_t *chunk_seqs, *chunk_pos; /* [max_batch]: prefill's KV chunks */
    /* apex_paged_submit's work on own_stream (staged in the sync slot):
     * sub_state 1 enqueued, 2 completed by pipeline_sync (another call)
     * with sub_status kept for apex_paged_wait, 0 none; where and how its
     * outputs go. */
    int sub_state, sub_timed;
    apex_status sub_status;
    int32_t sub_rows, sub_layer;
    void *sub_out;
    apex_dtype sub_out_dtype;
    uint64_t sub_tokens, sub_written;
} pipeline;

apex_status pipeline_init(apex_context *ctx);
void pipeline_destroy(apex_context *ctx);

/* Validated batches only; s is the engine's stream. Attention's enqueue
 * path is csrc/executor.c's, over the ring below. */
apex_status pipeline_kv_write(apex_context *ctx, int32_t layer, int32_t n, const int32_t *seqs,
                              const int32_t *pos, const void *k, const void *v, apex_dtype dt,
                              device_stream *s);

/* Prefill (see apex_prefill_async): K/V stored through pipeline_kv_write in
 * chunks of max_batch rows, then the device's causal prefill kernel. */
apex_status pipeline_prefill(apex_context *ctx, int32_t layer, int32_t n, const int32_t *seqs,
                             const int32_t *n_tokens, const void *q, const void *k,
                             const void *v, void *out, const apex_attn_opts *o,
                             device_stream *s);

/* Copy-on-write of a device block (all layers), ordered after the engine
 * stream's work so far and before its next call. */
apex_status pipeline_copy_device_block(apex_context *ctx, int32_t dst, int32_t src);

/* Copies n blocks (all layers) between tiers for a migration: after every
 * CPU job and engine-stream call so far, before every later one (the
 * engine stream waits on ev_copies; the worker on a barrier job). */
apex_status pipeline_copy_between_tiers(apex_context *ctx, apex_tier from, const int32_t *src,
                                        const int32_t *dst, int32_t n);
/* The copy functions above and the enqueue paths, when the device refuses
 * a call midway, wait for what they did enqueue before returning the
 * error, so no half-enqueued work outlives the call (its staging slot, the
 * caller's buffers and blocks the caller then releases are safe to reuse). */

/* The ring, for the enqueue paths here and attention's (csrc/executor.c):
 * acquire the next slot once its previous use is over (the only place the
 * engine thread blocks: a whole ring ahead of the device); finish records
 * its done event on s after the call's work; abandon, when the device
 * refused a call midway, waits for what it enqueued on s, the copy stream,
 * the own stream and the CPU worker, and returns st. */
stage_slot *pipeline_acquire(pipeline *pl);
apex_status pipeline_finish(pipeline *pl, stage_slot *sl, device_stream *s);
apex_status pipeline_abandon(pipeline *pl, device_stream *s, apex_status st);

/* The staging slot of synchronous device work (the ring's first slot, its
 * pinned and device halves, max_batch rows): for callers that ran
 * pipeline_sync, then _wait (its last asynchronous use, on an engine stream
 * pipeline_sync need not cover), and that wait for the own stream before
 * returning, so nothing else uses the slot meanwhile. */
stage_slot *pipeline_sync_slot(apex_context *ctx);
apex_status pipeline_sync_slot_wait(apex_context *ctx);

/* Waits for everything: the CPU worker and every stream; completes an
 * apex_paged_submit in flight (its outputs written, exec_complete). */
void pipeline_sync(apex_context *ctx);

#endif
