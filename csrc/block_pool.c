#include "csrc/block_pool.h"

#include <stdlib.h>
#include <string.h>

#include "cpu_attn/dtype_convert.h"
#include "csrc/device.h"
#include "csrc/error.h"
#include "csrc/host_mem.h"

/* Tables (refcounts, free stack) for n_blocks, every block free. Nothing is
 * written into them here (calloc/malloc of a large table only maps it), so
 * creating a large pool touches no memory per block. */
static apex_status init_tables(block_pool *p, int32_t n_blocks) {
    size_t n = n_blocks > 0 ? (size_t)n_blocks : 1;
    p->refcount = calloc(n, sizeof *p->refcount);
    p->free_stack = malloc(n * sizeof *p->free_stack);
    if (!p->refcount || !p->free_stack)
        return apex_fail(APEX_ERR_NO_MEMORY, "out of memory for the tables of %d blocks",
                         n_blocks);
    /* Fresh ids are handed out lowest first, so allocation is deterministic. */
    p->n_stacked = 0;
    p->next_fresh = 0;
    p->n_free = n_blocks;
    p->n_blocks = n_blocks;
    return APEX_OK;
}

/* An empty pool of one tier and geometry (no tables, no memory yet). */
static void pool_begin(block_pool *p, apex_tier tier, int32_t n_layers, size_t block_bytes) {
    memset(p, 0, sizeof *p);
    p->tier = tier;
    p->n_layers = n_layers;
    p->block_bytes = block_bytes;
}

/* The per-layer base table; layer_mem[l] = src[l], or, with src NULL, the
 * pool's own slabs: mem + l * n_blocks * block_bytes. */
static apex_status init_layers(block_pool *p, void *const *src) {
    p->layer_mem = calloc(p->n_layers > 0 ? (size_t)p->n_layers : 1, sizeof *p->layer_mem);
    if (!p->layer_mem)
        return apex_fail(APEX_ERR_NO_MEMORY, "out of memory for the layer table of a KV pool");
    for (int32_t l = 0; l < p->n_layers; l++)
        p->layer_mem[l] = src ? (uint8_t *)src[l]
                        : p->mem ? p->mem + (size_t)l * block_pool_layer_bytes(p)
                                 : NULL;
    return APEX_OK;
}

apex_status block_pool_init_device(block_pool *p, apex_device *dev, int32_t *n_blocks,
                                   int32_t n_layers, size_t block_bytes) {
    pool_begin(p, APEX_TIER_DEVICE, n_layers, block_bytes);
    int32_t n = *n_blocks;
    while (n > 0) {
        p->mem_bytes = (size_t)n * (size_t)n_layers * block_bytes;
        if (dev->iface->mem_alloc(dev, p->mem_bytes, (void **)&p->mem) == APEX_OK) break;
        n /= 2;
    }
    if (n == 0) p->mem_bytes = 0;
    p->dev = dev;
    apex_status st = init_tables(p, n);
    if (st == APEX_OK) st = init_layers(p, NULL);
    if (st) {
        block_pool_destroy(p);
        return st;
    }
    *n_blocks = n;
    return APEX_OK;
}

apex_status block_pool_init_host(block_pool *p, const cpu_workers *w,
                                 int32_t n_blocks, int32_t n_layers,
                                 size_t block_bytes) {
    pool_begin(p, APEX_TIER_HOST, n_layers, block_bytes);
    size_t n = n_blocks > 0 ? (size_t)n_blocks : 1;
    if (block_bytes && (size_t)n_layers > SIZE_MAX / n / block_bytes)
        return apex_fail(APEX_ERR_NO_MEMORY, "host KV pool size overflows size_t");
    p->mem_bytes = n * (size_t)n_layers * block_bytes;
    /* The slab first: a pool the machine cannot map fails here, before any
     * table is allocated. */
    p->mem = host_mem_alloc(w, p->mem_bytes);
    if (!p->mem) {
        p->mem_bytes = 0;
        block_pool_destroy(p);
        return APEX_ERR_NO_MEMORY; /* host_mem_alloc set the message */
    }
    apex_status st = init_tables(p, n_blocks);
    if (st == APEX_OK) st = init_layers(p, NULL);
    if (st) {
        block_pool_destroy(p);
        return st;
    }
    return APEX_OK;
}

apex_status block_pool_init_host_external(block_pool *p, void *const *layer_mem,
                                          int32_t n_blocks, int32_t n_layers,
                                          size_t block_bytes) {
    pool_begin(p, APEX_TIER_HOST, n_layers, block_bytes);
    p->external = 1;
    apex_status st = init_tables(p, n_blocks);
    if (st == APEX_OK) st = init_layers(p, layer_mem);
    if (st) {
        block_pool_destroy(p);
        return st;
    }
    return APEX_OK;
}

void block_pool_destroy(block_pool *p) {
    /* External layer memory is the engine's: only the tables are ours. */
    if (p->mem && p->dev) p->dev->iface->mem_free(p->dev, p->mem);
    else if (p->mem) host_mem_free(p->mem, p->mem_bytes);
    free(p->layer_mem);
    free(p->refcount);
    free(p->free_stack);
    memset(p, 0, sizeof *p);
}

int32_t block_pool_alloc(block_pool *p) {
    if (p->n_free == 0) return -1;
    int32_t b = p->n_stacked > 0 ? p->free_stack[--p->n_stacked] : p->next_fresh++;
    p->n_free--;
    p->refcount[b] = 1;
    return b;
}

void block_pool_ref(block_pool *p, int32_t b) { p->refcount[b]++; }

void block_pool_unref(block_pool *p, int32_t b) {
    if (--p->refcount[b] == 0) {
        p->free_stack[p->n_stacked++] = b;
        p->n_free++;
    }
}

void block_pool_copy(block_pool *p, int32_t dst, int32_t src) {
    for (int32_t l = 0; l < p->n_layers; l++)
        memcpy(block_pool_at(p, l, dst), block_pool_at(p, l, src), p->block_bytes);
}

void block_pool_store_rows(block_pool *p, const apex_kv_layout *l, apex_dtype kv_dtype,
                           int32_t n_kv_heads, int32_t layer, int32_t n, const int64_t *slots,
                           const void *k, const void *v, apex_dtype src) {
    const size_t d = l->row / apex_dtype_size(kv_dtype);   /* head_dim */
    const size_t hrow = d * apex_dtype_size(src);           /* one head's source row */
    const size_t row = (size_t)n_kv_heads * hrow;
    uint8_t *slab = block_pool_layer(p, layer);
    for (int32_t i = 0; i < n; i++) {
        uint8_t *blk = slab + (size_t)apex_kv_slot_block(slots[i], l->block_tokens) * p->block_bytes;
        const int32_t t = apex_kv_slot_row(slots[i], l->block_tokens);
        const uint8_t *ks = (const uint8_t *)k + (size_t)i * row;
        const uint8_t *vs = (const uint8_t *)v + (size_t)i * row;
        for (int32_t h = 0; h < n_kv_heads; h++) {
            if (!l->pairs) {
                apex_dtype_convert(blk + apex_kv_offset(l, 0, h, t), kv_dtype, ks + h * hrow, src, d);
                apex_dtype_convert(blk + apex_kv_offset(l, 1, h, t), kv_dtype, vs + h * hrow, src, d);
                continue;
            }
            /* Pair layout: a row's elements are 4 bytes apart (K) or in
             * place every other element (V); converted, then scattered. */
            uint16_t row_kv[APEX_MAX_HEAD_DIM];
            for (int which = 0; which < 2; which++) {
                apex_dtype_convert(row_kv, kv_dtype, (which ? vs : ks) + h * hrow, src, d);
                for (size_t e = 0; e < d; e++)
                    memcpy(blk + apex_kv_elem_offset(l, which, h, t, (int32_t)e, 2), &row_kv[e], 2);
            }
        }
    }
}
