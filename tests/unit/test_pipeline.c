/*
 * test_pipeline.c - the hybrid pipeline on the emulated device: a mixed
 * batch (sequences on both tiers) decoded step by step through the async
 * ABI, with forks, frees and new sequences between steps, equals naive
 * attention over the K/V the test wrote; and the engine's thread returns
 * from the async calls before the CPU cohort's work has run.
 * APEX_TEST_DEVICE=cuda runs the same tests on a real GPU (tests/gpu/run.sh).
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "csrc/context.h"
#include "test_util.h"
#include "csrc/env.h"

enum { L = 2, HQ = 8, HK = 2, D = 64, BT = 16, SLOTS = 10, MAXLEN = 256 };

typedef struct {
    apex_context *ctx;
    apex_stream s;
    float *kv; /* [slot][layer][pos][k|v][HK*D] */
    int len[SLOTS], active[SLOTS];
    void *d_q, *d_out, *d_k, *d_v; /* engine tensors in device memory */
} fixture;

static float *kv_at(fixture *f, int s, int l, int pos, int which) {
    return f->kv + ((((size_t)s * L + l) * MAXLEN + pos) * 2 + which) * HK * D;
}

static void setup(fixture *f, int32_t device_blocks) {
    memset(f, 0, sizeof *f);
    apex_config c;
    assert_ok(apex_config_init(&c));
    c.n_layers = L;
    c.n_q_heads = HQ;
    c.n_kv_heads = HK;
    c.head_dim = D;
    c.kv_dtype = APEX_DTYPE_F32;
    c.act_dtype = APEX_DTYPE_F32;
    c.block_tokens = BT;
    c.device_blocks = device_blocks;
    c.host_blocks = 128;
    c.max_seqs = SLOTS;
    c.max_batch = SLOTS;
    c.max_seq_len = MAXLEN;
    c.n_threads = 2;
    const char *dev = getenv("APEX_TEST_DEVICE");
    c.device = dev && !strcmp(dev, "cuda") ? APEX_DEVICE_CUDA : APEX_DEVICE_EMULATED;
    assert_ok(apex_context_create(&c, &f->ctx));
    assert_false(apex_context_host_mode(f->ctx));
    assert_ok(apex_stream_create(f->ctx, &f->s));
    f->kv = calloc((size_t)SLOTS * L * MAXLEN * 2 * HK * D, sizeof(float));
    assert_ok(apex_device_alloc(f->ctx, SLOTS * HQ * D * 4, &f->d_q));
    assert_ok(apex_device_alloc(f->ctx, SLOTS * HQ * D * 4, &f->d_out));
    assert_ok(apex_device_alloc(f->ctx, SLOTS * HK * D * 4, &f->d_k));
    assert_ok(apex_device_alloc(f->ctx, SLOTS * HK * D * 4, &f->d_v));
}

static void teardown(fixture *f) {
    apex_device_free(f->ctx, f->d_q);
    apex_device_free(f->ctx, f->d_out);
    apex_device_free(f->ctx, f->d_k);
    apex_device_free(f->ctx, f->d_v);
    apex_stream_destroy(f->ctx, f->s);
    apex_context_destroy(f->ctx);
    free(f->kv);
}

/* Appends n tokens to each listed sequence through the async path (one
 * batched kv_write per layer, host buffers staged to the device first). */
static void append(fixture *f, int nb, const int32_t *seqs, int n_tok, uint64_t *rng) {
    static float k[SLOTS * HK * D], v[SLOTS * HK * D];
    for (int t = 0; t < n_tok; t++) {
        int32_t pos[SLOTS];
        for (int b = 0; b < nb; b++) {
            assert_ok(apex_seq_reserve(f->ctx, seqs[b], 1, &pos[b]));
            assert_int_equal(pos[b], f->len[seqs[b]]);
            f->len[seqs[b]]++;
        }
        for (int l = 0; l < L; l++) {
            for (int b = 0; b < nb; b++)
                for (int i = 0; i < HK * D; i++) {
                    k[b * HK * D + i] = kv_at(f, seqs[b], l, pos[b], 0)[i] = test_rand_f(rng);
                    v[b * HK * D + i] = kv_at(f, seqs[b], l, pos[b], 1)[i] = test_rand_f(rng);
                }
            assert_ok(apex_memcpy_async(f->ctx, f->d_k, k, (size_t)nb * HK * D * 4, f->s));
            assert_ok(apex_memcpy_async(f->ctx, f->d_v, v, (size_t)nb * HK * D * 4, f->s));
            assert_ok(apex_kv_write_async(f->ctx, l, nb, seqs, pos, f->d_k, f->d_v,
                                          APEX_DTYPE_F32, f->s));
            /* The host buffers are reused next layer: wait for the copies. */
            assert_ok(apex_stream_sync(f->ctx, f->s));
        }
    }
}

/* One decode step's attention for every layer, checked against naive. */
static void attend_and_check(fixture *f, int nb, const int32_t *seqs, uint64_t *rng) {
    static float q[L][SLOTS * HQ * D], out[L][SLOTS * HQ * D];
    for (int l = 0; l < L; l++) {
        for (int i = 0; i < nb * HQ * D; i++) q[l][i] = 2.0f * test_rand_f(rng);
    }
    for (int l = 0; l < L; l++) {
        assert_ok(apex_memcpy_async(f->ctx, f->d_q, q[l], (size_t)nb * HQ * D * 4, f->s));
        assert_ok(apex_attention_async(f->ctx, l, nb, seqs, f->d_q, f->d_out, NULL, f->s));
        assert_ok(apex_memcpy_async(f->ctx, out[l], f->d_out, (size_t)nb * HQ * D * 4, f->s));
    }
    assert_ok(apex_stream_sync(f->ctx, f->s));
    for (int l = 0; l < L; l++)
        for (int b = 0; b < nb; b++)
            for (int h = 0; h < HQ; h++) {
                double want[D];
                int s = seqs[b], hk = h / (HQ / HK);
                test_naive_attention(q[l] + (b * HQ + h) * D, D, kv_at(f, s, l, 0, 0) + hk * D,
                                     kv_at(f, s, l, 0, 1) + hk * D, 2 * HK * D, 0, f->len[s],
                                     1.0f / 8.0f, 0, want);
                for (int i = 0; i < D; i++)
                    if (fabs(out[l][(b * HQ + h) * D + i] - want[i]) > 2e-5)
                        fail_msg("layer %d seq %d head %d dim %d: got %g want %g", l, s, h, i,
                                 out[l][(b * HQ + h) * D + i], want[i]);
            }
}

static int tier_of(fixture *f, int s) {
    apex_seq_info info;
    assert_ok(apex_seq_get_info(f->ctx, s, &info));
    return info.tier;
}

static void test_mixed_batch_multi_step(void **state) {
    (void)state;
    fixture f;
    setup(&f, 16);
    uint64_t rng = 5;
    int32_t seqs[SLOTS];
    int nb = 0;
    for (int s = 0; s < 5; s++) {
        assert_ok(apex_seq_add(f.ctx, s, s < 2 ? APEX_TIER_DEVICE : APEX_TIER_HOST));
        int32_t one = s;
        append(&f, 1, &one, 40 + 20 * s, &rng); /* prompt, through the async path */
        seqs[nb++] = s;
        f.active[s] = 1;
    }
    for (int s = 0; s < 5; s++)
        assert_int_equal(tier_of(&f, s), s < 2 ? APEX_TIER_DEVICE : APEX_TIER_HOST);

    for (int step = 0; step < 12; step++) {
        append(&f, nb, seqs, 1, &rng);
        attend_and_check(&f, nb, seqs, &rng);
        if (step == 3) { /* fork a sequence: it shares blocks, then diverges */
            int src = seqs[0], dst = 7;
            assert_ok(apex_seq_fork(f.ctx, src, dst));
            memcpy(kv_at(&f, dst, 0, 0, 0), kv_at(&f, src, 0, 0, 0),
                   sizeof(float) * (size_t)L * MAXLEN * 2 * HK * D);
            f.len[dst] = f.len[src];
            seqs[nb++] = dst;
            assert_int_equal(tier_of(&f, dst), APEX_TIER_DEVICE);
        }
        if (step == 6) { /* free the second sequence */
            assert_ok(apex_seq_free(f.ctx, seqs[1]));
            memmove(&seqs[1], &seqs[2], sizeof(int32_t) * (size_t)(nb - 2));
            nb--;
        }
        if (step == 8) { /* a new sequence joins */
            assert_ok(apex_seq_add(f.ctx, 8, APEX_TIER_HOST));
            int32_t one = 8;
            append(&f, 1, &one, 30, &rng);
            seqs[nb++] = 8;
        }
    }
    apex_stats st;
    assert_ok(apex_stats_get(f.ctx, &st));
    assert_true(st.seqs_attended_device > 0);
    assert_true(st.seqs_attended_host > 0);
    assert_int_equal(st.errors, 0);
    /* The synchronous ABI agrees with the pipeline on the same state. */
    float q[SLOTS * HQ * D], out[SLOTS * HQ * D];
    for (int i = 0; i < nb * HQ * D; i++) q[i] = test_rand_f(&rng);
    assert_ok(apex_attention(f.ctx, 1, nb, seqs, q, out, NULL));
    for (int b = 0; b < nb; b++) {
        double want[D];
        int s = seqs[b];
        test_naive_attention(q + b * HQ * D, D, kv_at(&f, s, 1, 0, 0), kv_at(&f, s, 1, 0, 1),
                             2 * HK * D, 0, f.len[s], 1.0f / 8.0f, 0, want);
        for (int i = 0; i < D; i++) assert_true(fabs(out[b * HQ * D + i] - want[i]) < 2e-5);
    }
    teardown(&f);
}

/* A prefill of fresh sequences on both tiers: causal attention on the
 * device equals naive attention token by token, and the K/V it stored (in
 * each sequence's tier) serves the decode steps that follow. */
static void test_prefill_then_decode(void **state) {
    (void)state;
    fixture f;
    setup(&f, 16);
    uint64_t rng = 31;
    enum { N = 3 };
    int32_t seqs[N] = {0, 1, 2}, n_tok[N] = {37, 50, 5}, T = 37 + 50 + 5;
    assert_ok(apex_seq_add(f.ctx, 0, APEX_TIER_DEVICE));
    assert_ok(apex_seq_add(f.ctx, 1, APEX_TIER_HOST));
    assert_ok(apex_seq_add(f.ctx, 2, APEX_TIER_HOST));
    for (int i = 0; i < N; i++) {
        assert_ok(apex_seq_reserve(f.ctx, seqs[i], n_tok[i], NULL));
        f.len[seqs[i]] = n_tok[i];
    }
    float *q = malloc(sizeof(float) * T * HQ * D), *out = malloc(sizeof(float) * T * HQ * D);
    float *k = malloc(sizeof(float) * T * HK * D), *v = malloc(sizeof(float) * T * HK * D);
    void *dq, *dk, *dv, *dout;
    assert_ok(apex_device_alloc(f.ctx, sizeof(float) * T * HQ * D, &dq));
    assert_ok(apex_device_alloc(f.ctx, sizeof(float) * T * HQ * D, &dout));
    assert_ok(apex_device_alloc(f.ctx, sizeof(float) * T * HK * D, &dk));
    assert_ok(apex_device_alloc(f.ctx, sizeof(float) * T * HK * D, &dv));
    for (int l = 0; l < L; l++) {
        int row = 0;
        for (int i = 0; i < N; i++)
            for (int p = 0; p < n_tok[i]; p++, row++)
                for (int e = 0; e < HK * D; e++) {
                    k[row * HK * D + e] = kv_at(&f, seqs[i], l, p, 0)[e] = test_rand_f(&rng);
                    v[row * HK * D + e] = kv_at(&f, seqs[i], l, p, 1)[e] = test_rand_f(&rng);
                }
        for (int e = 0; e < T * HQ * D; e++) q[e] = 2.0f * test_rand_f(&rng);
        assert_ok(apex_memcpy_async(f.ctx, dq, q, sizeof(float) * T * HQ * D, f.s));
        assert_ok(apex_memcpy_async(f.ctx, dk, k, sizeof(float) * T * HK * D, f.s));
        assert_ok(apex_memcpy_async(f.ctx, dv, v, sizeof(float) * T * HK * D, f.s));
        assert_ok(apex_prefill_async(f.ctx, l, N, seqs, n_tok, dq, dk, dv, dout, NULL, f.s));
        assert_ok(apex_memcpy_async(f.ctx, out, dout, sizeof(float) * T * HQ * D, f.s));
        assert_ok(apex_stream_sync(f.ctx, f.s));
        row = 0;
        for (int i = 0; i < N; i++)
            for (int p = 0; p < n_tok[i]; p++, row++)
                for (int h = 0; h < HQ; h++) {
                    double want[D];
                    int hk = h / (HQ / HK);
                    test_naive_attention(q + (row * HQ + h) * D, D,
                                         kv_at(&f, seqs[i], l, 0, 0) + hk * D,
                                         kv_at(&f, seqs[i], l, 0, 1) + hk * D, 2 * HK * D, 0,
                                         p + 1, 1.0f / 8.0f, 0, want);
                    for (int e = 0; e < D; e++)
                        if (fabs(out[(row * HQ + h) * D + e] - want[e]) > 2e-5)
                            fail_msg("prefill layer %d seq %d pos %d head %d: got %g want %g", l,
                                     seqs[i], p, h, out[(row * HQ + h) * D + e], want[e]);
                }
    }
    /* Bad prefills: a length that is not the reserved one; a non-fresh sequence. */
    int32_t wrong[N] = {36, 50, 5};
    assert_status(apex_prefill_async(f.ctx, 0, N, seqs, wrong, dq, dk, dv, dout, NULL, f.s),
                  APEX_ERR_INVALID_ARG);
    for (int step = 0; step < 3; step++) {
        append(&f, N, seqs, 1, &rng);
        attend_and_check(&f, N, seqs, &rng);
    }
    apex_device_free(f.ctx, dq);
    apex_device_free(f.ctx, dk);
    apex_device_free(f.ctx, dv);
    apex_device_free(f.ctx, dout);
    free(q);
    free(k);
    free(v);
    free(out);
    teardown(&f);
}

/* Sequences move between tiers (by hand, and by reserve spilling a device
 * sequence that outgrows the device pool); attention stays exact. */
static void test_migration_and_spill(void **state) {
    (void)state;
    fixture f;
    setup(&f, 6); /* 6 device blocks of 16 tokens */
    uint64_t rng = 21;
    int32_t seqs[3] = {0, 1, 2};
    assert_ok(apex_seq_add(f.ctx, 0, APEX_TIER_DEVICE));
    assert_ok(apex_seq_add(f.ctx, 1, APEX_TIER_HOST));
    assert_ok(apex_seq_add(f.ctx, 2, APEX_TIER_DEVICE));
    append(&f, 3, seqs, 30, &rng); /* 2 + 2 device blocks */
    attend_and_check(&f, 3, seqs, &rng);

    assert_ok(apex_seq_migrate(f.ctx, 0, APEX_TIER_HOST));
    assert_ok(apex_seq_migrate(f.ctx, 1, APEX_TIER_DEVICE));
    assert_int_equal(tier_of(&f, 0), APEX_TIER_HOST);
    assert_int_equal(tier_of(&f, 1), APEX_TIER_DEVICE);
    attend_and_check(&f, 3, seqs, &rng); /* right after the enqueued copies */
    append(&f, 3, seqs, 3, &rng);
    attend_and_check(&f, 3, seqs, &rng);

    /* Sequence 2 outgrows the device pool (2 + 2 used, 2 free): at 65
     * tokens it needs a 5th block, so reserve spills it to the host. */
    int32_t two = 2;
    append(&f, 1, &two, 40, &rng);
    assert_int_equal(tier_of(&f, 2), APEX_TIER_HOST);
    attend_and_check(&f, 3, seqs, &rng);
    /* And back, once there is room again. */
    assert_ok(apex_seq_free(f.ctx, 1));
    assert_ok(apex_seq_migrate(f.ctx, 2, APEX_TIER_DEVICE));
    int32_t live[2] = {0, 2};
    append(&f, 2, live, 2, &rng);
    attend_and_check(&f, 2, live, &rng);

    apex_stats st;
    assert_ok(apex_stats_get(f.ctx, &st));
    assert_int_equal(st.migrations[APEX_TIER_HOST], 2);
    assert_int_equal(st.migrations[APEX_TIER_DEVICE], 2);
    /* Too big for the target tier: refused, nothing moved. */
    assert_ok(apex_seq_add(f.ctx, 3, APEX_TIER_HOST));
    int32_t three = 3;
    append(&f, 1, &three, 100, &rng);
    assert_status(apex_seq_migrate(f.ctx, 3, APEX_TIER_DEVICE), APEX_ERR_OUT_OF_BLOCKS);
    assert_int_equal(tier_of(&f, 3), APEX_TIER_HOST);
    assert_status(apex_seq_migrate(f.ctx, 9, APEX_TIER_DEVICE), APEX_ERR_UNKNOWN_SEQ);
    teardown(&f);
}

/* A device too small for even the staging buffers: the context still comes
 * up, in host mode, and says so; a device that holds only part of the pool
 * gets a smaller pool. */
static void test_device_too_small_falls_back(void **state) {
    (void)state;
    apex_config c;
    assert_ok(apex_config_init(&c));
    c.n_layers = L; c.n_q_heads = HQ; c.n_kv_heads = HK; c.head_dim = D; c.block_tokens = BT;
    c.host_blocks = 16; c.max_seqs = SLOTS; c.max_batch = SLOTS; c.max_seq_len = MAXLEN;
    c.device = APEX_DEVICE_EMULATED;
    c.device_blocks = 1 << 20; /* 64 GiB of KV: far more than the device */
    setenv("APEX_EMU_DEVICE_MB", "64", 1);
    apex_env_refresh(); /* the snapshot the core reads (csrc/env.h) */
    apex_context *ctx;
    assert_ok(apex_context_create(&c, &ctx));
    unsetenv("APEX_EMU_DEVICE_MB");
    apex_env_refresh();
    apex_config got;
    assert_ok(apex_context_config(ctx, &got));
    assert_false(apex_context_host_mode(ctx));
    assert_true(got.device_blocks > 0 && got.device_blocks < c.device_blocks);
    apex_context_destroy(ctx);

    /* 1 MiB of device, 64 staging slots of ~100 KiB: not even those fit. */
    setenv("APEX_EMU_DEVICE_MB", "1", 1);
    setenv("APEX_STAGING_SLOTS", "64", 1);
    apex_env_refresh();
    c.device_blocks = 8;
    assert_ok(apex_context_create(&c, &ctx));
    unsetenv("APEX_EMU_DEVICE_MB");
    unsetenv("APEX_STAGING_SLOTS");
    apex_env_refresh();
    assert_true(apex_context_host_mode(ctx));
    assert_ok(apex_context_config(ctx, &got));
    assert_int_equal(got.device_blocks, 0);
    /* Host mode works as usual. */
    assert_ok(apex_seq_add(ctx, 0, APEX_TIER_AUTO));
    apex_seq_info info;
    assert_ok(apex_seq_get_info(ctx, 0, &info));
    assert_int_equal(info.tier, APEX_TIER_HOST);
    apex_context_destroy(ctx);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* With the CPU worker slowed to 300 ms a job, the engine's thread still
 * returns from the async attention call at once, before the job ran. */
static void test_engine_thread_never_waits(void **state) {
    (void)state;
    fixture f;
    setup(&f, 0); /* every sequence on the host tier: all CPU work */
    uint64_t rng = 11;
    int32_t seqs[2] = {0, 1};
    for (int s = 0; s < 2; s++) assert_ok(apex_seq_add(f.ctx, s, APEX_TIER_AUTO));
    append(&f, 2, seqs, 20, &rng);
    cpu_jobs_set_delay(&f.ctx->pipe.jobs, 300000);
    float q[2 * HQ * D];
    for (int i = 0; i < 2 * HQ * D; i++) q[i] = test_rand_f(&rng);
    assert_ok(apex_memcpy_async(f.ctx, f.d_q, q, sizeof q, f.s));
    double t0 = now();
    assert_ok(apex_attention_async(f.ctx, 0, 2, seqs, f.d_q, f.d_out, NULL, f.s));
    double dt = now() - t0;
    uint32_t job = f.ctx->pipe.slots[(f.ctx->pipe.next_slot + f.ctx->pipe.n_slots - 1) %
                                     f.ctx->pipe.n_slots].job;
    assert_false(cpu_jobs_done(&f.ctx->pipe.jobs, job));
    assert_true(dt < 0.1);
    double t1 = now();
    assert_ok(apex_stream_sync(f.ctx, f.s));
    assert_true(now() - t1 > 0.1); /* the stream really waited for the CPU */
    assert_true(cpu_jobs_done(&f.ctx->pipe.jobs, job));
    cpu_jobs_set_delay(&f.ctx->pipe.jobs, 0);
    float out[2 * HQ * D];
    assert_ok(apex_memcpy_async(f.ctx, out, f.d_out, sizeof out, f.s));
    assert_ok(apex_stream_sync(f.ctx, f.s));
    for (int b = 0; b < 2; b++) {
        double want[D];
        test_naive_attention(q + b * HQ * D, D, kv_at(&f, b, 0, 0, 0), kv_at(&f, b, 0, 0, 1),
                             2 * HK * D, 0, f.len[b], 1.0f / 8.0f, 0, want);
        for (int i = 0; i < D; i++) assert_true(fabs(out[b * HQ * D + i] - want[i]) < 2e-5);
    }
    teardown(&f);
}

static void test_async_bad_input(void **state) {
    (void)state;
    fixture f;
    setup(&f, 4);
    int32_t s0 = 0, p0 = 0, ghost = 3;
    assert_ok(apex_seq_add(f.ctx, 0, APEX_TIER_AUTO));
    assert_ok(apex_seq_reserve(f.ctx, 0, 1, &p0));
    assert_status(apex_attention_async(f.ctx, 0, 1, &s0, f.d_q, f.d_out, NULL, NULL),
                  APEX_ERR_INVALID_ARG);
    assert_status(apex_attention_async(f.ctx, 0, 1, &ghost, f.d_q, f.d_out, NULL, f.s),
                  APEX_ERR_UNKNOWN_SEQ);
    assert_status(apex_attention_async(f.ctx, L, 1, &s0, f.d_q, f.d_out, NULL, f.s),
                  APEX_ERR_OUT_OF_RANGE);
    int32_t p9 = 9;
    assert_status(apex_kv_write_async(f.ctx, 0, 1, &s0, &p9, f.d_k, f.d_v, APEX_DTYPE_F32, f.s),
                  APEX_ERR_OUT_OF_RANGE);
    void *big = NULL;
    assert_status(apex_device_alloc(f.ctx, (size_t)1 << 40, &big), APEX_ERR_NO_MEMORY);
    assert_null(big);
    teardown(&f);
    /* Host mode: the device calls say so. */
    apex_config c;
    assert_ok(apex_config_init(&c));
    c.n_layers = 1; c.n_q_heads = 2; c.n_kv_heads = 1; c.head_dim = 64; c.host_blocks = 4;
    c.max_seqs = 2; c.max_batch = 2; c.max_seq_len = 64; c.device = APEX_DEVICE_NONE;
    apex_context *ctx;
    assert_ok(apex_context_create(&c, &ctx));
    apex_stream s;
    assert_status(apex_stream_create(ctx, &s), APEX_ERR_UNSUPPORTED);
    apex_context_destroy(ctx);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mixed_batch_multi_step),
        cmocka_unit_test(test_prefill_then_decode),
        cmocka_unit_test(test_migration_and_spill),
        cmocka_unit_test(test_engine_thread_never_waits),
        cmocka_unit_test(test_async_bad_input),
        cmocka_unit_test(test_device_too_small_falls_back),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
