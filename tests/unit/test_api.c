/*
 * test_api.c - the ABI end to end: attention through apex_* equals a naive
 * softmax attention computed here from the K/V the test wrote; and every
 * kind of bad input returns a clear status with a message and leaves the
 * context exactly as it was.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "cpu_attn/dtype_convert.h"
#include "apex/apex_paged.h"
#include "csrc/env.h"
#include "test_util.h"

enum { L = 2, HQ = 8, HK = 2, D = 64, BT = 16, SLOTS = 6, MAXB = 4, MAXLEN = 300 };

static apex_config small_config(void) {
    apex_config c;
    assert_ok(apex_config_init(&c));
    c.n_layers = L;
    c.n_q_heads = HQ;
    c.n_kv_heads = HK;
    c.head_dim = D;
    c.kv_dtype = APEX_DTYPE_F32;
    c.act_dtype = APEX_DTYPE_F32;
    c.block_tokens = BT;
    c.host_blocks = 30; /* the fixture uses 26 */
    c.max_seqs = SLOTS;
    c.max_batch = MAXB;
    c.max_seq_len = MAXLEN;
    c.n_threads = 2;
    return c;
}

/* The test's own copy of what it wrote: kv[seq][layer][pos][k|v][HK*D]. */
typedef struct {
    apex_context *ctx;
    float *kv;
    int len[SLOTS];
} fixture;

static float *kv_at(fixture *f, int s, int l, int pos, int which) {
    return f->kv + ((((size_t)s * L + l) * MAXLEN + pos) * 2 + which) * HK * D;
}

static void grow(fixture *f, int s, int n, uint64_t *rng) {
    int32_t first;
    assert_ok(apex_seq_reserve(f->ctx, s, n, &first));
    assert_int_equal(first, f->len[s]);
    for (int p = first; p < first + n; p++) {
        for (int l = 0; l < L; l++) {
            float *k = kv_at(f, s, l, p, 0), *v = kv_at(f, s, l, p, 1);
            for (int i = 0; i < HK * D; i++) {
                k[i] = test_rand_f(rng);
                v[i] = test_rand_f(rng);
            }
            int32_t seq = s, pos = p;
            assert_ok(apex_kv_write(f->ctx, l, 1, &seq, &pos, k, v, APEX_DTYPE_F32));
        }
    }
    f->len[s] += n;
}

static void setup_fixture(fixture *f) {
    memset(f, 0, sizeof *f);
    apex_config c = small_config();
    assert_ok(apex_context_create(&c, &f->ctx));
    f->kv = calloc((size_t)SLOTS * L * MAXLEN * 2 * HK * D, sizeof(float));
    uint64_t rng = 7;
    static const int lens[] = {1, 17, 100, 250};
    for (int s = 0; s < 4; s++) {
        assert_ok(apex_seq_add(f->ctx, s, APEX_TIER_AUTO));
        grow(f, s, lens[s], &rng);
    }
}

static void teardown_fixture(fixture *f) {
    apex_context_destroy(f->ctx);
    free(f->kv);
}

/* Naive decode attention of one query head of sequence s. */
static void naive(fixture *f, int s, int l, int h, const float *q, float scale, float softcap,
                  int window, double *out) {
    int hk = h / (HQ / HK), n = f->len[s];
    int start = window && n > window ? n - window : 0;
    test_naive_attention(q, D, kv_at(f, s, l, 0, 0) + hk * D, kv_at(f, s, l, 0, 1) + hk * D,
                         2 * HK * D, start, n, scale, softcap, out);
}

/* Attention of n sequences against the naive one, within tol; q_bf16: q
 * drawn bf16-exact (for bf16 KV, whose kernel rounds q to bf16). */
static void check_attention_tol(fixture *f, int n, const int32_t *seqs, int layer,
                                const apex_attn_opts *o, uint64_t *rng, double tol, int q_bf16) {
    float q[MAXB * HQ * D], out[MAXB * HQ * D];
    for (int i = 0; i < n * HQ * D; i++) {
        q[i] = 2.0f * test_rand_f(rng);
        if (q_bf16) q[i] = apex_bf16_to_f32(apex_f32_to_bf16(q[i]));
    }
    assert_ok(apex_attention(f->ctx, layer, n, seqs, q, out, o));
    float scale = o && o->scale > 0 ? o->scale : 1.0f / sqrtf(D);
    for (int b = 0; b < n; b++)
        for (int h = 0; h < HQ; h++) {
            double want[D];
            naive(f, seqs[b], layer, h, q + (b * HQ + h) * D, scale, o ? o->softcap : 0,
                  o ? o->window : 0, want);
            for (int i = 0; i < D; i++)
                if (fabs(out[(b * HQ + h) * D + i] - want[i]) > tol)
                    fail_msg("seq %d head %d dim %d: got %g want %g", seqs[b], h, i,
                             out[(b * HQ + h) * D + i], want[i]);
        }
}

static void check_attention(fixture *f, int n, const int32_t *seqs, int layer,
                            const apex_attn_opts *o, uint64_t *rng) {
    check_attention_tol(f, n, seqs, layer, o, rng, 2e-5, 0);
}

static void test_attention_matches_naive(void **state) {
    (void)state;
    fixture f;
    setup_fixture(&f);
    uint64_t rng = 99;
    int32_t all[] = {3, 0, 2, 1};
    check_attention(&f, 4, all, 0, NULL, &rng);
    check_attention(&f, 4, all, 1, NULL, &rng);
    apex_attn_opts o = apex_attn_opts_default(f.ctx);
    o.window = 40;
    o.softcap = 5.0f;
    o.scale = 0.3f;
    check_attention(&f, 4, all, 1, &o, &rng);
    /* Grow, fork and diverge, then attend again. */
    grow(&f, 3, 5, &rng);
    assert_ok(apex_seq_fork(f.ctx, 2, 4));
    memcpy(kv_at(&f, 4, 0, 0, 0), kv_at(&f, 2, 0, 0, 0),
           sizeof(float) * (size_t)L * MAXLEN * 2 * HK * D);
    f.len[4] = f.len[2];
    grow(&f, 4, 3, &rng);
    grow(&f, 2, 1, &rng);
    int32_t some[] = {4, 2, 3};
    check_attention(&f, 3, some, 0, NULL, &rng);
    apex_stats st;
    assert_ok(apex_stats_get(f.ctx, &st));
    assert_int_equal(st.attention_calls, 4);
    assert_int_equal(st.seqs_attended_host, 15);
    assert_int_equal(st.seqs_attended_device, 0);
    assert_int_equal(st.seqs_active, 5);
    assert_int_equal(st.errors, 0);
    assert_true(st.attention_seconds > 0);
    teardown_fixture(&f);
}

/* bf16 KV in host mode: the CPU pair layout where the kernel reads it
 * (APEX_KV_LAYOUT unset), the row layout with APEX_KV_LAYOUT=rows. In both,
 * what apex_kv_read returns is exactly what was written (values chosen
 * bf16-exact), a fork's copy reads the same, and attention equals the naive
 * one over those values within the bf16 kernel's rounding of P (2^-9
 * max|V|; q is bf16-exact too). */
static void test_bf16_layouts(void **state) {
    (void)state;
    const int isa_pairs = !strcmp(apex_cpu_isa(), "avx512bf16") || !strcmp(apex_cpu_isa(), "amxbf16");
    for (int rows = 0; rows < 2; rows++) {
        if (rows) setenv("APEX_KV_LAYOUT", "rows", 1);
        else unsetenv("APEX_KV_LAYOUT");
        apex_env_refresh();
        fixture f;
        memset(&f, 0, sizeof f);
        apex_config c = small_config();
        c.kv_dtype = APEX_DTYPE_BF16;
        c.device = APEX_DEVICE_NONE;
        assert_ok(apex_context_create(&c, &f.ctx));
        assert_int_equal(apex_context_kv_layout(f.ctx), !rows && isa_pairs ? APEX_KV_PAIRS : APEX_KV_ROWS);
        f.kv = calloc((size_t)SLOTS * L * MAXLEN * 2 * HK * D, sizeof(float));
        uint64_t rng = 5;
        static const int lens[] = {1, 18, 61, 200};
        for (int s = 0; s < 4; s++) {
            assert_ok(apex_seq_add(f.ctx, s, APEX_TIER_AUTO));
            int32_t first;
            assert_ok(apex_seq_reserve(f.ctx, s, lens[s], &first));
            for (int p = 0; p < lens[s]; p++)
                for (int l = 0; l < L; l++) {
                    float *k = kv_at(&f, s, l, p, 0), *v = kv_at(&f, s, l, p, 1);
                    for (int i = 0; i < HK * D; i++) {
                        k[i] = apex_bf16_to_f32(apex_f32_to_bf16(test_rand_f(&rng)));
                        v[i] = apex_bf16_to_f32(apex_f32_to_bf16(test_rand_f(&rng)));
                    }
                    int32_t seq = s, pos = p;
                    assert_ok(apex_kv_write(f.ctx, l, 1, &seq, &pos, k, v, APEX_DTYPE_F32));
                }
            f.len[s] = lens[s];
        }
        assert_ok(apex_seq_fork(f.ctx, 3, 4));
        memcpy(kv_at(&f, 4, 0, 0, 0), kv_at(&f, 3, 0, 0, 0),
               sizeof(float) * (size_t)L * MAXLEN * 2 * HK * D);
        f.len[4] = f.len[3];
        for (int s = 0; s < 5; s++)
            for (int l = 0; l < L; l++)
                for (int p = 0; p < f.len[s]; p += 7) {
                    float k[HK * D], v[HK * D];
                    int32_t seq = s, pos = p;
                    assert_ok(apex_kv_read(f.ctx, l, 1, &seq, &pos, k, v, APEX_DTYPE_F32));
                    assert_memory_equal(k, kv_at(&f, s, l, p, 0), sizeof k);
                    assert_memory_equal(v, kv_at(&f, s, l, p, 1), sizeof v);
                }
        int32_t seqs[MAXB] = {3, 0, 4, 2};
        for (int l = 0; l < L; l++)
            check_attention_tol(&f, MAXB, seqs, l, NULL, &rng, 1.0 / 512 + 2e-5, 1);
        teardown_fixture(&f);
    }
    unsetenv("APEX_KV_LAYOUT");
    apex_env_refresh();
}

/* ---------------------------------------------------------- bad input */

/* Everything observable about a context, to prove a failed call changed
 * nothing. */
typedef struct {
    apex_stats stats;
    apex_seq_info info[SLOTS];
    apex_status info_st[SLOTS];
    float k[L][8][HK * D];
} snapshot;

static void take(fixture *f, snapshot *s) {
    memset(s, 0, sizeof *s);
    assert_ok(apex_stats_get(f->ctx, &s->stats));
    s->stats.errors = 0;
    s->stats.attention_seconds = s->stats.kv_write_seconds = 0;
    for (int i = 0; i < SLOTS; i++) s->info_st[i] = apex_seq_get_info(f->ctx, i, &s->info[i]);
    int32_t seqs[8] = {3, 3, 3, 3, 2, 2, 1, 0}, pos[8] = {0, 15, 16, 249, 99, 0, 16, 0};
    float v[8 * HK * D];
    for (int l = 0; l < L; l++) assert_ok(apex_kv_read(f->ctx, l, 4, seqs, pos, s->k[l], v, APEX_DTYPE_F32));
    for (int l = 0; l < L; l++) assert_ok(apex_kv_read(f->ctx, l, 4, seqs + 4, pos + 4, s->k[l][4], v, APEX_DTYPE_F32));
}

static void assert_unchanged(fixture *f, const snapshot *before) {
    snapshot now;
    take(f, &now);
    assert_memory_equal(&now, before, sizeof now);
}

/* The message of the last BAD call (taking a snapshot overwrites
 * apex_last_error with the lookups of free slots). */
static char bad_msg[512];

/* Runs a call that must fail with want, then checks nothing changed. */
#define BAD(f, call, want)                                      \
    do {                                                        \
        snapshot s_;                                            \
        take((f), &s_);                                         \
        assert_status((call), (want));                          \
        snprintf(bad_msg, sizeof bad_msg, "%s", apex_last_error()); \
        assert_unchanged((f), &s_);                             \
    } while (0)

static void test_bad_config(void **state) {
    (void)state;
    apex_context *ctx = (apex_context *)0x1;
    apex_config c = small_config();
    assert_status(apex_context_create(NULL, &ctx), APEX_ERR_INVALID_ARG);
    assert_null(ctx);
    assert_status(apex_context_create(&c, NULL), APEX_ERR_INVALID_ARG);
    c.n_q_heads = 7; /* not a multiple of 2 KV heads */
    assert_status(apex_context_create(&c, &ctx), APEX_ERR_INVALID_ARG);
    assert_non_null(strstr(apex_last_error(), "n_q_heads"));
    c = small_config();
    c.head_dim = 100;
    assert_status(apex_context_create(&c, &ctx), APEX_ERR_UNSUPPORTED);
    assert_non_null(strstr(apex_last_error(), "head_dim"));
    c = small_config();
    c.block_tokens = 12;
    assert_status(apex_context_create(&c, &ctx), APEX_ERR_UNSUPPORTED);
    c = small_config();
    c.kv_dtype = (apex_dtype)9;
    assert_status(apex_context_create(&c, &ctx), APEX_ERR_INVALID_ARG);
    c = small_config();
    c.max_batch = SLOTS + 1;
    assert_status(apex_context_create(&c, &ctx), APEX_ERR_INVALID_ARG);
    c = small_config();
    c.host_blocks = -5;
    assert_status(apex_context_create(&c, &ctx), APEX_ERR_INVALID_ARG);
    c = small_config();
    c.n_layers = 0;
    assert_status(apex_context_create(&c, &ctx), APEX_ERR_INVALID_ARG);
    c = small_config();
    c.cpu_set = "not-a-list";
    assert_status(apex_context_create(&c, &ctx), APEX_ERR_INVALID_ARG);
    assert_non_null(strstr(apex_last_error(), "cpu_set"));
    c = small_config();
    c.cpu_set = "100000";
    assert_status(apex_context_create(&c, &ctx), APEX_ERR_INVALID_ARG);
    /* Allocation failure: more host KV than the address space holds. */
    c = small_config();
    c.n_layers = 4096;
    c.head_dim = 256;
    c.n_kv_heads = 64;
    c.n_q_heads = 64;
    c.block_tokens = 256;
    c.host_blocks = INT32_MAX;
    assert_status(apex_context_create(&c, &ctx), APEX_ERR_NO_MEMORY);
    assert_null(ctx);
    /* Malformed environment. */
    setenv("APEX_THREADS", "many", 1);
    assert_status(apex_config_init(&c), APEX_ERR_INVALID_ARG);
    assert_non_null(strstr(apex_last_error(), "APEX_THREADS"));
    unsetenv("APEX_THREADS");
    setenv("APEX_MAX_SEQS", "12", 1);
    assert_ok(apex_config_init(&c));
    assert_int_equal(c.max_seqs, 12);
    unsetenv("APEX_MAX_SEQS");
    assert_ok(apex_context_destroy(NULL));
}

static void test_bad_sequences(void **state) {
    (void)state;
    fixture f;
    setup_fixture(&f);
    BAD(&f, apex_seq_add(f.ctx, 0, APEX_TIER_AUTO), APEX_ERR_SEQ_EXISTS);
    BAD(&f, apex_seq_add(f.ctx, -1, APEX_TIER_AUTO), APEX_ERR_UNKNOWN_SEQ);
    BAD(&f, apex_seq_add(f.ctx, SLOTS, APEX_TIER_AUTO), APEX_ERR_UNKNOWN_SEQ);
    BAD(&f, apex_seq_add(f.ctx, 5, (apex_tier)7), APEX_ERR_INVALID_ARG);
    BAD(&f, apex_seq_add(f.ctx, 5, APEX_TIER_DEVICE), APEX_ERR_UNSUPPORTED); /* host mode */
    BAD(&f, apex_seq_reserve(f.ctx, 5, 1, NULL), APEX_ERR_UNKNOWN_SEQ);
    BAD(&f, apex_seq_reserve(f.ctx, 0, -1, NULL), APEX_ERR_INVALID_ARG);
    BAD(&f, apex_seq_reserve(f.ctx, 3, MAXLEN, NULL), APEX_ERR_OUT_OF_RANGE);
    BAD(&f, apex_seq_reserve(f.ctx, 2, 100, NULL), APEX_ERR_OUT_OF_BLOCKS);
    BAD(&f, apex_seq_fork(f.ctx, 5, 4), APEX_ERR_UNKNOWN_SEQ);
    BAD(&f, apex_seq_fork(f.ctx, 0, 1), APEX_ERR_SEQ_EXISTS);
    BAD(&f, apex_seq_fork(f.ctx, 0, 99), APEX_ERR_UNKNOWN_SEQ);
    BAD(&f, apex_seq_free(f.ctx, 5), APEX_ERR_UNKNOWN_SEQ);
    BAD(&f, apex_seq_get_info(f.ctx, 0, NULL), APEX_ERR_INVALID_ARG);
    BAD(&f, apex_seq_add(NULL, 0, APEX_TIER_AUTO), APEX_ERR_INVALID_ARG);
    BAD(&f, apex_stats_get(f.ctx, NULL), APEX_ERR_INVALID_ARG);
    apex_stats st;
    assert_ok(apex_stats_get(f.ctx, &st));
    assert_true(st.errors >= 10);
    teardown_fixture(&f);
}

static void test_bad_kv_write(void **state) {
    (void)state;
    fixture f;
    setup_fixture(&f);
    float k[MAXB * 2 * HK * D], v[MAXB * 2 * HK * D];
    for (int i = 0; i < MAXB * 2 * HK * D; i++) k[i] = v[i] = 0.5f;
    int32_t seqs[MAXB + 1] = {0, 1, 2, 3, 3}, pos[MAXB + 1] = {0, 1, 2, 3, 4};
    BAD(&f, apex_kv_write(f.ctx, L, 1, seqs, pos, k, v, APEX_DTYPE_F32), APEX_ERR_OUT_OF_RANGE);
    BAD(&f, apex_kv_write(f.ctx, -1, 1, seqs, pos, k, v, APEX_DTYPE_F32), APEX_ERR_OUT_OF_RANGE);
    BAD(&f, apex_kv_write(f.ctx, 0, MAXB + 1, seqs, pos, k, v, APEX_DTYPE_F32),
        APEX_ERR_OUT_OF_RANGE);
    BAD(&f, apex_kv_write(f.ctx, 0, 1, NULL, pos, k, v, APEX_DTYPE_F32), APEX_ERR_INVALID_ARG);
    BAD(&f, apex_kv_write(f.ctx, 0, 1, seqs, pos, NULL, v, APEX_DTYPE_F32), APEX_ERR_INVALID_ARG);
    BAD(&f, apex_kv_write(f.ctx, 0, 1, seqs, pos, k, v, (apex_dtype)3), APEX_ERR_INVALID_ARG);
    /* Position 1 of sequence 0 (len 1) is not reserved; row 0 is fine. */
    int32_t p2[2] = {0, 1}, s2[2] = {1, 0};
    BAD(&f, apex_kv_write(f.ctx, 0, 2, s2, p2, k, v, APEX_DTYPE_F32), APEX_ERR_OUT_OF_RANGE);
    int32_t neg = -1;
    BAD(&f, apex_kv_write(f.ctx, 0, 1, seqs, &neg, k, v, APEX_DTYPE_F32), APEX_ERR_OUT_OF_RANGE);
    int32_t ghost = 5;
    BAD(&f, apex_kv_write(f.ctx, 0, 1, &ghost, pos, k, v, APEX_DTYPE_F32), APEX_ERR_UNKNOWN_SEQ);
    /* A NaN in the last row's V: nothing of the batch is written. */
    v[4 * HK * D - 1] = NAN;
    BAD(&f, apex_kv_write(f.ctx, 0, 4, seqs, pos, k, v, APEX_DTYPE_F32), APEX_ERR_INVALID_ARG);
    v[4 * HK * D - 1] = 0.5f;
    k[HK * D] = INFINITY;
    BAD(&f, apex_kv_write(f.ctx, 0, 4, seqs, pos, k, v, APEX_DTYPE_F32), APEX_ERR_INVALID_ARG);
    k[HK * D] = 0.5f;
    /* Writing into a block shared after a fork is refused. */
    assert_ok(apex_seq_fork(f.ctx, 3, 4));
    int32_t s4 = 4, p4 = 10;
    BAD(&f, apex_kv_write(f.ctx, 0, 1, &s4, &p4, k, v, APEX_DTYPE_F32), APEX_ERR_INVALID_ARG);
    assert_non_null(strstr(bad_msg, "shared"));
    teardown_fixture(&f);
}

static void test_bad_attention(void **state) {
    (void)state;
    fixture f;
    setup_fixture(&f);
    float q[(MAXB + 1) * HQ * D], out[(MAXB + 1) * HQ * D];
    for (int i = 0; i < (MAXB + 1) * HQ * D; i++) q[i] = 0.25f;
    int32_t seqs[MAXB + 1] = {0, 1, 2, 3, 0};
    BAD(&f, apex_attention(f.ctx, L, 1, seqs, q, out, NULL), APEX_ERR_OUT_OF_RANGE);
    BAD(&f, apex_attention(f.ctx, 0, -1, seqs, q, out, NULL), APEX_ERR_OUT_OF_RANGE);
    BAD(&f, apex_attention(f.ctx, 0, MAXB + 1, seqs, q, out, NULL), APEX_ERR_OUT_OF_RANGE);
    BAD(&f, apex_attention(f.ctx, 0, 1, NULL, q, out, NULL), APEX_ERR_INVALID_ARG);
    BAD(&f, apex_attention(f.ctx, 0, 1, seqs, NULL, out, NULL), APEX_ERR_INVALID_ARG);
    BAD(&f, apex_attention(f.ctx, 0, 1, seqs, q, NULL, NULL), APEX_ERR_INVALID_ARG);
    BAD(&f, apex_attention(NULL, 0, 1, seqs, q, out, NULL), APEX_ERR_INVALID_ARG);
    apex_attn_opts o = apex_attn_opts_default(f.ctx);
    o.scale = -1;
    BAD(&f, apex_attention(f.ctx, 0, 1, seqs, q, out, &o), APEX_ERR_INVALID_ARG);
    o = apex_attn_opts_default(f.ctx);
    o.softcap = NAN;
    BAD(&f, apex_attention(f.ctx, 0, 1, seqs, q, out, &o), APEX_ERR_INVALID_ARG);
    o = apex_attn_opts_default(f.ctx);
    o.window = -3;
    BAD(&f, apex_attention(f.ctx, 0, 1, seqs, q, out, &o), APEX_ERR_INVALID_ARG);
    o = apex_attn_opts_default(f.ctx);
    o.q_dtype = (apex_dtype)5;
    BAD(&f, apex_attention(f.ctx, 0, 1, seqs, q, out, &o), APEX_ERR_INVALID_ARG);
    int32_t ghost[2] = {1, 5};
    BAD(&f, apex_attention(f.ctx, 0, 2, ghost, q, out, NULL), APEX_ERR_UNKNOWN_SEQ);
    /* A batch names distinct sequences. */
    int32_t twice[3] = {2, 1, 2};
    BAD(&f, apex_attention(f.ctx, 0, 3, twice, q, out, NULL), APEX_ERR_INVALID_ARG);
    assert_non_null(strstr(bad_msg, "listed twice"));
    /* An empty sequence has nothing to attend. */
    assert_ok(apex_seq_add(f.ctx, 5, APEX_TIER_HOST));
    int32_t empty[1] = {5};
    BAD(&f, apex_attention(f.ctx, 0, 1, empty, q, out, NULL), APEX_ERR_OUT_OF_RANGE);
    /* NaN in q: rejected before any work, out untouched. */
    for (int i = 0; i < (MAXB + 1) * HQ * D; i++) out[i] = 7.0f;
    q[3 * HQ * D + 5] = NAN;
    BAD(&f, apex_attention(f.ctx, 0, 4, seqs, q, out, NULL), APEX_ERR_INVALID_ARG);
    assert_non_null(strstr(bad_msg, "sequence 3"));
    for (int i = 0; i < (MAXB + 1) * HQ * D; i++) assert_true(out[i] == 7.0f);
    /* The same q in fp16: an fp16 Inf is caught too. */
    uint16_t qh[HQ * D];
    for (int i = 0; i < HQ * D; i++) qh[i] = apex_f32_to_f16(0.1f);
    qh[7] = 0x7c00;
    o = apex_attn_opts_default(f.ctx);
    o.q_dtype = APEX_DTYPE_F16;
    BAD(&f, apex_attention(f.ctx, 0, 1, seqs, qh, out, &o), APEX_ERR_INVALID_ARG);
    teardown_fixture(&f);
}

/* n = 0 means one thing everywhere: an empty batch, APEX_OK, nothing done,
 * NULL arrays allowed; the layer and options are still checked. */
static void test_empty_batches(void **state) {
    (void)state;
    fixture f;
    setup_fixture(&f);
    apex_stats st0, st1;
    assert_ok(apex_stats_get(f.ctx, &st0));
    snapshot s;
    take(&f, &s);
    assert_ok(apex_attention(f.ctx, 0, 0, NULL, NULL, NULL, NULL));
    assert_ok(apex_kv_write(f.ctx, 1, 0, NULL, NULL, NULL, NULL, APEX_DTYPE_F32));
    assert_ok(apex_kv_read(f.ctx, 1, 0, NULL, NULL, NULL, NULL, APEX_DTYPE_F32));
    assert_unchanged(&f, &s);
    assert_ok(apex_stats_get(f.ctx, &st1));
    /* Only the snapshots' lookups of the free slots 4 and 5 failed. */
    assert_int_equal(st1.errors, st0.errors + 2 * 2);
    assert_int_equal(st1.attention_calls, st0.attention_calls);
    assert_int_equal(st1.kv_rows_written, st0.kv_rows_written);
    BAD(&f, apex_attention(f.ctx, L, 0, NULL, NULL, NULL, NULL), APEX_ERR_OUT_OF_RANGE);
    BAD(&f, apex_kv_write(f.ctx, -1, 0, NULL, NULL, NULL, NULL, APEX_DTYPE_F32),
        APEX_ERR_OUT_OF_RANGE);
    apex_attn_opts o = apex_attn_opts_default(f.ctx);
    o.window = -1;
    BAD(&f, apex_attention(f.ctx, 0, 0, NULL, NULL, NULL, &o), APEX_ERR_INVALID_ARG);
    teardown_fixture(&f);
}

/* stats.errors counts every failed call on a context, queries included. */
static void test_errors_counted(void **state) {
    (void)state;
    fixture f;
    setup_fixture(&f);
    apex_stats st;
    assert_ok(apex_stats_reset(f.ctx));
    int32_t seq = 5, pos = 0;
    float k[HK * D], v[HK * D];
    apex_seq_info info;
    assert_status(apex_kv_read(f.ctx, 0, 1, &seq, &pos, k, v, APEX_DTYPE_F32), APEX_ERR_UNKNOWN_SEQ);
    assert_status(apex_seq_get_info(f.ctx, 5, &info), APEX_ERR_UNKNOWN_SEQ);
    assert_status(apex_seq_get_info(f.ctx, 0, NULL), APEX_ERR_INVALID_ARG);
    assert_status(apex_stats_get(f.ctx, NULL), APEX_ERR_INVALID_ARG);
    assert_status(apex_context_config(f.ctx, NULL), APEX_ERR_INVALID_ARG);
    assert_ok(apex_stats_get(f.ctx, &st));
    assert_int_equal(st.errors, 5);
    teardown_fixture(&f);
}

/* A host pool the machine cannot hold fails at once, touching nothing
 * large first (it used to fill 2^31-entry block tables, 8 GB, before the
 * mapping failed). */
static void test_huge_host_pool_fails_fast(void **state) {
    (void)state;
    apex_config c = small_config();
    c.n_layers = 2;
    c.n_kv_heads = 8;
    c.n_q_heads = 8;
    c.head_dim = 256;
    c.block_tokens = 16;
    c.host_blocks = INT32_MAX;
    struct rusage r0, r1;
    getrusage(RUSAGE_SELF, &r0);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    apex_context *ctx = (apex_context *)0x1;
    assert_status(apex_context_create(&c, &ctx), APEX_ERR_NO_MEMORY);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    getrusage(RUSAGE_SELF, &r1);
    assert_null(ctx);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    long grew_kb = r1.ru_maxrss - r0.ru_maxrss;
    if (secs > 2.0 || grew_kb > 256 * 1024)
        fail_msg("huge host pool: %.2f s, max RSS grew by %ld kB", secs, grew_kb);
}

static void test_version_and_isa(void **state) {
    (void)state;
    assert_int_equal(apex_abi_version(), APEX_ABI_VERSION);
    assert_string_equal(apex_version(), APEX_VERSION_STRING);
    const char *isa = apex_cpu_isa();
    assert_true(!strcmp(isa, "amxbf16") || !strcmp(isa, "avx512bf16") || !strcmp(isa, "avx512") || !strcmp(isa, "avx2") ||
                !strcmp(isa, "scalar"));
    assert_string_equal(apex_status_name(APEX_ERR_OUT_OF_BLOCKS), "APEX_ERR_OUT_OF_BLOCKS");
    apex_config c = small_config();
    c.device_blocks = 10; /* no GPU tier here: host mode, device tier empty */
    apex_context *ctx;
    assert_ok(apex_context_create(&c, &ctx));
    assert_true(apex_context_host_mode(ctx));
    apex_config got;
    assert_ok(apex_context_config(ctx, &got));
    assert_int_equal(got.device_blocks, 0);
    assert_int_equal(got.n_threads, 2);
    apex_context_destroy(ctx);
}

/* apex_limits_get is the list apex_context_create checks against: every
 * listed head_dim and block size is accepted, a value between them is
 * refused with a message naming the list. */
static void test_limits(void **state) {
    (void)state;
    assert_int_equal(apex_limits_get(NULL), APEX_ERR_INVALID_ARG);
    apex_limits l;
    assert_ok(apex_limits_get(&l));
    assert_int_equal(l.kv_dtypes, (1u << APEX_DTYPE_F32) | (1u << APEX_DTYPE_F16) |
                                      (1u << APEX_DTYPE_BF16));
    assert_int_equal(l.host_kv_align, APEX_PAGED_HOST_KV_ALIGN);
    int nd = 0, nb = 0;
    for (; nd < 8 && l.head_dims[nd]; nd++) {
        apex_config c = small_config();
        c.head_dim = l.head_dims[nd];
        apex_context *ctx;
        assert_ok(apex_context_create(&c, &ctx));
        apex_context_destroy(ctx);
        if (nd) assert_true(l.head_dims[nd] > l.head_dims[nd - 1]);
    }
    for (; nb < 8 && l.block_tokens[nb]; nb++) {
        apex_config c = small_config();
        c.block_tokens = l.block_tokens[nb];
        apex_context *ctx;
        assert_ok(apex_context_create(&c, &ctx));
        apex_context_destroy(ctx);
    }
    assert_true(nd >= 1 && nd < 8 && nb >= 1 && nb < 8);
    apex_config c = small_config();
    c.head_dim = l.head_dims[0] + 8; /* between two listed values */
    apex_context *ctx = (apex_context *)&c;
    assert_int_equal(apex_context_create(&c, &ctx), APEX_ERR_UNSUPPORTED);
    assert_null(ctx);
    char want[32];
    snprintf(want, sizeof want, "(%d, %d", l.head_dims[0], l.head_dims[1]);
    assert_non_null(strstr(apex_last_error(), want));
    c = small_config();
    c.max_seq_len = l.max_seq_len + 1;
    assert_int_equal(apex_context_create(&c, &ctx), APEX_ERR_INVALID_ARG);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_version_and_isa),
        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_attention_matches_naive),
        cmocka_unit_test(test_bf16_layouts),
        cmocka_unit_test(test_bad_config),
        cmocka_unit_test(test_bad_sequences),
        cmocka_unit_test(test_bad_kv_write),
        cmocka_unit_test(test_bad_attention),
        cmocka_unit_test(test_empty_batches),
        cmocka_unit_test(test_errors_counted),
        cmocka_unit_test(test_huge_host_pool_fails_fast),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
