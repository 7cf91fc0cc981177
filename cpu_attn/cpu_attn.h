/*
 * cpu_attn.h - paged decode attention on the CPU.
 *
 * One query token per sequence attends to that sequence's KV, stored in
 * blocks of the APEX layout (see apex.h): block b of the layer slab starts at
 * kv + b * block_bytes; inside it K is [n_kv_heads][block_tokens][head_dim],
 * then V likewise. Sequence i attends positions [start_i, len_i) where
 * start_i = window ? max(0, len_i - window) : 0.
 *
 * Two implementations with one signature:
 *   cpu_attn_reference  plain scalar loops, fp32 math, whole-sequence softmax:
 *                       the definition the optimised kernel is held to.
 *   cpu_attn_decode     OpenMP over (sequence, kv head, KV chunk) work items,
 *                       so one long sequence uses every thread; each item
 *                       produces a partial (max, sum, acc) merged by
 *                       log-sum-exp; inner loops dispatched once at start to
 *                       AVX512-BF16 / AVX-512 / AVX2+FMA+F16C / scalar.
 */
#ifndef APEX_CPU_ATTN_H
#define APEX_CPU_ATTN_H

#include <stddef.h>
#include <stdint.h>

#include "apex/apex.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cpu_attn_geom {
    int32_t n_q_heads;
    int32_t n_kv_heads;
    int32_t head_dim;
    int32_t block_tokens;
    apex_dtype kv_dtype;
    int32_t kv_pairs;          /* 1: blocks in the pair layout (kv_layout.h);
                                * only where cpu_attn_pairs_ok()            */
} cpu_attn_geom;

typedef struct cpu_attn_batch {
    int32_t n_seqs;
    const void *q;             /* [n_seqs][n_q_heads][head_dim], q_dtype      */
    apex_dtype q_dtype;
    void *out;                 /* [n_seqs][n_q_heads][head_dim], out_dtype    */
    apex_dtype out_dtype;
    const int32_t *seq_lens;   /* [n_seqs], each >= 1                         */
    const int32_t *block_table;/* [n_seqs][block_table_stride] block ids      */
    int32_t block_table_stride;
    const void *kv;            /* layer slab base                             */
    size_t block_bytes;        /* bytes between consecutive blocks            */
    float scale;               /* already resolved (never 0)                  */
    float softcap;             /* 0 = off                                     */
    int32_t window;            /* 0 = all                                     */
} cpu_attn_batch;

typedef enum cpu_attn_isa {
    CPU_ATTN_ISA_SCALAR = 0,
    CPU_ATTN_ISA_AVX2 = 1,
    CPU_ATTN_ISA_AVX512 = 2,
    /* AVX512 + AVX512-BF16: bf16 KV dotted with vdpbf16ps (q and P rounded
     * to bf16, fp32 accumulation); f16/f32 KV as avx512. */
    CPU_ATTN_ISA_AVX512BF16 = 3,
    /* avx512bf16 + AMX-BF16 (and the OS's leave to use the tiles): bf16 KV
     * on tiles in either layout (G 2-16, head_dim % 32); everything else
     * as avx512bf16. */
    CPU_ATTN_ISA_AMXBF16 = 4
} cpu_attn_isa;

/* The variant picked from cpuid (or APEX_ISA), decided once, thread-safe. */
cpu_attn_isa cpu_attn_isa_selected(void);
const char *cpu_attn_isa_name(cpu_attn_isa isa);
/* Forces a variant (tests); returns 0, or -1 if the CPU lacks it. */
int cpu_attn_isa_force(cpu_attn_isa isa);
/* 1 if the AVX-512 kernels' row-layout q.K takes 256-bit tiles for 3-4 q
 * heads per KV head (f16 KV in avx512, bf16 KV in avx512bf16): faster where
 * 512-bit operations issue as two 256-bit halves (AMD Zen 4, measured
 * +2-7 % in cache), much slower where they do not (a Xeon: 512-bit tiles
 * ran 1.3-1.5x faster in cache). From cpuid (AMD family 19h), decided once;
 * cpu_attn_qk_ymm_force(0 or 1) overrides it (tests: each path on any
 * CPU), -1 returns to cpuid's choice. */
int cpu_attn_qk_ymm(void);
void cpu_attn_qk_ymm_force(int on);
/* 1 if g's KV may be held in the pair layout: bf16 KV, block_tokens >= 16
 * and the selected variant reads it (avx512bf16, amxbf16); the others and
 * cpu_attn_decode on a geometry they cannot read return -1. The reference
 * reads both layouts. */
int cpu_attn_pairs_ok(const cpu_attn_geom *g);

/* Workspace for cpu_attn_decode: partial results of the split-K items.
 * Sized for a batch of at most max_seqs sequences of at most max_len tokens
 * on n_threads threads. Opaque; NULL on allocation failure. */
typedef struct cpu_attn_ws cpu_attn_ws;
cpu_attn_ws *cpu_attn_ws_create(const cpu_attn_geom *g, int32_t max_seqs,
                                int32_t max_len, int32_t n_threads);
void cpu_attn_ws_destroy(cpu_attn_ws *ws);

/* Both return 0 on success. Inputs are trusted (APEX validates them at the
 * ABI); n_threads <= the workspace's. */
int cpu_attn_reference(const cpu_attn_geom *g, const cpu_attn_batch *b);
int cpu_attn_decode(const cpu_attn_geom *g, const cpu_attn_batch *b,
                    cpu_attn_ws *ws, int32_t n_threads);

#ifdef __cplusplus
}
#endif
#endif /* APEX_CPU_ATTN_H */
