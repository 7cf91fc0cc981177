/* test_strided_api: the exported calls of apex_strided.h. Attention through
 * the ABI equals the kernel's reference (and, in exact mode, the kernel
 * itself bit for bit); every bad descriptor gets its status and a message
 * and leaves out untouched; host KV memory (an injected mapping failure
 * included), pinning without a CUDA runtime, and the metrics file. */
#include "test_util.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "apex/apex_strided.h"
#include "cpu_attn/cpu_attn_strided.h"
#include "cpu_attn/dtype_convert.h"
#include "csrc/env.h"
#include "csrc/fault.h"

enum { D = 64, HQ = 4, HKV = 2, T = 2, S = 2, NKV = 40 };

typedef struct fixture {
    apex_strided_desc d;
    float q[S * T * HQ * D], out[S * T * HQ * D], ref[S * T * HQ * D];
    uint16_t k16[S * NKV * HKV * D], v16[S * NKV * HKV * D];
    float k32[S * NKV * HKV * D], v32[S * NKV * HKV * D];
    uint16_t mask[S * T * NKV];
} fixture;

/* ggml's layout: KV [stream][row][kv head][D]; q [stream][head][token][D];
 * out [stream][token][head][D]; a causal-looking mask per stream. */
static void fx_init(fixture *f, apex_dtype kv) {
    uint64_t seed = 7;
    memset(f, 0, sizeof *f);
    for (size_t i = 0; i < sizeof f->q / sizeof *f->q; i++) f->q[i] = test_rand_f(&seed);
    for (size_t i = 0; i < sizeof f->k32 / sizeof *f->k32; i++) {
        f->k32[i] = test_rand_f(&seed), f->v32[i] = test_rand_f(&seed);
        f->k16[i] = apex_f32_to_f16(f->k32[i]), f->v16[i] = apex_f32_to_f16(f->v32[i]);
    }
    for (int s = 0; s < S; s++)
        for (int t = 0; t < T; t++)
            for (int j = 0; j < NKV; j++) f->mask[(s * T + t) * NKV + j] = j <= NKV - T + t - s ? 0 : 0xfc00u;
    apex_strided_desc *d = &f->d;
    assert_ok(apex_strided_desc_init(d));
    const size_t es = kv == APEX_DTYPE_F16 ? 2 : 4;
    d->head_dim = D, d->n_q_heads = HQ, d->n_kv_heads = HKV, d->n_tokens = T, d->n_streams = S, d->n_kv = NKV;
    d->q = f->q, d->q_nb_tok = D * 4, d->q_nb_head = T * D * 4, d->q_nb_stream = HQ * T * D * 4;
    d->kv_dtype = kv;
    d->k = kv == APEX_DTYPE_F16 ? (const void *)f->k16 : (const void *)f->k32;
    d->v = kv == APEX_DTYPE_F16 ? (const void *)f->v16 : (const void *)f->v32;
    d->k_nb_row = d->v_nb_row = HKV * D * es, d->k_nb_head = d->v_nb_head = D * es;
    d->k_nb_stream = d->v_nb_stream = NKV * HKV * D * es;
    d->mask = f->mask, d->mask_nb_tok = NKV * 2, d->mask_nb_stream = T * NKV * 2;
    d->out = f->out, d->out_nb_head = D * 4, d->out_nb_tok = HQ * D * 4, d->out_nb_stream = T * HQ * D * 4;
    d->scale = 0.125f;
}

/* The same operands, writing into out (the kernel takes the same struct). */
static cpu_attn_strided_desc kernel_desc(const apex_strided_desc *d, float *out) {
    cpu_attn_strided_desc k = *d;
    k.out = out;
    return k;
}

static void test_desc_init(void **state) {
    (void)state;
    apex_strided_desc d;
    memset(&d, 0xab, sizeof d);
    assert_ok(apex_strided_desc_init(&d));
    assert_int_equal(d.struct_size, sizeof d);
    assert_int_equal(d.version, APEX_STRIDED_DESC_VERSION);
    assert_null(d.q);
    assert_int_equal(d.ggml_compat, 0);
    assert_status(apex_strided_desc_init(NULL), APEX_ERR_INVALID_ARG);
}

static void test_attention_matches_reference(void **state) {
    (void)state;
    static fixture f;
    const apex_dtype kvs[] = {APEX_DTYPE_F32, APEX_DTYPE_F16};
    for (int i = 0; i < 2; i++) {
        for (int softcap = 0; softcap < 2; softcap++) {
            fx_init(&f, kvs[i]);
            f.d.softcap = softcap ? 20.0f : 0.0f;
            assert_ok(apex_strided_check(&f.d));
            assert_ok(apex_strided_attention(&f.d, 2));
            cpu_attn_strided_desc k = kernel_desc(&f.d, f.ref);
            assert_int_equal(cpu_attn_strided_reference(&k), 0);
            for (size_t j = 0; j < sizeof f.out / sizeof *f.out; j++) assert_float_equal(f.out[j], f.ref[j], 2e-5);
        }
    }
    /* Exact mode where it runs: bit for bit the kernel's exact mode. */
    fx_init(&f, APEX_DTYPE_F16);
    f.d.ggml_compat = 1, f.d.ggml_n_threads = 3;
    if (apex_strided_exact_ok(D, APEX_DTYPE_F16)) {
        assert_ok(apex_strided_attention(&f.d, 2));
        cpu_attn_strided_desc k = kernel_desc(&f.d, f.ref);
        assert_int_equal(cpu_attn_strided(&k, 2), 0);
        assert_memory_equal(f.out, f.ref, sizeof f.out);
    } else {
        assert_status(apex_strided_attention(&f.d, 2), APEX_ERR_UNSUPPORTED);
    }
}

static void test_exact_ok_and_isa(void **state) {
    (void)state;
    assert_int_equal(apex_strided_exact_ok(128, APEX_DTYPE_F16), cpu_attn_strided_compat_ok(128, APEX_DTYPE_F16));
    assert_int_equal(apex_strided_exact_ok(80, APEX_DTYPE_F16), 0);
    assert_int_equal(apex_strided_exact_ok(128, APEX_DTYPE_F32), 0);
    const char *isa = apex_strided_isa();
    assert_true(strcmp(isa, "avx512") == 0 || strcmp(isa, "scalar") == 0);
}

/* Each bad descriptor: its status, a message naming the call, out as it was. */
static void expect_bad(fixture *f, apex_status want, int32_t n_threads) {
    for (size_t j = 0; j < sizeof f->out / sizeof *f->out; j++) f->out[j] = 42.0f;
    assert_status(apex_strided_check(&f->d), want);
    assert_non_null(strstr(apex_last_error(), "apex_strided_check"));
    assert_status(apex_strided_attention(&f->d, n_threads), want);
    assert_non_null(strstr(apex_last_error(), "apex_strided_attention"));
    for (size_t j = 0; j < sizeof f->out / sizeof *f->out; j++) assert_true(f->out[j] == 42.0f);
}

static void test_rejects(void **state) {
    (void)state;
    static fixture f;
    assert_status(apex_strided_check(NULL), APEX_ERR_INVALID_ARG);
    assert_status(apex_strided_attention(NULL, 1), APEX_ERR_INVALID_ARG);
#define BAD(field_change, want)        \
    do {                               \
        fx_init(&f, APEX_DTYPE_F16);   \
        field_change;                  \
        expect_bad(&f, (want), 1);     \
    } while (0)
    BAD(f.d.struct_size = 8, APEX_ERR_INVALID_ARG);
    BAD(f.d.version = APEX_STRIDED_DESC_VERSION + 1, APEX_ERR_INVALID_ARG);
    BAD(f.d.q = NULL, APEX_ERR_INVALID_ARG);
    BAD(f.d.v = NULL, APEX_ERR_INVALID_ARG);
    BAD(f.d.head_dim = 0, APEX_ERR_INVALID_ARG);
    BAD(f.d.head_dim = 513, APEX_ERR_INVALID_ARG);
    BAD(f.d.n_q_heads = 3, APEX_ERR_INVALID_ARG);
    BAD(f.d.n_kv_heads = 0, APEX_ERR_INVALID_ARG);
    BAD(f.d.n_tokens = 0, APEX_ERR_INVALID_ARG);
    BAD(f.d.n_streams = -1, APEX_ERR_INVALID_ARG);
    BAD(f.d.n_kv = -1, APEX_ERR_INVALID_ARG);
    BAD(f.d.kv_dtype = APEX_DTYPE_BF16, APEX_ERR_UNSUPPORTED);
    BAD(f.d.scale = 0.0f, APEX_ERR_INVALID_ARG);
    BAD(f.d.scale = NAN, APEX_ERR_INVALID_ARG);
    BAD(f.d.softcap = -1.0f, APEX_ERR_INVALID_ARG);
    BAD(f.d.softcap = INFINITY, APEX_ERR_INVALID_ARG);
    BAD(f.d.ggml_n_threads = -2, APEX_ERR_INVALID_ARG);
    BAD((f.d.ggml_compat = 1, f.d.head_dim = 80), APEX_ERR_UNSUPPORTED);
#undef BAD
    /* n_threads is the call's own argument: only attention checks it. */
    fx_init(&f, APEX_DTYPE_F32);
    for (size_t j = 0; j < sizeof f.out / sizeof *f.out; j++) f.out[j] = 42.0f;
    assert_status(apex_strided_attention(&f.d, -1), APEX_ERR_INVALID_ARG);
    assert_true(f.out[0] == 42.0f);
}

static void test_host_kv(void **state) {
    (void)state;
    void *p = (void *)1;
    assert_status(apex_host_kv_alloc(1 << 20, NULL), APEX_ERR_INVALID_ARG);
    assert_ok(apex_host_kv_alloc(3 << 20, &p));
    assert_non_null(p);
    assert_int_equal((uintptr_t)p % 4096, 0);
    const unsigned char *b = p;
    for (size_t i = 0; i < (3u << 20); i += 4093) assert_int_equal(b[i], 0);
    memset(p, 0x5a, 3 << 20);
    assert_int_equal(((unsigned char *)p)[(3 << 20) - 1], 0x5a);
    assert_ok(apex_host_kv_free(p, 3 << 20));
    assert_ok(apex_host_kv_free(NULL, 0));
    /* A mapping the OS refuses (injected): NO_MEMORY, a message, *out NULL. */
    fault_arm(1u << FAULT_HOST_ALLOC, 1, 0, 0);
    p = (void *)1;
    assert_status(apex_host_kv_alloc(1 << 20, &p), APEX_ERR_NO_MEMORY);
    assert_non_null(strstr(apex_last_error(), "injected"));
    assert_null(p);
    fault_disarm();
    /* The nodes it binds to: an hwloc list (or "", or why the topology is missing). */
    char nodes[64];
    assert_status(apex_host_kv_nodes(NULL, 8), APEX_ERR_INVALID_ARG);
    assert_status(apex_host_kv_nodes(nodes, 0), APEX_ERR_INVALID_ARG);
    const apex_status st = apex_host_kv_nodes(nodes, sizeof nodes);
    if (st == APEX_OK) {
        for (const char *c = nodes; *c; c++) assert_non_null(strchr("0123456789,-", *c));
    } else {
        assert_int_equal(st, APEX_ERR_INTERNAL);
        assert_true(apex_last_error()[0] != '\0');
    }
}

static void test_host_kv_pin(void **state) {
    (void)state;
    void *p = NULL;
    assert_ok(apex_host_kv_alloc(1 << 20, &p));
    assert_status(apex_host_kv_pin(NULL, 1 << 20), APEX_ERR_INVALID_ARG);
    assert_status(apex_host_kv_pin(p, 0), APEX_ERR_INVALID_ARG);
    assert_status(apex_host_kv_unpin(NULL), APEX_ERR_INVALID_ARG);
    /* No CUDA runtime in this process: not pinned, and it says why. */
    assert_status(apex_host_kv_pin(p, 1 << 20), APEX_ERR_UNSUPPORTED);
    assert_non_null(strstr(apex_last_error(), "no CUDA runtime"));
    setenv("APEX_PIN_HOST_POOL", "0", 1);
    apex_env_refresh();
    assert_status(apex_host_kv_pin(p, 1 << 20), APEX_ERR_UNSUPPORTED);
    assert_non_null(strstr(apex_last_error(), "APEX_PIN_HOST_POOL=0"));
    unsetenv("APEX_PIN_HOST_POOL");
    apex_env_refresh();
    assert_ok(apex_host_kv_free(p, 1 << 20));
}

static char *slurp(const char *path) {
    FILE *fp = fopen(path, "r");
    if (!fp) return NULL;
    static char buf[1 << 16];
    const size_t n = fread(buf, 1, sizeof buf - 1, fp);
    buf[n] = '\0';
    fclose(fp);
    return buf;
}

static void test_metrics_file(void **state) {
    (void)state;
    apex_metrics_values m;
    apex_metrics_file *f = (apex_metrics_file *)1, *g = (apex_metrics_file *)1;
    assert_status(apex_metrics_values_init(NULL, "x"), APEX_ERR_INVALID_ARG);
    assert_ok(apex_metrics_values_init(&m, "unit"));
    assert_int_equal(m.struct_size, sizeof m);
    assert_int_equal(m.kv_bytes[APEX_TIER_HOST], -1);
    /* Unset: no file, not an error. */
    unsetenv("APEX_METRICS_FILE");
    apex_env_refresh();
    assert_ok(apex_metrics_file_open("the test", &f));
    assert_null(f);
    assert_status(apex_metrics_file_open("the test", NULL), APEX_ERR_INVALID_ARG);
    assert_status(apex_metrics_file_open(NULL, &f), APEX_ERR_INVALID_ARG);
    char path[128];
    snprintf(path, sizeof path, "/tmp/apex_test_strided_metrics_%d.prom", (int)getpid());
    setenv("APEX_METRICS_FILE", path, 1);
    apex_env_refresh();
    assert_ok(apex_metrics_file_open("the test", &f));
    assert_non_null(f);
    /* One writer per process: a second gets none (and a line on stderr). */
    assert_ok(apex_metrics_file_open("a second user", &g));
    assert_null(g);
    m.attention_calls = 1234;
    m.kv_bytes[APEX_TIER_HOST] = 4096;
    assert_status(apex_metrics_file_write(NULL, &m, 1), APEX_ERR_INVALID_ARG);
    assert_status(apex_metrics_file_write(f, NULL, 1), APEX_ERR_INVALID_ARG);
    apex_metrics_values bad = m;
    bad.struct_size = 4;
    assert_status(apex_metrics_file_write(f, &bad, 1), APEX_ERR_INVALID_ARG);
    bad = m;
    bad.engine = "";
    assert_status(apex_metrics_file_write(f, &bad, 1), APEX_ERR_INVALID_ARG);
    assert_null(slurp(path)); /* nothing written by the refused calls */
    assert_ok(apex_metrics_file_write(f, &m, 1));
    const char *text = slurp(path);
    assert_non_null(text);
    assert_non_null(strstr(text, "apex_attention_calls_total{engine=\"unit\"} 1234"));
    assert_non_null(strstr(text, "apex_kv_bytes{engine=\"unit\",tier=\"host\"} 4096"));
    assert_null(strstr(text, "tier=\"gpu\"} -1"));
    assert_ok(apex_metrics_file_close(f));
    assert_ok(apex_metrics_file_close(NULL));
    /* Given back: the next user takes it. */
    assert_ok(apex_metrics_file_open("a second user", &g));
    assert_non_null(g);
    assert_ok(apex_metrics_file_close(g));
    unsetenv("APEX_METRICS_FILE");
    apex_env_refresh();
    remove(path);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_desc_init),
        cmocka_unit_test(test_attention_matches_reference),
        cmocka_unit_test(test_exact_ok_and_isa),
        cmocka_unit_test(test_rejects),
        cmocka_unit_test(test_host_kv),
        cmocka_unit_test(test_host_kv_pin),
        cmocka_unit_test(test_metrics_file),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
