/*
 * test_paged_copy.c - apex_paged_copy_blocks: whole blocks between engine
 * ids, all layers, device->device, device->host, host->device and
 * host->host, on the emulated device (whose memory is host memory, so the
 * test reads both tiers' slabs directly); attention after a round trip
 * (also on a GPU with APEX_TEST_DEVICE=cuda); bad arguments copy nothing.
 */
#include <stdlib.h>
#include <string.h>

#include "apex/apex_paged.h"
#include "test_util.h"

enum { L = 3, HQ = 4, HK = 2, D = 64, BT = 16, ND = 6, NH = 10, NB = ND + NH };
#define BLOCK_BYTES ((size_t)2 * HK * BT * D * sizeof(float))

/* The device of the attention test: the emulated one, or with
 * APEX_TEST_DEVICE=cuda a real GPU (tests/gpu/run.sh). The other tests read
 * the device slab directly (emulated memory is host memory). */
static apex_device_kind tier_device(void) {
    const char *dev = getenv("APEX_TEST_DEVICE");
    return dev && !strcmp(dev, "cuda") ? APEX_DEVICE_CUDA : APEX_DEVICE_EMULATED;
}

static apex_context *make(apex_device_kind dev, int64_t device_blocks) {
    apex_config c;
    assert_ok(apex_config_init(&c));
    c.n_layers = L;
    c.n_q_heads = HQ;
    c.n_kv_heads = HK;
    c.head_dim = D;
    c.kv_dtype = c.act_dtype = APEX_DTYPE_F32;
    c.block_tokens = BT;
    c.device = dev;
    c.device_blocks = device_blocks;
    c.host_blocks = NH;
    c.max_seqs = c.max_batch = 8;
    c.max_seq_len = 256;
    c.n_threads = 2;
    apex_context *ctx;
    assert_ok(apex_context_create(&c, &ctx));
    assert_ok(apex_paged_claim(ctx, NULL));
    return ctx;
}

/* Fills every row of every block of every layer with distinct values. */
static void fill(apex_context *ctx, int64_t nb) {
    int64_t n = nb * BT;
    int64_t *slots = malloc((size_t)n * sizeof *slots);
    float *k = malloc((size_t)n * HK * D * sizeof *k), *v = malloc((size_t)n * HK * D * sizeof *v);
    uint64_t rng = 7;
    for (int64_t i = 0; i < n; i++) slots[i] = i;
    for (int l = 0; l < L; l++) {
        for (int64_t i = 0; i < n * HK * D; i++) k[i] = test_rand_f(&rng), v[i] = test_rand_f(&rng);
        assert_ok(apex_paged_kv_write(ctx, l, n, slots, k, HK * D, v, HK * D, APEX_DTYPE_F32));
    }
    free(slots);
    free(k);
    free(v);
}

/* Engine block id's bytes in layer l (both tiers are host-addressable here). */
static uint8_t *block_at(apex_context *ctx, int l, int64_t id, int64_t nd) {
    void *base;
    int64_t n;
    apex_tier t = id < nd ? APEX_TIER_DEVICE : APEX_TIER_HOST;
    assert_ok(apex_paged_layer_kv(ctx, l, t, &base, &n));
    return (uint8_t *)base + (size_t)(id < nd ? id : id - nd) * BLOCK_BYTES;
}

/* Every block of every layer, concatenated: [L][nb][BLOCK_BYTES]. */
static uint8_t *snapshot(apex_context *ctx, int64_t nb, int64_t nd) {
    uint8_t *s = malloc((size_t)L * nb * BLOCK_BYTES);
    for (int l = 0; l < L; l++)
        for (int64_t b = 0; b < nb; b++)
            memcpy(s + ((size_t)l * nb + b) * BLOCK_BYTES, block_at(ctx, l, b, nd), BLOCK_BYTES);
    return s;
}

/* After copying src->dst: dst blocks hold the sources' old bytes, every other block is unchanged. */
static void check_copied(const uint8_t *before, const uint8_t *after, int64_t nb, int64_t n,
                         const int64_t *src, const int64_t *dst) {
    for (int l = 0; l < L; l++)
        for (int64_t b = 0; b < nb; b++) {
            int64_t from = b;
            for (int64_t i = 0; i < n; i++)
                if (dst[i] == b) from = src[i];
            assert_memory_equal(after + ((size_t)l * nb + b) * BLOCK_BYTES,
                                before + ((size_t)l * nb + from) * BLOCK_BYTES, BLOCK_BYTES);
        }
}

static void test_copies_every_direction(void **state) {
    (void)state;
    apex_context *ctx = make(APEX_DEVICE_EMULATED, ND);
    fill(ctx, NB);
    uint8_t *before = snapshot(ctx, NB, ND);
    /* device->device, device->host (a spill), host->device (a promotion),
     * host->host, in one call, interleaved */
    const int64_t src[] = {0, 1, ND + 0, 2, ND + 1, ND + 2, ND + 3};
    const int64_t dst[] = {3, ND + 5, 4, ND + 6, 5, ND + 7, ND + 8};
    const int64_t n = sizeof src / sizeof src[0];
    apex_stats s0, s1;
    assert_ok(apex_stats_get(ctx, &s0));
    assert_ok(apex_paged_copy_blocks(ctx, n, src, dst));
    uint8_t *after = snapshot(ctx, NB, ND);
    check_copied(before, after, NB, n, src, dst);
    assert_ok(apex_stats_get(ctx, &s1));
    assert_int_equal(s1.errors, s0.errors);
    assert_ok(apex_paged_copy_blocks(ctx, 0, NULL, NULL)); /* nothing to do */
    free(before);
    free(after);
    assert_ok(apex_context_destroy(ctx));
}

/* Attention over a sequence moved between tiers gives the same output as
 * before the move (the copy carries K and V of every layer). */
static void test_attention_after_move(void **state) {
    (void)state;
    apex_context *ctx = make(tier_device(), ND);
    if (apex_context_host_mode(ctx)) { /* cuda asked, no GPU */
        assert_ok(apex_context_destroy(ctx));
        skip();
    }
    fill(ctx, NB);
    const int32_t len = 3 * BT - 5, qsl[2] = {0, 1};
    const int32_t on_device[3] = {1, 4, 2}, on_host[3] = {ND + 7, ND + 2, ND + 9};
    float q[HQ * D], out_a[HQ * D], out_b[HQ * D], out_c[HQ * D];
    uint64_t rng = 3;
    for (int i = 0; i < HQ * D; i++) q[i] = test_rand_f(&rng);
    apex_attn_opts o = apex_attn_opts_default(ctx);
    assert_ok(apex_paged_attention(ctx, L - 1, 1, qsl, &len, on_device, 3, q, out_a, &o));
    const int64_t spill_s[3] = {1, 4, 2}, spill_d[3] = {ND + 7, ND + 2, ND + 9};
    assert_ok(apex_paged_copy_blocks(ctx, 3, spill_s, spill_d));
    assert_ok(apex_paged_attention(ctx, L - 1, 1, qsl, &len, on_host, 3, q, out_b, &o));
    /* and back, onto other device blocks */
    const int64_t prom_s[3] = {ND + 7, ND + 2, ND + 9}, prom_d[3] = {0, 5, 3};
    const int32_t back[3] = {0, 5, 3};
    assert_ok(apex_paged_copy_blocks(ctx, 3, prom_s, prom_d));
    assert_ok(apex_paged_attention(ctx, L - 1, 1, qsl, &len, back, 3, q, out_c, &o));
    for (int i = 0; i < HQ * D; i++) {
        assert_float_equal(out_b[i], out_a[i], 1e-5);
        assert_float_equal(out_c[i], out_a[i], 1e-5);
    }
    assert_ok(apex_context_destroy(ctx));
}

static void test_host_mode_copies(void **state) {
    (void)state;
    apex_context *ctx = make(APEX_DEVICE_NONE, 0);
    fill(ctx, NH);
    uint8_t *before = snapshot(ctx, NH, 0);
    const int64_t src[] = {0, 3}, dst[] = {9, 1};
    assert_ok(apex_paged_copy_blocks(ctx, 2, src, dst));
    uint8_t *after = snapshot(ctx, NH, 0);
    check_copied(before, after, NH, 2, src, dst);
    free(before);
    free(after);
    assert_ok(apex_context_destroy(ctx));
}

/* Every bad argument: a status with a message, no block changed, counted. */
static void test_bad_arguments_copy_nothing(void **state) {
    (void)state;
    apex_context *ctx = make(APEX_DEVICE_EMULATED, ND);
    fill(ctx, NB);
    uint8_t *before = snapshot(ctx, NB, ND);
    const int64_t ok_s[] = {0, ND}, ok_d[] = {1, ND + 1};
    const int64_t out_s[] = {0, NB}, neg_d[] = {1, -1};
    const int64_t self_s[] = {0, 2}, self_d[] = {1, 2};
    const int64_t twice_s[] = {0, 2}, twice_d[] = {3, 3};
    const int64_t chain_s[] = {0, 1}, chain_d[] = {1, 4};
    apex_stats s0, s1;
    assert_ok(apex_stats_get(ctx, &s0));
    assert_status(apex_paged_copy_blocks(NULL, 2, ok_s, ok_d), APEX_ERR_INVALID_ARG);
    assert_status(apex_paged_copy_blocks(ctx, -1, ok_s, ok_d), APEX_ERR_INVALID_ARG);
    assert_status(apex_paged_copy_blocks(ctx, 2, NULL, ok_d), APEX_ERR_INVALID_ARG);
    assert_status(apex_paged_copy_blocks(ctx, 2, ok_s, NULL), APEX_ERR_INVALID_ARG);
    assert_status(apex_paged_copy_blocks(ctx, 2, out_s, ok_d), APEX_ERR_OUT_OF_RANGE);
    assert_status(apex_paged_copy_blocks(ctx, 2, ok_s, neg_d), APEX_ERR_OUT_OF_RANGE);
    assert_status(apex_paged_copy_blocks(ctx, 2, self_s, self_d), APEX_ERR_INVALID_ARG);
    assert_status(apex_paged_copy_blocks(ctx, 2, twice_s, twice_d), APEX_ERR_INVALID_ARG);
    assert_status(apex_paged_copy_blocks(ctx, 2, chain_s, chain_d), APEX_ERR_INVALID_ARG);
    assert_ok(apex_stats_get(ctx, &s1));
    assert_int_equal(s1.errors, s0.errors + 8); /* all but the NULL context */
    uint8_t *after = snapshot(ctx, NB, ND);
    assert_memory_equal(after, before, (size_t)L * NB * BLOCK_BYTES);
    free(before);
    free(after);
    assert_ok(apex_context_destroy(ctx));

    /* an unclaimed context */
    apex_config c;
    assert_ok(apex_config_init(&c));
    c.n_layers = 1;
    c.n_q_heads = c.n_kv_heads = 1;
    c.head_dim = D;
    c.block_tokens = BT;
    c.host_blocks = 4;
    c.device = APEX_DEVICE_NONE;
    assert_ok(apex_context_create(&c, &ctx));
    const int64_t s[] = {0}, d[] = {1};
    assert_status(apex_paged_copy_blocks(ctx, 1, s, d), APEX_ERR_INVALID_ARG);
    assert_ok(apex_context_destroy(ctx));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_copies_every_direction),
        cmocka_unit_test(test_attention_after_move),
        cmocka_unit_test(test_host_mode_copies),
        cmocka_unit_test(test_bad_arguments_copy_nothing),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
