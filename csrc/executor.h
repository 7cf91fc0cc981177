/*
 * executor.h - attention over APEX's paged KV, the one place for both
 * ABIs. apex.h's sequence calls and apex_paged.h's engine-table calls check
 * their arguments, describe the batch here (the way FlashInfer's paged_kv_t
 * describes one) and call exec_attention, which decides what runs where and
 * runs it:
 *   - a sequence whose blocks are all on the device tier: the device's
 *     paged-decode kernel;
 *   - all on the host tier: the CPU kernel (cpu_attn_decode) over the host
 *     pool in place;
 *   - on both tiers (synchronous calls only): the CPU kernel over a copy of
 *     its blocks gathered into pinned host scratch (correct, slow).
 * Synchronously (host q/out, APEX's own stream, waited for) or enqueued on
 * an engine stream (device q/out; the async pipeline of pipeline.h).
 *
 * The KV view is APEX's blocks with engine-style ids: id < device_blocks is
 * device block id, id >= device_blocks is host block id - device_blocks.
 * ggml's token-major KV read in place (cpu_attn_strided) is another view,
 * kept by the client that owns that memory (the ggml backend), not here.
 */
#ifndef APEX_EXECUTOR_H
#define APEX_EXECUTOR_H

#include "apex/apex.h"
#include "csrc/device.h"

typedef struct apex_context apex_context;

/* One attention batch. Row j of a sequence with q_len ql and length len
 * attends positions [start, len - ql + j + 1), start from o.window. */
typedef struct exec_batch {
    int32_t layer;
    int32_t n_seqs;
    const int32_t *qsl;      /* [n_seqs + 1]: sequence i's query rows are
                                [qsl[i], qsl[i+1]) of q; NULL: row i is
                                sequence i, one decode row each          */
    const int32_t *seq_lens; /* [n_seqs]                                 */
    const int32_t *table;    /* sequence i's ceil(len / block_tokens) ids
                                at table + i * stride                    */
    int32_t stride;
    const void *q;           /* [rows][n_q_heads][head_dim], o.q_dtype    */
    void *out;               /* [rows][n_q_heads][head_dim], o.out_dtype  */
    apex_attn_opts o;        /* resolved (apex_attn_opts_resolve)         */
} exec_batch;

/* Runs a validated batch (ids in range, lengths in [q_len, max_seq_len],
 * q finite). s NULL: synchronously, q and out host memory; first waits for
 * the context's in-flight work, any number of rows. s an engine stream:
 * enqueued there, q and out device memory, at most max_batch rows and no
 * sequence on both tiers (APEX_ERR_UNSUPPORTED otherwise). Counts the
 * attended tokens and sequences in ctx->stats when it succeeds. A device
 * failure is returned as is (the sync path may have written part of out;
 * the async path waited for what it had enqueued). */
apex_status exec_attention(apex_context *ctx, const exec_batch *b, device_stream *s);

/* K/V rows to store: row i (at k + i * k_stride elements of dtype, holding
 * [n_kv_heads][head_dim]; likewise v) goes to engine slot slots[i] =
 * id * block_tokens + offset, ids as above; slots[i] < 0 is skipped. */
typedef struct exec_rows {
    int32_t layer;
    int64_t n;
    const int64_t *slots;
    const void *k, *v;
    int64_t k_stride, v_stride;
    apex_dtype dtype;
} exec_rows;

/* Stores validated rows synchronously (host k, v), after the context's
 * in-flight work: device-tier rows first, packed max_batch at a time into
 * the pipeline's sync slot, copied up and stored by the device's kv_append
 * (a device failure then leaves the host tier as it was), then host-tier
 * rows by the calling thread. (Rows in device memory on a stream are
 * pipeline_kv_write's: only the sequence model has them.) */
apex_status exec_kv_write(apex_context *ctx, const exec_rows *r);

/* apex_paged_submit: validated rows r (device-tier slots or < 0, at most
 * max_batch stored) and batch b (device-tier sequences only, at most
 * max_batch rows; b->out host memory) staged into the sync slot and
 * enqueued on the own stream: kv_append, then paged_decode, then the
 * outputs down into the slot; returns without waiting. A device failure
 * while enqueueing waits for what was enqueued and leaves nothing in
 * flight. exec_wait waits, scatters the outputs into b->out, and clears
 * the submission whatever the status. exec_in_flight: 1 from submit to
 * exec_wait. */
apex_status exec_submit(apex_context *ctx, const exec_rows *r, const exec_batch *b);
apex_status exec_wait(apex_context *ctx);
int exec_in_flight(const apex_context *ctx);
/* A submission enqueued and not yet waited for: waits for it and writes
 * its outputs now, keeping the status for exec_wait (pipeline_sync: any
 * other call on the context finishes it first). */
void exec_complete(apex_context *ctx);

/* Frees the executor's host scratch (context_destroy). */
void exec_destroy(apex_context *ctx);

#endif
