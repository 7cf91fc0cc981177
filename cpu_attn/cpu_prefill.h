/*
 * cpu_prefill.h - causal prefill attention, plain reference (fp32 math in
 * double accumulators). The definition the device prefill kernels (CUDA's
 * apex_cuda_prefill_attention, the emulated device's) are held to.
 *
 * Sequences are packed token-major: sequence s owns rows
 * [cu_seqlens[s], cu_seqlens[s+1]) at positions 0.., and its token i attends
 * its tokens [max(0, i + 1 - window), i] (window 0 = all): logits = scale *
 * q.k, then softcap * tanh(logits / softcap) when softcap > 0, softmax,
 * weighted sum of V. Row strides are in elements (0 = packed).
 */
#ifndef APEX_CPU_PREFILL_H
#define APEX_CPU_PREFILL_H

#include <stdint.h>

#include "apex/apex.h"

typedef struct cpu_prefill_batch {
    int32_t n_seqs;
    const int32_t *cu_seqlens; /* [n_seqs + 1]                       */
    int32_t n_q_heads, n_kv_heads, head_dim;
    const void *q, *k, *v;     /* act_dtype rows                      */
    int64_t q_stride, k_stride, v_stride;
    apex_dtype act_dtype;
    void *out;                 /* [n_tokens][n_q_heads][head_dim]     */
    apex_dtype out_dtype;
    float scale, softcap;
    int32_t window;
} cpu_prefill_batch;

/* 0 on success, -1 if scratch memory could not be had. */
int cpu_prefill_reference(const cpu_prefill_batch *b);

#endif
