/*
 * block_pool.h - one KV tier: a fixed number of blocks, a free stack and a
 * reference count per block. Block b of layer l lives at
 *     layer_mem[l] + b * block_bytes
 * (per-layer slabs, the layout described in apex.h). The slabs are one
 * allocation of the pool's own (mem: layer_mem[l] = mem + l * n_blocks *
 * block_bytes), or, for a host pool over engine memory
 * (block_pool_init_host_external), the engine's per-layer regions, which
 * the pool never frees.
 */
#ifndef APEX_BLOCK_POOL_H
#define APEX_BLOCK_POOL_H

#include <stddef.h>
#include <stdint.h>

#include "apex/apex.h"
#include "cpu_attn/kv_layout.h"
#include "csrc/cpu_workers.h"

typedef struct apex_device apex_device;

typedef struct block_pool {
    apex_tier tier;
    apex_device *dev;     /* device pool: memory from this device */
    int32_t n_blocks;
    int32_t n_layers;
    size_t block_bytes;   /* one block of one layer */
    uint8_t *mem;         /* the pool's own slabs; NULL when external */
    size_t mem_bytes;     /* bytes of mem (0 when external)           */
    uint8_t **layer_mem;  /* [n_layers]: each layer's slab            */
    int external;         /* layer_mem is the engine's memory         */
    int32_t *refcount;    /* [n_blocks]                       */
    /* Free blocks: the n_stacked released ones on free_stack (LIFO), then
     * the never-used ids [next_fresh, n_blocks) in order. Lazy, so a large
     * pool's tables cost no memory until blocks are used. */
    int32_t *free_stack;  /* [n_blocks]                       */
    int32_t n_stacked;
    int32_t next_fresh;
    int32_t n_free;       /* n_stacked + n_blocks - next_fresh */
} block_pool;

/* A host pool (memory from host_mem_alloc). n_blocks may be 0. */
apex_status block_pool_init_host(block_pool *p, const cpu_workers *w,
                                 int32_t n_blocks, int32_t n_layers,
                                 size_t block_bytes);
/* A host pool over engine memory: layer l's n_blocks blocks at
 * layer_mem[l] (the caller checked size, alignment and overlap). */
apex_status block_pool_init_host_external(block_pool *p, void *const *layer_mem,
                                          int32_t n_blocks, int32_t n_layers,
                                          size_t block_bytes);
/* A device pool: n_blocks (or, if that does not fit, the largest power-of-
 * two fraction of it that does) in dev's memory. *n_blocks gets the count. */
apex_status block_pool_init_device(block_pool *p, apex_device *dev, int32_t *n_blocks,
                                   int32_t n_layers, size_t block_bytes);
void block_pool_destroy(block_pool *p);

/* A free block with refcount 1, or -1 when the pool is exhausted. */
int32_t block_pool_alloc(block_pool *p);
void block_pool_ref(block_pool *p, int32_t b);
void block_pool_unref(block_pool *p, int32_t b); /* frees at zero */

static inline uint8_t *block_pool_at(const block_pool *p, int32_t layer,
                                     int32_t b) {
    if (!p->layer_mem) return NULL; /* an empty tier (host mode's device pool) */
    return p->layer_mem[layer] + (size_t)b * p->block_bytes;
}

static inline uint8_t *block_pool_layer(const block_pool *p, int32_t layer) {
    return block_pool_at(p, layer, 0);
}

/* Bytes of layer memory the pool uses (n_blocks blocks of every layer). */
static inline size_t block_pool_layer_bytes(const block_pool *p) {
    return (size_t)p->n_blocks * p->block_bytes;
}

/* Copies block src to block dst in every layer (host pools only). */
void block_pool_copy(block_pool *p, int32_t dst, int32_t src);

/* Stores n K/V rows of layer into a host pool at slots[i] (block *
 * block_tokens + row, this pool's block ids), converting from src to
 * kv_dtype; row i of k (and v) is [n_kv_heads][head_dim] elements of src at
 * k + i * that. l is the pool's layout (cpu_attn/kv_layout.h). */
void block_pool_store_rows(block_pool *p, const apex_kv_layout *l, apex_dtype kv_dtype,
                           int32_t n_kv_heads, int32_t layer, int32_t n, const int64_t *slots,
                           const void *k, const void *v, apex_dtype src);

#endif
