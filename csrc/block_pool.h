/*
 * block_pool.h - one KV tier: a fixed number of blocks, a free stack and a
 * reference count per block. Block b of layer l lives at
 *     mem + ((size_t)l * n_blocks + b) * block_bytes
 * (per-layer slabs, the layout described in apex.h).
 */
#ifndef APEX_BLOCK_POOL_H
#define APEX_BLOCK_POOL_H

#include <stddef.h>
#include <stdint.h>

#include "apex/apex.h"
#include "csrc/cpu_workers.h"

typedef struct apex_device apex_device;

typedef struct block_pool {
    apex_tier tier;
    apex_device *dev;     /* device pool: memory from this device */
    int32_t n_blocks;
    int32_t n_layers;
    size_t block_bytes;   /* one block of one layer */
    uint8_t *mem;
    size_t mem_bytes;
    int32_t *refcount;    /* [n_blocks]                       */
    int32_t *free_stack;  /* [n_blocks]; top n_free entries   */
    int32_t n_free;
} block_pool;

/* A host pool (memory from host_mem_alloc). n_blocks may be 0. */
apex_status block_pool_init_host(block_pool *p, const cpu_workers *w,
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
    return p->mem + ((size_t)layer * (size_t)p->n_blocks + (size_t)b) * p->block_bytes;
}

static inline uint8_t *block_pool_layer(const block_pool *p, int32_t layer) {
    return block_pool_at(p, layer, 0);
}

/* Copies block src to block dst in every layer (host pools only). */
void block_pool_copy(block_pool *p, int32_t dst, int32_t src);

#endif
