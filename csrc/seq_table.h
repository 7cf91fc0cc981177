/*
 * seq_table.h - sequences and their block tables over the two KV tiers.
 *
 * Slot s owns row s of one [max_seqs][max_blocks_per_seq] table of block ids
 * in its tier's pool. Blocks are shared between sequences by reference
 * count (fork); a reserve that lands in a shared block copies it first, so
 * a position a sequence may write is always in a block only it holds.
 */
#ifndef APEX_SEQ_TABLE_H
#define APEX_SEQ_TABLE_H

#include <stdint.h>

#include "csrc/block_pool.h"

typedef struct seq_entry {
    int32_t len;
    int32_t n_blocks;
    apex_tier tier;
    uint8_t active;
} seq_entry;

typedef struct seq_table {
    int32_t max_seqs;
    int32_t max_seq_len;
    int32_t block_tokens;
    int32_t max_blocks_per_seq;
    seq_entry *seqs;          /* [max_seqs]                         */
    int32_t *blocks;          /* [max_seqs][max_blocks_per_seq]     */
    block_pool *pools[2];     /* [APEX_TIER_DEVICE], [APEX_TIER_HOST]; not owned */
    int32_t n_active;
    uint64_t cow_copies;
    /* Copies block src to dst (all layers) of a tier; set by the context so
     * copies are ordered with in-flight device and CPU work. */
    apex_status (*copy_block)(void *user, apex_tier tier, int32_t dst, int32_t src);
    void *copy_user;
} seq_table;

apex_status seq_table_init(seq_table *t, int32_t max_seqs, int32_t max_seq_len,
                           int32_t block_tokens, block_pool *device,
                           block_pool *host);
void seq_table_destroy(seq_table *t);

/* Each returns APEX_OK or an error with a message, changing nothing. */
apex_status seq_table_add(seq_table *t, int32_t seq, apex_tier tier);
apex_status seq_table_reserve(seq_table *t, int32_t seq, int32_t n,
                              int32_t *first_pos);
apex_status seq_table_fork(seq_table *t, int32_t src, int32_t dst);
apex_status seq_table_free(seq_table *t, int32_t seq);

/* Moves seq to tier: takes n_blocks fresh blocks there (all or nothing),
 * lets copy_blocks copy the contents, then drops the old blocks. A copy
 * that fails (it returns only once nothing it enqueued is pending) gives
 * the fresh blocks back and leaves seq where it was. The same holds for
 * the copy-on-write copy_block of a reserve. */
apex_status seq_table_move(seq_table *t, int32_t seq, apex_tier tier,
                           apex_status (*copy_blocks)(void *user, apex_tier from,
                                                      const int32_t *src, const int32_t *dst,
                                                      int32_t n),
                           void *user);

/* The active sequence in slot seq, or NULL with an error message set. */
const seq_entry *seq_table_get(const seq_table *t, int32_t seq);

static inline int32_t *seq_table_row(const seq_table *t, int32_t seq) {
    return t->blocks + (size_t)seq * (size_t)t->max_blocks_per_seq;
}

static inline block_pool *seq_table_pool(const seq_table *t, const seq_entry *e) {
    return t->pools[e->tier];
}

#endif
