/*
 * test_metrics.c - APEX_METRICS_FILE (csrc/metrics.c): the Prometheus text
 * (every metric documented with HELP and TYPE, unknown gauges left out), the
 * atomic rewrite, a write that cannot happen (a status and a message, no
 * file), and libapex's feed: a context writes the file when created, at most
 * once a second while it runs, and its final figures when destroyed; a
 * second context of the process leaves the first one's file alone.
 */
#include <dirent.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "csrc/metrics.h"
#include "test_util.h"
#include "csrc/env.h"

static const char *const NAMES[] = {
    "apex_attention_calls_total", "apex_kv_rows_written_total", "apex_sequence_attentions_total",
    "apex_migrations_total",      "apex_fallbacks_total",       "apex_errors_total",
    "apex_attention_seconds_total", "apex_kv_blocks_used",      "apex_kv_blocks_free",
    "apex_kv_bytes",              "apex_sequences",
};

static char g_dir[256];

static int setup_dir(void **state) {
    (void)state;
    snprintf(g_dir, sizeof g_dir, "/tmp/apex_test_metrics.XXXXXX");
    return mkdtemp(g_dir) ? 0 : -1;
}

static int teardown_dir(void **state) {
    (void)state;
    DIR *d = opendir(g_dir);
    struct dirent *e;
    char p[512];
    while (d && (e = readdir(d)))
        if (e->d_name[0] != '.') {
            snprintf(p, sizeof p, "%s/%s", g_dir, e->d_name);
            unlink(p);
        }
    if (d) closedir(d);
    rmdir(g_dir);
    return 0;
}

static int n_files(void) {
    DIR *d = opendir(g_dir);
    struct dirent *e;
    int n = 0;
    while (d && (e = readdir(d)))
        if (e->d_name[0] != '.') n++;
    if (d) closedir(d);
    return n;
}

static char *slurp(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return NULL;
    static char buf[16384];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    return buf;
}

/* The value of the sample line that starts with `sample ` (name and labels). */
static double value_of(const char *text, const char *sample) {
    char key[256];
    snprintf(key, sizeof key, "\n%s ", sample);
    const char *p = strstr(text, key);
    if (!p) fail_msg("no sample %s in:\n%s", sample, text);
    return strtod(p + strlen(key), NULL);
}

static void test_render(void **state) {
    (void)state;
    apex_metrics m;
    apex_metrics_init(&m, "libapex");
    m.attention_calls = 12;
    m.kv_rows_written = 34;
    m.seq_attentions[APEX_TIER_HOST] = 56;
    m.migrations[APEX_TIER_DEVICE] = 2;
    m.fallbacks = 3;
    m.errors = 4;
    m.attention_seconds = 0.25;
    m.blocks_used[APEX_TIER_HOST] = 7;
    m.blocks_free[APEX_TIER_HOST] = 9;
    m.seqs[APEX_TIER_HOST] = 5;
    char buf[8192];
    int n = apex_metrics_render(&m, buf, sizeof buf);
    assert_true(n > 0);
    assert_int_equal((size_t)n, strlen(buf));
    for (size_t i = 0; i < sizeof NAMES / sizeof NAMES[0]; i++) {
        char help[128], type[128];
        snprintf(help, sizeof help, "# HELP %s ", NAMES[i]);
        snprintf(type, sizeof type, "# TYPE %s %s\n", NAMES[i],
                 strstr(NAMES[i], "_total") ? "counter" : "gauge");
        if (!strstr(buf, help) || !strstr(buf, type)) fail_msg("%s undocumented in:\n%s", NAMES[i], buf);
    }
    char text[8200] = "\n";
    strcat(text, buf);
    assert_int_equal(value_of(text, "apex_attention_calls_total{engine=\"libapex\"}"), 12);
    assert_int_equal(value_of(text, "apex_kv_rows_written_total{engine=\"libapex\"}"), 34);
    assert_int_equal(value_of(text, "apex_sequence_attentions_total{engine=\"libapex\",tier=\"host\"}"), 56);
    assert_int_equal(value_of(text, "apex_sequence_attentions_total{engine=\"libapex\",tier=\"gpu\"}"), 0);
    assert_int_equal(value_of(text, "apex_migrations_total{engine=\"libapex\",to=\"gpu\"}"), 2);
    assert_int_equal(value_of(text, "apex_fallbacks_total{engine=\"libapex\"}"), 3);
    assert_int_equal(value_of(text, "apex_errors_total{engine=\"libapex\"}"), 4);
    assert_true(value_of(text, "apex_attention_seconds_total{engine=\"libapex\"}") == 0.25);
    assert_int_equal(value_of(text, "apex_kv_blocks_used{engine=\"libapex\",tier=\"host\"}"), 7);
    assert_int_equal(value_of(text, "apex_kv_blocks_free{engine=\"libapex\",tier=\"host\"}"), 9);
    assert_int_equal(value_of(text, "apex_sequences{engine=\"libapex\",tier=\"host\"}"), 5);
    /* Unknown gauges (-1) have no sample line. */
    assert_null(strstr(text, "apex_kv_blocks_used{engine=\"libapex\",tier=\"gpu\"}"));
    assert_null(strstr(text, "apex_kv_bytes{"));
    /* Every line is a comment or "name{labels} value". */
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n"))
        assert_true(line[0] == '#' || (strncmp(line, "apex_", 5) == 0 && strchr(line, '}') &&
                                       strchr(line, '}')[1] == ' '));
    /* A buffer too small: -1, not a truncated file. */
    assert_int_equal(apex_metrics_render(&m, buf, 100), -1);

    /* No per-step summary (tracing off): none of its metrics. */
    assert_true(apex_metrics_render(&m, buf, sizeof buf) > 0);
    assert_null(strstr(buf, "apex_step_us_per_layer"));
    /* With it: the steps, and each part per layer-step, documented. */
    m.has_step_summary = 1;
    m.step = (apex_step_summary){.steps = 3, .layer_steps = 90, .engine_us = 100.5, .cpu_attn_us = 40,
                                 .gpu_attn_us = 0, .copy_us = 2, .wait_us = 1, .apex_overhead_us = 7.25};
    assert_true(apex_metrics_render(&m, buf, sizeof buf) > 0);
    assert_non_null(strstr(buf, "# TYPE apex_step_us_per_layer gauge\n"));
    assert_non_null(strstr(buf, "# TYPE apex_steps_total counter\n"));
    text[0] = '\n';
    text[1] = 0;
    strcat(text, buf);
    assert_int_equal(value_of(text, "apex_steps_total{engine=\"libapex\"}"), 3);
    assert_int_equal(value_of(text, "apex_layer_steps_total{engine=\"libapex\"}"), 90);
    assert_true(value_of(text, "apex_step_us_per_layer{engine=\"libapex\",part=\"engine\"}") == 100.5);
    assert_true(value_of(text, "apex_step_us_per_layer{engine=\"libapex\",part=\"apex_overhead\"}") == 7.25);
    assert_true(value_of(text, "apex_step_us_per_layer{engine=\"libapex\",part=\"cpu_attn\"}") == 40);
}

static void test_write_atomic_and_failure(void **state) {
    (void)state;
    apex_metrics m;
    apex_metrics_init(&m, "test");
    m.attention_calls = 1;
    char path[512], want[8192];
    snprintf(path, sizeof path, "%s/apex.prom", g_dir);
    assert_ok(apex_metrics_write(path, &m));
    apex_metrics_render(&m, want, sizeof want);
    assert_string_equal(slurp(path), want);
    m.attention_calls = 2;
    assert_ok(apex_metrics_write(path, &m));
    apex_metrics_render(&m, want, sizeof want);
    assert_string_equal(slurp(path), want);
    assert_int_equal(n_files(), 1); /* the temporary file was renamed, none left */
    unlink(path);

    /* A directory that does not exist: a status and a message, no file. */
    snprintf(path, sizeof path, "%s/no/such/dir/apex.prom", g_dir);
    assert_status(apex_metrics_write(path, &m), APEX_ERR_INVALID_ARG);
    assert_non_null(strstr(apex_last_error(), "no/such/dir"));
    assert_int_equal(n_files(), 0);
}

static apex_config small_config(void) {
    apex_config c;
    assert_ok(apex_config_init(&c));
    c.n_layers = 2;
    c.n_q_heads = 4;
    c.n_kv_heads = 2;
    c.head_dim = 64;
    c.kv_dtype = APEX_DTYPE_F32;
    c.act_dtype = APEX_DTYPE_F32;
    c.block_tokens = 16;
    c.host_blocks = 8;
    c.max_seqs = 4;
    c.max_batch = 4;
    c.max_seq_len = 64;
    c.n_threads = 1;
    c.device = APEX_DEVICE_NONE;
    return c;
}

/* One decode step of both sequences on both layers. */
static void step(apex_context *ctx) {
    int32_t seqs[2] = {0, 1}, pos[2];
    float k[2 * 2 * 64], v[2 * 2 * 64], q[2 * 4 * 64], out[2 * 4 * 64];
    uint64_t rng = 5;
    for (int i = 0; i < 2 * 2 * 64; i++) k[i] = v[i] = test_rand_f(&rng);
    for (int i = 0; i < 2 * 4 * 64; i++) q[i] = test_rand_f(&rng);
    for (int s = 0; s < 2; s++) assert_ok(apex_seq_reserve(ctx, seqs[s], 1, &pos[s]));
    for (int l = 0; l < 2; l++) {
        assert_ok(apex_kv_write(ctx, l, 2, seqs, pos, k, v, APEX_DTYPE_F32));
        assert_ok(apex_attention(ctx, l, 2, seqs, q, out, NULL));
    }
}

static void test_context_feed(void **state) {
    (void)state;
    char path[512], env[512];
    snprintf(path, sizeof path, "%s/ctx.%ld.prom", g_dir, (long)getpid());
    snprintf(env, sizeof env, "%s/ctx.%%p.prom", g_dir); /* %p: the process id */
    setenv("APEX_METRICS_FILE", env, 1);
    apex_env_refresh(); /* the snapshot the core reads (csrc/env.h) */
    apex_config c = small_config();
    apex_context *ctx, *other;
    assert_ok(apex_context_create(&c, &ctx));
    /* Written at creation: zero counters, the host pool's blocks free. */
    char text[16384] = "\n";
    char *t = slurp(path);
    assert_non_null(t);
    strcat(text, t);
    assert_int_equal(value_of(text, "apex_attention_calls_total{engine=\"libapex\"}"), 0);
    assert_int_equal(value_of(text, "apex_kv_blocks_free{engine=\"libapex\",tier=\"host\"}"), 8);
    assert_int_equal(value_of(text, "apex_sequences{engine=\"libapex\",tier=\"host\"}"), 0);

    assert_ok(apex_seq_add(ctx, 0, APEX_TIER_HOST));
    assert_ok(apex_seq_add(ctx, 1, APEX_TIER_HOST));
    step(ctx);
    /* Within the second: not rewritten. */
    strcpy(text, "\n");
    strcat(text, slurp(path));
    assert_int_equal(value_of(text, "apex_attention_calls_total{engine=\"libapex\"}"), 0);
    /* A second context does not take the file (one line on stderr). */
    assert_ok(apex_context_create(&c, &other));
    assert_ok(apex_seq_add(other, 0, APEX_TIER_HOST));
    assert_ok(apex_seq_add(other, 1, APEX_TIER_HOST));
    step(other);
    apex_context_destroy(other);
    strcpy(text, "\n");
    strcat(text, slurp(path));
    assert_int_equal(value_of(text, "apex_attention_calls_total{engine=\"libapex\"}"), 0);
    /* After a second the next attention (the step's first, layer 0: the
     * third call) rewrites it, and the step's second call does not. */
    sleep(1);
    step(ctx);
    strcpy(text, "\n");
    strcat(text, slurp(path));
    assert_int_equal(value_of(text, "apex_attention_calls_total{engine=\"libapex\"}"), 3);
    assert_int_equal(value_of(text, "apex_sequence_attentions_total{engine=\"libapex\",tier=\"host\"}"), 6);
    assert_int_equal(value_of(text, "apex_kv_rows_written_total{engine=\"libapex\"}"), 6);
    assert_int_equal(value_of(text, "apex_sequences{engine=\"libapex\",tier=\"host\"}"), 2);
    assert_int_equal(value_of(text, "apex_kv_blocks_used{engine=\"libapex\",tier=\"host\"}"), 2);
    /* A failing call counts as an error; destroy writes the final figures. */
    int32_t bad = 3;
    float q[4 * 64] = {0}, out[4 * 64];
    assert_status(apex_attention(ctx, 0, 1, &bad, q, out, NULL), APEX_ERR_UNKNOWN_SEQ);
    step(ctx);
    apex_context_destroy(ctx);
    strcpy(text, "\n");
    strcat(text, slurp(path));
    assert_int_equal(value_of(text, "apex_attention_calls_total{engine=\"libapex\"}"), 6);
    assert_int_equal(value_of(text, "apex_errors_total{engine=\"libapex\"}"), 1);
    assert_int_equal(n_files(), 1);
    unlink(path);

    /* The file is free again: the next context takes it. */
    assert_ok(apex_context_create(&c, &ctx));
    assert_non_null(slurp(path));
    apex_context_destroy(ctx);
    unlink(path);
    unsetenv("APEX_METRICS_FILE");
    apex_env_refresh();
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_render),
        cmocka_unit_test(test_write_atomic_and_failure),
        cmocka_unit_test(test_context_feed),
    };
    return cmocka_run_group_tests(tests, setup_dir, teardown_dir);
}
