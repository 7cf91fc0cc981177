/*
 * test_place.c - apex_sched_place (apex_paged.h): the scheduler placing an
 * engine's sequences on a claimed context, as llama.cpp's GPU tier uses it.
 *   - bad input: a status and a message, out_tier untouched, the next good
 *     call answers as if the bad one never happened;
 *   - placement: decoders stay where they are, idle and finished ones leave
 *     the device, a freed place promotes the first waiting host decoder,
 *     the sequence limit and the block budget cap the device;
 *   - determinism: two contexts fed the same calls answer the same;
 *   - a migrated sequence's KV (the tier's promotion: its rows stored again
 *     in another slot's device blocks) reads back exactly as written, on the
 *     device tier and on the host tier, and attends identically.
 */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "apex/apex_paged.h"
#include "cpu_attn/dtype_convert.h"
#include "csrc/sched/sched.h"
#include "test_util.h"

enum { L = 2, HQ = 4, HK = 2, D = 64, BT = 16, KV = 32, BPS = KV / BT, SLOTS = 4 };
enum { ROW = HK * D };

static char profile_path[256];

/* A roofline profile of this geometry in a file: no measurement, nothing
 * written to the user's cache. The geometry is what the tier gives
 * apex_sched_enable: f16 KV, f32 activations, hidden = q heads x head_dim,
 * ffn = 4 x hidden, vocab 32000 (its estimates). */
static int make_profile(void **state) {
    (void)state;
    apex_model_geom g = {.n_layers = L, .n_q_heads = HQ, .n_kv_heads = HK, .head_dim = D,
                         .kv_bytes = 2, .act_bytes = 4,
                         .hidden = HQ * D, .ffn = 4 * HQ * D, .vocab = 32000};
    apex_profile p;
    if (apex_profile_from_preset(apex_hw_preset_find("t4"), &g, 0, 1, &p) != SCHED_OK) return -1;
    snprintf(profile_path, sizeof profile_path, "/tmp/apex-test-place-%d.json", (int)getpid());
    if (apex_profile_save(&p, profile_path) != SCHED_OK) return -1;
    setenv("APEX_PROFILE", profile_path, 1);
    return 0;
}

static int drop_profile(void **state) {
    (void)state;
    unlink(profile_path);
    unsetenv("APEX_PROFILE");
    return 0;
}

/* The tier's context: SLOTS slots of BPS device blocks, f16 KV, claimed,
 * the scheduler enabled after the claim. */
static apex_context *tier_context(int host_blocks) {
    apex_config c;
    assert_ok(apex_config_init(&c));
    c.n_layers = L;
    c.n_q_heads = HQ;
    c.n_kv_heads = HK;
    c.head_dim = D;
    c.kv_dtype = APEX_DTYPE_F16;
    c.act_dtype = APEX_DTYPE_F32;
    c.block_tokens = BT;
    c.device = APEX_DEVICE_EMULATED;
    c.device_blocks = SLOTS * BPS;
    c.host_blocks = host_blocks;
    c.max_seqs = SLOTS;
    c.max_batch = SLOTS;
    c.max_seq_len = KV;
    c.n_threads = 1;
    apex_context *ctx;
    assert_ok(apex_context_create(&c, &ctx));
    assert_ok(apex_paged_claim(ctx, NULL));
    apex_sched_options o;
    memset(&o, 0, sizeof o);
    o.gpu_preset = "host";
    o.hidden = HQ * D, o.ffn = 4 * HQ * D, o.vocab = 32000;
    assert_ok(apex_sched_enable(ctx, &o));
    return ctx;
}

static apex_place_item item(int64_t id, int32_t len, apex_tier tier, int32_t state) {
    return (apex_place_item){.id = id, .len = len, .tier = tier, .state = state};
}

/* A bad call: status want, a message, out_tier untouched. */
static void place_bad(apex_context *ctx, int32_t n, const apex_place_item *it, int64_t blocks, int32_t seqs,
                      apex_status want) {
    apex_tier out[8];
    for (int i = 0; i < 8; i++) out[i] = (apex_tier)77;
    assert_int_equal(apex_sched_place(ctx, n, it, blocks, seqs, out, NULL), want);
    assert_true(strlen(apex_last_error()) > 0);
    for (int i = 0; i < 8; i++) assert_int_equal(out[i], 77);
}

static void test_bad_input(void **state) {
    (void)state;
    apex_config c;
    assert_ok(apex_config_init(&c));
    c.n_layers = L, c.n_q_heads = HQ, c.n_kv_heads = HK, c.head_dim = D, c.block_tokens = BT;
    c.max_seq_len = KV, c.host_blocks = 8, c.n_threads = 1;
    apex_context *plain;
    assert_ok(apex_context_create(&c, &plain));
    apex_place_item ok[2] = {item(0, 5, APEX_TIER_HOST, APEX_PLACE_DECODING),
                             item(1, 9, APEX_TIER_HOST, APEX_PLACE_DECODING)};
    place_bad(plain, 2, ok, 8, 2, APEX_ERR_INVALID_ARG); /* no apex_sched_enable */
    assert_ok(apex_context_destroy(plain));
    assert_int_equal(apex_sched_place(NULL, 2, ok, 8, 2, NULL, NULL), APEX_ERR_INVALID_ARG);

    apex_context *ctx = tier_context(1);
    apex_tier first[2];
    apex_place_plan p0;
    assert_ok(apex_sched_place(ctx, 2, ok, SLOTS * BPS, SLOTS, first, &p0));
    place_bad(ctx, -1, ok, 8, 2, APEX_ERR_OUT_OF_RANGE);
    place_bad(ctx, 2, NULL, 8, 2, APEX_ERR_INVALID_ARG);
    assert_int_equal(apex_sched_place(ctx, 2, ok, 8, 2, NULL, NULL), APEX_ERR_INVALID_ARG);
    place_bad(ctx, 2, ok, -1, 2, APEX_ERR_INVALID_ARG);
    place_bad(ctx, 2, ok, 8, -1, APEX_ERR_INVALID_ARG);
    apex_place_item bad[2];
    memcpy(bad, ok, sizeof bad);
    bad[1].tier = APEX_TIER_AUTO;
    place_bad(ctx, 2, bad, 8, 2, APEX_ERR_INVALID_ARG);
    memcpy(bad, ok, sizeof bad);
    bad[1].state = 3;
    place_bad(ctx, 2, bad, 8, 2, APEX_ERR_INVALID_ARG);
    bad[1].state = -1;
    place_bad(ctx, 2, bad, 8, 2, APEX_ERR_INVALID_ARG);
    memcpy(bad, ok, sizeof bad);
    bad[0].len = -1;
    place_bad(ctx, 2, bad, 8, 2, APEX_ERR_INVALID_ARG);
    bad[0].len = KV + 1; /* longer than max_seq_len */
    place_bad(ctx, 2, bad, 8, 2, APEX_ERR_INVALID_ARG);
    memcpy(bad, ok, sizeof bad);
    bad[1].id = 0;
    place_bad(ctx, 2, bad, 8, 2, APEX_ERR_INVALID_ARG);
    /* device items over the capacity given: blocks, then sequences */
    apex_place_item dev[2] = {item(0, 20, APEX_TIER_DEVICE, APEX_PLACE_DECODING),
                              item(1, 20, APEX_TIER_DEVICE, APEX_PLACE_IDLE)};
    place_bad(ctx, 2, dev, 3, 0, APEX_ERR_INVALID_ARG);
    place_bad(ctx, 2, dev, 8, 1, APEX_ERR_INVALID_ARG);
    apex_stats st;
    assert_ok(apex_stats_get(ctx, &st));
    assert_true(st.errors >= 13);
    /* Nothing changed: the same good call answers as the first did. */
    apex_tier again[2];
    apex_place_plan p1;
    assert_ok(apex_sched_place(ctx, 2, ok, SLOTS * BPS, SLOTS, again, &p1));
    assert_memory_equal(first, again, sizeof first);
    assert_int_equal(p0.n_to_device, p1.n_to_device);
    assert_ok(apex_sched_place(ctx, 0, NULL, 0, 0, NULL, NULL)); /* nothing to place */
    assert_ok(apex_context_destroy(ctx));
}

/* Four decoders, two device places: the device ones stay, the host ones
 * wait; one finishing promotes the first waiting one; an idle one frees its
 * place too; a short block budget spills from the back. */
static void test_placement(void **state) {
    (void)state;
    apex_context *ctx = tier_context(1);
    apex_place_item it[4] = {item(10, 20, APEX_TIER_DEVICE, APEX_PLACE_DECODING),
                             item(11, 12, APEX_TIER_DEVICE, APEX_PLACE_DECODING),
                             item(12, 30, APEX_TIER_HOST, APEX_PLACE_DECODING),
                             item(13, 3, APEX_TIER_HOST, APEX_PLACE_DECODING)};
    apex_tier out[4];
    apex_place_plan p;
    const int64_t blocks = 2 * BPS;
    assert_ok(apex_sched_place(ctx, 4, it, blocks, 2, out, &p));
    assert_int_equal(out[0], APEX_TIER_DEVICE);
    assert_int_equal(out[1], APEX_TIER_DEVICE);
    assert_int_equal(out[2], APEX_TIER_HOST);
    assert_int_equal(out[3], APEX_TIER_HOST);
    assert_int_equal(p.n_device, 2);
    assert_int_equal(p.n_host, 2);
    /* the cohort the step form leaves out is a part of the host decoders */
    assert_true(p.n_host_idle >= 0 && p.n_host_idle <= p.n_host);
    assert_int_equal(p.n_to_device + p.n_to_host, 0);
    assert_non_null(p.strategy);
    assert_true(p.predicted_step_ms > 0);
    /* sequence 10 finished: its place goes to 12, the first waiting one */
    it[0].state = APEX_PLACE_FINISHED;
    assert_ok(apex_sched_place(ctx, 4, it, blocks, 2, out, &p));
    assert_int_equal(out[0], APEX_TIER_HOST);
    assert_int_equal(out[1], APEX_TIER_DEVICE);
    assert_int_equal(out[2], APEX_TIER_DEVICE);
    assert_int_equal(out[3], APEX_TIER_HOST);
    assert_int_equal(p.n_to_device, 1);
    assert_int_equal(p.n_to_host, 1);
    assert_int_equal(p.n_device, 2);
    assert_int_equal(p.n_host, 1);
    assert_true(p.n_host_idle <= 1);
    /* the engine carried it out; now 11 idles: 13 takes its place */
    it[0].tier = APEX_TIER_HOST, it[2].tier = APEX_TIER_DEVICE;
    it[1].state = APEX_PLACE_IDLE;
    assert_ok(apex_sched_place(ctx, 4, it, blocks, 2, out, &p));
    assert_int_equal(out[1], APEX_TIER_HOST);
    assert_int_equal(out[2], APEX_TIER_DEVICE);
    assert_int_equal(out[3], APEX_TIER_DEVICE);
    /* no sequence limit: the block budget (less a reserve block) decides,
     * and promotion goes in priority order */
    apex_place_item b[3] = {item(1, 30, APEX_TIER_DEVICE, APEX_PLACE_DECODING),
                            item(2, 12, APEX_TIER_HOST, APEX_PLACE_DECODING),
                            item(3, 12, APEX_TIER_HOST, APEX_PLACE_DECODING)};
    assert_ok(apex_sched_place(ctx, 3, b, 3, 0, out, &p));
    assert_int_equal(out[0], APEX_TIER_DEVICE);
    assert_int_equal(out[1], APEX_TIER_HOST); /* 2 + 1 blocks = 3: no reserve block left */
    assert_ok(apex_sched_place(ctx, 3, b, 4, 0, out, &p));
    assert_int_equal(out[1], APEX_TIER_DEVICE);
    assert_int_equal(out[2], APEX_TIER_HOST); /* 2 + 1 + 1 = 4 of 4: the reserve block gone */
    /* a device decoder that needs a new block and finds none spills */
    apex_place_item full[2] = {item(1, 16, APEX_TIER_DEVICE, APEX_PLACE_DECODING),
                               item(2, 16, APEX_TIER_DEVICE, APEX_PLACE_DECODING)};
    assert_ok(apex_sched_place(ctx, 2, full, 2, 0, out, &p));
    assert_int_equal(out[0], APEX_TIER_DEVICE);
    assert_int_equal(out[1], APEX_TIER_HOST);
    assert_int_equal(p.n_to_host, 1);
    assert_ok(apex_context_destroy(ctx));
}

/* A run of steps: 6 sequences of staggered lengths, 2 places, each
 * finishing in turn; the engine applies every answer. Returns the trace. */
static void run_steps(apex_context *ctx, apex_tier *trace, int steps) {
    apex_place_item it[6];
    for (int i = 0; i < 6; i++) it[i] = item(100 + i, 1 + 2 * i, APEX_TIER_HOST, APEX_PLACE_DECODING);
    for (int s = 0; s < steps; s++) {
        apex_tier out[6];
        assert_ok(apex_sched_place(ctx, 6, it, 2 * BPS, 2, out, NULL));
        int on_dev = 0;
        for (int i = 0; i < 6; i++) {
            trace[s * 6 + i] = out[i];
            on_dev += out[i] == APEX_TIER_DEVICE;
            it[i].tier = out[i];
            if (it[i].state == APEX_PLACE_DECODING && it[i].len < KV) it[i].len++;
            if (it[i].len >= 6 + 3 * i) it[i].state = APEX_PLACE_FINISHED;
        }
        assert_true(on_dev <= 2);
        if (s % 3 == 2) assert_ok(apex_sched_observe(ctx, 1e-3 * (1 + s % 5)));
    }
}

static void test_deterministic(void **state) {
    (void)state;
    enum { STEPS = 24 };
    apex_tier a[STEPS * 6], b[STEPS * 6];
    apex_context *c1 = tier_context(1), *c2 = tier_context(1);
    run_steps(c1, a, STEPS);
    run_steps(c2, b, STEPS);
    assert_memory_equal(a, b, sizeof a);
    /* every sequence got a place at some step: places freed were reused */
    for (int i = 0; i < 6; i++) {
        int got = 0;
        for (int s = 0; s < STEPS; s++) got |= a[s * 6 + i] == APEX_TIER_DEVICE;
        assert_true(got);
    }
    assert_ok(apex_context_destroy(c1));
    assert_ok(apex_context_destroy(c2));
}

/* The tier's migration through the paged ABI: a stream's rows (the host
 * copy, f16) are stored in slot 0's device blocks, then -- promoted again
 * after a spill -- in slot 2's, as the tier's lazy store does, and in the
 * host tier. Every copy reads back bit for bit, and attention over either
 * device slot gives the same bits. */
static void test_migrated_kv_reads_back(void **state) {
    (void)state;
    apex_context *ctx = tier_context(BPS);
    enum { LEN = 27 };
    static uint16_t k[LEN][ROW], v[LEN][ROW];
    uint64_t r = 7;
    for (int t = 0; t < LEN; t++)
        for (int x = 0; x < ROW; x++) {
            r = r * 6364136223846793005ull + 1442695040888963407ull;
            k[t][x] = apex_f32_to_f16((float)((r >> 33) % 2001) / 1000.0f - 1.0f);
            v[t][x] = apex_f32_to_f16((float)((r >> 17) % 2001) / 1000.0f - 1.0f);
        }
    const int64_t host_block0 = SLOTS * BPS; /* engine id of the host tier's first block */
    const int64_t bases[3] = {0 * KV, 2 * KV, host_block0 * BT};
    int64_t slots[LEN];
    for (int l = 0; l < L; l++)
        for (int c = 0; c < 3; c++) {
            for (int t = 0; t < LEN; t++) slots[t] = bases[c] + t;
            assert_ok(apex_paged_kv_write(ctx, l, LEN, slots, k, ROW, v, ROW, APEX_DTYPE_F16));
        }
    const size_t block_elems = (size_t)2 * HK * BT * D;
    for (int l = 0; l < L; l++) {
        void *dbase, *hbase;
        assert_ok(apex_paged_layer_kv(ctx, l, APEX_TIER_DEVICE, &dbase, NULL));
        assert_ok(apex_paged_layer_kv(ctx, l, APEX_TIER_HOST, &hbase, NULL));
        /* emulated device memory is host memory: read the slabs directly */
        const uint16_t *copies[3] = {(const uint16_t *)dbase, (const uint16_t *)dbase + 2 * BPS * block_elems,
                                     (const uint16_t *)hbase};
        for (int c = 0; c < 3; c++)
            for (int t = 0; t < LEN; t++)
                for (int h = 0; h < HK; h++)
                    for (int x = 0; x < D; x++) {
                        const uint16_t *blk = copies[c] + (size_t)(t / BT) * block_elems;
                        const size_t at = ((size_t)h * BT + (size_t)(t % BT)) * D + (size_t)x;
                        assert_int_equal(blk[at], k[t][h * D + x]);
                        assert_int_equal(blk[(size_t)HK * BT * D + at], v[t][h * D + x]);
                    }
    }
    float q[HQ * D], out[2][HQ * D];
    for (int i = 0; i < HQ * D; i++) q[i] = (float)((i * 37) % 101) / 101.0f - 0.5f;
    int32_t qsl[2] = {0, 1}, len = LEN, tab[2][BPS] = {{0, 1}, {2 * BPS, 2 * BPS + 1}};
    for (int c = 0; c < 2; c++) assert_ok(apex_paged_attention(ctx, 1, 1, qsl, &len, tab[c], BPS, q, out[c], NULL));
    assert_memory_equal(out[0], out[1], sizeof out[0]);
    assert_ok(apex_context_destroy(ctx));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_placement),
        cmocka_unit_test(test_deterministic),
        cmocka_unit_test(test_migrated_kv_reads_back),
    };
    return cmocka_run_group_tests(tests, make_profile, drop_profile);
}
