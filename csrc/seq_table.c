#include "csrc/seq_table.h"

#include <stdlib.h>
#include <string.h>

#include "csrc/error.h"

static const char *tier_name(apex_tier t) {
    return t == APEX_TIER_DEVICE ? "device" : "host";
}

apex_status seq_table_init(seq_table *t, int32_t max_seqs, int32_t max_seq_len,
                           int32_t block_tokens, block_pool *device,
                           block_pool *host) {
    memset(t, 0, sizeof *t);
    t->max_seqs = max_seqs;
    t->max_seq_len = max_seq_len;
    t->block_tokens = block_tokens;
    t->max_blocks_per_seq = (max_seq_len + block_tokens - 1) / block_tokens;
    t->pools[APEX_TIER_DEVICE] = device;
    t->pools[APEX_TIER_HOST] = host;
    t->seqs = calloc((size_t)max_seqs, sizeof *t->seqs);
    t->blocks = malloc((size_t)max_seqs * (size_t)t->max_blocks_per_seq * sizeof *t->blocks);
    if (!t->seqs || !t->blocks) {
        seq_table_destroy(t);
        return apex_fail(APEX_ERR_NO_MEMORY, "out of memory for %d sequence tables",
                         max_seqs);
    }
    return APEX_OK;
}

void seq_table_destroy(seq_table *t) {
    free(t->seqs);
    free(t->blocks);
    memset(t, 0, sizeof *t);
}

const seq_entry *seq_table_get(const seq_table *t, int32_t seq) {
    if (seq < 0 || seq >= t->max_seqs) {
        apex_fail(APEX_ERR_UNKNOWN_SEQ, "sequence %d is outside the slots [0, %d)",
                  seq, t->max_seqs);
        return NULL;
    }
    if (!t->seqs[seq].active) {
        apex_fail(APEX_ERR_UNKNOWN_SEQ, "sequence %d is not in use", seq);
        return NULL;
    }
    return &t->seqs[seq];
}

/* seq_table_get's status for a NULL result. */
static apex_status get_status(const seq_table *t, int32_t seq) {
    return (seq < 0 || seq >= t->max_seqs || !t->seqs[seq].active)
               ? APEX_ERR_UNKNOWN_SEQ : APEX_OK;
}

apex_status seq_table_add(seq_table *t, int32_t seq, apex_tier tier) {
    if (seq < 0 || seq >= t->max_seqs)
        return apex_fail(APEX_ERR_UNKNOWN_SEQ, "sequence %d is outside the slots [0, %d)",
                         seq, t->max_seqs);
    if (t->seqs[seq].active)
        return apex_fail(APEX_ERR_SEQ_EXISTS, "sequence %d is already in use", seq);
    if (tier == APEX_TIER_AUTO) {
        tier = t->pools[APEX_TIER_DEVICE]->n_free > 0 ? APEX_TIER_DEVICE : APEX_TIER_HOST;
    } else if (tier != APEX_TIER_DEVICE && tier != APEX_TIER_HOST) {
        return apex_fail(APEX_ERR_INVALID_ARG, "tier %d is not a tier", (int)tier);
    }
    if (t->pools[tier]->n_blocks == 0)
        return apex_fail(APEX_ERR_UNSUPPORTED, "the %s tier has no blocks in this context%s",
                         tier_name(tier),
                         tier == APEX_TIER_DEVICE ? " (host mode)" : "");
    t->seqs[seq] = (seq_entry){.len = 0, .n_blocks = 0, .tier = tier, .active = 1};
    t->n_active++;
    return APEX_OK;
}

apex_status seq_table_reserve(seq_table *t, int32_t seq, int32_t n,
                              int32_t *first_pos) {
    const seq_entry *ce = seq_table_get(t, seq);
    if (!ce) return get_status(t, seq);
    seq_entry *e = &t->seqs[seq];
    if (n < 0)
        return apex_fail(APEX_ERR_INVALID_ARG, "reserve of %d tokens for sequence %d", n, seq);
    if ((int64_t)e->len + n > t->max_seq_len)
        return apex_fail(APEX_ERR_OUT_OF_RANGE,
                         "sequence %d would reach %lld tokens, more than max_seq_len %d",
                         seq, (long long)e->len + n, t->max_seq_len);
    block_pool *p = seq_table_pool(t, e);
    int32_t *row = seq_table_row(t, seq);
    int32_t bt = t->block_tokens;
    int32_t new_len = e->len + n;
    int32_t need = (new_len + bt - 1) / bt - e->n_blocks;
    /* The one existing block that can receive new positions: a partial last
     * block. If it is shared, it is copied first (copy-on-write). */
    int32_t cow = n > 0 && e->len % bt != 0 && p->refcount[row[e->n_blocks - 1]] > 1;
    if (need + cow > p->n_free)
        return apex_fail(APEX_ERR_OUT_OF_BLOCKS,
                         "%s tier out of blocks: sequence %d needs %d, %d free",
                         tier_name(e->tier), seq, need + cow, p->n_free);
    if (cow) {
        int32_t old = row[e->n_blocks - 1];
        int32_t fresh = block_pool_alloc(p);
        apex_status st = t->copy_block(t->copy_user, e->tier, fresh, old);
        if (st) {
            block_pool_unref(p, fresh);
            return st;
        }
        block_pool_unref(p, old);
        row[e->n_blocks - 1] = fresh;
        t->cow_copies++;
    }
    for (int32_t i = 0; i < need; i++) row[e->n_blocks++] = block_pool_alloc(p);
    if (first_pos) *first_pos = e->len;
    e->len = new_len;
    return APEX_OK;
}

apex_status seq_table_fork(seq_table *t, int32_t src, int32_t dst) {
    const seq_entry *s = seq_table_get(t, src);
    if (!s) return get_status(t, src);
    if (dst < 0 || dst >= t->max_seqs)
        return apex_fail(APEX_ERR_UNKNOWN_SEQ, "sequence %d is outside the slots [0, %d)",
                         dst, t->max_seqs);
    if (t->seqs[dst].active)
        return apex_fail(APEX_ERR_SEQ_EXISTS, "fork target %d is already in use", dst);
    block_pool *p = seq_table_pool(t, s);
    const int32_t *from = seq_table_row(t, src);
    int32_t *to = seq_table_row(t, dst);
    for (int32_t i = 0; i < s->n_blocks; i++) {
        to[i] = from[i];
        block_pool_ref(p, from[i]);
    }
    t->seqs[dst] = *s;
    t->n_active++;
    return APEX_OK;
}

apex_status seq_table_free(seq_table *t, int32_t seq) {
    const seq_entry *e = seq_table_get(t, seq);
    if (!e) return get_status(t, seq);
    block_pool *p = seq_table_pool(t, e);
    const int32_t *row = seq_table_row(t, seq);
    for (int32_t i = 0; i < e->n_blocks; i++) block_pool_unref(p, row[i]);
    memset(&t->seqs[seq], 0, sizeof t->seqs[seq]);
    t->n_active--;
    return APEX_OK;
}

apex_status seq_table_move(seq_table *t, int32_t seq, apex_tier tier,
                           apex_status (*copy_blocks)(void *user, apex_tier from,
                                                      const int32_t *src, const int32_t *dst,
                                                      int32_t n),
                           void *user) {
    const seq_entry *ce = seq_table_get(t, seq);
    if (!ce) return get_status(t, seq);
    if (tier != APEX_TIER_DEVICE && tier != APEX_TIER_HOST)
        return apex_fail(APEX_ERR_INVALID_ARG, "tier %d is not a tier to move to", (int)tier);
    seq_entry *e = &t->seqs[seq];
    if (e->tier == tier) return APEX_OK;
    block_pool *from = t->pools[e->tier], *to = t->pools[tier];
    if (to->n_blocks == 0)
        return apex_fail(APEX_ERR_UNSUPPORTED, "the %s tier has no blocks in this context",
                         tier_name(tier));
    if (e->n_blocks > to->n_free)
        return apex_fail(APEX_ERR_OUT_OF_BLOCKS,
                         "%s tier out of blocks: moving sequence %d needs %d, %d free",
                         tier_name(tier), seq, e->n_blocks, to->n_free);
    int32_t *row = seq_table_row(t, seq);
    int32_t *fresh = malloc((size_t)(e->n_blocks ? e->n_blocks : 1) * sizeof *fresh);
    if (!fresh) return apex_fail(APEX_ERR_NO_MEMORY, "out of memory moving sequence %d", seq);
    for (int32_t i = 0; i < e->n_blocks; i++) fresh[i] = block_pool_alloc(to);
    apex_status st = e->n_blocks ? copy_blocks(user, e->tier, row, fresh, e->n_blocks) : APEX_OK;
    if (st) {
        for (int32_t i = 0; i < e->n_blocks; i++) block_pool_unref(to, fresh[i]);
        free(fresh);
        return st;
    }
    for (int32_t i = 0; i < e->n_blocks; i++) {
        block_pool_unref(from, row[i]);
        row[i] = fresh[i];
    }
    free(fresh);
    e->tier = tier;
    return APEX_OK;
}
