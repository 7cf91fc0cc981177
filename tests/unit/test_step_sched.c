/*
 * test_step_sched.c - the scheduler driven through the ABI, as an engine
 * would: a queue of requests served step by step on the emulated device with
 * a small device pool. Every decision is carried out (admit, prefill,
 * decode, preempt) and checked against the context: a decode's tier is where
 * the sequence's KV is, the pools never overflow, every request finishes,
 * and two runs from the same state make the same decisions.
 */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "csrc/sched/sched.h"
#include "test_util.h"
#include "csrc/env.h"

enum { SLOTS = 12, REQS = 24, OUT_TOKENS = 24 };

typedef struct {
    int32_t prompt, generated, slot, prompt_left, done;
} request;

static char profile_path[256];

/* A roofline profile (t4 preset, this test's geometry) in a file, so no
 * measurement runs and nothing is written to the user's cache. */
static int make_profile(void **state) {
    (void)state;
    apex_model_geom g = {.n_layers = 4, .n_q_heads = 8, .n_kv_heads = 2, .head_dim = 64,
                         .kv_bytes = 2, .act_bytes = 2, .hidden = 512, .ffn = 1536,
                         .vocab = 32000};
    apex_profile p;
    if (apex_profile_from_preset(apex_hw_preset_find("t4"), &g, 50e6, 2, &p) != SCHED_OK)
        return -1;
    snprintf(profile_path, sizeof profile_path, "/tmp/apex-test-profile-%d.json", (int)getpid());
    if (apex_profile_save(&p, profile_path) != SCHED_OK) return -1;
    setenv("APEX_PROFILE", profile_path, 1);
    apex_env_refresh(); /* the snapshot the core reads (csrc/env.h) */
    return 0;
}

static int drop_profile(void **state) {
    (void)state;
    unlink(profile_path);
    unsetenv("APEX_PROFILE");
    apex_env_refresh();
    return 0;
}

static apex_context *make_context(void) {
    apex_config c;
    assert_ok(apex_config_init(&c));
    c.n_layers = 4;
    c.n_q_heads = 8;
    c.n_kv_heads = 2;
    c.head_dim = 64;
    c.block_tokens = 16;
    c.device_blocks = 24;
    c.host_blocks = 400;
    c.max_seqs = SLOTS;
    c.max_batch = SLOTS;
    c.max_seq_len = 512;
    c.n_threads = 2;
    c.device = APEX_DEVICE_EMULATED;
    apex_context *ctx;
    assert_ok(apex_context_create(&c, &ctx));
    apex_sched_options o = {.gpu_preset = "t4", .weight_bytes = 50000000, .hidden = 512,
                            .ffn = 1536, .vocab = 32000, .tpot_target_ms = 0,
                            .prefill_budget = 256};
    assert_ok(apex_sched_enable(ctx, &o));
    return ctx;
}

/* Serves every request to completion; writes the decision trace. */
static int serve(apex_context *ctx, int32_t *trace, int cap) {
    request r[REQS];
    for (int i = 0; i < REQS; i++)
        r[i] = (request){.prompt = 20 + (i * 37) % 90, .slot = -1, .prompt_left = 20 + (i * 37) % 90};
    int slot_used[SLOTS] = {0}, n_trace = 0, finished = 0, steps = 0, saw_cpu = 0, saw_gpu = 0;
    apex_step_item items[2 * SLOTS];
    apex_step_decision d[2 * SLOTS];
    int owner[2 * SLOTS];
    while (finished < REQS) {
        assert_true(++steps < 2000);
        int n = 0, waiting = 0;
        for (int i = 0; i < REQS && n < 2 * SLOTS; i++) {
            if (r[i].done) continue;
            if (r[i].slot < 0 && waiting >= SLOTS) continue;
            waiting += r[i].slot < 0;
            items[n] = (apex_step_item){.seq = r[i].slot, .prompt_left = r[i].prompt_left};
            owner[n++] = i;
        }
        apex_step_plan plan;
        assert_ok(apex_sched_step(ctx, n, items, d, &plan));
        saw_cpu += plan.n_cpu > 0;
        saw_gpu += plan.n_gpu > 0;
        for (int k = 0; k < n; k++) {
            request *q = &r[owner[k]];
            if (n_trace + 3 <= cap) {
                trace[n_trace++] = d[k].action;
                trace[n_trace++] = d[k].chunk;
                trace[n_trace++] = d[k].tier;
            }
            if (d[k].action == APEX_STEP_PREEMPT) {
                assert_true(q->slot >= 0);
                assert_ok(apex_seq_free(ctx, q->slot));
                slot_used[q->slot] = 0;
                q->slot = -1;
                q->prompt_left = q->prompt + q->generated; /* recompute */
                continue;
            }
            if (d[k].action == APEX_STEP_PREFILL) {
                assert_true(d[k].chunk >= 1 && d[k].chunk <= q->prompt_left);
                if (q->slot < 0) {
                    int s = 0;
                    while (s < SLOTS && slot_used[s]) s++;
                    assert_true(s < SLOTS);
                    assert_ok(apex_seq_add(ctx, s, d[k].tier));
                    slot_used[s] = 1;
                    q->slot = s;
                }
                assert_ok(apex_seq_reserve(ctx, q->slot, d[k].chunk, NULL));
                q->prompt_left -= d[k].chunk;
            } else if (d[k].action == APEX_STEP_DECODE) {
                assert_true(q->slot >= 0 && q->prompt_left == 0);
                apex_seq_info info;
                assert_ok(apex_seq_get_info(ctx, q->slot, &info));
                assert_int_equal(info.tier, d[k].tier);
                assert_ok(apex_seq_reserve(ctx, q->slot, 1, NULL));
                if (++q->generated == OUT_TOKENS) {
                    assert_ok(apex_seq_free(ctx, q->slot));
                    slot_used[q->slot] = 0;
                    q->slot = -1;
                    q->done = 1;
                    finished++;
                }
            }
        }
        assert_ok(apex_sched_observe(ctx, plan.predicted_step_ms > 0 ? plan.predicted_step_ms / 1e3
                                                                     : 1e-3));
    }
    /* The device pool (24 blocks) cannot hold the load: both tiers served. */
    assert_true(saw_gpu > 0);
    assert_true(saw_cpu > 0);
    return n_trace;
}

static void test_serves_queue_deterministically(void **state) {
    (void)state;
    enum { CAP = 200000 };
    int32_t *a = malloc(CAP * sizeof *a), *b = malloc(CAP * sizeof *b);
    apex_context *ctx = make_context();
    int na = serve(ctx, a, CAP);
    apex_stats st;
    assert_ok(apex_stats_get(ctx, &st));
    assert_int_equal(st.seqs_active, 0);
    assert_int_equal(st.blocks_used[APEX_TIER_DEVICE], 0);
    assert_int_equal(st.blocks_used[APEX_TIER_HOST], 0);
    apex_context_destroy(ctx);
    ctx = make_context();
    int nb = serve(ctx, b, CAP);
    apex_context_destroy(ctx);
    assert_int_equal(na, nb);
    assert_memory_equal(a, b, (size_t)na * sizeof *a);
    free(a);
    free(b);
}

static void test_bad_scheduler_input(void **state) {
    (void)state;
    apex_config c;
    assert_ok(apex_config_init(&c));
    c.n_layers = 4; c.n_q_heads = 8; c.n_kv_heads = 2; c.head_dim = 64; c.host_blocks = 16;
    c.max_seqs = 4; c.max_batch = 4; c.max_seq_len = 256; c.device = APEX_DEVICE_NONE;
    apex_context *ctx;
    assert_ok(apex_context_create(&c, &ctx));
    apex_step_item it[2] = {{.seq = -1, .prompt_left = 10}, {.seq = -1, .prompt_left = 5}};
    apex_step_decision d[2];
    assert_status(apex_sched_step(ctx, 2, it, d, NULL), APEX_ERR_INVALID_ARG); /* not enabled */
    apex_sched_options o = {.gpu_preset = "t4", .weight_bytes = 50000000, .hidden = 512,
                            .ffn = 1536, .vocab = 32000};
    o.tpot_target_ms = -1;
    assert_status(apex_sched_enable(ctx, &o), APEX_ERR_INVALID_ARG);
    o.tpot_target_ms = 0;
    o.gpu_preset = "no-such-gpu";
    unsetenv("APEX_PROFILE");
    apex_env_refresh();
    assert_status(apex_sched_enable(ctx, &o), APEX_ERR_INVALID_ARG);
    setenv("APEX_PROFILE", profile_path, 1);
    apex_env_refresh();
    o.gpu_preset = "t4";
    assert_ok(apex_sched_enable(ctx, &o));
    assert_status(apex_sched_observe(ctx, 0.01), APEX_ERR_INVALID_ARG); /* nothing planned */
    it[1].prompt_left = 0;
    assert_status(apex_sched_step(ctx, 2, it, d, NULL), APEX_ERR_INVALID_ARG);
    it[1] = (apex_step_item){.seq = 3, .prompt_left = 0};
    assert_status(apex_sched_step(ctx, 2, it, d, NULL), APEX_ERR_UNKNOWN_SEQ);
    assert_ok(apex_seq_add(ctx, 3, APEX_TIER_HOST));
    it[0] = it[1];
    assert_status(apex_sched_step(ctx, 2, it, d, NULL), APEX_ERR_INVALID_ARG); /* listed twice */
    assert_status(apex_sched_step(ctx, 1000, it, d, NULL), APEX_ERR_OUT_OF_RANGE);
    /* Host mode: a running sequence decodes on the host tier. */
    assert_ok(apex_seq_reserve(ctx, 3, 10, NULL));
    apex_step_plan plan;
    assert_ok(apex_sched_step(ctx, 1, it, d, &plan));
    assert_int_equal(d[0].action, APEX_STEP_DECODE);
    assert_int_equal(d[0].tier, APEX_TIER_HOST);
    assert_ok(apex_sched_observe(ctx, 0.01));
    assert_status(apex_sched_observe(ctx, -1), APEX_ERR_INVALID_ARG);
    apex_context_destroy(ctx);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_serves_queue_deterministically),
        cmocka_unit_test(test_bad_scheduler_input),
    };
    return cmocka_run_group_tests(tests, make_profile, drop_profile);
}
