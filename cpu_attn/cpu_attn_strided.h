/*
 * cpu_attn_strided.h - attention over a token-major, strided KV cache.
 *
 * The layout of llama.cpp/ggml's KV cache and FLASH_ATTN_EXT operands:
 *   q    [n_streams][n_q_heads][n_tokens][head_dim]   any strides, f32 rows
 *   k, v [n_streams][n_kv_heads][n_kv][head_dim]      any strides, f16/f32 rows
 *   mask [n_streams or 1][n_tokens][n_kv]             f16, additive (-inf hides)
 *   out  [n_streams][n_tokens][n_q_heads][head_dim]   any strides, f32 rows
 * (outermost first; rows of head_dim elements are contiguous). Query head h
 * reads KV head h / (n_q_heads / n_kv_heads).
 *
 * Definition (that of ggml-cpu's FLASH_ATTN_EXT): with f16 K, q is rounded to
 * f16 before the dot product; score = dot(q, k_j) * scale, or with a softcap
 * c, c * tanh(dot * scale / c); score += mask; rows whose mask is -inf are
 * skipped; out = softmax(scores) . V, and 0 when no row is visible.
 *
 * cpu_attn_strided reads each KV row once for all query heads that share it
 * (GQA) and for a tile of query tokens, streams only the rows the mask leaves
 * visible, and splits long ranges across threads (log-sum-exp merge).
 */
#ifndef APEX_CPU_ATTN_STRIDED_H
#define APEX_CPU_ATTN_STRIDED_H

#include <stddef.h>
#include <stdint.h>

#include "apex/apex.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cpu_attn_strided_desc {
    int32_t head_dim;    /* of K and of V                                 */
    int32_t n_q_heads;   /* a multiple of n_kv_heads                      */
    int32_t n_kv_heads;
    int32_t n_tokens;    /* query tokens per stream                       */
    int32_t n_streams;
    int32_t n_kv;        /* KV rows per stream                            */
    const float *q;      /* strides in bytes                              */
    size_t q_nb_tok, q_nb_head, q_nb_stream;
    apex_dtype kv_dtype; /* APEX_DTYPE_F16 or APEX_DTYPE_F32              */
    const void *k;
    size_t k_nb_row, k_nb_head, k_nb_stream;
    const void *v;
    size_t v_nb_row, v_nb_head, v_nb_stream;
    const uint16_t *mask;  /* f16 bits; NULL = every row visible           */
    size_t mask_nb_tok;    /* bytes                                        */
    size_t mask_nb_stream; /* bytes; 0 = one mask for all streams          */
    float *out;
    size_t out_nb_head, out_nb_tok, out_nb_stream;
    float scale;         /* never 0                                       */
    float softcap;       /* 0 = off                                       */
    /* 1: reproduce ggml-cpu's FLASH_ATTN_EXT arithmetic bit for bit (its
     * row-by-row path with an f16 output accumulator, on an AVX-512 build):
     * same results as the engine, so greedy tokens match. Needs f16 KV,
     * head_dim a multiple of 64 and AVX-512. Ranges are split only where
     * ggml splits them: one query token of one stream over >= 512 rows
     * (its split-KV path) is cut into ggml's chunks, ceil(n_kv /
     * ggml_n_threads) rows each, merged in chunk order as ggml merges. */
    int32_t ggml_compat;
    int32_t ggml_n_threads; /* ggml-cpu's thread count for the op; 0 = the
                             * n_threads of cpu_attn_strided              */
    int32_t ggml_streams;   /* streams of ggml's op when this call runs a
                             * part of it (0 = n_streams): ggml splits only
                             * an op of one stream                        */
} cpu_attn_strided_desc;

/* 0 if the descriptor is well formed and supported, else -1. */
int cpu_attn_strided_compat_ok(int32_t head_dim, apex_dtype kv_dtype);
int cpu_attn_strided_check(const cpu_attn_strided_desc *d);

/* Plain scalar loops, the definition the fast path is held to. */
int cpu_attn_strided_reference(const cpu_attn_strided_desc *d);

/* The fast path on n_threads OpenMP threads (0 = the OpenMP default).
 * Returns 0, or -1 on a bad descriptor or a failed allocation. */
int cpu_attn_strided(const cpu_attn_strided_desc *d, int32_t n_threads);

/* "avx512" or "scalar": the inner loop the fast path uses on this CPU. */
const char *cpu_attn_strided_isa(void);

#ifdef __cplusplus
}
#endif
#endif /* APEX_CPU_ATTN_STRIDED_H */
