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

#include "apex/apex_strided.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The descriptor is the public one (apex_strided.h documents every field):
 * the kernel reads the fields, the ABI (plugin/src/apex_strided_api.c)
 * checks struct_size and version before it calls in. Exact mode
 * (ggml_compat) reproduces ggml-cpu's FLASH_ATTN_EXT arithmetic bit for
 * bit; its split-KV decode is cut where ggml cuts it, given ggml_n_threads
 * and ggml_streams. */
typedef apex_strided_desc cpu_attn_strided_desc;

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
