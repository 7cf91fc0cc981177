/*
 * test_fault.c - fault injection sweeps (the way SQLite's OOM tests work).
 *
 * One scenario drives a context on the emulated device through everything
 * that can fail at run time: create (device, pools, staging, pinning, the
 * CPU worker), sequences on both tiers, synchronous and asynchronous K/V
 * writes, copy-on-write after a fork, migrations both ways, decode
 * attention (sync and async), prefill, free, destroy. A shadow copy of
 * every K/V row the scenario wrote checks, after each attention and at the
 * end, that no sequence's KV was lost or corrupted.
 *
 * The sweep runs the scenario with failure point N armed, for N = 1, 2, ...
 * until a run reaches no Nth point: every failure point the scenario
 * reaches fails once (single-shot), and, in a second sweep, fails with
 * every point after it (persistent: a device that stays broken). For each
 * run: every call returns OK or an error with a message; a failed call
 * leaves what it was about as it was (a sequence's length, tier, presence);
 * attention that succeeds matches the reference over the shadow; a context
 * that cannot use its device runs in host mode. Nothing may abort: the
 * test process surviving the sweep (under ASan/UBSan and TSan in CI) is
 * that check.
 */
#include <string.h>
#include <unistd.h>

#include "csrc/fault.h"
#include "test_util.h"
#include "csrc/env.h"

enum { L = 2, HQ = 4, HK = 2, D = 64, BT = 16, NSEQ = 5, MAXB = 4, MAXLEN = 64 };
enum { ROW = HK * D, QROW = HQ * D };

static uint64_t sweep_n; /* the armed point, for messages */

typedef struct {
    apex_context *ctx;
    int host_mode;
    int active[NSEQ], len[NSEQ];
    float k[NSEQ][L][MAXLEN][ROW], v[NSEQ][L][MAXLEN][ROW];
    uint8_t known[NSEQ][L][MAXLEN]; /* the shadow holds what APEX must hold */
    uint64_t rng;
    int calls, failed, attn_checked;
} scen;

/* A failed call: a status other than OK, always with a message. */
static int failed(scen *s, apex_status st) {
    s->calls++;
    if (st == APEX_OK) return 0;
    if (apex_last_error()[0] == '\0')
        fail_msg("point %llu: status %s without a message", (unsigned long long)sweep_n,
                 apex_status_name(st));
    if (getenv("APEX_FAULT_TRACE"))
        fprintf(stderr, "  call %d: %s: %s\n", s->calls, apex_status_name(st), apex_last_error());
    s->failed++;
    return 1;
}

static void check_info(scen *s, int seq) {
    apex_seq_info info;
    apex_status st = apex_seq_get_info(s->ctx, seq, &info);
    if (!s->active[seq]) {
        assert_int_equal(st, APEX_ERR_UNKNOWN_SEQ);
        return;
    }
    assert_int_equal(st, APEX_OK);
    assert_int_equal(info.len, s->len[seq]);
}

static void add(scen *s, int seq, apex_tier tier) {
    if (!failed(s, apex_seq_add(s->ctx, seq, tier))) {
        s->active[seq] = 1;
        s->len[seq] = 0;
    }
    check_info(s, seq);
}

/* Reserves n and writes the new rows of every layer with apex_kv_write
 * (one call per layer for the whole chunk, max_batch rows at a time). A
 * failed write leaves its rows unknown until a retry succeeds. */
static void grow(scen *s, int seq, int n) {
    if (!s->active[seq]) return;
    int32_t first = -1;
    if (failed(s, apex_seq_reserve(s->ctx, seq, n, &first))) {
        check_info(s, seq); /* all or nothing */
        return;
    }
    assert_int_equal(first, s->len[seq]);
    s->len[seq] += n;
    for (int l = 0; l < L; l++)
        for (int p0 = first; p0 < first + n; p0 += MAXB) {
            int m = first + n - p0 < MAXB ? first + n - p0 : MAXB;
            int32_t seqs[MAXB], pos[MAXB];
            for (int i = 0; i < m; i++) {
                seqs[i] = seq;
                pos[i] = p0 + i;
                for (int e = 0; e < ROW; e++) {
                    s->k[seq][l][p0 + i][e] = test_rand_f(&s->rng);
                    s->v[seq][l][p0 + i][e] = test_rand_f(&s->rng);
                }
                s->known[seq][l][p0 + i] = 0;
            }
            for (int attempt = 0; attempt < 2; attempt++)
                if (!failed(s, apex_kv_write(s->ctx, l, m, seqs, pos, s->k[seq][l][p0],
                                             s->v[seq][l][p0], APEX_DTYPE_F32))) {
                    for (int i = 0; i < m; i++) s->known[seq][l][p0 + i] = 1;
                    break;
                }
        }
}

static void fork_seq(scen *s, int src, int dst) {
    if (!s->active[src]) return;
    if (!failed(s, apex_seq_fork(s->ctx, src, dst))) {
        s->active[dst] = 1;
        s->len[dst] = s->len[src];
        memcpy(s->k[dst], s->k[src], sizeof s->k[dst]);
        memcpy(s->v[dst], s->v[src], sizeof s->v[dst]);
        memcpy(s->known[dst], s->known[src], sizeof s->known[dst]);
    }
    check_info(s, dst);
}

static void migrate(scen *s, int seq, apex_tier tier) {
    if (!s->active[seq]) return;
    apex_seq_info before, after;
    assert_ok(apex_seq_get_info(s->ctx, seq, &before));
    apex_status st = apex_seq_migrate(s->ctx, seq, tier);
    if (s->host_mode) assert_int_equal(st, APEX_ERR_UNSUPPORTED);
    assert_ok(apex_seq_get_info(s->ctx, seq, &after));
    if (failed(s, st)) assert_int_equal(after.tier, before.tier); /* all or nothing */
    else assert_int_equal(after.tier, tier);
}

static void free_seq(scen *s, int seq) {
    if (!s->active[seq]) return;
    if (!failed(s, apex_seq_free(s->ctx, seq))) s->active[seq] = 0;
    check_info(s, seq);
}

/* 1 if every row of seq's layer l the attention reads is known. */
static int all_known(const scen *s, int seq, int l) {
    for (int p = 0; p < s->len[seq]; p++)
        if (!s->known[seq][l][p]) return 0;
    return 1;
}

/* out (n rows) against the naive attention over the shadow. */
static void check_out(scen *s, int n, const int32_t *seqs, int l, const float *q, const float *out) {
    for (int b = 0; b < n; b++) {
        if (!all_known(s, seqs[b], l)) continue;
        s->attn_checked++;
        for (int h = 0; h < HQ; h++) {
            double want[D];
            int g = h / (HQ / HK);
            test_naive_attention(q + (b * HQ + h) * D, D, &s->k[seqs[b]][l][0][g * D],
                                 &s->v[seqs[b]][l][0][g * D], ROW, 0, s->len[seqs[b]],
                                 1.0f / sqrtf(D), 0, want);
            for (int i = 0; i < D; i++)
                if (fabs(out[(b * HQ + h) * D + i] - want[i]) > 1e-4)
                    fail_msg("point %llu: seq %d layer %d head %d dim %d: got %g want %g "
                             "(KV corrupted)", (unsigned long long)sweep_n,
                             seqs[b], l, h, i, out[(b * HQ + h) * D + i], want[i]);
        }
    }
}

/* The active sequences with len >= 1, at most MAXB. */
static int batch(const scen *s, int32_t *seqs) {
    int n = 0;
    for (int i = 0; i < NSEQ && n < MAXB; i++)
        if (s->active[i] && s->len[i] > 0) seqs[n++] = i;
    return n;
}

static void attend(scen *s, int l) {
    int32_t seqs[MAXB];
    int n = batch(s, seqs);
    float q[MAXB * QROW], out[MAXB * QROW];
    for (int i = 0; i < n * QROW; i++) q[i] = test_rand_f(&s->rng);
    if (!failed(s, apex_attention(s->ctx, l, n, seqs, q, out, NULL))) check_out(s, n, seqs, l, q, out);
}

/* The async path: one decode token for every sequence of the batch written
 * with apex_kv_write_async, then apex_attention_async, all from device
 * buffers on an engine stream. */
static void step_async(scen *s) {
    if (s->host_mode) {
        apex_stream st;
        assert_int_equal(apex_stream_create(s->ctx, &st), APEX_ERR_UNSUPPORTED);
        return;
    }
    apex_stream stream = NULL;
    void *dq = NULL, *dout = NULL, *dk = NULL, *dv = NULL;
    if (failed(s, apex_stream_create(s->ctx, &stream))) return;
    if (failed(s, apex_device_alloc(s->ctx, MAXB * QROW * 4, &dq)) ||
        failed(s, apex_device_alloc(s->ctx, MAXB * QROW * 4, &dout)) ||
        failed(s, apex_device_alloc(s->ctx, MAXB * ROW * 4, &dk)) ||
        failed(s, apex_device_alloc(s->ctx, MAXB * ROW * 4, &dv)))
        goto out;
    int32_t seqs[MAXB], pos[MAXB];
    int n = 0;
    for (int i = 0; i < NSEQ && n < MAXB; i++) {
        if (!s->active[i] || s->len[i] >= MAXLEN) continue;
        int32_t first;
        if (failed(s, apex_seq_reserve(s->ctx, i, 1, &first))) {
            check_info(s, i);
            continue;
        }
        s->len[i]++;
        for (int l = 0; l < L; l++) s->known[i][l][first] = 0;
        seqs[n] = i;
        pos[n++] = first;
    }
    for (int l = 0; l < L && n > 0; l++) {
        float k[MAXB][ROW], v[MAXB][ROW], q[MAXB * QROW], out[MAXB * QROW];
        for (int b = 0; b < n; b++)
            for (int e = 0; e < ROW; e++) {
                k[b][e] = s->k[seqs[b]][l][pos[b]][e] = test_rand_f(&s->rng);
                v[b][e] = s->v[seqs[b]][l][pos[b]][e] = test_rand_f(&s->rng);
            }
        for (int i = 0; i < n * QROW; i++) q[i] = test_rand_f(&s->rng);
        if (failed(s, apex_memcpy_async(s->ctx, dk, k, (size_t)n * ROW * 4, stream)) ||
            failed(s, apex_memcpy_async(s->ctx, dv, v, (size_t)n * ROW * 4, stream)) ||
            failed(s, apex_kv_write_async(s->ctx, l, n, seqs, pos, dk, dv, APEX_DTYPE_F32, stream))) {
            assert_ok(apex_stream_sync(s->ctx, stream)); /* k, v are reused next layer */
            continue; /* the rows stay unknown */
        }
        for (int b = 0; b < n; b++) s->known[seqs[b]][l][pos[b]] = 1;
        if (failed(s, apex_memcpy_async(s->ctx, dq, q, (size_t)n * QROW * 4, stream)) ||
            failed(s, apex_attention_async(s->ctx, l, n, seqs, dq, dout, NULL, stream)) ||
            failed(s, apex_memcpy_async(s->ctx, out, dout, (size_t)n * QROW * 4, stream)) ||
            failed(s, apex_stream_sync(s->ctx, stream))) {
            assert_ok(apex_stream_sync(s->ctx, stream));
            continue;
        }
        check_out(s, n, seqs, l, q, out);
    }
out:
    assert_ok(apex_stream_sync(s->ctx, stream)); /* the host buffers above die here */
    apex_device_free(s->ctx, dq);
    apex_device_free(s->ctx, dout);
    apex_device_free(s->ctx, dk);
    apex_device_free(s->ctx, dv);
    assert_ok(apex_stream_destroy(s->ctx, stream));
}

/* Every known row of every live sequence, read back. */
static void verify_all(scen *s) {
    for (int seq = 0; seq < NSEQ; seq++) {
        check_info(s, seq);
        if (!s->active[seq]) continue;
        for (int l = 0; l < L; l++)
            for (int p = 0; p < s->len[seq]; p++) {
                if (!s->known[seq][l][p]) continue;
                float k[ROW], v[ROW];
                int32_t sq = seq, ps = p;
                assert_ok(apex_kv_read(s->ctx, l, 1, &sq, &ps, k, v, APEX_DTYPE_F32));
                if (memcmp(k, s->k[seq][l][p], sizeof k) || memcmp(v, s->v[seq][l][p], sizeof v))
                    fail_msg("point %llu: seq %d layer %d pos %d: KV differs from the shadow",
                             (unsigned long long)sweep_n, seq, l, p);
            }
    }
}

/* Runs the scenario; returns 0 if the context could not be created. */
static int scenario(scen *s) {
    memset(s, 0, sizeof *s);
    s->rng = 1234;
    apex_config c;
    assert_ok(apex_config_init(&c));
    c.n_layers = L;
    c.n_q_heads = HQ;
    c.n_kv_heads = HK;
    c.head_dim = D;
    c.kv_dtype = c.act_dtype = APEX_DTYPE_F32;
    c.block_tokens = BT;
    c.device_blocks = 10;
    c.host_blocks = 24;
    c.max_seqs = NSEQ;
    c.max_batch = MAXB;
    c.max_seq_len = MAXLEN;
    c.n_threads = 1;
    c.device = APEX_DEVICE_EMULATED;
    apex_context *ctx = (apex_context *)0x1;
    /* stderr into a file: a fallback to host mode is said exactly once. */
    fflush(stderr);
    FILE *log = tmpfile();
    int saved = dup(2);
    dup2(fileno(log), 2);
    apex_status st = apex_context_create(&c, &ctx);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    int said = 0;
    char line[1024];
    rewind(log);
    while (fgets(line, sizeof line, log)) said += strstr(line, "host mode") != NULL;
    fclose(log);
    if (failed(s, st)) {
        assert_null(ctx);
        return 0;
    }
    s->ctx = ctx;
    s->host_mode = apex_context_host_mode(ctx);
    if (said != s->host_mode) fail_msg("point %llu: host mode %d, said so %d times",
                                       (unsigned long long)sweep_n, s->host_mode, said);
    add(s, 0, APEX_TIER_AUTO);
    add(s, 1, APEX_TIER_HOST);
    grow(s, 0, 20);
    grow(s, 1, 9);
    attend(s, 0);
    fork_seq(s, 0, 2); /* shares 0's partial last block */
    grow(s, 2, 5);     /* copy-on-write on 0's tier */
    grow(s, 0, 3);
    migrate(s, 0, APEX_TIER_HOST);
    migrate(s, 1, APEX_TIER_DEVICE);
    attend(s, 1);
    step_async(s);
    fork_seq(s, 1, 3);
    grow(s, 3, 2); /* copy-on-write on the device tier */
    migrate(s, 2, APEX_TIER_DEVICE);
    attend(s, 0);
    free_seq(s, 0);
    step_async(s);
    fault_disarm(); /* the checking reads below are not swept */
    verify_all(s);
    attend(s, 1);
    apex_context_destroy(ctx);
    return 1;
}

static scen S; /* large: keep it off the stack */

/* Sweeps N over every failure point the scenario reaches. */
static void sweep(int persist) {
    fault_disarm();
    assert_int_equal(scenario(&S), 1); /* the clean run */
    assert_int_equal(S.failed, 0);
    assert_false(S.host_mode);
    int clean_checked = S.attn_checked;
    assert_true(clean_checked > 10);
    uint64_t points = 0, created_host_mode = 0, create_failed = 0, calls_failed = 0;
    const char *from = getenv("APEX_FAULT_SWEEP_FROM"); /* debugging: skip ahead */
    for (uint64_t n = from ? strtoull(from, NULL, 10) : 1;; n++) {
        sweep_n = n;
        fault_arm(FAULT_ALL, n, persist, 0);
        int created = scenario(&S);
        uint64_t injected = fault_injected();
        fault_disarm();
        if (injected == 0) break; /* the scenario reaches fewer than n points */
        points = n;
        create_failed += !created;
        created_host_mode += created && S.host_mode;
        calls_failed += (uint64_t)S.failed;
    }
    print_message("fault sweep (%s): %llu failure points; %llu runs failed create, %llu fell "
                  "back to host mode, %llu calls failed with a status\n",
                  persist ? "persistent" : "single-shot", (unsigned long long)points,
                  (unsigned long long)create_failed, (unsigned long long)created_host_mode,
                  (unsigned long long)calls_failed);
    assert_true(points > 100); /* the scenario does reach the device paths */
}

static void test_sweep_single(void **state) {
    (void)state;
    sweep(0);
}

static void test_sweep_persistent(void **state) {
    (void)state;
    sweep(1);
}

/* Each kind of point alone, persistent from its first check: the device
 * that refuses every copy (or launch, or event) still leaves a context that
 * answers every call with a status and keeps the host-tier KV. */
static void test_each_point_broken(void **state) {
    (void)state;
    for (int p = 0; p < FAULT_N_POINTS; p++) {
        fault_arm(1u << p, 1, 1, 0);
        scenario(&S);
        fault_disarm();
    }
}

/* A stalled CPU worker (every job sleeps 2 ms) only delays results. */
static void test_stalled_worker(void **state) {
    (void)state;
    fault_arm(0, 0, 0, 2000);
    assert_int_equal(scenario(&S), 1);
    fault_disarm();
    assert_int_equal(S.failed, 0);
    assert_true(S.attn_checked > 10);
}

/* APEX_FAULT arms the switch at the first check of the process (it used
 * to deadlock there: the once-only environment read re-entered itself).
 * Runs first, before anything else checks a point. */
static void test_env_arming(void **state) {
    (void)state;
    setenv("APEX_FAULT", "copy,launch:2", 1);
    apex_env_refresh(); /* the snapshot the core reads (csrc/env.h) */
    assert_int_equal(fault_fail(FAULT_HOST_ALLOC), 0); /* not a listed point */
    assert_int_equal(fault_fail(FAULT_COPY), 0);       /* check 1 */
    assert_int_equal(fault_fail(FAULT_LAUNCH), 1);     /* check 2 fails */
    assert_int_equal(fault_fail(FAULT_COPY), 0);       /* single-shot */
    assert_int_equal(fault_injected(), 1);
    fault_disarm();
    unsetenv("APEX_FAULT");
    apex_env_refresh();
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_env_arming),
        cmocka_unit_test(test_stalled_worker),
        cmocka_unit_test(test_each_point_broken),
        cmocka_unit_test(test_sweep_single),
        cmocka_unit_test(test_sweep_persistent),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
