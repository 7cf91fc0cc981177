/*
 * cpu_attn_impl.h - internals shared by the dispatcher (cpu_attn_decode.c)
 * and the per-ISA inner kernels (cpu_attn_{scalar,avx2,avx512}.c).
 *
 * The dispatcher cuts the batch into spans: one sequence, a range of KV
 * heads (all of them unless more parallelism is needed), a token range that
 * starts and ends anywhere (window start, a chunk border on a block border,
 * the sequence end). An ISA kernel runs online softmax over one span for all
 * q heads of each KV head at once, so K and V are read once, and walks each
 * block's K heads, then its V heads, in address order: a block's K (and V)
 * is one contiguous run, which memory streams far better than scattered
 * per-head panels.
 */
#ifndef APEX_CPU_ATTN_IMPL_H
#define APEX_CPU_ATTN_IMPL_H

#include <stddef.h>
#include <stdint.h>

#include "cpu_attn/cpu_attn.h"

/* Largest block_tokens (apex.h) and the padding around each head's row of
 * scores, so that whole-vector masked stores stay inside the row. */
#define CPU_ATTN_MAX_BT 256
#define CPU_ATTN_SPAD 16
/* Tokens scored before each softmax update: at least one block. Bigger
 * amortises the per-update horizontal work; smaller keeps K/V in L1. */
#define CPU_ATTN_GROUP_TOKENS 64
/* A group is max(block_tokens, GROUP_TOKENS) <= MAX_BT tokens. */
#define CPU_ATTN_SROW (CPU_ATTN_MAX_BT + 2 * CPU_ATTN_SPAD)

typedef struct cpu_attn_span {
    const float *q;          /* [NH*G][D] fp32, multiplied by the softmax
                              * scale unless the kernel takes raw q (below) */
    float q_scale;           /* scores are q.k * q_scale: 1, or the softmax
                              * scale where q is raw                         */
    const uint8_t *kv;       /* layer slab                                   */
    const int32_t *blocks;   /* the sequence's block ids                     */
    size_t block_bytes;
    size_t k_off, v_off;     /* bytes from a block's start to the first
                              * head's K panel and V panel                   */
    size_t panel;            /* bytes of one head's panel: bt * D * esize    */
    int32_t NH, G, D, bt;    /* KV heads in this span, q heads per KV head,
                              * head_dim, block_tokens                       */
    int32_t t0, t1;          /* token positions [t0, t1), t0 < t1            */
    apex_dtype kv_dtype;
    float softcap;           /* 0 = off                                      */
} cpu_attn_span;

/* Floats of per-thread scratch a kernel's span() needs for nq = NH*G q
 * heads (64-byte aligned): score rows, then (avx512bf16) the same rows of
 * P in bf16 and q in bf16 padded to a multiple of 32 columns, then
 * (amxbf16, row layout) q again with dim pairs outermost and one group's
 * V (<= MAX_BT tokens) with token pairs interleaved. */
static inline size_t cpu_attn_scratch_floats(int32_t nq, int32_t D) {
    return (size_t)nq * CPU_ATTN_SROW * 3 / 2 + (size_t)nq * ((size_t)D + 32) +
           (size_t)CPU_ATTN_MAX_BT * ((size_t)D + 32) / 2 + (size_t)D + 64;
}

typedef struct cpu_attn_kernel {
    /* Online softmax over the span, per q head i < NH*G: m[i] running max,
     * l[i] sum of exp(s - m), acc[i][D] sum of exp(s - m) * v (not
     * normalised). */
    void (*span)(const cpu_attn_span *s, float *m, float *l, float *acc,
                 float *scratch);
    /* out[i] = src[i] * mul, i < n, stored as dt. */
    void (*store)(void *out, apex_dtype dt, const float *src, float mul, int32_t n);
    /* dst[i] = src[i] * mul, i < n, src of type dt (q rows into fp32);
     * NULL: a plain loop. */
    void (*load)(float *dst, const void *src, apex_dtype dt, size_t n, float mul);
    /* Nonzero: for bf16 KV, span() takes q unscaled (its bf16 rounding is
     * then exact for bf16 q) and applies q_scale to the scores itself. */
    int raw_q_bf16_kv;
    /* span() for bf16 KV in the pair layout (kv_layout.h); NULL: the
     * variant does not read it. */
    void (*span_pairs)(const cpu_attn_span *s, float *m, float *l, float *acc, float *scratch);
} cpu_attn_kernel;

extern const cpu_attn_kernel cpu_attn_kernel_scalar;
extern const cpu_attn_kernel cpu_attn_kernel_avx2;
extern const cpu_attn_kernel cpu_attn_kernel_avx512;
extern const cpu_attn_kernel cpu_attn_kernel_avx512bf16;
extern const cpu_attn_kernel cpu_attn_kernel_amxbf16;
/* The avx512 kernel's stages, which avx512bf16 reuses for f16/f32 KV. */
void cpu_attn_span_avx512(const cpu_attn_span *s, float *m, float *l, float *acc, float *scratch);
void cpu_attn_store_avx512(void *out, apex_dtype dt, const float *src, float mul, int32_t n);
void cpu_attn_load_avx512(float *dst, const void *src, apex_dtype dt, size_t n, float mul);
/* Whether the CPU has AVX512-BF16 (the avx512 kernel uses it for bf16 out). */
int cpu_attn_have_avx512bf16(void);

const cpu_attn_kernel *cpu_attn_kernel_get(cpu_attn_isa isa);

#endif /* APEX_CPU_ATTN_IMPL_H */
