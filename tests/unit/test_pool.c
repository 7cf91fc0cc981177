/*
 * test_pool.c - block pools and sequence tables under randomized add /
 * reserve / fork / free, checked after every step against a shadow model of
 * every sequence's KV contents, plus the pool invariants:
 *   refcount[b] == number of table entries naming b,
 *   free blocks == blocks with refcount 0, each once on the free stack,
 *   n_blocks == ceil(len / block_tokens).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "csrc/context.h"
#include "test_util.h"

enum { LAYERS = 2, HEAD_DIM = 64, BT = 8, SLOTS = 8, MAX_LEN = 96, BLOCKS = 30 };

typedef struct {
    apex_context *ctx;
    int active[SLOTS];
    float shadow[SLOTS][MAX_LEN]; /* value stored at each position */
    int len[SLOTS];
    float next_value;
} world;

static void make_world(world *w) {
    memset(w, 0, sizeof *w);
    apex_config c;
    assert_ok(apex_config_init(&c));
    c.n_layers = LAYERS;
    c.n_q_heads = 2;
    c.n_kv_heads = 1;
    c.head_dim = HEAD_DIM;
    c.kv_dtype = APEX_DTYPE_F32;
    c.act_dtype = APEX_DTYPE_F32;
    c.block_tokens = BT;
    c.host_blocks = BLOCKS;
    c.max_seqs = SLOTS;
    c.max_batch = SLOTS;
    c.max_seq_len = MAX_LEN;
    c.n_threads = 1;
    assert_ok(apex_context_create(&c, &w->ctx));
    w->next_value = 1;
}

/* K row of (layer, value) is filled with value + layer/4; V with its negation. */
static void write_pos(world *w, int s, int pos) {
    float v = w->next_value++;
    for (int l = 0; l < LAYERS; l++) {
        float k[HEAD_DIM], vv[HEAD_DIM];
        for (int i = 0; i < HEAD_DIM; i++) {
            k[i] = v + 0.25f * (float)l;
            vv[i] = -k[i];
        }
        int32_t seq = s, p = pos;
        assert_ok(apex_kv_write(w->ctx, l, 1, &seq, &p, k, vv, APEX_DTYPE_F32));
    }
    w->shadow[s][pos] = v;
}

static void check_world(const world *w) {
    const apex_context *ctx = w->ctx;
    const block_pool *p = &ctx->pools[APEX_TIER_HOST];
    int32_t *refs = calloc(BLOCKS, sizeof *refs);
    int32_t *on_stack = calloc(BLOCKS, sizeof *on_stack);
    for (int s = 0; s < SLOTS; s++) {
        apex_seq_info info;
        if (!w->active[s]) {
            assert_status(apex_seq_get_info(ctx, s, &info), APEX_ERR_UNKNOWN_SEQ);
            continue;
        }
        assert_ok(apex_seq_get_info(ctx, s, &info));
        assert_int_equal(info.len, w->len[s]);
        assert_int_equal(info.n_blocks, (w->len[s] + BT - 1) / BT);
        const int32_t *row = seq_table_row(&ctx->seqs, s);
        for (int i = 0; i < info.n_blocks; i++) refs[row[i]]++;
        for (int pos = 0; pos < w->len[s]; pos++) {
            for (int l = 0; l < LAYERS; l++) {
                float k[HEAD_DIM], v[HEAD_DIM];
                int32_t seq = s, pp = pos;
                assert_ok(apex_kv_read(ctx, l, 1, &seq, &pp, k, v, APEX_DTYPE_F32));
                float want = w->shadow[s][pos] + 0.25f * (float)l;
                assert_true(k[0] == want && k[HEAD_DIM - 1] == want);
                assert_true(v[0] == -want && v[HEAD_DIM - 1] == -want);
            }
        }
    }
    /* Free: the released blocks on the stack, then the never-used ids. */
    for (int i = 0; i < p->n_stacked; i++) on_stack[p->free_stack[i]]++;
    for (int b = p->next_fresh; b < p->n_blocks; b++) on_stack[b]++;
    assert_int_equal(p->n_stacked + p->n_blocks - p->next_fresh, p->n_free);
    int used = 0;
    for (int b = 0; b < BLOCKS; b++) {
        assert_int_equal(p->refcount[b], refs[b]);
        assert_int_equal(on_stack[b], refs[b] == 0 ? 1 : 0);
        used += refs[b] > 0;
    }
    assert_int_equal(used + p->n_free, BLOCKS);
    apex_stats st;
    assert_ok(apex_stats_get(ctx, &st));
    assert_int_equal(st.blocks_used[APEX_TIER_HOST], used);
    assert_int_equal(st.blocks_free[APEX_TIER_HOST], p->n_free);
    free(refs);
    free(on_stack);
}

static void test_randomized_operations(void **state) {
    (void)state;
    world w;
    make_world(&w);
    uint64_t rng = 42;
    int out_of_blocks = 0, cows = 0;
    for (int step = 0; step < 3000; step++) {
        int s = test_rand_int(&rng, SLOTS);
        int op = test_rand_int(&rng, 10);
        if (!w.active[s]) {
            if (op < 3) { /* fork from some active sequence */
                int src = test_rand_int(&rng, SLOTS);
                if (w.active[src]) {
                    assert_ok(apex_seq_fork(w.ctx, src, s));
                    memcpy(w.shadow[s], w.shadow[src], sizeof w.shadow[s]);
                    w.len[s] = w.len[src];
                    w.active[s] = 1;
                }
            } else {
                assert_ok(apex_seq_add(w.ctx, s, APEX_TIER_AUTO));
                w.active[s] = 1;
                w.len[s] = 0;
            }
        } else if (op < 6) { /* grow by 1..20 tokens and write them */
            int n = 1 + test_rand_int(&rng, 20);
            int32_t first = -1;
            apex_stats before;
            assert_ok(apex_stats_get(w.ctx, &before));
            apex_status st = apex_seq_reserve(w.ctx, s, n, &first);
            if (w.len[s] + n > MAX_LEN) {
                assert_int_equal(st, APEX_ERR_OUT_OF_RANGE);
            } else if (st == APEX_ERR_OUT_OF_BLOCKS) {
                out_of_blocks++;
            } else {
                assert_int_equal(st, APEX_OK);
                assert_int_equal(first, w.len[s]);
                apex_stats after;
                assert_ok(apex_stats_get(w.ctx, &after));
                cows += (int)(after.cow_copies - before.cow_copies);
                w.len[s] += n;
                for (int p = first; p < w.len[s]; p++) write_pos(&w, s, p);
            }
        } else if (op < 7) { /* overwrite a position in a private block */
            if (w.len[s] > 0) {
                int pos = test_rand_int(&rng, w.len[s]);
                const block_pool *p = &w.ctx->pools[APEX_TIER_HOST];
                int32_t b = seq_table_row(&w.ctx->seqs, s)[pos / BT];
                if (p->refcount[b] == 1) {
                    write_pos(&w, s, pos);
                } else {
                    float k[HEAD_DIM] = {0}, v[HEAD_DIM] = {0};
                    int32_t seq = s, pp = pos;
                    assert_status(apex_kv_write(w.ctx, 0, 1, &seq, &pp, k, v, APEX_DTYPE_F32),
                                  APEX_ERR_INVALID_ARG);
                }
            }
        } else {
            assert_ok(apex_seq_free(w.ctx, s));
            w.active[s] = 0;
        }
        check_world(&w);
    }
    /* The walk must have exercised the interesting paths. */
    assert_true(out_of_blocks > 10);
    assert_true(cows > 10);
    apex_context_destroy(w.ctx);
}

/* A fork shares every block; the first reserve into the shared partial
 * block copies exactly that one block, and the parent never changes. */
static void test_fork_copy_on_write(void **state) {
    (void)state;
    world w;
    make_world(&w);
    assert_ok(apex_seq_add(w.ctx, 0, APEX_TIER_HOST));
    assert_ok(apex_seq_reserve(w.ctx, 0, 20, NULL)); /* blocks: 8, 8, 4 of 8 */
    w.active[0] = 1;
    w.len[0] = 20;
    for (int p = 0; p < 20; p++) write_pos(&w, 0, p);
    assert_ok(apex_seq_fork(w.ctx, 0, 1));
    w.active[1] = 1;
    w.len[1] = 20;
    memcpy(w.shadow[1], w.shadow[0], sizeof w.shadow[0]);
    apex_seq_info info;
    assert_ok(apex_seq_get_info(w.ctx, 1, &info));
    assert_int_equal(info.n_shared, 3);
    apex_stats st;
    assert_ok(apex_stats_get(w.ctx, &st));
    assert_int_equal(st.blocks_used[APEX_TIER_HOST], 3);

    assert_ok(apex_seq_reserve(w.ctx, 1, 1, NULL)); /* lands in block 2 */
    w.len[1] = 21;
    write_pos(&w, 1, 20);
    assert_ok(apex_seq_get_info(w.ctx, 1, &info));
    assert_int_equal(info.n_shared, 2);
    assert_ok(apex_stats_get(w.ctx, &st));
    assert_int_equal(st.cow_copies, 1);
    assert_int_equal(st.blocks_used[APEX_TIER_HOST], 4);
    check_world(&w);

    /* Freeing the parent leaves the child the sole owner of the shared blocks. */
    assert_ok(apex_seq_free(w.ctx, 0));
    w.active[0] = 0;
    assert_ok(apex_seq_get_info(w.ctx, 1, &info));
    assert_int_equal(info.n_shared, 0);
    check_world(&w);
    apex_context_destroy(w.ctx);
}

/* Running out of blocks is a status, all or nothing. */
static void test_out_of_blocks_all_or_nothing(void **state) {
    (void)state;
    world w;
    make_world(&w);
    /* Fill all but 2 blocks: 12 + 12 + 4 of 30. */
    static const int fill[][2] = {{0, MAX_LEN}, {2, MAX_LEN}, {3, 4 * BT}};
    for (int i = 0; i < 3; i++) {
        int s = fill[i][0];
        assert_ok(apex_seq_add(w.ctx, s, APEX_TIER_AUTO));
        w.active[s] = 1;
        assert_ok(apex_seq_reserve(w.ctx, s, fill[i][1], NULL));
        w.len[s] = fill[i][1];
        for (int p = 0; p < w.len[s]; p++) write_pos(&w, s, p);
    }
    assert_ok(apex_seq_add(w.ctx, 1, APEX_TIER_AUTO));
    w.active[1] = 1;
    int32_t first = 123;
    assert_status(apex_seq_reserve(w.ctx, 1, 3 * BT, &first), APEX_ERR_OUT_OF_BLOCKS);
    assert_int_equal(first, 123);
    check_world(&w);
    assert_ok(apex_seq_reserve(w.ctx, 1, 2 * BT, &first));
    w.len[1] = 2 * BT;
    for (int p = 0; p < w.len[1]; p++) write_pos(&w, 1, p);
    check_world(&w);
    apex_context_destroy(w.ctx);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fork_copy_on_write),
        cmocka_unit_test(test_out_of_blocks_all_or_nothing),
        cmocka_unit_test(test_randomized_operations),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
