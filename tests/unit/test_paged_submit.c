/*
 * test_paged_submit.c - apex_paged_submit / apex_paged_wait (apex_paged.h):
 * one layer's device-tier row store and attention enqueued, waited for
 * separately. Checked against the synchronous pair on a twin context (the
 * same config, the same calls through apex_paged_kv_write and
 * apex_paged_attention): the outputs must be the same bits, step after
 * step, so the async path stores what the sync one stores and attends the
 * same way. Also: every refusal leaves the context as it was (a later good
 * step still matches the twin), a call while a submission is in flight
 * behaves as the header says, and injected copy/launch failures at submit
 * leave nothing in flight and a following submit works.
 * On the emulated device, or a real GPU with APEX_TEST_DEVICE=cuda.
 */
#include <stdlib.h>
#include <string.h>

#include "apex/apex_paged.h"
#include "csrc/fault.h"
#include "test_util.h"

enum { L = 3, HQ = 4, HK = 2, D = 64, BT = 16, ND = 24, NH = 8, MAXB = 4, MAXLEN = 128, NSEQ = 3 };
enum { ROW = HK * D, QROW = HQ * D, MBPS = MAXLEN / BT };

static apex_device_kind test_device(void) {
    const char *dev = getenv("APEX_TEST_DEVICE");
    return dev && strcmp(dev, "cuda") == 0 ? APEX_DEVICE_CUDA : APEX_DEVICE_EMULATED;
}

static apex_config config(apex_device_kind dev) {
    apex_config c;
    assert_ok(apex_config_init(&c));
    c.n_layers = L;
    c.n_q_heads = HQ;
    c.n_kv_heads = HK;
    c.head_dim = D;
    c.kv_dtype = APEX_DTYPE_F32;
    c.act_dtype = APEX_DTYPE_F32;
    c.block_tokens = BT;
    c.device = dev;
    c.device_blocks = dev == APEX_DEVICE_NONE ? 0 : ND;
    c.host_blocks = NH;
    c.max_seqs = MAXB;
    c.max_batch = MAXB;
    c.max_seq_len = MAXLEN;
    c.n_threads = 2;
    return c;
}

static apex_context *claimed(apex_device_kind dev) {
    apex_config c = config(dev);
    apex_context *ctx = NULL;
    assert_ok(apex_context_create(&c, &ctx));
    assert_ok(apex_paged_claim(ctx, NULL));
    return ctx;
}

/* Two contexts fed the same: sync (kv_write + attention) and async
 * (submit + wait). Sequence s's table: device blocks scattered over
 * [0, ND); its length len[s]. */
typedef struct {
    apex_context *sync, *async;
    int32_t table[NSEQ][MBPS];
    int32_t len[NSEQ];
    uint64_t rng;
} twins;

static twins *twins_new(void) {
    twins *t = calloc(1, sizeof *t);
    assert_non_null(t);
    t->rng = 7;
    t->sync = claimed(test_device());
    t->async = claimed(test_device());
    int32_t next = 0;
    for (int s = 0; s < NSEQ; s++)
        for (int b = 0; b < MBPS && next < ND; b++) t->table[s][b] = (next++ * 5) % ND;
    return t;
}

static void twins_free(twins *t) {
    apex_context_destroy(t->sync);
    apex_context_destroy(t->async);
    free(t);
}

static int64_t slot_of(const twins *t, int s, int pos) {
    return (int64_t)t->table[s][pos / BT] * BT + pos % BT;
}

static void fill(uint64_t *rng, float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = test_rand_f(rng);
}

/* Prompts of lens[s] tokens into both contexts through the synchronous
 * kv_write (more rows than one staging slot: what submit refuses). */
static void prefill(twins *t, const int32_t *lens) {
    static float k[NSEQ * MAXLEN][ROW], v[NSEQ * MAXLEN][ROW];
    static int64_t slots[NSEQ * MAXLEN];
    for (int l = 0; l < L; l++) {
        int64_t n = 0;
        for (int s = 0; s < NSEQ; s++)
            for (int p = 0; p < lens[s]; p++) {
                fill(&t->rng, k[n], ROW);
                fill(&t->rng, v[n], ROW);
                slots[n++] = slot_of(t, s, p);
            }
        assert_ok(apex_paged_kv_write(t->sync, l, n, slots, k, ROW, v, ROW, APEX_DTYPE_F32));
        assert_ok(apex_paged_kv_write(t->async, l, n, slots, k, ROW, v, ROW, APEX_DTYPE_F32));
    }
    memcpy(t->len, lens, sizeof t->len);
}

/* One decode step's layer l as the step describes it (every sequence one
 * new token at len[s], its row stored first), q random. */
typedef struct {
    float k[NSEQ][ROW], v[NSEQ][ROW], q[NSEQ][QROW];
    int64_t slots[NSEQ];
    int32_t qsl[NSEQ + 1], lens[NSEQ];
    apex_paged_step step;
} layer_in;

static void layer_make(twins *t, int l, layer_in *in) {
    for (int s = 0; s < NSEQ; s++) {
        fill(&t->rng, in->k[s], ROW);
        fill(&t->rng, in->v[s], ROW);
        fill(&t->rng, in->q[s], QROW);
        in->slots[s] = slot_of(t, s, t->len[s]);
        in->qsl[s] = s;
        in->lens[s] = t->len[s] + 1;
    }
    in->qsl[NSEQ] = NSEQ;
    in->step = (apex_paged_step){
        .layer = l, .n_rows = NSEQ, .slots = in->slots, .k = in->k, .v = in->v,
        .k_row_stride = ROW, .v_row_stride = ROW, .kv_src_dtype = APEX_DTYPE_F32,
        .n_seqs = NSEQ, .query_start_loc = in->qsl, .seq_lens = in->lens,
        .block_table = &t->table[0][0], .block_table_stride = MBPS, .q = in->q, .opts = NULL,
    };
}

/* The synchronous pair on the sync twin. */
static void layer_sync(twins *t, const layer_in *in, float *out) {
    const apex_paged_step *s = &in->step;
    assert_ok(apex_paged_kv_write(t->sync, s->layer, s->n_rows, s->slots, s->k, s->k_row_stride, s->v,
                                  s->v_row_stride, s->kv_src_dtype));
    assert_ok(apex_paged_attention(t->sync, s->layer, s->n_seqs, s->query_start_loc, s->seq_lens,
                                   s->block_table, s->block_table_stride, s->q, out, s->opts));
}

/* One decode step over every layer on both twins; outputs equal bits. */
static void step_both(twins *t) {
    for (int l = 0; l < L; l++) {
        layer_in in;
        float want[NSEQ][QROW], got[NSEQ][QROW];
        layer_make(t, l, &in);
        layer_sync(t, &in, &want[0][0]);
        memset(got, 0xff, sizeof got);
        in.step.out = got;
        assert_ok(apex_paged_submit(t->async, &in.step));
        memset(&in.k, 0x7f, sizeof in.k + sizeof in.v + sizeof in.q); /* staged: the caller may reuse them */
        assert_ok(apex_paged_wait(t->async));
        assert_memory_equal(got, want, sizeof want);
    }
    for (int s = 0; s < NSEQ; s++) t->len[s]++;
}

static void test_matches_sync(void **state) {
    (void)state;
    twins *t = twins_new();
    const int32_t lens[NSEQ] = {5, 17, 40};
    prefill(t, lens);
    for (int i = 0; i < 12; i++) step_both(t); /* crosses block boundaries */
    twins_free(t);
}

/* Rows only, attention only, a sequence with q_len 0 skipped. */
static void test_halves(void **state) {
    (void)state;
    twins *t = twins_new();
    const int32_t lens[NSEQ] = {3, 9, 20};
    prefill(t, lens);
    layer_in in;
    layer_make(t, 1, &in);
    /* Rows alone (no attention described). */
    apex_paged_step rows = in.step;
    rows.n_seqs = 0;
    rows.query_start_loc = NULL;
    assert_ok(apex_paged_submit(t->async, &rows));
    assert_ok(apex_paged_wait(t->async));
    assert_ok(apex_paged_kv_write(t->sync, 1, NSEQ, in.slots, in.k, ROW, in.v, ROW, APEX_DTYPE_F32));
    /* Attention alone, sequence 1 skipped (q_len 0). */
    int32_t qsl[NSEQ + 1] = {0, 1, 1, 2};
    float q2[2][QROW], want[2][QROW], got[2][QROW];
    memcpy(q2[0], in.q[0], sizeof q2[0]);
    memcpy(q2[1], in.q[2], sizeof q2[1]);
    apex_paged_step att = in.step;
    att.n_rows = 0;
    att.slots = NULL;
    att.k = att.v = NULL;
    att.query_start_loc = qsl;
    att.q = q2;
    att.out = got;
    assert_ok(apex_paged_attention(t->sync, 1, NSEQ, qsl, in.lens, &t->table[0][0], MBPS, q2, want, NULL));
    assert_ok(apex_paged_submit(t->async, &att));
    assert_ok(apex_paged_wait(t->async));
    assert_memory_equal(got, want, sizeof want);
    twins_free(t);
}

/* Every refusal: a clear status and message, nothing in flight, nothing
 * stored (row 0 of each bad call rewrites a position already attended:
 * were it stored, the next step would differ from the twin's). */
static void test_refusals(void **state) {
    (void)state;
    twins *t = twins_new();
    const int32_t lens[NSEQ] = {4, 16, 33};
    prefill(t, lens);
    layer_in in;
    float out[NSEQ][QROW];
    layer_make(t, 0, &in);
    in.slots[0] = slot_of(t, 0, 0); /* already attended */
    in.step.out = out;
    apex_paged_step bad;

    assert_status(apex_paged_submit(NULL, &in.step), APEX_ERR_INVALID_ARG);
    assert_status(apex_paged_submit(t->async, NULL), APEX_ERR_INVALID_ARG);
    bad = in.step, bad.layer = L;
    assert_status(apex_paged_submit(t->async, &bad), APEX_ERR_OUT_OF_RANGE);
    bad = in.step, bad.layer = -1;
    assert_status(apex_paged_submit(t->async, &bad), APEX_ERR_OUT_OF_RANGE);
    /* A NaN in row 1 (row 0 valid). */
    in.v[1][5] = NAN;
    assert_status(apex_paged_submit(t->async, &in.step), APEX_ERR_INVALID_ARG);
    fill(&t->rng, in.v[1], ROW);
    /* A NaN in q. */
    in.q[2][7] = INFINITY;
    assert_status(apex_paged_submit(t->async, &in.step), APEX_ERR_INVALID_ARG);
    fill(&t->rng, in.q[2], QROW);
    /* A slot outside both tiers. */
    int64_t keep = in.slots[2];
    in.slots[2] = (int64_t)(ND + NH) * BT;
    assert_status(apex_paged_submit(t->async, &in.step), APEX_ERR_OUT_OF_RANGE);
    /* A host-tier row. */
    in.slots[2] = (int64_t)ND * BT + 3;
    assert_status(apex_paged_submit(t->async, &in.step), APEX_ERR_UNSUPPORTED);
    in.slots[2] = keep;
    /* A sequence with a host-tier block. */
    int32_t table[NSEQ][MBPS];
    memcpy(table, t->table, sizeof table);
    table[1][0] = ND + 2;
    bad = in.step, bad.block_table = &table[0][0];
    assert_status(apex_paged_submit(t->async, &bad), APEX_ERR_UNSUPPORTED);
    /* A sequence too long, a table stride too small, a decreasing qsl. */
    int32_t lens2[NSEQ] = {in.lens[0], MAXLEN + 1, in.lens[2]};
    bad = in.step, bad.seq_lens = lens2;
    assert_status(apex_paged_submit(t->async, &bad), APEX_ERR_OUT_OF_RANGE);
    bad = in.step, bad.block_table_stride = 1;
    assert_status(apex_paged_submit(t->async, &bad), APEX_ERR_INVALID_ARG);
    int32_t qsl_bad[NSEQ + 1] = {0, 2, 1, 3};
    bad = in.step, bad.query_start_loc = qsl_bad;
    assert_status(apex_paged_submit(t->async, &bad), APEX_ERR_INVALID_ARG);
    /* More rows than one staging slot holds (max_batch). */
    int64_t many[MAXB + 1];
    float mk[MAXB + 1][ROW];
    for (int i = 0; i <= MAXB; i++) many[i] = slot_of(t, 0, 0), fill(&t->rng, mk[i], ROW);
    bad = in.step, bad.n_rows = MAXB + 1, bad.slots = many, bad.k = mk, bad.v = mk;
    assert_status(apex_paged_submit(t->async, &bad), APEX_ERR_UNSUPPORTED);
    int32_t qsl_many[NSEQ + 1] = {0, 1, 2, MAXB + 1};
    float qm[MAXB + 1][QROW];
    fill(&t->rng, &qm[0][0], sizeof qm / sizeof(float));
    int32_t lens_many[NSEQ] = {in.lens[0], in.lens[1], in.lens[2]};
    float om[MAXB + 1][QROW];
    bad = in.step, bad.query_start_loc = qsl_many, bad.seq_lens = lens_many, bad.q = qm, bad.out = om;
    assert_status(apex_paged_submit(t->async, &bad), APEX_ERR_UNSUPPORTED);
    /* NULL arrays, a bad dtype, a short row stride, NULL q/out. */
    bad = in.step, bad.slots = NULL;
    assert_status(apex_paged_submit(t->async, &bad), APEX_ERR_INVALID_ARG);
    bad = in.step, bad.kv_src_dtype = (apex_dtype)99;
    assert_status(apex_paged_submit(t->async, &bad), APEX_ERR_INVALID_ARG);
    bad = in.step, bad.k_row_stride = ROW - 1;
    assert_status(apex_paged_submit(t->async, &bad), APEX_ERR_INVALID_ARG);
    bad = in.step, bad.out = NULL;
    assert_status(apex_paged_submit(t->async, &bad), APEX_ERR_INVALID_ARG);
    bad = in.step, bad.seq_lens = NULL;
    assert_status(apex_paged_submit(t->async, &bad), APEX_ERR_INVALID_ARG);
    /* Nothing was enqueued by any of them. */
    assert_status(apex_paged_wait(t->async), APEX_ERR_INVALID_ARG);
    assert_status(apex_paged_wait(NULL), APEX_ERR_INVALID_ARG);
    /* And the state is the twin's: the next steps match. */
    for (int i = 0; i < 3; i++) step_both(t);

    /* Contexts submit cannot serve: no device; not claimed. */
    apex_context *host = claimed(APEX_DEVICE_NONE);
    int64_t hslots[1] = {3};
    apex_paged_step rows = {.layer = 0, .n_rows = 1, .slots = hslots, .k = in.k, .v = in.v,
                            .k_row_stride = ROW, .v_row_stride = ROW, .kv_src_dtype = APEX_DTYPE_F32};
    assert_status(apex_paged_submit(host, &rows), APEX_ERR_UNSUPPORTED);
    apex_context_destroy(host);
    apex_config c = config(test_device());
    apex_context *fresh = NULL;
    assert_ok(apex_context_create(&c, &fresh));
    assert_status(apex_paged_submit(fresh, &rows), APEX_ERR_INVALID_ARG);
    apex_context_destroy(fresh);
    twins_free(t);
}

/* While a submission is in flight: a second submit is refused; another
 * call finishes it first (out written, the status kept for the wait);
 * destroy drops it. */
static void test_in_flight(void **state) {
    (void)state;
    twins *t = twins_new();
    const int32_t lens[NSEQ] = {8, 12, 30};
    prefill(t, lens);
    layer_in in, in2;
    float want[NSEQ][QROW], got[NSEQ][QROW];

    layer_make(t, 0, &in);
    layer_sync(t, &in, &want[0][0]);
    in.step.out = got;
    assert_ok(apex_paged_submit(t->async, &in.step));
    assert_status(apex_paged_submit(t->async, &in.step), APEX_ERR_INVALID_ARG);
    assert_ok(apex_paged_wait(t->async)); /* the refused one changed nothing */
    assert_memory_equal(got, want, sizeof want);
    assert_status(apex_paged_wait(t->async), APEX_ERR_INVALID_ARG);

    /* A synchronous call meanwhile finishes the submission first. */
    layer_make(t, 1, &in);
    layer_sync(t, &in, &want[0][0]);
    memset(got, 0, sizeof got);
    in.step.out = got;
    assert_ok(apex_paged_submit(t->async, &in.step));
    int64_t n_blocks = 0;
    assert_ok(apex_paged_claim(t->async, &n_blocks)); /* again: the count, nothing else */
    float kk[ROW], vv[ROW];
    fill(&t->rng, kk, ROW);
    fill(&t->rng, vv, ROW);
    int64_t far = slot_of(t, 2, MAXLEN - 1); /* a position no step reaches */
    assert_ok(apex_paged_kv_write(t->async, 2, 1, &far, kk, ROW, vv, ROW, APEX_DTYPE_F32));
    assert_ok(apex_paged_kv_write(t->sync, 2, 1, &far, kk, ROW, vv, ROW, APEX_DTYPE_F32));
    assert_memory_equal(got, want, sizeof want); /* written before the wait */
    assert_status(apex_paged_submit(t->async, &in.step), APEX_ERR_INVALID_ARG); /* still until the wait */
    assert_ok(apex_paged_wait(t->async));
    assert_memory_equal(got, want, sizeof want);

    /* The rest of the step, then more steps: still the twin's state. */
    layer_make(t, 2, &in2);
    layer_sync(t, &in2, &want[0][0]);
    in2.step.out = got;
    assert_ok(apex_paged_submit(t->async, &in2.step));
    assert_ok(apex_paged_wait(t->async));
    assert_memory_equal(got, want, sizeof want);
    for (int s = 0; s < NSEQ; s++) t->len[s]++;
    step_both(t);

    /* Destroy with a submission in flight: waits for the device, no leak. */
    layer_make(t, 0, &in);
    in.step.out = got;
    assert_ok(apex_paged_submit(t->async, &in.step));
    twins_free(t);
}

/* Copy and launch failures injected at the Nth device call of a submit,
 * for every N the submit reaches: the submit returns an error with a
 * message and leaves nothing in flight (the wait says so); after
 * disarming, the same step resubmitted matches the twin. The emulated
 * device reports failures when work is enqueued, so its wait has none to
 * return; a wait after a failed submit is the refusal above. */
static void test_faults(void **state) {
    (void)state;
    const uint32_t points[] = {1u << FAULT_COPY, 1u << FAULT_LAUNCH, (1u << FAULT_COPY) | (1u << FAULT_LAUNCH)};
    for (size_t pi = 0; pi < sizeof points / sizeof points[0]; pi++) {
        for (int persist = 0; persist < 2; persist++) {
            for (uint64_t nth = 1;; nth++) {
                twins *t = twins_new();
                const int32_t lens[NSEQ] = {6, 15, 31};
                prefill(t, lens);
                layer_in in;
                float want[NSEQ][QROW], got[NSEQ][QROW];
                layer_make(t, 1, &in);
                layer_sync(t, &in, &want[0][0]);
                in.step.out = got;
                fault_arm(points[pi], nth, persist, 0);
                apex_status st = apex_paged_submit(t->async, &in.step);
                const uint64_t hit = fault_injected();
                fault_disarm();
                if (st == APEX_OK) {
                    assert_int_equal(hit, 0);
                    assert_ok(apex_paged_wait(t->async));
                    assert_memory_equal(got, want, sizeof want);
                    twins_free(t);
                    break; /* no Nth point reached: every one was tried */
                }
                assert_true(hit > 0);
                assert_true(apex_last_error()[0] != '\0');
                assert_status(apex_paged_wait(t->async), APEX_ERR_INVALID_ARG); /* nothing in flight */
                memset(got, 0, sizeof got);
                assert_ok(apex_paged_submit(t->async, &in.step)); /* the rows again: idempotent */
                assert_ok(apex_paged_wait(t->async));
                assert_memory_equal(got, want, sizeof want);
                for (int s = 0; s < NSEQ; s++) t->len[s]++;
                for (int l = 0; l < L; l++)
                    if (l != 1) { /* the step's other layers, then one more step */
                        layer_in o;
                        layer_make(t, l, &o);
                        for (int s = 0; s < NSEQ; s++) o.slots[s] = slot_of(t, s, t->len[s] - 1), o.lens[s] = t->len[s];
                        layer_sync(t, &o, &want[0][0]);
                        o.step.out = got;
                        assert_ok(apex_paged_submit(t->async, &o.step));
                        assert_ok(apex_paged_wait(t->async));
                        assert_memory_equal(got, want, sizeof want);
                    }
                step_both(t);
                twins_free(t);
                assert_true(nth < 64);
            }
        }
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matches_sync),
        cmocka_unit_test(test_halves),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_in_flight),
        cmocka_unit_test(test_faults),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
