/*
 * test_trace.c - the tracer (apex.h "trace", csrc/trace.c): the per-step
 * summary's accounting, the event file, client spans from several threads,
 * bad arguments. Run twice by ctest: test_trace with APEX_TRACE set (events
 * and summary), test_trace_off with nothing set (everything off).
 */
#include <pthread.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "test_util.h"

enum { L = 3, HQ = 4, HK = 2, D = 64, BT = 16, SEQS = 2, STEPS = 4 };

static int tracing(void) { return getenv("APEX_TRACE") != NULL; }

static void spin_us(double us) { /* the "engine's" work between calls */
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    do clock_gettime(CLOCK_MONOTONIC, &b);
    while ((double)(b.tv_sec - a.tv_sec) * 1e6 + (double)(b.tv_nsec - a.tv_nsec) * 1e-3 < us);
}

static apex_context *make_ctx(apex_device_kind dev) {
    apex_config c;
    assert_ok(apex_config_init(&c));
    c.n_layers = L, c.n_q_heads = HQ, c.n_kv_heads = HK, c.head_dim = D;
    c.kv_dtype = APEX_DTYPE_F32, c.act_dtype = APEX_DTYPE_F32;
    c.block_tokens = BT, c.host_blocks = 16, c.max_seqs = SEQS, c.max_batch = SEQS;
    c.max_seq_len = 128, c.n_threads = 1, c.device = dev;
    c.device_blocks = dev == APEX_DEVICE_EMULATED ? 8 : 0;
    apex_context *ctx = NULL;
    assert_ok(apex_context_create(&c, &ctx));
    return ctx;
}

/* STEPS decode steps of SEQS sequences over L layers, engine work between. */
static void run_steps(apex_context *ctx, const apex_tier *tiers) {
    int32_t seqs[SEQS], pos[SEQS];
    float k[SEQS * HK * D], q[SEQS * HQ * D], out[SEQS * HQ * D];
    uint64_t rng = 7;
    for (int i = 0; i < SEQS * HK * D; i++) k[i] = test_rand_f(&rng);
    for (int i = 0; i < SEQS * HQ * D; i++) q[i] = test_rand_f(&rng);
    for (int s = 0; s < SEQS; s++) {
        seqs[s] = s;
        assert_ok(apex_seq_add(ctx, s, tiers[s]));
    }
    for (int step = 0; step < STEPS; step++) {
        for (int s = 0; s < SEQS; s++) assert_ok(apex_seq_reserve(ctx, s, 1, &pos[s]));
        for (int l = 0; l < L; l++) {
            spin_us(50);
            assert_ok(apex_kv_write(ctx, l, SEQS, seqs, pos, k, k, APEX_DTYPE_F32));
            assert_ok(apex_attention(ctx, l, SEQS, seqs, q, out, NULL));
        }
        spin_us(200);
    }
}

/* The engine thread's calls hold the overhead and its waits; the CPU jobs
 * run on APEX's worker, beside them. */
static void assert_balanced(const apex_step_summary *s) {
    assert_true(s->apex_overhead_us >= 0);
    assert_true(s->apex_us + 1e-3 >= s->apex_overhead_us + s->wait_us);
}

static void test_host_mode_summary(void **state) {
    (void)state;
    if (!tracing()) skip();
    apex_context *ctx = make_ctx(APEX_DEVICE_NONE);
    assert_ok(apex_step_summary_reset());
    const apex_tier tiers[SEQS] = {APEX_TIER_HOST, APEX_TIER_HOST};
    run_steps(ctx, tiers);
    apex_step_summary s;
    assert_ok(apex_step_summary_get(&s));
    assert_int_equal(s.steps, STEPS);
    assert_int_equal(s.layer_steps, STEPS * L);
    assert_int_equal(s.calls, 2 * STEPS * L);
    assert_true(s.cpu_attn_us > 0 && s.copy_us > 0);
    assert_true(s.wait_us == 0 && s.gpu_attn_us == 0); /* host mode: no pipeline */
    /* On the engine's thread every child is counted: apex = overhead +
     * CPU attention + copies, to rounding. */
    assert_true(fabs(s.apex_us - (s.apex_overhead_us + s.cpu_attn_us + s.copy_us)) < 1e-3);
    assert_true(s.apex_overhead_us >= 0);
    /* 50 us of engine work before each layer's calls (the first layer's is
     * the between-step gap, with the step's 200 us). */
    assert_true(s.engine_us >= 50.0 * (L - 1) / L);
    assert_true(s.step_gap_us >= 250.0);
    assert_ok(apex_context_destroy(ctx));
}

static void test_emulated_pipeline_summary(void **state) {
    (void)state;
    if (!tracing()) skip();
    apex_context *ctx = make_ctx(APEX_DEVICE_EMULATED);
    assert_ok(apex_step_summary_reset());
    /* One sequence on each tier: the host one's attention is a CPU job on
     * APEX's worker thread, which the engine's thread waits for. */
    const apex_tier tiers[SEQS] = {APEX_TIER_DEVICE, APEX_TIER_HOST};
    run_steps(ctx, tiers);
    apex_step_summary s;
    assert_ok(apex_step_summary_get(&s));
    assert_int_equal(s.steps, STEPS);
    assert_int_equal(s.layer_steps, STEPS * L);
    assert_true(s.cpu_attn_us > 0 && s.wait_us > 0);
    assert_balanced(&s);
    assert_ok(apex_context_destroy(ctx));
}

/* A worker thread of a client: GPU attention outside any engine call. */
static void *gpu_worker(void *arg) {
    (void)arg;
    apex_trace_thread_name("test-gpu-tier");
    apex_trace_begin(APEX_TRACE_GPU_ATTN, "gpu attention", 0);
    spin_us(300);
    apex_trace_begin(APEX_TRACE_CALL_ATTN, "nested libapex call", 0); /* not an engine call */
    spin_us(100);
    apex_trace_end();
    apex_trace_end();
    return NULL;
}

static void test_client_spans(void **state) {
    (void)state;
    if (!tracing()) skip();
    assert_ok(apex_step_summary_reset());
    for (int step = 0; step < 2; step++) {
        apex_trace_begin(APEX_TRACE_CALL_ATTN, "client attention", 0);
        pthread_t th;
        assert_int_equal(pthread_create(&th, NULL, gpu_worker, NULL), 0);
        apex_trace_begin(APEX_TRACE_CPU_ATTN, "client cpu kernel", 0);
        /* Nearly all of the outer span: counted twice, CPU attention would
         * exceed the call that holds it. */
        apex_trace_begin(APEX_TRACE_CPU_ATTN, "deeper: not summed", 0);
        spin_us(300);
        apex_trace_end();
        apex_trace_end();
        apex_trace_begin(APEX_TRACE_WAIT, "client wait", 0);
        pthread_join(th, NULL);
        apex_trace_end();
        apex_trace_end();
        spin_us(100);
    }
    apex_step_summary s;
    assert_ok(apex_step_summary_get(&s));
    /* The worker's nested libapex-style call is not an engine call. */
    assert_int_equal(s.steps, 2);
    assert_int_equal(s.layer_steps, 2);
    assert_int_equal(s.calls, 2);
    assert_true(s.cpu_attn_us >= 300 && s.gpu_attn_us >= 400 && s.wait_us > 0);
    assert_true(s.cpu_attn_us <= s.apex_us - s.wait_us + 1e-3);
    assert_true(fabs(s.apex_us - (s.apex_overhead_us + s.cpu_attn_us + s.wait_us)) < 1e-3);
    assert_true(s.engine_us == 0 && s.step_gap_us >= 100);
}

static char *read_all(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    if (b && fread(b, 1, (size_t)n, f) != (size_t)n) n = 0;
    if (b) b[n] = 0;
    fclose(f);
    return b;
}

static size_t count(const char *s, const char *what) {
    size_t n = 0;
    for (const char *p = s; (p = strstr(p, what)); p += strlen(what)) n++;
    return n;
}

static void test_event_file(void **state) {
    (void)state;
    if (!tracing()) skip();
    assert_int_equal(apex_trace_level(), 2);
    apex_context *ctx = make_ctx(APEX_DEVICE_NONE);
    const apex_tier tiers[SEQS] = {APEX_TIER_HOST, APEX_TIER_HOST};
    run_steps(ctx, tiers);
    assert_ok(apex_context_destroy(ctx));
    assert_ok(apex_trace_flush());
    char path[4096];
    const char *p = getenv("APEX_TRACE"), *pp = strstr(p, "%p");
    if (pp) snprintf(path, sizeof path, "%.*s%d%s", (int)(pp - p), p, (int)getpid(), pp + 2);
    else snprintf(path, sizeof path, "%s", p);
    char *j = read_all(path);
    assert_non_null(j);
    assert_true(strncmp(j, "{\"traceEvents\": [", 17) == 0);
    assert_true(strstr(j, "\"apex_summary\": {\"steps\"") != NULL);
    assert_true(strstr(j, "\"name\": \"thread_name\"") != NULL);
    assert_true(strstr(j, "test-gpu-tier") != NULL); /* named by the earlier test */
    /* This run's calls (and the earlier tests'): every attention and KV
     * write, each kernel and row store, the engine gaps. */
    assert_true(count(j, "\"name\": \"apex_attention\"") >= STEPS * L);
    assert_true(count(j, "\"name\": \"apex_kv_write\"") >= STEPS * L);
    assert_true(count(j, "\"name\": \"cpu_attn_decode\"") >= STEPS * L);
    assert_true(count(j, "\"cat\": \"engine\"") >= STEPS * (L - 1));
    assert_true(count(j, "\"ph\": \"X\"") > 4 * STEPS * L);
    assert_true(strstr(j, "\"args\": {\"layer\": 2, \"step\": ") != NULL);
    /* Balanced braces: one object. */
    long depth = 0, min = 1;
    for (const char *c = j; *c; c++) {
        depth += *c == '{' ? 1 : *c == '}' ? -1 : 0;
        if (c > j && depth < min) min = depth;
    }
    assert_int_equal(depth, 0);
    assert_true(min >= 0);
    free(j);
    unlink(path);
}

static void test_bad_arguments(void **state) {
    (void)state;
    assert_status(apex_step_summary_get(NULL), APEX_ERR_INVALID_ARG);
    assert_status(apex_trace_enable(0), APEX_ERR_INVALID_ARG);
    assert_status(apex_trace_enable(3), APEX_ERR_INVALID_ARG);
    /* Unmatched ends and bad kinds are ignored, never a crash. */
    apex_trace_end();
    apex_trace_begin((apex_trace_kind)99, "bad kind", 0);
    apex_trace_end();
    apex_trace_thread_name(NULL);
}

static void test_off(void **state) {
    (void)state;
    if (tracing()) skip();
    assert_int_equal(apex_trace_level(), 0);
    apex_step_summary s;
    assert_status(apex_step_summary_get(&s), APEX_ERR_UNSUPPORTED);
    apex_trace_begin(APEX_TRACE_CALL_ATTN, "nothing", 0);
    apex_trace_end();
    assert_ok(apex_trace_flush()); /* no file to write */
    assert_status(apex_trace_enable(2), APEX_ERR_INVALID_ARG); /* no APEX_TRACE file */
    /* A client can turn the summary on (the ggml backend does for its exit
     * report); it counts from then on. */
    assert_ok(apex_trace_enable(1));
    assert_int_equal(apex_trace_level(), 1);
    apex_context *ctx = make_ctx(APEX_DEVICE_NONE);
    const apex_tier tiers[SEQS] = {APEX_TIER_HOST, APEX_TIER_HOST};
    run_steps(ctx, tiers);
    assert_ok(apex_step_summary_get(&s));
    assert_int_equal(s.layer_steps, STEPS * L);
    assert_ok(apex_context_destroy(ctx));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bad_arguments),
        cmocka_unit_test(test_off),
        cmocka_unit_test(test_host_mode_summary),
        cmocka_unit_test(test_emulated_pipeline_summary),
        cmocka_unit_test(test_client_spans),
        cmocka_unit_test(test_event_file),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
