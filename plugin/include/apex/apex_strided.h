/*
 * apex_strided.h - APEX for engines that keep their own KV tensors in place
 * (llama.cpp/ggml: the ggml backend, shim/, is this header's client).
 *
 * Such an engine lays out its KV cache itself, token-major, and hands APEX
 * strided views of it at each attention op. This part of the ABI gives it:
 *
 *   apex_strided_attention(&d, n_threads)  attention over strided q, K, V,
 *                                          mask and out, read in place
 *   apex_host_kv_alloc / _free             host memory for the KV tensors:
 *                                          huge pages, NUMA-local to the
 *                                          worker cores (APEX_CPUSET)
 *   apex_host_kv_pin / _unpin              registered with the CUDA runtime
 *                                          the process already has
 *   apex_metrics_file_*                    APEX_METRICS_FILE from the
 *                                          engine's own counters
 * No context: these calls keep no per-engine state (the worker cores'
 * topology and the metrics file are process-wide, loaded once).
 *
 * Strided layout (ggml's FLASH_ATTN_EXT operands), outermost first, rows of
 * head_dim elements contiguous, every other stride in bytes:
 *   q    [n_streams][n_q_heads][n_tokens][head_dim]   f32
 *   k, v [n_streams][n_kv_heads][n_kv][head_dim]      f16 or f32
 *   mask [n_streams or 1][n_tokens][n_kv]             f16 bits, additive
 *   out  [n_streams][n_tokens][n_q_heads][head_dim]   f32
 * Query head h reads KV head h / (n_q_heads / n_kv_heads). With f16 K, q is
 * rounded to f16 before the dot product; score = dot(q, k_j) * scale, or
 * with a softcap c, c * tanh(dot * scale / c); score += mask; rows whose
 * mask is -inf are skipped; out = softmax(scores) . V, 0 when no row is
 * visible (ggml-cpu's definition).
 *
 * Errors: as apex.h: an apex_status, and apex_last_error() says what was
 * wrong. Bad input changes nothing (out is not written).
 */
#ifndef APEX_STRIDED_H
#define APEX_STRIDED_H

#include "apex/apex.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------- attention */

/* Bumped when apex_strided_desc changes incompatibly; fields are only ever
 * appended, and struct_size tells APEX which ones the caller knows. */
#define APEX_STRIDED_DESC_VERSION 1

typedef struct apex_strided_desc {
    uint32_t struct_size; /* sizeof(apex_strided_desc) of the caller     */
    uint32_t version;     /* APEX_STRIDED_DESC_VERSION                    */
    int32_t head_dim;     /* of K and of V, in (0, 512]                   */
    int32_t n_q_heads;    /* a multiple of n_kv_heads                     */
    int32_t n_kv_heads;
    int32_t n_tokens;     /* query tokens per stream, >= 1                */
    int32_t n_streams;    /* >= 1                                         */
    int32_t n_kv;         /* KV rows per stream, >= 0                     */
    const float *q;
    size_t q_nb_tok, q_nb_head, q_nb_stream;
    apex_dtype kv_dtype;  /* APEX_DTYPE_F16 or APEX_DTYPE_F32             */
    const void *k;
    size_t k_nb_row, k_nb_head, k_nb_stream;
    const void *v;
    size_t v_nb_row, v_nb_head, v_nb_stream;
    const uint16_t *mask; /* NULL = every row visible                     */
    size_t mask_nb_tok;
    size_t mask_nb_stream; /* 0 = one mask for all streams                */
    float *out;
    size_t out_nb_head, out_nb_tok, out_nb_stream;
    float scale;          /* finite, not 0                                */
    float softcap;        /* finite, >= 0; 0 = off                        */
    /* 1: exact mode, ggml-cpu's FLASH_ATTN_EXT arithmetic bit for bit (its
     * row-by-row path with an f16 accumulator; its split-KV decode of one
     * query token of one stream over >= 512 rows, cut into
     * ceil(n_kv / ggml_n_threads) rows a chunk and merged in chunk order).
     * Needs apex_strided_exact_ok(head_dim, kv_dtype). */
    int32_t ggml_compat;
    int32_t ggml_n_threads; /* ggml-cpu's thread count; 0 = n_threads     */
    int32_t ggml_streams;   /* streams of ggml's whole op when this call
                             * runs a part of it; 0 = n_streams           */
} apex_strided_desc;

/* Zeroes *d and sets struct_size and version. */
APEX_API apex_status apex_strided_desc_init(apex_strided_desc *d);

/* APEX_OK when d is well formed and supported; else APEX_ERR_INVALID_ARG
 * (NULL pointers, sizes, scale, softcap, struct_size/version) or
 * APEX_ERR_UNSUPPORTED (kv dtype; exact mode where it cannot run). */
APEX_API apex_status apex_strided_check(const apex_strided_desc *d);

/* Checks d, then computes out on n_threads OpenMP threads of the calling
 * thread's team (0 = the OpenMP default); APEX pins nothing, the engine's
 * threads stay where they are. Each K/V row is read once for every query
 * head sharing it and a tile of query tokens; rows the mask hides are never
 * read. APEX_ERR_NO_MEMORY when scratch cannot be allocated. */
APEX_API apex_status apex_strided_attention(const apex_strided_desc *d, int32_t n_threads);

/* 1 when exact mode runs here for this geometry: f16 KV, head_dim a
 * multiple of 64 (at most 512), a CPU with AVX-512. Else 0. */
APEX_API int apex_strided_exact_ok(int32_t head_dim, apex_dtype kv_dtype);

/* The fp32 mode's inner loop on this CPU: "avx512" or "scalar"
 * (APEX_ISA=scalar or avx2 forces "scalar"). Never NULL. */
APEX_API const char *apex_strided_isa(void);

/* ------------------------------------------------------- host KV memory */

/* bytes (0 is taken as 1) of page-aligned host memory, zero-filled, mapped with
 * transparent huge pages and bound to the NUMA nodes of the worker cores
 * (APEX_CPUSET, hwloc list syntax; unset: every core the process may use).
 * Memory is committed on first touch. APEX_ERR_NO_MEMORY when the mapping
 * fails (APEX_FAULT=host_alloc:N injects it); *out is NULL then. */
APEX_API apex_status apex_host_kv_alloc(size_t bytes, void **out);

/* Unmaps memory from apex_host_kv_alloc (bytes as allocated). NULL: no-op.
 * Unpin it first if it was pinned. */
APEX_API apex_status apex_host_kv_free(void *p, size_t bytes);

/* The NUMA nodes apex_host_kv_alloc binds to, as an hwloc list ("0" or
 * "0-1") into buf (cap bytes, NUL-terminated; "" when the machine reports
 * none). APEX_ERR_INTERNAL with the reason when the worker cores' topology
 * cannot be loaded (the memory is then not bound); APEX_ERR_INVALID_ARG for
 * buf NULL or cap 0. */
APEX_API apex_status apex_host_kv_nodes(char *buf, size_t cap);

/* Registers [p, p + bytes) with the CUDA runtime the process already has
 * (cudaHostRegister, portable), so device copies from it are DMA. Never
 * loads a runtime. APEX_OK: pinned. Not pinned, and nothing to undo:
 * APEX_ERR_UNSUPPORTED when the process has no CUDA runtime or
 * APEX_PIN_HOST_POOL=0 says not to; APEX_ERR_INTERNAL when the runtime
 * refused (its error is cleared, so the engine's next CUDA error check does
 * not see it). Only copy speed is at stake. APEX_ERR_INVALID_ARG for p NULL
 * or bytes 0. */
APEX_API apex_status apex_host_kv_pin(void *p, size_t bytes);

/* Unregisters memory apex_host_kv_pin pinned (a runtime error is cleared
 * and returned as APEX_ERR_INTERNAL). APEX_ERR_INVALID_ARG for p NULL. */
APEX_API apex_status apex_host_kv_unpin(void *p);

/* ------------------------------------------------------- metrics file */

/* The figures of one write of APEX_METRICS_FILE (Prometheus text; the
 * metric names are those of libapex's own file). A gauge of -1 is "not
 * known to this engine" and left out of the file. */
typedef struct apex_metrics_values {
    uint32_t struct_size;       /* sizeof(apex_metrics_values) of the caller */
    const char *engine;         /* label value, e.g. "llama.cpp"; static     */
    uint64_t attention_calls;
    uint64_t kv_rows_written;
    uint64_t seq_attentions[2]; /* [APEX_TIER_DEVICE], [APEX_TIER_HOST]      */
    uint64_t migrations[2];     /* to [DEVICE], to [HOST]                    */
    uint64_t fallbacks;
    uint64_t errors;
    double attention_seconds;
    int64_t blocks_used[2];     /* gauges; -1: not known                     */
    int64_t blocks_free[2];
    int64_t kv_bytes[2];
    int64_t seqs[2];
    int32_t has_step_summary;   /* 1: step holds the trace's summary         */
    apex_step_summary step;
} apex_metrics_values;

/* Zeroes *m, sets struct_size and engine, every gauge -1. */
APEX_API apex_status apex_metrics_values_init(apex_metrics_values *m, const char *engine);

typedef struct apex_metrics_file apex_metrics_file;

/* Takes APEX_METRICS_FILE ("%p" in it is the process id) for the caller:
 * *out is the file, or NULL when the variable is unset or another user in
 * this process (a libapex context, another client) holds it (one line on
 * stderr names that one). who names the caller in APEX's messages. */
APEX_API apex_status apex_metrics_file_open(const char *who, apex_metrics_file **out);

/* Writes m to the file (atomically: a temporary file renamed over it) when
 * a second has passed since the last write, or now with force. A failed
 * write is reported on stderr once and retried at the next call; the call
 * still returns APEX_OK (metrics never fail the engine). */
APEX_API apex_status apex_metrics_file_write(apex_metrics_file *f, const apex_metrics_values *m, int force);

/* Gives the file back (NULL: no-op). */
APEX_API apex_status apex_metrics_file_close(apex_metrics_file *f);

#ifdef __cplusplus
}
#endif
#endif /* APEX_STRIDED_H */
