/*
 * apex_cuda.h - the GPU tier's kernels and driver hooks, callable from C.
 *
 * Every launcher takes the CUDA stream as a void * (a cudaStream_t; NULL is
 * the legacy default stream), enqueues its work and returns 0 or an error
 * code: a positive cudaError_t from the runtime, or one of the negative
 * APEX_CUDA_E* codes below when the arguments were refused before any work
 * was enqueued. Pointers marked "device" must be readable by the GPU: device
 * memory, or pinned host memory mapped into the device's address space
 * (cudaHostAlloc(..., cudaHostAllocMapped) with unified addressing), which
 * lets a kernel stream rows straight to or from the host tier.
 *
 * KV pools use the APEX block layout (apex.h): block b of a layer slab starts
 * at kv + b * block_bytes and holds K as [n_kv_heads][block_tokens][head_dim],
 * then V likewise (cpu_attn/kv_layout.h derives the offsets). Slots address
 * one token row: slot = block * block_tokens + offset; a negative slot means
 * "skip this row" (padding).
 *
 * Nothing here aborts: with no driver or no GPU, apex_cuda_device_count()
 * returns 0 and the process carries on in host mode.
 */
#ifndef APEX_CUDA_H
#define APEX_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "apex/apex.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Negative codes: refused before any work was enqueued. */
#define APEX_CUDA_EINVAL (-1)       /* bad geometry, null or misaligned ptr */
#define APEX_CUDA_EUNSUPPORTED (-2) /* valid but not built (head_dim ...)   */
#define APEX_CUDA_ENODRIVER (-3)    /* libcuda.so.1 or a symbol is missing  */

/* Text for any code this header returns (runtime or APEX_CUDA_E*). */
const char *apex_cuda_error_string(int code);

/* ------------------------------------------------------------ driver */

/* 1 when libcuda.so.1 loaded and cuInit succeeded (decided once). */
int apex_cuda_driver_available(void);
/* Number of usable GPUs; 0 with no driver or no device. Never aborts. */
int apex_cuda_device_count(void);
/* The driver's CUDA version (e.g. 13000), 0 when unavailable. */
int apex_cuda_driver_version(void);

/* Stream-ordered waits on, and writes of, a 32-bit word (driver memory
 * operations). addr is a device address: device memory or mapped pinned host
 * memory, which is how the engine's stream waits for a host-written flag
 * without blocking a host thread. APEX_CUDA_ENODRIVER when unsupported. */
enum {
    APEX_CUDA_WAIT_GEQ = 0x0, /* (int32_t)(*addr - value) >= 0 */
    APEX_CUDA_WAIT_EQ = 0x1,
    APEX_CUDA_WAIT_AND = 0x2, /* (*addr & value) != 0 */
    APEX_CUDA_WAIT_NOR = 0x3, /* ~(*addr | value) != 0 */
    APEX_CUDA_WAIT_FLUSH = 1 << 30
};
int apex_cuda_stream_wait_value32(void *stream, void *addr, uint32_t value,
                                  unsigned flags);
int apex_cuda_stream_write_value32(void *stream, void *addr, uint32_t value);

/* The stream waits until (int32_t)(*flag - value) >= 0, where flag is in
 * pinned, mapped host memory written by a host thread: a driver wait when
 * available, else a polling kernel. Never blocks the calling thread. */
int apex_cuda_stream_wait_flag(void *stream, const uint32_t *flag, uint32_t value);

/* ------------------------------------------------- paged decode attention */

/* One query token per sequence (position len-1) attends positions
 * [max(0, len - window), len) of its KV (window 0 = all), exactly as
 * cpu_attn_reference: logits = scale * q.k, then softcap * tanh(logits /
 * softcap) when softcap > 0, softmax, weighted sum of V; fp32 throughout. */
typedef struct apex_cuda_decode {
    int32_t n_seqs;
    int32_t n_q_heads;
    int32_t n_kv_heads;
    int32_t head_dim;          /* one of APEX_HEAD_DIMS (kv_layout.h)      */
    int32_t block_tokens;      /* power of two, 1..256                     */
    apex_dtype kv_dtype;
    apex_dtype q_dtype;
    apex_dtype out_dtype;
    const void *q;             /* device [n_seqs][n_q_heads][head_dim]     */
    void *out;                 /* device [n_seqs][n_q_heads][head_dim]     */
    const int32_t *seq_lens;   /* device [n_seqs], each >= 1               */
    const int32_t *block_table;/* device [n_seqs][block_table_stride]      */
    int32_t block_table_stride;
    const void *kv;            /* device layer slab, 16-byte aligned       */
    size_t block_bytes;
    float scale;               /* resolved, not 0                          */
    float softcap;             /* 0 = off                                  */
    int32_t window;            /* 0 = all                                  */
    int32_t max_seq_len;       /* host-known bound on seq_lens (must hold
                                  when split-K is used): sizes the split
                                  partition without reading the device     */
    void *workspace;           /* device scratch for split-K partials      */
    size_t workspace_bytes;    /* 0: no split-K                            */
    int32_t num_splits;        /* 0 = automatic; > 0 forces (tests)        */
} apex_cuda_decode;

/* Scratch that lets a batch of up to max_seqs sequences use split-K. */
size_t apex_cuda_decode_workspace_bytes(int32_t max_seqs, int32_t n_q_heads,
                                        int32_t head_dim);
/* The number of KV splits per (sequence, kv head) the launcher will use for
 * these arguments on the current device (1 = no split, no reduce kernel). */
int apex_cuda_decode_splits(const apex_cuda_decode *a);
int apex_cuda_paged_decode(const apex_cuda_decode *a, void *stream);

/* ------------------------------------------------------------ KV append */

/* Row r of k and v ([n_kv_heads][head_dim] each) goes to slot slots[r] of
 * the pool, converted from src_dtype to kv_dtype (round to nearest even). */
typedef struct apex_cuda_kv_append {
    int32_t n_rows;
    int32_t n_kv_heads;
    int32_t head_dim;
    int32_t block_tokens;      /* power of two                             */
    const void *k;             /* device, rows k_stride elements apart     */
    const void *v;
    int64_t k_stride;          /* 0 = n_kv_heads * head_dim                */
    int64_t v_stride;
    apex_dtype src_dtype;
    const int64_t *slots;      /* device [n_rows]                          */
    void *kv;                  /* device layer slab                        */
    size_t block_bytes;
    apex_dtype kv_dtype;
} apex_cuda_kv_append;

int apex_cuda_kv_append_rows(const apex_cuda_kv_append *a, void *stream);

/* ------------------------------------------------------ prefill attention */

/* Causal attention over a variable-length batch of fresh sequences packed
 * token-major: sequence s owns tokens [cu_seqlens[s], cu_seqlens[s+1]) at
 * positions 0.., and its token i attends its tokens
 * [max(0, i + 1 - window), i] with the same logits, softcap and softmax as
 * decode. Attention reads k/v as given (activations). When kv is not NULL
 * the same k/v rows are also stored into the pool by slots (as
 * apex_cuda_kv_append_rows), which is how a prefill fills either tier. */
typedef struct apex_cuda_prefill {
    int32_t n_seqs;
    int32_t n_tokens;          /* cu_seqlens[n_seqs]                       */
    int32_t n_q_heads;
    int32_t n_kv_heads;
    int32_t head_dim;          /* one of APEX_HEAD_DIMS (kv_layout.h)      */
    const int32_t *cu_seqlens; /* device [n_seqs + 1], cu_seqlens[0] = 0   */
    int32_t max_seq_len;       /* host bound on any sequence's length      */
    const void *q;             /* device, rows q_stride elements apart     */
    const void *k;
    const void *v;
    int64_t q_stride;          /* 0 = n_q_heads * head_dim                 */
    int64_t k_stride;          /* 0 = n_kv_heads * head_dim                */
    int64_t v_stride;
    apex_dtype act_dtype;      /* type of q, k and v                       */
    void *out;                 /* device [n_tokens][n_q_heads][head_dim]   */
    apex_dtype out_dtype;
    float scale;
    float softcap;
    int32_t window;
    /* Optional KV store into a pool (kv NULL: none). */
    void *kv;
    size_t block_bytes;
    int32_t block_tokens;
    apex_dtype kv_dtype;
    const int64_t *slots;      /* device [n_tokens]                        */
} apex_cuda_prefill;

int apex_cuda_prefill_attention(const apex_cuda_prefill *a, void *stream);

/* ------------------------------------------------ CPU cohort staging copy */

/* Up to four row tensors moved together by one index list. For gather,
 * dst row i = src row idx[i]; for scatter, dst row idx[i] = src row i.
 * A negative idx[i] skips row i. Strides are in bytes, >= row_bytes;
 * row_bytes, strides and pointers that are multiples of 16 get full-width
 * copies (any value is correct). */
typedef struct apex_cuda_rows {
    const void *src;
    void *dst;
    size_t src_stride;
    size_t dst_stride;
    size_t row_bytes;
} apex_cuda_rows;

#define APEX_CUDA_MAX_ROW_TENSORS 4

int apex_cuda_gather_rows(const apex_cuda_rows *t, int n_tensors,
                          const int32_t *idx, int32_t n_rows, void *stream);
int apex_cuda_scatter_rows(const apex_cuda_rows *t, int n_tensors,
                           const int32_t *idx, int32_t n_rows, void *stream);

#ifdef __cplusplus
}
#endif
#endif /* APEX_CUDA_H */
