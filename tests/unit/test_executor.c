/*
 * test_executor.c - the one attention executor (csrc/executor.c) behind
 * both ABIs. One batch of sequences on the device tier, the host tier
 * (interleaved, so the host rows are not adjacent) and, through the paged
 * ABI, on both tiers, run synchronously (apex_attention), on a stream
 * (apex_attention_async, exec_attention) and through apex_paged_attention
 * on the emulated device: every path gives the same bits, device-tier rows
 * are cpu_attn_reference's bits (the emulated device's kernel), host-tier
 * and mixed rows are within rounding of it. Host mode likewise.
 */
#include <stdlib.h>
#include <string.h>

#include "apex/apex_paged.h"
#include "cpu_attn/cpu_attn.h"
#include "csrc/config.h"
#include "csrc/context.h"
#include "csrc/executor.h"
#include "test_util.h"

enum { L = 2, HQ = 4, HK = 2, D = 64, BT = 16, MAXB = 8, MAXLEN = 128, MB = MAXLEN / BT };
enum { DEVB = 16, HOSTB = 32, NS = 6, ROW = HK * D, QROW = HQ * D };
#define BLOCK_FLOATS ((size_t)2 * HK * BT * D)

/* The batch: tiers interleaved, lengths across block borders. */
static const apex_tier TIER[NS] = {APEX_TIER_DEVICE, APEX_TIER_HOST, APEX_TIER_DEVICE,
                                   APEX_TIER_HOST,   APEX_TIER_HOST, APEX_TIER_DEVICE};
static const int32_t LEN[NS] = {37, 50, 16, 5, 70, 90};

typedef struct {
    float kv[L][NS + 1][MAXLEN][2][ROW]; /* every row written; NS: the mixed sequence */
    int32_t ids[NS + 1][MB];             /* engine ids (host ids after device ids)    */
    uint64_t rng;
} shadow;

static apex_config config(apex_device_kind dev) {
    apex_config c;
    assert_ok(apex_config_init(&c));
    c.n_layers = L;
    c.n_q_heads = HQ;
    c.n_kv_heads = HK;
    c.head_dim = D;
    c.kv_dtype = c.act_dtype = APEX_DTYPE_F32;
    c.block_tokens = BT;
    c.device = dev;
    c.device_blocks = dev == APEX_DEVICE_NONE ? 0 : DEVB;
    c.host_blocks = HOSTB;
    c.max_seqs = MAXB;
    c.max_batch = MAXB;
    c.max_seq_len = MAXLEN;
    c.n_threads = 2;
    return c;
}

/* The sequence-model context: NS sequences on their tiers (host mode:
 * all host), every row written; their block ids recorded in engine form. */
static apex_context *seq_context(apex_device_kind dev, shadow *sh) {
    apex_config c = config(dev);
    apex_context *ctx;
    assert_ok(apex_context_create(&c, &ctx));
    int32_t nd = ctx->pools[APEX_TIER_DEVICE].n_blocks;
    for (int32_t s = 0; s < NS; s++) {
        assert_ok(apex_seq_add(ctx, s, nd ? TIER[s] : APEX_TIER_HOST));
        int32_t first;
        assert_ok(apex_seq_reserve(ctx, s, LEN[s], &first));
        for (int l = 0; l < L; l++)
            for (int32_t p0 = 0; p0 < LEN[s]; p0 += MAXB) {
                int32_t m = LEN[s] - p0 < MAXB ? LEN[s] - p0 : MAXB, seqs[MAXB], pos[MAXB];
                float k[MAXB][ROW], v[MAXB][ROW];
                for (int32_t i = 0; i < m; i++) {
                    seqs[i] = s;
                    pos[i] = p0 + i;
                    for (int e = 0; e < ROW; e++) {
                        k[i][e] = sh->kv[l][s][p0 + i][0][e] = test_rand_f(&sh->rng);
                        v[i][e] = sh->kv[l][s][p0 + i][1][e] = test_rand_f(&sh->rng);
                    }
                }
                assert_ok(apex_kv_write(ctx, l, m, seqs, pos, k, v, APEX_DTYPE_F32));
            }
        const seq_entry *e = &ctx->seqs.seqs[s];
        const int32_t *row = seq_table_row(&ctx->seqs, s);
        for (int32_t b = 0; b < e->n_blocks; b++)
            sh->ids[s][b] = row[b] + (e->tier == APEX_TIER_HOST ? nd : 0);
    }
    return ctx;
}

/* The paged context of the same configuration, claimed, holding the same
 * rows at the same engine ids. */
static apex_context *paged_context(apex_device_kind dev, const shadow *sh, int32_t n_seqs,
                                   const int32_t *lens) {
    apex_config c = config(dev);
    apex_context *ctx;
    assert_ok(apex_context_create(&c, &ctx));
    assert_ok(apex_paged_claim(ctx, NULL));
    for (int32_t s = 0; s < n_seqs; s++)
        for (int l = 0; l < L; l++)
            for (int32_t p = 0; p < lens[s]; p++) {
                int64_t slot = (int64_t)sh->ids[s][p / BT] * BT + p % BT;
                assert_ok(apex_paged_kv_write(ctx, l, 1, &slot, sh->kv[l][s][p][0], ROW,
                                              sh->kv[l][s][p][1], ROW, APEX_DTYPE_F32));
            }
    return ctx;
}

/* cpu_attn_reference of rows (seq[r], len[r]) over the shadow, laid out in
 * a private slab of the kernel's block layout (sequence s at blocks s*MB..). */
static void reference(const shadow *sh, int l, int32_t rows, const int32_t *seq,
                      const int32_t *len, const float *q, const apex_attn_opts *o, float *out) {
    float *slab = calloc((size_t)(NS + 1) * MB * BLOCK_FLOATS, sizeof(float));
    int32_t *table = malloc(sizeof(int32_t) * (size_t)rows * MB);
    for (int32_t s = 0; s <= NS; s++)
        for (int32_t p = 0; p < MAXLEN; p++)
            for (int w = 0; w < 2; w++)
                for (int h = 0; h < HK; h++)
                    memcpy(slab + (size_t)(s * MB + p / BT) * BLOCK_FLOATS +
                               ((size_t)(w * HK + h) * BT + (size_t)(p % BT)) * D,
                           &sh->kv[l][s][p][w][h * D], D * sizeof(float));
    for (int32_t r = 0; r < rows; r++)
        for (int32_t b = 0; b < MB; b++) table[r * MB + b] = seq[r] * MB + b;
    cpu_attn_geom g = {.n_q_heads = HQ, .n_kv_heads = HK, .head_dim = D, .block_tokens = BT,
                       .kv_dtype = APEX_DTYPE_F32};
    cpu_attn_batch b = {
        .n_seqs = rows, .q = q, .q_dtype = APEX_DTYPE_F32, .out = out,
        .out_dtype = APEX_DTYPE_F32, .seq_lens = len, .block_table = table,
        .block_table_stride = MB, .kv = slab, .block_bytes = BLOCK_FLOATS * sizeof(float),
        .scale = o->scale, .softcap = o->softcap, .window = o->window,
    };
    assert_int_equal(cpu_attn_reference(&g, &b), 0);
    free(table);
    free(slab);
}

/* Row r of got against the reference: the same bits (exact) or within
 * the CPU kernel's rounding. */
static void check_row(const float *got, const float *want, int32_t r, int exact) {
    for (int i = 0; i < QROW; i++) {
        float g = got[r * QROW + i], w = want[r * QROW + i];
        if (exact ? memcmp(&g, &w, sizeof g) != 0 : fabsf(g - w) > 2e-5f)
            fail_msg("row %d element %d: got %.9g, reference %.9g%s", r, i, g, w,
                     exact ? " (device rows are the reference's bits)" : "");
    }
}

static void random_q(shadow *sh, float *q, int32_t rows) {
    for (int32_t i = 0; i < rows * QROW; i++) q[i] = test_rand_f(&sh->rng);
}

/* The batch through apex_attention, apex_attention_async, exec_attention on
 * a stream over engine ids, and apex_paged_attention: the same bits; and
 * each row against the reference. Twice: default options, then a window
 * and a softcap. */
static void test_paths_agree(void **state) {
    (void)state;
    shadow *sh = calloc(1, sizeof *sh);
    sh->rng = 7;
    apex_context *a = seq_context(APEX_DEVICE_EMULATED, sh);
    assert_false(apex_context_host_mode(a));
    apex_context *p = paged_context(APEX_DEVICE_EMULATED, sh, NS, LEN);
    apex_stream sa, sp;
    void *dq, *dout, *pq, *pout;
    assert_ok(apex_stream_create(a, &sa));
    assert_ok(apex_stream_create(p, &sp));
    assert_ok(apex_device_alloc(a, NS * QROW * 4, &dq));
    assert_ok(apex_device_alloc(a, NS * QROW * 4, &dout));
    assert_ok(apex_device_alloc(p, NS * QROW * 4, &pq));
    assert_ok(apex_device_alloc(p, NS * QROW * 4, &pout));
    int32_t seqs[NS], qsl[NS + 1] = {0};
    for (int32_t s = 0; s < NS; s++) {
        seqs[s] = s;
        qsl[s + 1] = s + 1;
    }
    for (int variant = 0; variant < 2; variant++) {
        apex_attn_opts o = apex_attn_opts_default(a), ro = o;
        if (variant) o.window = ro.window = 24, o.softcap = ro.softcap = 3.0f;
        ro.scale = 1.0f / sqrtf(D);
        for (int l = 0; l < L; l++) {
            float q[NS * QROW], sync[NS * QROW], async[NS * QROW], paged[NS * QROW];
            float on_stream[NS * QROW], want[NS * QROW];
            random_q(sh, q, NS);
            apex_stats before, after;
            assert_ok(apex_stats_get(a, &before));
            assert_ok(apex_attention(a, l, NS, seqs, q, sync, &o));
            assert_ok(apex_stats_get(a, &after));
            assert_int_equal(after.seqs_attended_device - before.seqs_attended_device, 3);
            assert_int_equal(after.seqs_attended_host - before.seqs_attended_host, 3);

            assert_ok(apex_memcpy_async(a, dq, q, sizeof q, sa));
            assert_ok(apex_attention_async(a, l, NS, seqs, dq, dout, &o, sa));
            assert_ok(apex_memcpy_async(a, async, dout, sizeof async, sa));
            assert_ok(apex_stream_sync(a, sa));

            assert_ok(apex_paged_attention(p, l, NS, qsl, LEN, &sh->ids[0][0], MB, q, paged,
                                           &o));

            /* The executor itself on a stream, over the engine's tables. */
            exec_batch b = {.layer = l, .n_seqs = NS, .qsl = qsl, .seq_lens = LEN,
                            .table = &sh->ids[0][0], .stride = MB, .q = pq, .out = pout,
                            .o = o};
            assert_int_equal(apex_attn_opts_resolve(&p->cfg, "test", &o, &b.o), APEX_OK);
            assert_ok(apex_memcpy_async(p, pq, q, sizeof q, sp));
            assert_ok(exec_attention(p, &b, (device_stream *)sp));
            assert_ok(apex_memcpy_async(p, on_stream, pout, sizeof on_stream, sp));
            assert_ok(apex_stream_sync(p, sp));

            assert_memory_equal(sync, async, sizeof sync);
            assert_memory_equal(sync, paged, sizeof sync);
            assert_memory_equal(sync, on_stream, sizeof sync);
            reference(sh, l, NS, seqs, LEN, q, &ro, want);
            for (int32_t r = 0; r < NS; r++) check_row(sync, want, r, TIER[r] == APEX_TIER_DEVICE);
        }
    }
    apex_device_free(a, dq);
    apex_device_free(a, dout);
    apex_device_free(p, pq);
    apex_device_free(p, pout);
    assert_ok(apex_stream_destroy(a, sa));
    assert_ok(apex_stream_destroy(p, sp));
    apex_context_destroy(a);
    apex_context_destroy(p);
    free(sh);
}

/* A sequence on both tiers, with a 3-row prefill chunk, among the others:
 * the synchronous path gathers it (against the reference); the stream path
 * refuses it and changes nothing. */
static void test_mixed_tiers(void **state) {
    (void)state;
    shadow *sh = calloc(1, sizeof *sh);
    sh->rng = 11;
    apex_context *a = seq_context(APEX_DEVICE_EMULATED, sh);
    apex_context_destroy(a); /* only its ids and rows */
    /* Sequence NS: blocks alternating device / host, ids no one else uses. */
    int used[DEVB + HOSTB] = {0};
    for (int32_t s = 0; s < NS; s++)
        for (int32_t b = 0; b < (LEN[s] + BT - 1) / BT; b++) used[sh->ids[s][b]] = 1;
    int32_t lens[NS + 1];
    memcpy(lens, LEN, sizeof LEN);
    lens[NS] = 60;
    for (int32_t b = 0, want_dev = 1; b < 4; b++, want_dev = !want_dev) {
        int32_t id = want_dev ? 0 : DEVB;
        while (used[id]) id++;
        used[id] = 1;
        sh->ids[NS][b] = id;
    }
    for (int l = 0; l < L; l++)
        for (int32_t pos = 0; pos < lens[NS]; pos++)
            for (int w = 0; w < 2; w++)
                for (int e = 0; e < ROW; e++) sh->kv[l][NS][pos][w][e] = test_rand_f(&sh->rng);
    apex_context *p = paged_context(APEX_DEVICE_EMULATED, sh, NS + 1, lens);
    /* Rows: sequences 0..NS-1 one each, then NS's last 3 positions. */
    enum { ROWS = NS + 3 };
    int32_t qsl[NS + 2], rseq[ROWS], rlen[ROWS];
    for (int32_t s = 0; s <= NS; s++) qsl[s] = s;
    qsl[NS + 1] = ROWS;
    for (int32_t r = 0; r < ROWS; r++) {
        rseq[r] = r < NS ? r : NS;
        rlen[r] = r < NS ? LEN[r] : lens[NS] - 3 + (r - NS) + 1;
    }
    apex_attn_opts o = apex_attn_opts_default(p), ro = o;
    ro.scale = 1.0f / sqrtf(D);
    for (int l = 0; l < L; l++) {
        float q[ROWS * QROW], out[ROWS * QROW], want[ROWS * QROW];
        random_q(sh, q, ROWS);
        uint64_t fallbacks = p->fallbacks;
        assert_ok(apex_paged_attention(p, l, NS + 1, qsl, lens, &sh->ids[0][0], MB, q, out, &o));
        assert_int_equal(p->fallbacks, fallbacks + 1);
        reference(sh, l, ROWS, rseq, rlen, q, &ro, want);
        for (int32_t r = 0; r < ROWS; r++)
            check_row(out, want, r, r < NS && TIER[r] == APEX_TIER_DEVICE);
    }
    /* On a stream: refused before anything is enqueued. */
    apex_stream s;
    void *dq, *dout;
    assert_ok(apex_stream_create(p, &s));
    assert_ok(apex_device_alloc(p, ROWS * QROW * 4, &dq));
    assert_ok(apex_device_alloc(p, ROWS * QROW * 4, &dout));
    exec_batch b = {.layer = 0, .n_seqs = NS + 1, .qsl = qsl, .seq_lens = lens,
                    .table = &sh->ids[0][0], .stride = MB, .q = dq, .out = dout, .o = ro};
    apex_stats before, after;
    assert_ok(apex_stats_get(p, &before));
    assert_status(exec_attention(p, &b, (device_stream *)s), APEX_ERR_UNSUPPORTED);
    assert_non_null(strstr(apex_last_error(), "both tiers"));
    assert_ok(apex_stats_get(p, &after));
    assert_memory_equal(&before, &after, sizeof before);
    apex_device_free(p, dq);
    apex_device_free(p, dout);
    assert_ok(apex_stream_destroy(p, s));
    apex_context_destroy(p);
    free(sh);
}

/* Host mode: the sequence model and the paged ABI run the same CPU batch. */
static void test_host_mode(void **state) {
    (void)state;
    shadow *sh = calloc(1, sizeof *sh);
    sh->rng = 3;
    apex_context *a = seq_context(APEX_DEVICE_NONE, sh);
    assert_true(apex_context_host_mode(a));
    apex_context *p = paged_context(APEX_DEVICE_NONE, sh, NS, LEN);
    int32_t seqs[NS], qsl[NS + 1] = {0};
    for (int32_t s = 0; s < NS; s++) {
        seqs[s] = s;
        qsl[s + 1] = s + 1;
    }
    apex_attn_opts o = apex_attn_opts_default(a), ro = o;
    ro.scale = 1.0f / sqrtf(D);
    for (int l = 0; l < L; l++) {
        float q[NS * QROW], sync[NS * QROW], paged[NS * QROW], want[NS * QROW];
        random_q(sh, q, NS);
        assert_ok(apex_attention(a, l, NS, seqs, q, sync, &o));
        assert_ok(apex_paged_attention(p, l, NS, qsl, LEN, &sh->ids[0][0], MB, q, paged, &o));
        assert_memory_equal(sync, paged, sizeof sync);
        reference(sh, l, NS, seqs, LEN, q, &ro, want);
        for (int32_t r = 0; r < NS; r++) check_row(sync, want, r, 0);
    }
    /* No stream path without a device. */
    exec_batch b = {.layer = 0, .n_seqs = NS, .seq_lens = LEN, .table = &sh->ids[0][0],
                    .stride = MB, .o = ro};
    assert_status(exec_attention(a, &b, (device_stream *)&b), APEX_ERR_UNSUPPORTED);
    apex_context_destroy(a);
    apex_context_destroy(p);
    free(sh);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_paths_agree),
        cmocka_unit_test(test_mixed_tiers),
        cmocka_unit_test(test_host_mode),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
