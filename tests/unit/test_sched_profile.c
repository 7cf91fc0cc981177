/* test_sched_profile.c - profile JSON round trip, validation of bad
 * profiles, presets, the cache path and the CPU measurement. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "apex/apex.h"
#include "cpu_attn/cpu_attn.h"
#include "csrc/sched/sched.h"
#include "csrc/env.h"

static apex_profile base(void) {
    apex_model_geom g;
    double wb;
    apex_profile p;
    assert_int_equal(apex_model_preset("llama3-8b", &g, &wb), SCHED_OK);
    assert_int_equal(apex_profile_from_preset(apex_hw_preset_find("a10"), &g, wb, 16, &p),
                     SCHED_OK);
    return p;
}

static void test_round_trip(void **st) {
    (void)st;
    apex_profile p = base(), q;
    char *text;
    assert_int_equal(apex_profile_write(&p, &text), SCHED_OK);
    assert_int_equal(apex_profile_parse(text, strlen(text), &q), SCHED_OK);
    free(text);
    assert_string_equal(p.hw_key, q.hw_key);
    assert_string_equal(p.model_key, q.model_key);
    assert_string_equal(p.source, q.source);
    assert_int_equal(p.lin.n, q.lin.n);
    for (int i = 0; i < p.lin.n; i++) assert_true(p.lin.y[i] == q.lin.y[i]);
    assert_int_equal(p.n_catt, q.n_catt);
    assert_true(p.catt[1].per_token == q.catt[1].per_token);
    assert_true(p.h2d.bw_Bps == q.h2d.bw_Bps);
    assert_memory_equal(&p.geom, &q.geom, sizeof p.geom);
    /* and through a file */
    char path[] = "/tmp/apex_prof_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    assert_int_equal(apex_profile_save(&p, path), SCHED_OK);
    memset(&q, 0, sizeof q);
    assert_int_equal(apex_profile_load(path, &q), SCHED_OK);
    assert_true(q.gatt.y[2] == p.gatt.y[2]);
    remove(path);
}

/* Replaces the first occurrence of `from` in text by `to`, then parses. */
static sched_status parse_edited(const char *from, const char *to) {
    apex_profile p = base(), q;
    char *text;
    assert_int_equal(apex_profile_write(&p, &text), SCHED_OK);
    char *at = strstr(text, from);
    assert_non_null(at);
    size_t n = strlen(text) + strlen(to) + 1;
    char *e = malloc(n);
    assert_non_null(e);
    snprintf(e, n, "%.*s%s%s", (int)(at - text), text, to, at + strlen(from));
    sched_status s = apex_profile_parse(e, strlen(e), &q);
    free(text);
    free(e);
    return s;
}

static void test_bad_profiles(void **st) {
    (void)st;
    /* missing field */
    assert_int_equal(parse_edited("\"cpu_threads\"", "\"cpu_threadz\""), SCHED_ERR_INVALID);
    assert_non_null(strstr(sched_last_error(), "missing field 'cpu_threads'"));
    assert_int_equal(parse_edited("\"pcie\"", "\"pcie_x\""), SCHED_ERR_INVALID);
    assert_non_null(strstr(sched_last_error(), "pcie"));
    /* negative time in a curve */
    assert_int_equal(parse_edited("\"s\": [", "\"s\": [-1, "), SCHED_ERR_INVALID);
    apex_profile p = base();
    p.gatt.y[1] = -0.5;
    assert_int_equal(apex_profile_validate(&p), SCHED_ERR_INVALID);
    assert_non_null(strstr(sched_last_error(), "negative"));
    assert_non_null(strstr(sched_last_error(), "gatt"));
    /* negative CPU fit */
    assert_int_equal(parse_edited("\"per_token_s\": ", "\"per_token_s\": -"), SCHED_ERR_INVALID);
    assert_non_null(strstr(sched_last_error(), "catt[0]"));
    /* zero bandwidth */
    p = base();
    p.d2h.bw_Bps = 0;
    assert_int_equal(apex_profile_validate(&p), SCHED_ERR_INVALID);
    assert_non_null(strstr(sched_last_error(), "pcie.d2h.bw_Bps"));
    /* x not increasing */
    p = base();
    p.lin.x[3] = p.lin.x[2];
    assert_int_equal(apex_profile_validate(&p), SCHED_ERR_INVALID);
    /* wrong type, malformed JSON, wrong version */
    assert_int_equal(parse_edited("\"cpu_threads\": 16", "\"cpu_threads\": \"16\""), SCHED_ERR_INVALID);
    assert_int_equal(parse_edited("\"hw_key\"", "\"hw_key\" \"x\","), SCHED_ERR_PARSE);
    assert_non_null(strstr(sched_last_error(), "line"));
    assert_int_equal(parse_edited("\"apex_profile\": 1", "\"apex_profile\": 7"), SCHED_ERR_INVALID);
    assert_int_equal(apex_profile_load("/nonexistent/apex.json", &p), SCHED_ERR_IO);
    /* noise is smoothed to a monotone curve, not rejected */
    p = base();
    p.lin.y[4] = p.lin.y[3] * 0.99;
    assert_int_equal(apex_profile_validate(&p), SCHED_OK);
    assert_true(p.lin.y[4] >= p.lin.y[3]);
}

static void test_presets(void **st) {
    (void)st;
    const char *names[] = {"t4", "a10", "a100-40gb", "h100-pcie", "h100-sxm"};
    apex_model_geom g;
    double wb;
    assert_int_equal(apex_model_preset("llama2-7b", &g, &wb), SCHED_OK);
    double prev_step = 1e9;
    for (int i = 0; i < 5; i++) {
        const apex_hw_preset *h = apex_hw_preset_find(names[i]);
        assert_non_null(h);
        assert_non_null(strstr(h->sources, "datasheet"));
        apex_profile p;
        assert_int_equal(apex_profile_from_preset(h, &g, wb, 0, &p), SCHED_OK);
        assert_non_null(strstr(p.source, "roofline estimate"));
        /* a decode step reads the weights: at least weights / bandwidth */
        double t1 = apex_t_lin(&p, 1);
        assert_true(t1 >= wb / h->gpu_bw_Bps);
        assert_true(t1 < prev_step || i == 4);
        prev_step = t1;
    }
    assert_null(apex_hw_preset_find("v100"));
    assert_int_equal(apex_model_preset("gpt5", &g, &wb), SCHED_ERR_NOT_FOUND);
}

static void test_obtain_env_and_cache(void **st) {
    (void)st;
    apex_model_geom g;
    double wb;
    assert_int_equal(apex_model_preset("llama2-7b", &g, &wb), SCHED_OK);
    apex_profile p = base(), q; /* llama3 profile */
    char path[] = "/tmp/apex_env_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    assert_int_equal(apex_profile_save(&p, path), SCHED_OK);
    setenv("APEX_PROFILE", path, 1);
    apex_env_refresh(); /* the snapshot the core reads (csrc/env.h) */
    const char *how = NULL;
    /* geometry mismatch is refused with a clear message */
    assert_int_equal(apex_profile_obtain("t4", &g, wb, 2, -1, 0, "/tmp", &q, &how), SCHED_ERR_MISMATCH);
    assert_non_null(strstr(sched_last_error(), "APEX_PROFILE"));
    assert_int_equal(apex_profile_obtain("a10", &p.geom, wb, 2, -1, 0, "/tmp", &q, &how), SCHED_OK);
    assert_string_equal(how, "APEX_PROFILE");
    unsetenv("APEX_PROFILE");
    apex_env_refresh();
    remove(path);
}

/* The CPU part measured with the real kernel: positive, finite, and more
 * tokens cost more. Kept short (2 threads, small budget). */
static void test_measure_cpu(void **st) {
    (void)st;
    apex_profile p = base();
    sched_status s = apex_profile_measure_cpu(&p, 2, 0.3, -1, 0);
    assert_int_equal(s, SCHED_OK);
    assert_true(p.n_catt >= 1);
    for (int i = 0; i < p.n_catt; i++) {
        assert_true(p.catt[i].per_token > 0 && isfinite(p.catt[i].per_token));
        assert_true(p.catt[i].c0 >= 0 && p.catt[i].per_seq >= 0);
    }
    assert_int_equal(apex_profile_validate(&p), SCHED_OK);
    assert_true(apex_t_catt(&p, 100000, 8, 2) > apex_t_catt(&p, 1000, 8, 2));
    apex_link l;
    assert_int_equal(apex_profile_measure_memcpy(&l), SCHED_OK);
    assert_true(l.bw_Bps > 1e8 && l.lat_s >= 0);
}

/* The CPU part measures the KV the context's kernel reads: bf16 (in the
 * pair layout where the kernel reads it) as well as f16, each under its
 * own cache key; a KV type that does not match kv_bytes is refused with a
 * message and leaves the profile as it was. */
static void test_measure_cpu_kv(void **st) {
    (void)st;
    apex_profile p = base();
    assert_int_equal(apex_profile_measure_cpu(&p, 1, 0.2, APEX_DTYPE_BF16, 1), SCHED_OK);
    assert_true(p.n_catt >= 1 && p.catt[0].per_token > 0 && isfinite(p.catt[0].per_token));
    assert_int_equal(apex_profile_validate(&p), SCHED_OK);
    const apex_profile before = p;
    assert_int_equal(apex_profile_measure_cpu(&p, 1, 0.2, APEX_DTYPE_F32, 0), SCHED_ERR_INVALID);
    assert_non_null(strstr(sched_last_error(), "kv_bytes 2"));
    assert_int_equal(apex_profile_measure_cpu(&p, 1, 0.2, 99, 0), SCHED_ERR_INVALID);
    assert_memory_equal(&p, &before, sizeof p);

    char dir[] = "/tmp/apex_prof_XXXXXX";
    assert_non_null(mkdtemp(dir));
    apex_profile q;
    const char *how = NULL;
    assert_int_equal(apex_profile_obtain("t4", &p.geom, 1e9, 1, APEX_DTYPE_BF16, 1, dir, &q, &how),
                     SCHED_OK);
    assert_string_equal(how, "measured, saved");
    const cpu_attn_geom cg = {p.geom.n_q_heads, p.geom.n_kv_heads, p.geom.head_dim, 16,
                              APEX_DTYPE_BF16, 1};
    assert_non_null(strstr(q.hw_key, cpu_attn_pairs_ok(&cg) ? "kv=bf16-pairs" : "kv=bf16-rows"));
    assert_int_equal(apex_profile_obtain("t4", &p.geom, 1e9, 1, APEX_DTYPE_BF16, 1, dir, &q, &how),
                     SCHED_OK);
    assert_string_equal(how, "cache");
    /* f16 is another key: measured afresh, not the bf16 file */
    assert_int_equal(apex_profile_obtain("t4", &p.geom, 1e9, 1, -1, 0, dir, &q, &how), SCHED_OK);
    assert_string_equal(how, "measured, saved");
    assert_non_null(strstr(q.hw_key, "kv=f16-rows"));
    assert_int_equal(apex_profile_obtain("t4", &p.geom, 1e9, 1, APEX_DTYPE_F32, 0, dir, &q, &how),
                     SCHED_ERR_INVALID);
    char cmd[64];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    assert_int_equal(system(cmd), 0);
}

int main(void) {
    const struct CMUnitTest t[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_bad_profiles),
        cmocka_unit_test(test_presets),
        cmocka_unit_test(test_obtain_env_and_cache),
        cmocka_unit_test(test_measure_cpu),
        cmocka_unit_test(test_measure_cpu_kv),
    };
    return cmocka_run_group_tests(t, NULL, NULL);
}
