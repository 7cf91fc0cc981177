/* test_env.c - the core's environment snapshot (csrc/env.h): one table,
 * values as of the last snapshot, apex_config_init retaking it, old values
 * staying valid, the typo guard warning once per unknown name, readers
 * racing a refresh. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "test_util.h"
#include "csrc/env.h"

static void test_table(void **state) {
    (void)state;
    for (int i = 0; i < APEX_ENV_N; i++) {
        const apex_env_info *v = apex_env_info_at(i);
        assert_non_null(v);
        assert_int_equal(strncmp(v->name, "APEX_", 5), 0);
        assert_true(v->type[0] && v->doc[0] && v->def);
        assert_true(apex_env_known(v->name));
        for (int j = 0; j < i; j++) assert_string_not_equal(apex_env_info_at(j)->name, v->name);
    }
    assert_null(apex_env_info_at(APEX_ENV_N));
    assert_null(apex_env_info_at(-1));
    assert_string_equal(apex_env_info_at(APEX_ENV_ISA)->name, "APEX_ISA");
    assert_true(apex_env_known("APEX_GGML_EXACT")); /* the ggml backend's */
    assert_true(apex_env_known("APEX_TEST_DEVICE")); /* the tests' */
    assert_false(apex_env_known("APEX_THREDS"));
    assert_false(apex_env_known("APEX_"));
}

static void test_snapshot(void **state) {
    (void)state;
    unsetenv("APEX_MAX_SEQS");
    apex_env_refresh();
    assert_null(apex_env_get(APEX_ENV_MAX_SEQS));
    setenv("APEX_MAX_SEQS", "12", 1);
    assert_null(apex_env_get(APEX_ENV_MAX_SEQS)); /* not until a snapshot */
    apex_env_refresh();
    const char *v = apex_env_get(APEX_ENV_MAX_SEQS);
    assert_string_equal(v, "12");
    setenv("APEX_MAX_SEQS", "", 1); /* set but empty: kept as "" */
    apex_env_refresh();
    assert_string_equal(apex_env_get(APEX_ENV_MAX_SEQS), "");
    assert_string_equal(v, "12"); /* an old snapshot's value stays valid */
    /* apex_config_init takes a fresh snapshot. */
    setenv("APEX_MAX_SEQS", "7", 1);
    apex_config c;
    assert_ok(apex_config_init(&c));
    assert_int_equal(c.max_seqs, 7);
    assert_string_equal(apex_env_get(APEX_ENV_MAX_SEQS), "7");
    unsetenv("APEX_MAX_SEQS");
    apex_env_refresh();
    assert_null(apex_env_get(APEX_ENV_MAX_SEQS));
    assert_null(apex_env_get(APEX_ENV_N));
}

/* Runs a refresh with stderr captured into buf. */
static void refresh_capturing(char *buf, size_t n) {
    fflush(stderr);
    int saved = dup(2);
    FILE *f = tmpfile();
    assert_non_null(f);
    dup2(fileno(f), 2);
    apex_env_refresh();
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    rewind(f);
    size_t got = fread(buf, 1, n - 1, f);
    buf[got] = '\0';
    fclose(f);
}

static void test_typo_guard(void **state) {
    (void)state;
    char err[4096];
    setenv("APEX_THREDS", "4", 1);
    setenv("APEX_GGML_SOMETHING_NEW", "1", 1); /* another part's prefix */
    refresh_capturing(err, sizeof err);
    assert_non_null(strstr(err, "APEX_THREDS"));
    assert_null(strstr(err, "APEX_GGML_SOMETHING_NEW"));
    assert_non_null(strchr(err, '\n'));
    assert_null(strchr(strchr(err, '\n') + 1, '\n')); /* one line */
    assert_non_null(strstr(apex_env_unknown(), "APEX_THREDS"));
    /* Once per name: the next snapshot still lists it but does not warn. */
    refresh_capturing(err, sizeof err);
    assert_string_equal(err, "");
    assert_non_null(strstr(apex_env_unknown(), "APEX_THREDS"));
    /* Never a failure: configuration goes on. */
    apex_config c;
    assert_ok(apex_config_init(&c));
    unsetenv("APEX_THREDS");
    unsetenv("APEX_GGML_SOMETHING_NEW");
    apex_env_refresh();
    assert_null(strstr(apex_env_unknown(), "APEX_THREDS"));
}

static void *reader(void *arg) {
    int *bad = arg;
    for (int i = 0; i < 20000; i++) {
        const char *v = apex_env_get(APEX_ENV_TRACE_MAX_EVENTS);
        if (v && strcmp(v, "1000") != 0) (*bad)++;
    }
    return NULL;
}

/* Readers see a whole snapshot while another thread publishes new ones. */
static void test_concurrent_refresh(void **state) {
    (void)state;
    setenv("APEX_TRACE_MAX_EVENTS", "1000", 1);
    apex_env_refresh();
    pthread_t t[2];
    int bad[2] = {0, 0};
    for (int i = 0; i < 2; i++) assert_int_equal(pthread_create(&t[i], NULL, reader, &bad[i]), 0);
    for (int i = 0; i < 200; i++) apex_env_refresh();
    for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
    assert_int_equal(bad[0] + bad[1], 0);
    unsetenv("APEX_TRACE_MAX_EVENTS");
    apex_env_refresh();
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_table),
        cmocka_unit_test(test_snapshot),
        cmocka_unit_test(test_typo_guard),
        cmocka_unit_test(test_concurrent_refresh),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
