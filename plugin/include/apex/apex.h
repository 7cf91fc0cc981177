/*
 * apex.h - the APEX C ABI.
 *
 * APEX is a hybrid CPU-GPU attention backend that serving engines load as a
 * shared object (libapex.so). The engine keeps its linear layers; APEX owns the
 * KV cache and runs decode attention.
 *
 * Model of use
 * ------------
 *  1. Fill an apex_config (apex_config_init gives defaults and reads the
 *     APEX_* environment variables), describing the model geometry, the block
 *     size and the capacity of each KV tier, then apex_context_create().
 *     A context owns everything; two contexts share nothing.
 *
 *  2. Sequences are engine-chosen slot ids in [0, max_seqs). For each request:
 *       apex_seq_add(ctx, seq, APEX_TIER_AUTO)      placed on a tier
 *       apex_seq_reserve(ctx, seq, n, &first_pos)   room for n more tokens
 *       apex_kv_write(ctx, layer, ...)              per layer: the new K/V rows
 *       apex_attention(ctx, layer, ...)             per layer: decode attention
 *       apex_seq_free(ctx, seq)                     when the request ends
 *     apex_seq_fork() makes a sequence that shares every block of another (a
 *     common prompt prefix); the first reserve that lands in a shared block
 *     copies it (copy-on-write), so a write never changes another sequence.
 *
 *  3. Decode attention attends the single query token of each sequence (the
 *     token at position len-1, whose K/V must already be written) to positions
 *     [max(0, len-window), len) of that sequence. Lengths come from APEX's own
 *     tables: the engine never passes them.
 *
 *  4. A context's blocks belong to one model at a time: APEX's sequences
 *     (this header) or an engine's own block tables (apex_paged.h, after
 *     apex_paged_claim). Once an engine claimed them, every sequence call
 *     (apex_seq_*, apex_kv_write/read, apex_attention, their async forms,
 *     apex_prefill_async, apex_sched_step) fails with
 *     APEX_ERR_INVALID_ARG and a message saying the engine owns the blocks;
 *     while sequences exist, the claim and the paged calls fail likewise.
 *     Both models run attention through the same executor (where each
 *     sequence runs: its blocks' tier). apex_sched_enable and
 *     apex_sched_observe serve both: apex_sched_step for APEX's sequences,
 *     apex_sched_place (apex_paged.h) for an engine's.
 *
 * KV layout (identical on both tiers, so a tier move is a block copy)
 * -------------------------------------------------------------------
 * (The one exception: a context without a device, bf16 KV, block_tokens >= 16
 * and the avx512bf16 or amxbf16 CPU kernel orders the elements inside each panel for the
 * CPU's pair dot products, apex_context_kv_layout() == APEX_KV_PAIRS; see
 * cpu_attn/kv_layout.h. Block bytes, panels and their places are as below.
 * APEX_KV_LAYOUT=rows keeps the row layout.)
 * A block holds block_tokens consecutive positions of one sequence, for every
 * layer. Within a tier, layer l's slab is [n_blocks][block_bytes]; one block of
 * one layer is
 *     K: [n_kv_heads][block_tokens][head_dim]   then
 *     V: [n_kv_heads][block_tokens][head_dim]   in kv_dtype,
 * so block_bytes = 2 * n_kv_heads * block_tokens * head_dim * sizeof(kv_dtype).
 * Each (block, kv head) is a contiguous [block_tokens][head_dim] panel, which
 * is what the CPU kernel streams.
 *
 * Errors
 * ------
 * Every function that can fail returns an apex_status (here and in
 * apex_paged.h). On failure nothing changed (but the context's stats.errors,
 * which counts every failed call on a non-NULL context, queries included),
 * and apex_last_error() returns a message (thread-local, valid until the
 * next APEX call on the same thread). APEX never aborts the host process.
 * The exceptions cannot fail, so they return their value directly, never
 * set the message and accept any argument:
 *   apex_status_name, apex_last_error, apex_abi_version, apex_version,
 *   apex_cpu_isa                        constants and names (never NULL);
 *   apex_context_host_mode              1 for a NULL context;
 *   apex_context_kv_layout              APEX_KV_ROWS for a NULL context;
 *   apex_attn_opts_default              fp32 q/out for a NULL context;
 *   apex_trace_level, apex_trace_begin, apex_trace_end,
 *   apex_trace_thread_name              the tracer: off is not an error, a
 *                                       span must cost nothing to record.
 *
 * Empty batches: n = 0 (rows, sequences) is valid in every batched call
 * (kv write/read, attention, prefill, their async and paged forms). The
 * layer, dtypes and options are still checked; the arrays may be NULL;
 * the call does nothing and returns APEX_OK (no counter moves).
 *
 * Threads
 * -------
 * A context is not thread-safe: one engine thread drives it. Attention runs
 * on the context's own worker threads (OpenMP, pinned with hwloc to cpu_set).
 * Different contexts may be used from different threads.
 */
#ifndef APEX_H
#define APEX_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define APEX_API
#else
#define APEX_API __attribute__((visibility("default")))
#endif

/* Bumped on any incompatible change of a type or function below. */
#define APEX_ABI_VERSION 1
#define APEX_VERSION_STRING "0.1.0"

/* ---------------------------------------------------------------- status */

typedef enum apex_status {
    APEX_OK = 0,
    APEX_ERR_INVALID_ARG = 1,  /* null pointer, bad geometry, NaN, bad option */
    APEX_ERR_UNKNOWN_SEQ = 2,  /* sequence slot not in use                   */
    APEX_ERR_SEQ_EXISTS = 3,   /* sequence slot already in use               */
    APEX_ERR_OUT_OF_RANGE = 4, /* position, layer, batch or length too large  */
    APEX_ERR_OUT_OF_BLOCKS = 5,/* the tier has no free KV blocks left         */
    APEX_ERR_NO_MEMORY = 6,    /* an allocation failed                        */
    APEX_ERR_UNSUPPORTED = 7,  /* valid but not supported (head_dim, dtype..) */
    APEX_ERR_INTERNAL = 8
} apex_status;

/* Short name of a status ("APEX_ERR_OUT_OF_BLOCKS"). Never NULL. */
APEX_API const char *apex_status_name(apex_status s);

/* Message describing the last failure on this thread ("" if none). */
APEX_API const char *apex_last_error(void);

APEX_API int apex_abi_version(void);        /* == APEX_ABI_VERSION */
APEX_API const char *apex_version(void);    /* "0.1.0"             */

/* ---------------------------------------------------------------- config */

typedef enum apex_dtype {
    APEX_DTYPE_F32 = 0,
    APEX_DTYPE_F16 = 1,
    APEX_DTYPE_BF16 = 2
} apex_dtype;

typedef enum apex_tier {
    APEX_TIER_AUTO = -1,  /* device if it has room, else host */
    APEX_TIER_DEVICE = 0, /* GPU memory                       */
    APEX_TIER_HOST = 1    /* pinned, NUMA-local host memory   */
} apex_tier;

typedef enum apex_device_kind {
    APEX_DEVICE_AUTO = 0,     /* cuda if a GPU answers, else none          */
    APEX_DEVICE_NONE = 1,     /* host mode: every sequence on the host tier */
    APEX_DEVICE_EMULATED = 2, /* a capacity-limited device in host memory  */
    APEX_DEVICE_CUDA = 3
} apex_device_kind;

typedef struct apex_config {
    /* Model geometry. head_dim one of apex_limits.head_dims (today 64,
     * 80, 96, 128, 256); n_q_heads must be a multiple of n_kv_heads (MHA,
     * GQA and MQA). */
    int32_t n_layers;
    int32_t n_q_heads;
    int32_t n_kv_heads;
    int32_t head_dim;
    apex_dtype kv_dtype;   /* storage type of the KV cache            */
    apex_dtype act_dtype;  /* default type of q, k, v and the output */

    /* KV cache. block_tokens one of apex_limits.block_tokens (today 8 to
     * 256, powers of two). */
    int32_t block_tokens;
    int64_t device_blocks; /* GPU tier capacity (0 in host mode)    */
    int64_t host_blocks;   /* host tier capacity                    */

    int32_t max_seqs;      /* sequence slots: ids are [0, max_seqs) */
    int32_t max_batch;     /* sequences per attention / write call  */
    int32_t max_seq_len;   /* tokens per sequence                   */

    /* CPU workers. n_threads 0 = one per core of cpu_set.
     * cpu_set: hwloc list syntax ("0-7,16"), NULL or "" = all cores. */
    int32_t n_threads;
    const char *cpu_set;

    /* The accelerator (APEX_DEVICE=auto|none|emulated|cuda). */
    apex_device_kind device;
} apex_config;

/* Fills defaults, then applies the environment:
 *   APEX_HOST_BLOCKS, APEX_DEVICE_BLOCKS, APEX_THREADS, APEX_CPUSET,
 *   APEX_BLOCK_TOKENS, APEX_MAX_SEQS, APEX_MAX_BATCH, APEX_MAX_SEQ_LEN,
 *   APEX_DEVICE (auto|none|emulated|cuda).
 * Geometry (n_layers ... head_dim) is left 0: the engine must set it.
 * A malformed variable gives APEX_ERR_INVALID_ARG naming it. */
APEX_API apex_status apex_config_init(apex_config *cfg);

/* --------------------------------------------------------------- context */

typedef struct apex_context apex_context;

/* Validates cfg, opens the device, allocates both tiers and the worker
 * state. Without a device (APEX_DEVICE=none, or auto on a machine with no
 * usable GPU) device_blocks is reduced to 0 ("host mode") and
 * apex_context_host_mode() reports it. If the device cannot hold
 * device_blocks, the pool shrinks to what fits, with one line on stderr.
 * The emulated device's memory is APEX_EMU_DEVICE_MB (default 256). */
APEX_API apex_status apex_context_create(const apex_config *cfg,
                                         apex_context **out);
APEX_API apex_status apex_context_destroy(apex_context *ctx); /* NULL ok */

/* The config in force (after host-mode and thread-count resolution). */
APEX_API apex_status apex_context_config(const apex_context *ctx,
                                         apex_config *out);
APEX_API int apex_context_host_mode(const apex_context *ctx);

/* How K and V sit inside this context's blocks ("KV layout" above). */
typedef enum apex_kv_order {
    APEX_KV_ROWS = 0,  /* panels of [block_tokens][head_dim] rows          */
    APEX_KV_PAIRS = 1  /* host mode, bf16: K [block_tokens/16][head_dim/2]
                        * [16] of (d, d+1) pairs, V [block_tokens/2]
                        * [head_dim] of (t, t+1) pairs, per panel          */
} apex_kv_order;
APEX_API apex_kv_order apex_context_kv_layout(const apex_context *ctx);

/* Name of the CPU kernel variant in use: "amxbf16", "avx512bf16", "avx512",
 * "avx2" or "scalar". Chosen once from cpuid; APEX_ISA=amxbf16|avx512bf16|
 * avx512|avx2|scalar forces one. */
APEX_API const char *apex_cpu_isa(void);

/* What this build accepts, for engines to ask instead of keeping lists
 * (apex_config_validate and every adapter use these same tables). The lists
 * are ascending and end at the first 0. */
typedef struct apex_limits {
    int32_t head_dims[8];     /* supported head_dim values                  */
    int32_t block_tokens[8];  /* supported block sizes (tokens)             */
    uint32_t kv_dtypes;       /* bit (1u << apex_dtype) per KV dtype        */
    uint32_t act_dtypes;      /* likewise for q/k/v/out activations         */
    int32_t max_layers, max_kv_heads, max_q_heads, max_seqs, max_seq_len;
    int32_t host_kv_align;    /* bytes: engine memory for apex_paged_context_create */
} apex_limits;
APEX_API apex_status apex_limits_get(apex_limits *out);

/* ------------------------------------------------------------- sequences */

typedef struct apex_seq_info {
    int32_t len;        /* tokens reserved (and written, if the engine did) */
    int32_t n_blocks;   /* blocks in its table                              */
    int32_t n_shared;   /* of which shared with another sequence            */
    apex_tier tier;     /* where its KV lives                               */
} apex_seq_info;

/* Starts an empty sequence in slot seq on the given tier (AUTO: device if
 * it has a free block, else host). */
APEX_API apex_status apex_seq_add(apex_context *ctx, int32_t seq,
                                  apex_tier tier);

/* Grows seq by n tokens; *first_pos (may be NULL) gets the first new
 * position. Allocates blocks on the sequence's tier and makes every block
 * that holds a new position private (copy-on-write). All or nothing:
 * APEX_ERR_OUT_OF_BLOCKS leaves the sequence as it was. */
APEX_API apex_status apex_seq_reserve(apex_context *ctx, int32_t seq,
                                      int32_t n, int32_t *first_pos);

/* dst (a free slot) becomes a copy of src that shares all of src's blocks. */
APEX_API apex_status apex_seq_fork(apex_context *ctx, int32_t src,
                                   int32_t dst);

/* Releases the slot and drops its references to its blocks. */
APEX_API apex_status apex_seq_free(apex_context *ctx, int32_t seq);

APEX_API apex_status apex_seq_get_info(const apex_context *ctx, int32_t seq,
                                       apex_seq_info *out);

/* Moves seq's KV to the other tier (the scheduler's choice: spill to the
 * host when the device fills, back when it frees up). The copies are
 * enqueued, ordered after all work already enqueued and before all work
 * enqueued later; the call does not wait for them. All or nothing:
 * APEX_ERR_OUT_OF_BLOCKS if the target tier lacks room. Blocks the
 * sequence shared with others become private copies on the new tier.
 * apex_seq_reserve spills a device-tier sequence to the host by itself when
 * the device pool is out of blocks and the host pool has room. */
APEX_API apex_status apex_seq_migrate(apex_context *ctx, int32_t seq, apex_tier tier);

/* -------------------------------------------------------------- KV write */

/* Stores K and V rows for n (sequence, position) pairs of one layer.
 *   k, v: [n][n_kv_heads][head_dim] in src_dtype, rows contiguous.
 * Each position must be reserved (pos < len) and lie in a block that is not
 * shared with another sequence. Validates everything before writing. */
APEX_API apex_status apex_kv_write(apex_context *ctx, int32_t layer,
                                   int32_t n, const int32_t *seqs,
                                   const int32_t *pos, const void *k,
                                   const void *v, apex_dtype src_dtype);

/* Reads K and V rows back (the inverse of apex_kv_write; for tests and
 * migration checks). k, v: [n][n_kv_heads][head_dim] in dst_dtype. */
APEX_API apex_status apex_kv_read(const apex_context *ctx, int32_t layer,
                                  int32_t n, const int32_t *seqs,
                                  const int32_t *pos, void *k, void *v,
                                  apex_dtype dst_dtype);

/* ------------------------------------------------------------- attention */

typedef struct apex_attn_opts {
    float scale;       /* softmax scale; 0 = 1/sqrt(head_dim)             */
    float softcap;     /* logits = softcap*tanh(logits/softcap); 0 = off  */
    int32_t window;    /* attend to the last `window` positions; 0 = all  */
    apex_dtype q_dtype;   /* type of q                                    */
    apex_dtype out_dtype; /* type of out                                  */
} apex_attn_opts;

/* Defaults: scale 0, softcap 0, window 0, q/out in the config's act_dtype. */
APEX_API apex_attn_opts apex_attn_opts_default(const apex_context *ctx);

/* Decode attention of layer for a batch of n distinct sequences.
 *   q:   [n][n_q_heads][head_dim]   (q_dtype)
 *   out: [n][n_q_heads][head_dim]   (out_dtype)
 * opts may be NULL (defaults). A NaN or Inf in q is rejected before any
 * work. Every sequence must have len >= 1; a sequence named twice is
 * APEX_ERR_INVALID_ARG. n = 0: APEX_OK, nothing done. */
APEX_API apex_status apex_attention(apex_context *ctx, int32_t layer,
                                    int32_t n, const int32_t *seqs,
                                    const void *q, void *out,
                                    const apex_attn_opts *opts);

/* ------------------------------------------- the device pipeline (async) */

/* With a device, the engine's tensors live in device memory and the engine
 * passes its stream. These calls only enqueue work on that stream (and on
 * APEX's own copy stream and CPU worker) and return at once: the engine's
 * thread never waits for the CPU cohort. Rows of device-tier sequences are
 * served by device kernels; rows of host-tier sequences are copied down to
 * pinned memory, handled by APEX's CPU worker (pinned to cpu_set, away from
 * the engine thread), and the results copied up; the stream waits for them
 * on the device. Arguments are checked at enqueue; q, k, v and out are not
 * read by the host (no NaN check). Use one engine stream at a time. */

/* A stream of the context's device: a cudaStream_t with the CUDA device,
 * an emulated stream otherwise. */
typedef struct apex_stream_opaque *apex_stream;

APEX_API apex_status apex_stream_create(apex_context *ctx, apex_stream *out);
APEX_API apex_status apex_stream_destroy(apex_context *ctx, apex_stream s);
/* Blocks until everything enqueued on s (and the CPU work it waits for)
 * has finished. */
APEX_API apex_status apex_stream_sync(apex_context *ctx, apex_stream s);

/* Device memory for the engine's tensors (tests, engines without their own
 * allocator) and copies in any direction, ordered on s. */
APEX_API apex_status apex_device_alloc(apex_context *ctx, size_t bytes, void **out);
APEX_API apex_status apex_device_free(apex_context *ctx, void *p);
APEX_API apex_status apex_memcpy_async(apex_context *ctx, void *dst, const void *src,
                                       size_t bytes, apex_stream s);

/* apex_kv_write with k, v in device memory, ordered on s. */
APEX_API apex_status apex_kv_write_async(apex_context *ctx, int32_t layer, int32_t n,
                                         const int32_t *seqs, const int32_t *pos,
                                         const void *k, const void *v,
                                         apex_dtype src_dtype, apex_stream s);

/* apex_attention with q, out in device memory, ordered on s. */
APEX_API apex_status apex_attention_async(apex_context *ctx, int32_t layer, int32_t n,
                                          const int32_t *seqs, const void *q, void *out,
                                          const apex_attn_opts *opts, apex_stream s);

/* Prefill of layer for n fresh sequences, packed token-major: sequence i
 * contributes n_tokens[i] rows at positions 0..n_tokens[i]-1, which must be
 * exactly its reserved length (apex_seq_reserve of an empty sequence).
 *   q:    [T][n_q_heads][head_dim]    T = sum of n_tokens, opts->q_dtype
 *   k, v: [T][n_kv_heads][head_dim]   same dtype as q
 *   out:  [T][n_q_heads][head_dim]    opts->out_dtype
 * Causal attention (window and softcap as in decode) always runs on the
 * device; each sequence's K/V goes to its tier (a host-tier sequence's rows
 * are copied down and stored by the CPU worker, layer by layer). */
APEX_API apex_status apex_prefill_async(apex_context *ctx, int32_t layer, int32_t n,
                                        const int32_t *seqs, const int32_t *n_tokens,
                                        const void *q, const void *k, const void *v, void *out,
                                        const apex_attn_opts *opts, apex_stream s);

/* -------------------------------------------------------------- scheduler */

/* The step scheduler (csrc/sched/, docs/sched.md): each step it predicts CPU
 * and GPU subtask times from a profile and picks the strategy, which running
 * sequences attend on which tier (moving KV between tiers itself), which
 * waiting requests to admit and where, how much prompt to prefill, and whom
 * to preempt. It is the same function apex-sim runs. */

typedef struct apex_sched_options {
    /* GPU part of the profile: a preset ("t4", "a10", "a100-40gb",
     * "h100-pcie", "h100-sxm"; roofline estimates) or "host" for the
     * emulated device. NULL: APEX_GPU_PRESET, else "host". The CPU part is
     * measured on this machine once and cached (~/.cache/apex); APEX_PROFILE
     * names a profile file to use instead. */
    const char *gpu_preset;
    int64_t weight_bytes;    /* the engine's weights on the GPU          */
    int32_t hidden, ffn, vocab; /* linear-layer shapes                   */
    double tpot_target_ms;   /* per-token latency target; 0 = none        */
    int32_t prefill_budget;  /* prompt tokens per step; 0 = 2048          */
} apex_sched_options;

/* Obtains the profile (may take ~2 s the first time on a machine). Also
 * on a claimed context (apex_paged.h), for apex_sched_place. */
APEX_API apex_status apex_sched_enable(apex_context *ctx, const apex_sched_options *o);

/* One entry per request the engine holds, oldest first. */
typedef struct apex_step_item {
    int32_t seq;         /* slot of a running sequence, or -1: waiting     */
    int32_t prompt_left; /* prompt tokens not yet prefilled (waiting: all) */
} apex_step_item;

typedef enum apex_step_action {
    APEX_STEP_IDLE = 0,    /* nothing this step (or its KV is moving)      */
    APEX_STEP_DECODE = 1,  /* decode one token; attention on `tier`        */
    APEX_STEP_PREFILL = 2, /* prefill `chunk` prompt tokens; KV on `tier`
                              (a waiting request: apex_seq_add it there)   */
    APEX_STEP_PREEMPT = 3  /* free it and requeue (recompute later)        */
} apex_step_action;

typedef struct apex_step_decision {
    int32_t action;     /* apex_step_action */
    int32_t chunk;      /* PREFILL: tokens  */
    apex_tier tier;
} apex_step_decision;

typedef struct apex_step_plan {
    const char *strategy;   /* "gpu_only", "overlap", "pipeline", "split" */
    int32_t n_gpu, n_cpu, n_prefill, n_admit, n_to_host, n_to_device, n_preempt;
    double predicted_step_ms;
} apex_step_plan;

/* Plans one step for n items and carries out the migrations it decided
 * (enqueued like apex_seq_migrate). out: n decisions. Deterministic: the
 * same state gives the same plan. */
APEX_API apex_status apex_sched_step(apex_context *ctx, int32_t n, const apex_step_item *items,
                                     apex_step_decision *out, apex_step_plan *plan);

/* The engine's measured time of the step just planned (by apex_sched_step
 * or apex_sched_place): corrects the model online (bounded steps, so one
 * outlier does not swing it). APEX also corrects CPU attention from its
 * own measurements. */
APEX_API apex_status apex_sched_observe(apex_context *ctx, double step_seconds);

/* ------------------------------------------------------------ statistics */

typedef struct apex_stats {
    uint64_t attention_calls;     /* apex_attention calls that succeeded */
    uint64_t seqs_attended_host;  /* sequence-layers attended on the CPU */
    uint64_t seqs_attended_device;/* sequence-layers attended on the GPU */
    uint64_t kv_tokens_attended;  /* sum of attended lengths             */
    uint64_t kv_rows_written;     /* (seq, pos) rows stored, all layers  */
    uint64_t cow_copies;          /* blocks copied on write              */
    uint64_t migrations[2];       /* sequences moved to [DEVICE], [HOST] */
    uint64_t errors;              /* calls on this context that returned
                                     an error (queries included)       */
    int64_t blocks_used[2];       /* [APEX_TIER_DEVICE], [APEX_TIER_HOST] */
    int64_t blocks_free[2];
    int32_t seqs_active;
    double attention_seconds;     /* wall time inside apex_attention     */
    double kv_write_seconds;      /* wall time inside apex_kv_write      */
} apex_stats;

APEX_API apex_status apex_stats_get(const apex_context *ctx,
                                    apex_stats *out);
APEX_API apex_status apex_stats_reset(apex_context *ctx); /* counters only */

/* ----------------------------------------------------------------- trace */

/* A per-step timeline of every process that loads APEX (csrc/trace.h).
 * APEX_TRACE=FILE writes Chrome trace-event JSON (Perfetto,
 * chrome://tracing) at exit, "%p" in FILE standing for the process id;
 * APEX_TRACE_SUMMARY=1 keeps only the per-step summary. Off by default: a
 * hook then costs one branch. Process-wide: every context and every client
 * (the ggml backend, the vLLM plugin) records into the same tracer, so an
 * engine adapter records its own spans through these calls. */
typedef enum apex_trace_kind {
    APEX_TRACE_CALL = 0,      /* an engine's call into APEX (e.g. a KV write)       */
    APEX_TRACE_CALL_ATTN = 1, /* an engine's attention call: one per layer per step */
    APEX_TRACE_CPU_ATTN = 2,  /* the CPU attention kernel                           */
    APEX_TRACE_GPU_ATTN = 3,  /* the GPU tier's attention (host side)               */
    APEX_TRACE_COPY = 4,      /* KV row stores, conversions, copies                 */
    APEX_TRACE_WAIT = 5,      /* the engine's thread waiting for APEX's other work  */
    APEX_TRACE_INFO = 6       /* shown in the timeline, not summed                  */
} apex_trace_kind;

/* 0 off, 1 summary only, 2 summary and the event file. */
APEX_API int apex_trace_level(void);
/* Turns tracing on from a client (level 1 or 2; 2 needs APEX_TRACE for the
 * file name). Never turns it off: spans may be open on other threads. */
APEX_API apex_status apex_trace_enable(int level);
/* A span on the calling thread; spans nest. name: a string with static
 * storage (kept until the flush). layer: the model layer, or -1. */
APEX_API void apex_trace_begin(apex_trace_kind kind, const char *name, int32_t layer);
APEX_API void apex_trace_end(void);
/* Names the calling thread in the timeline (copied). */
APEX_API void apex_trace_thread_name(const char *name);
/* Writes the event file now (also done at exit); APEX_OK when off. */
APEX_API apex_status apex_trace_flush(void);

/* The per-step summary, from the trace's timestamps: times are microseconds
 * per layer per step (means over layer_steps), except step_gap_us (per step). */
typedef struct apex_step_summary {
    uint64_t steps;        /* steps seen                                          */
    uint64_t layer_steps;  /* engine attention calls (layers x steps)             */
    uint64_t calls;        /* engine calls into APEX                              */
    double engine_us;      /* the engine's own time between APEX's calls in a step */
    double apex_us;        /* wall time of APEX's calls on the engine's thread     */
    double cpu_attn_us;    /* CPU attention kernel (any thread)                    */
    double gpu_attn_us;    /* GPU tier attention, host side (any thread)           */
    double gpu_kernel_us;  /* GPU time from device events (a CUDA build)           */
    double copy_us;        /* KV row stores and copies (any thread)                */
    double wait_us;        /* the engine's thread waiting inside APEX's calls      */
    double apex_overhead_us; /* APEX's calls less their CPU attention, copies, waits */
    double step_gap_us;    /* per step: between the last call of a step and the next */
} apex_step_summary;

/* APEX_ERR_UNSUPPORTED when tracing is off (nothing was measured). */
APEX_API apex_status apex_step_summary_get(apex_step_summary *out);
APEX_API apex_status apex_step_summary_reset(void);

#ifdef __cplusplus
}
#endif
#endif /* APEX_H */
