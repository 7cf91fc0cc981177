/*
 * kv_layout.h - the KV cache layout both tiers share, derived in one place:
 * the geometry this build supports (head dims, block sizes), the bytes of a
 * block, where head h's row of token t of K or V sits in a block, and which
 * block and row a slot names.
 *
 * One block of one layer is K [n_kv_heads][block_tokens][head_dim] then V
 * likewise, elements of kv_dtype (apex.h, "KV layout"). Header-only and
 * callable from CUDA device code too; it lives with the kernels (the lowest
 * layer) so that cpu_attn/, cuda/ and csrc/ all include it.
 */
#ifndef APEX_KV_LAYOUT_H
#define APEX_KV_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

#include "apex/apex.h"
#include "cpu_attn/dtype_traits.h"

#ifdef __CUDACC__
#define APEX_KV_FN static inline __host__ __device__
#else
#define APEX_KV_FN static inline
#endif

/* The head dims this build runs: X(d) per supported head_dim, the one list.
 * apex_limits_get reports it, apex_config_validate checks against it, and
 * the CUDA launchers instantiate their kernels from it (cuda/paged_decode.cuh,
 * cuda/prefill.cu); the CPU kernels take any multiple of 16. A new head_dim
 * is one entry here (the CUDA kernels' instantiations follow from it). */
#define APEX_HEAD_DIMS(X) X(64) X(80) X(96) X(128) X(256)
/* The largest entry above (fixed-size scratch in the reference kernels;
 * csrc/config.c checks every entry against it at compile time). */
#define APEX_MAX_HEAD_DIM 256
/* The block sizes (tokens per block); powers of two: the kernels address a
 * slot's block and row by shift and mask. */
#define APEX_BLOCK_TOKENS(X) X(8) X(16) X(32) X(64) X(128) X(256)

typedef struct apex_kv_layout {
    size_t row;          /* bytes of one token's row of one head        */
    size_t panel;        /* one head's K (or V) in a block: bt rows     */
    size_t half;         /* all heads' K in a block; V starts here      */
    size_t block;        /* bytes of one block of one layer: 2 * half   */
    int32_t block_tokens;
    int32_t pairs;       /* 1: the CPU pair layout inside each panel
                          * (below); 0: rows, what apex_kv_layout_of
                          * gives and what apex_kv_offset addresses      */
} apex_kv_layout;

APEX_KV_FN apex_kv_layout apex_kv_layout_of(int32_t n_kv_heads, int32_t block_tokens,
                                            int32_t head_dim, size_t elem_bytes) {
    apex_kv_layout l;
    l.row = (size_t)head_dim * elem_bytes;
    l.panel = (size_t)block_tokens * l.row;
    l.half = (size_t)n_kv_heads * l.panel;
    l.block = 2 * l.half;
    l.block_tokens = block_tokens;
    l.pairs = 0;
    return l;
}

/* Bytes of one block of one layer (0 if kv_dtype is not an apex_dtype). */
static inline size_t apex_kv_block_bytes(int32_t n_kv_heads, int32_t block_tokens,
                                         int32_t head_dim, apex_dtype kv_dtype) {
    return apex_kv_layout_of(n_kv_heads, block_tokens, head_dim, apex_dtype_size(kv_dtype)).block;
}

/* Byte offset, from its block's start, of head h's row for row t of the
 * block, in K (which 0) or V (which 1). */
APEX_KV_FN size_t apex_kv_offset(const apex_kv_layout *l, int which, int32_t h, int32_t t) {
    return (size_t)which * l->half + (size_t)h * l->panel + (size_t)t * l->row;
}

/* The CPU pair layout (l->pairs), an alternative inside a block for bf16
 * KV (2-byte elements) with block_tokens >= 16: the panels sit where the
 * row layout puts them and have its size, but the elements inside are
 * ordered for vdpbf16ps, which multiplies adjacent pairs:
 *   K panel: tiles of 16 tokens, each [head_dim/2][16] of (d even, d odd)
 *            pairs, so one 64-byte line is one dim pair of 16 tokens and a
 *            dot product gives 16 tokens' partial scores with no reduce;
 *   V panel: [block_tokens/2][head_dim] of (t even, t odd) pairs, so one
 *            line times a broadcast (p_t, p_t+1) adds two tokens into 16
 *            columns with no interleave.
 * A group of whole 16-token tiles (K) or token pairs (V) stays contiguous.
 * Only the CPU kernels read it (cpu_attn.h, kv_pairs); it is never a device
 * tier's layout: a context uses it only without a device (csrc/context.c).
 * apex_kv_elem_offset: the byte offset, from the block's start, of (token
 * t, dim d) of head h's K (which 0) or V (which 1), in either layout. */
#define APEX_KV_PAIR_TILE 16
APEX_KV_FN size_t apex_kv_elem_offset(const apex_kv_layout *l, int which, int32_t h, int32_t t,
                                      int32_t d, size_t elem_bytes) {
    if (!l->pairs) return apex_kv_offset(l, which, h, t) + (size_t)d * elem_bytes;
    const size_t D = l->row / elem_bytes, base = (size_t)which * l->half + (size_t)h * l->panel;
    size_t e;
    if (which == 0)
        e = (size_t)(t / APEX_KV_PAIR_TILE) * D * APEX_KV_PAIR_TILE +
            ((size_t)(d / 2) * APEX_KV_PAIR_TILE + (size_t)(t % APEX_KV_PAIR_TILE)) * 2 +
            (size_t)(d & 1);
    else
        e = ((size_t)(t / 2) * D + (size_t)d) * 2 + (size_t)(t & 1);
    return base + e * elem_bytes;
}

/* A slot is block * block_tokens + row (the paged ABI's slot mapping and
 * the device kernels' append target). */
APEX_KV_FN int64_t apex_kv_slot_block(int64_t slot, int32_t block_tokens) {
    return slot / block_tokens;
}
APEX_KV_FN int32_t apex_kv_slot_row(int64_t slot, int32_t block_tokens) {
    return (int32_t)(slot % block_tokens);
}
/* The slot of position pos of a sequence whose block table is blocks. */
APEX_KV_FN int64_t apex_kv_slot_of(const int32_t *blocks, int32_t pos, int32_t block_tokens) {
    return (int64_t)blocks[pos / block_tokens] * block_tokens + pos % block_tokens;
}

#endif /* APEX_KV_LAYOUT_H */
