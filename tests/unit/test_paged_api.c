/*
 * test_paged_api.c - apex_paged.h: the engine owns block tables and the
 * slot mapping (vLLM's model); APEX stores rows and attends. Checked against
 * a naive causal attention over the test's own copy of every K/V row.
 * The device-tier tests run on the emulated device, or on a real GPU with
 * APEX_TEST_DEVICE=cuda (tests/gpu/run.sh).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "apex/apex_paged.h"
#include "cpu_attn/dtype_convert.h"
#include "test_util.h"

enum { L = 2, HQ = 4, HK = 2, D = 64, BT = 16, NB = 24, MAXB = 8, MAXLEN = 128, NSEQ = 4 };
enum { ROW = HK * D, QKV = (HQ + 2 * HK) * D }; /* fused q|k|v row, as an engine has it */
#define BLOCK_BYTES_F32 ((size_t)2 * HK * BT * D * sizeof(float))

static apex_config paged_config(apex_device_kind dev, int64_t device_blocks) {
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
    c.device_blocks = device_blocks;
    c.host_blocks = NB;
    c.max_seqs = MAXB;
    c.max_batch = MAXB; /* smaller than a prefill chunk: rows run in several batches */
    c.max_seq_len = MAXLEN;
    c.n_threads = 2;
    return c;
}

/* The engine's state: per sequence a block table of scattered ids, its
 * length, and every K/V row it wrote (kv[layer][seq][pos][k|v][ROW]) as the
 * cache holds it (rounded to kv_dtype). */
typedef struct {
    apex_context *ctx;
    int32_t table[NSEQ][MAXLEN / BT];
    int32_t len[NSEQ];
    float kv[L][NSEQ][MAXLEN][2][ROW];
    apex_dtype kv_dtype;
    uint64_t rng;
} engine;

/* An engine on a context made from c: its host tier APEX's own slab (kv
 * NULL) or the engine's memory (layer l at kv[l], bytes_per_layer there). */
static engine *engine_create(const apex_config *c, void *const *kv, size_t bytes_per_layer) {
    engine *e = calloc(1, sizeof *e);
    assert_non_null(e);
    e->rng = 42;
    e->kv_dtype = c->kv_dtype;
    if (kv)
        assert_ok(apex_paged_context_create(c, kv, bytes_per_layer, &e->ctx));
    else
        assert_ok(apex_context_create(c, &e->ctx));
    int64_t n = 0;
    assert_ok(apex_paged_claim(e->ctx, &n));
    assert_int_equal(n, c->device_blocks + NB);
    return e;
}

/* A host-mode engine. Five blocks per sequence (80 tokens), ids handed out
 * in a scrambled order as vLLM's free queue does; unused entries stay 0. */
static engine *engine_new_on(void *const *kv, size_t bytes_per_layer) {
    apex_config c = paged_config(APEX_DEVICE_NONE, 0);
    engine *e = engine_create(&c, kv, bytes_per_layer);
    int32_t next = 0;
    for (int s = 0; s < NSEQ; s++)
        for (int b = 0; b < 5; b++) e->table[s][b] = (next++ * 7) % NB;
    return e;
}

static engine *engine_new(void) { return engine_new_on(NULL, 0); }

static void engine_free(engine *e) {
    assert_ok(apex_context_destroy(e->ctx));
    free(e);
}

/* The device of the tier tests: the emulated one, or with
 * APEX_TEST_DEVICE=cuda a real GPU (tests/gpu/run.sh); tests that read the
 * device slab directly (emulated memory is host memory) skip there. */
static apex_device_kind tier_device(void) {
    const char *dev = getenv("APEX_TEST_DEVICE");
    return dev && !strcmp(dev, "cuda") ? APEX_DEVICE_CUDA : APEX_DEVICE_EMULATED;
}

/* An engine on an emulated device with ND device blocks (ids [0, ND)) and
 * NB host blocks (ids ND + h): sequences 0 and 3 on the device tier, 1 on
 * the host tier, 2 on both (blocks alternate). */
enum { ND = 8 };
static engine *engine_new_tiers(apex_dtype kv_dtype) {
    apex_config c = paged_config(tier_device(), ND);
    c.kv_dtype = kv_dtype;
    apex_context *probe;
    assert_ok(apex_context_create(&c, &probe));
    const int no_device = apex_context_host_mode(probe); /* cuda asked, no GPU */
    apex_context_destroy(probe);
    if (no_device) return NULL;
    engine *e = engine_create(&c, NULL, 0);
    static const int32_t tables[NSEQ][5] = {
        {5, 2, 7, 0, 3},
        {ND + 11, ND + 4, ND + 17, ND + 0, ND + 23},
        {6, ND + 9, 1, ND + 20, ND + 2},
        {4, 4, 4, 4, 4},
    };
    for (int s = 0; s < NSEQ; s++) memcpy(e->table[s], tables[s], sizeof tables[s]);
    return e;
}

/* What the cache holds for val. */
static float kv_round(apex_dtype t, float val) {
    float r = 0;
    apex_store_f32(&r, t, 0, val);
    return apex_load_f32(&r, t, 0);
}

/* Appends n tokens to seq in every layer through apex_paged_kv_write, the
 * K/V rows taken from a fused q|k|v buffer (row stride QKV) with one padding
 * row (slot -1) in front. */
static void engine_append(engine *e, int seq, int n) {
    float *qkv = calloc((size_t)(n + 1) * QKV, sizeof(float));
    int64_t *slots = malloc(sizeof(int64_t) * (size_t)(n + 1));
    slots[0] = -1;
    for (int l = 0; l < L; l++) {
        for (int i = 0; i < n; i++) {
            int pos = e->len[seq] + i;
            slots[i + 1] = (int64_t)e->table[seq][pos / BT] * BT + pos % BT;
            for (int w = 0; w < 2; w++)
                for (int x = 0; x < ROW; x++) {
                    float val = test_rand_f(&e->rng);
                    e->kv[l][seq][pos][w][x] = kv_round(e->kv_dtype, val);
                    qkv[(size_t)(i + 1) * QKV + (size_t)HQ * D + (size_t)w * ROW + x] = val;
                }
        }
        for (int x = 0; x < QKV; x++) qkv[x] = NAN; /* the padding row is never read */
        assert_ok(apex_paged_kv_write(e->ctx, l, n + 1, slots, qkv + HQ * D, QKV,
                                      qkv + HQ * D + ROW, QKV, APEX_DTYPE_F32));
    }
    e->len[seq] += n;
    free(qkv);
    free(slots);
}

/* out[row][HQ][D] for the batch, from the engine's own rows. */
static void naive_batch(const engine *e, int layer, int n, const int *seqs, const int32_t *qsl,
                        const float *q, int window, float softcap, double *out) {
    float *k = malloc(sizeof(float) * MAXLEN * D), *v = malloc(sizeof(float) * MAXLEN * D);
    for (int i = 0; i < n; i++) {
        int s = seqs[i], ql = qsl[i + 1] - qsl[i];
        for (int j = 0; j < ql; j++) {
            int row = qsl[i] + j, len = e->len[s] - ql + j + 1;
            int start = window > 0 && len > window ? len - window : 0;
            for (int h = 0; h < HQ; h++) {
                int kh = h / (HQ / HK);
                for (int t = 0; t < len; t++)
                    for (int x = 0; x < D; x++) {
                        k[t * D + x] = e->kv[layer][s][t][0][kh * D + x];
                        v[t * D + x] = e->kv[layer][s][t][1][kh * D + x];
                    }
                test_naive_attention(q + ((size_t)row * HQ + h) * D, D, k, v, D, start, len,
                                     1.0f / sqrtf((float)D), softcap,
                                     out + ((size_t)row * HQ + h) * D);
            }
        }
    }
    free(k);
    free(v);
}

/* One decode step: a token for every sequence in one kv_write call of
 * src-typed rows (so one call crosses tiers when the sequences do), a
 * padding row between. */
static void engine_step(engine *e, apex_dtype src) {
    float k[2 * NSEQ][ROW], v[2 * NSEQ][ROW]; /* room for any src dtype */
    int64_t slots[2 * NSEQ];
    for (int l = 0; l < L; l++) {
        for (int s = 0; s < NSEQ; s++) {
            int pos = e->len[s];
            slots[2 * s] = (int64_t)e->table[s][pos / BT] * BT + pos % BT;
            slots[2 * s + 1] = -1;
            for (int x = 0; x < ROW; x++) {
                size_t at = (size_t)2 * s * ROW + x, pad = at + ROW;
                apex_store_f32(k, src, at, test_rand_f(&e->rng));
                apex_store_f32(v, src, at, test_rand_f(&e->rng));
                apex_store_f32(k, src, pad, NAN); /* never read */
                apex_store_f32(v, src, pad, NAN);
                e->kv[l][s][pos][0][x] = kv_round(e->kv_dtype, apex_load_f32(k, src, at));
                e->kv[l][s][pos][1][x] = kv_round(e->kv_dtype, apex_load_f32(v, src, at));
            }
        }
        assert_ok(apex_paged_kv_write(e->ctx, l, 2 * NSEQ, slots, k, ROW, v, ROW, src));
    }
    for (int s = 0; s < NSEQ; s++) e->len[s]++;
}

/* The batch qsl over every sequence at its current length, q and out of
 * dtype dt, against the naive reference for (window, softcap) in (0, 0),
 * (9, 0), (0, 3): within tol; dev_rows of its rows ran on the device. */
static void check_batch(engine *e, const int32_t *qsl, apex_dtype dt, double tol,
                        int dev_rows) {
    int seqs[NSEQ] = {0, 1, 2, 3};
    int32_t lens[NSEQ];
    for (int s = 0; s < NSEQ; s++) lens[s] = e->len[s];
    int rows = qsl[NSEQ];
    size_t n = (size_t)rows * HQ * D;
    float *qf = malloc(sizeof(float) * n);
    void *q = malloc(4 * n), *out = malloc(4 * n);
    double *ref = malloc(sizeof(double) * n);
    for (size_t i = 0; i < n; i++) {
        apex_store_f32(q, dt, i, test_rand_f(&e->rng));
        qf[i] = apex_load_f32(q, dt, i);
    }
    static const struct { int window; float softcap; } variants[] = {{0, 0}, {9, 0}, {0, 3}};
    assert_ok(apex_stats_reset(e->ctx));
    for (int vi = 0; vi < 3; vi++)
        for (int l = 0; l < L; l++) {
            apex_attn_opts o = apex_attn_opts_default(e->ctx);
            o.window = variants[vi].window;
            o.softcap = variants[vi].softcap;
            o.q_dtype = o.out_dtype = dt;
            memset(out, 0xff, 4 * n); /* NaN wherever nothing is written */
            assert_ok(apex_paged_attention(e->ctx, l, NSEQ, qsl, lens, &e->table[0][0],
                                           MAXLEN / BT, q, out, &o));
            naive_batch(e, l, NSEQ, seqs, qsl, qf, o.window, o.softcap, ref);
            for (size_t i = 0; i < n; i++)
                if (!(fabs(apex_load_f32(out, dt, i) - ref[i]) <= tol))
                    fail_msg("layer %d window %d softcap %g: row %zu elem %zu: %g vs %g", l,
                             o.window, o.softcap, i / (HQ * D), i % (HQ * D),
                             apex_load_f32(out, dt, i), ref[i]);
        }
    apex_stats st;
    assert_ok(apex_stats_get(e->ctx, &st));
    assert_int_equal(st.attention_calls, 3 * L);
    assert_int_equal(st.seqs_attended_host, 3 * L * (rows - dev_rows));
    assert_int_equal(st.seqs_attended_device, 3 * L * dev_rows);
    assert_int_equal(st.errors, 0);
    free(qf);
    free(q);
    free(out);
    free(ref);
}

/* A mixed batch: a decode row, a whole prompt, a chunk of a longer prompt
 * and an idle sequence, against the naive reference. With engine_new_tiers
 * the decode row is a device-tier sequence's, the chunk a mixed one's. */
static void mixed_batch_matches_reference(engine *e, int dev_rows) {
    engine_append(e, 0, 37);
    engine_append(e, 1, 20);
    engine_append(e, 2, 50);
    engine_append(e, 3, 3);
    int32_t qsl[NSEQ + 1] = {0, 1, 21, 26, 26}; /* q_len 1, 20, 5, 0 */
    check_batch(e, qsl, APEX_DTYPE_F32, 2e-5, dev_rows);
}

static void test_mixed_batch_matches_reference(void **state) {
    engine *e = engine_new();
    mixed_batch_matches_reference(e, 0);
    uint64_t own = 0, ext = 1;
    assert_ok(apex_paged_host_kv(e->ctx, &own, &ext, NULL));
    assert_true(own >= (uint64_t)L * NB * BLOCK_BYTES_F32);
    assert_int_equal(ext, 0);
    engine_free(e);
}

/* The engine's memory as the host tier, laid out as vLLM does (one
 * allocation, layer-outer: layer l at l * layer_stride) with a guard tail
 * after each layer's blocks: same results, the rows land in the engine's
 * bytes, APEX allocates no slab, zeroing a free block (vLLM's
 * _zero_block_ids) changes nothing, and destroy leaves the memory alone. */
static void test_external_host_memory(void **state) {
    enum { TAIL = 192 };
    size_t layer_stride = (size_t)NB * BLOCK_BYTES_F32 + TAIL;
    uint8_t *mem = aligned_alloc(64, L * layer_stride);
    assert_non_null(mem);
    memset(mem, 0x5a, L * layer_stride); /* whatever the engine left there */
    void *kv[L];
    for (int l = 0; l < L; l++) kv[l] = mem + (size_t)l * layer_stride;
    engine *e = engine_new_on(kv, layer_stride); /* host_blocks NB of the NB + tail */
    uint64_t own = 1, ext = 0;
    int pinned = 1;
    assert_ok(apex_paged_host_kv(e->ctx, &own, &ext, &pinned));
    assert_int_equal(own, 0);
    assert_int_equal(ext, (uint64_t)L * NB * BLOCK_BYTES_F32);
    assert_int_equal(pinned, 0); /* host mode: no device to pin for */
    for (int l = 0; l < L; l++) {
        void *base;
        int64_t nb;
        assert_ok(apex_paged_layer_kv(e->ctx, l, APEX_TIER_HOST, &base, &nb));
        assert_ptr_equal(base, kv[l]);
        assert_int_equal(nb, NB);
    }
    /* The engine zeroes blocks it has not handed out yet (ids >= 20 here). */
    for (int l = 0; l < L; l++)
        for (int b = 20; b < NB; b++) memset((uint8_t *)kv[l] + (size_t)b * BLOCK_BYTES_F32, 0,
                                             BLOCK_BYTES_F32);
    mixed_batch_matches_reference(e, 0);
    /* Row 36 of sequence 0, layer 1: K of kv head 1 where apex.h says. */
    int32_t blk = e->table[0][36 / BT];
    const float *k = (const float *)((uint8_t *)kv[1] + (size_t)blk * BLOCK_BYTES_F32);
    assert_true(k[(size_t)1 * BT * D + (36 % BT) * D + 5] == e->kv[1][0][36][0][D + 5]);
    const float *v = k + (size_t)HK * BT * D;
    assert_true(v[(36 % BT) * D + 9] == e->kv[1][0][36][1][9]);
    for (int l = 0; l < L; l++)
        for (int t = 0; t < TAIL; t++)
            assert_int_equal(((uint8_t *)kv[l])[(size_t)NB * BLOCK_BYTES_F32 + t], 0x5a);
    engine_free(e);
    /* Destroy freed nothing of it (ASan would report a double free here). */
    mem[0] = 1;
    free(mem);
}

/* Bytes of [p, p + n) on transparent huge pages (AnonHugePages of the
 * mappings /proc/self/smaps lists over it); -1 if it cannot be read. */
static long long huge_bytes(const void *p, size_t n) {
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f) return -1;
    char line[512];
    unsigned long lo = 0, hi = 0;
    int in = 0;
    long long sum = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned long a, b;
        long long kb;
        if (sscanf(line, "%lx-%lx ", &a, &b) == 2 && strchr(line, '-') < strchr(line, ' ')) {
            lo = a, hi = b;
            in = lo < (unsigned long)p + n && (unsigned long)p < hi;
        } else if (in && sscanf(line, "AnonHugePages: %lld kB", &kb) == 1) {
            sum += kb * 1024;
        }
    }
    fclose(f);
    return sum;
}

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif

/* With APEX_HUGE_ENGINE_KV=1, engine memory on 4 KiB pages (vLLM's KV
 * tensors) is moved onto huge pages when a context takes it (csrc/
 * host_mem.c host_mem_huge), contents unchanged; by default it is left. Where this kernel cannot
 * collapse at all (a probe on a scratch mapping fails) only the contents
 * are checked. */
static void test_external_huge_pages(void **state) {
    (void)state;
    const size_t huge = (size_t)2 << 20, bytes = 4 * huge;
    int can = 0;
    {
        uint8_t *probe = mmap(NULL, 2 * huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        assert_true(probe != MAP_FAILED);
        uint8_t *a = (uint8_t *)(((uintptr_t)probe + huge - 1) & ~(uintptr_t)(huge - 1));
        memset(a, 1, huge);
        can = madvise(a, huge, MADV_COLLAPSE) == 0;
        munmap(probe, 2 * huge);
    }
    for (int off = 0; off < 2; off++) {
        /* L layers of 4 whole huge pages each, 2 MiB-aligned, first touched
         * on 4 KiB pages (no MADV_HUGEPAGE: THP "madvise" mode gives none). */
        uint8_t *raw = mmap(NULL, L * bytes + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                            -1, 0);
        assert_true(raw != MAP_FAILED);
        uint8_t *mem = (uint8_t *)(((uintptr_t)raw + huge - 1) & ~(uintptr_t)(huge - 1));
        for (size_t i = 0; i < L * bytes; i++) mem[i] = (uint8_t)(i * 7 + 3);
        const long long before = huge_bytes(mem, L * bytes);
        void *kv[L];
        for (int l = 0; l < L; l++) kv[l] = mem + (size_t)l * bytes;
        if (!off) setenv("APEX_HUGE_ENGINE_KV", "1", 1);
        apex_config c = paged_config(APEX_DEVICE_NONE, 0);
        c.host_blocks = 0; /* every block of the 8 MiB */
        apex_context *ctx = NULL;
        assert_ok(apex_paged_context_create(&c, kv, bytes, &ctx));
        const long long after = huge_bytes(mem, L * bytes);
        fprintf(stderr, "huge pages (APEX_HUGE_ENGINE_KV %s): %lld -> %lld bytes of %zu (collapse %s)\n",
                off ? "unset" : "1", before, after, L * bytes, can ? "works here" : "refused here");
        for (size_t i = 0; i < L * bytes; i++)
            if (mem[i] != (uint8_t)(i * 7 + 3)) fail_msg("byte %zu changed", i);
        if (can && before == 0 && !off) assert_true(after == (long long)(L * bytes));
        if (off) assert_true(after == before);
        apex_context_destroy(ctx);
        munmap(raw, L * bytes + huge);
        if (!off) unsetenv("APEX_HUGE_ENGINE_KV");
    }
}

/* host_blocks 0 takes every whole block the bytes hold; separate
 * allocations per layer; a device tier beside engine memory (ids past
 * device_blocks are the engine's blocks). */
static void test_external_sizes_and_device(void **state) {
    size_t bytes = (size_t)5 * BLOCK_BYTES_F32 + 100;
    void *kv[L];
    for (int l = 0; l < L; l++) {
        kv[l] = aligned_alloc(64, (bytes + 63) / 64 * 64);
        assert_non_null(kv[l]);
    }
    apex_config c = paged_config(APEX_DEVICE_EMULATED, 8);
    c.host_blocks = 0;
    apex_context *ctx;
    assert_ok(apex_paged_context_create(&c, kv, bytes, &ctx));
    apex_config got;
    assert_ok(apex_context_config(ctx, &got));
    assert_int_equal(got.host_blocks, 5);
    int64_t n = 0;
    assert_ok(apex_paged_claim(ctx, &n));
    assert_int_equal(n, 8 + 5);
    float kr[ROW], q[HQ * D], out[HQ * D];
    for (int x = 0; x < ROW; x++) kr[x] = (float)x / ROW;
    for (int i = 0; i < HQ * D; i++) q[i] = 0.25f;
    int64_t hslot = 12 * BT + 3; /* engine block 12: host block 4, the last */
    assert_ok(apex_paged_kv_write(ctx, 1, 1, &hslot, kr, ROW, kr, ROW, APEX_DTYPE_F32));
    const float *k = (const float *)((uint8_t *)kv[1] + 4 * BLOCK_BYTES_F32);
    assert_true(k[3 * D + 7] == kr[7]);
    int32_t qsl[2] = {0, 1}, len = 4, tab[1] = {12};
    /* Positions 0..2 of the block hold whatever; write them too. */
    int64_t slots[3] = {12 * BT, 12 * BT + 1, 12 * BT + 2};
    float zero[3][ROW];
    memset(zero, 0, sizeof zero);
    assert_ok(apex_paged_kv_write(ctx, 1, 3, slots, zero, ROW, zero, ROW, APEX_DTYPE_F32));
    assert_ok(apex_paged_attention(ctx, 1, 1, qsl, &len, tab, 1, q, out, NULL));
    for (int i = 0; i < HQ * D; i++) assert_true(isfinite(out[i]));
    uint64_t own = 1, ext = 0;
    assert_ok(apex_paged_host_kv(ctx, &own, &ext, NULL));
    assert_int_equal(own, 0);
    assert_int_equal(ext, (uint64_t)L * 5 * BLOCK_BYTES_F32);
    assert_ok(apex_context_destroy(ctx));
    for (int l = 0; l < L; l++) free(kv[l]);
}

/* Every bad argument: APEX_ERR_INVALID_ARG with a message, *out NULL,
 * the memory untouched, nothing leaked (ASan). */
static void test_external_bad_args(void **state) {
    size_t bytes = (size_t)NB * BLOCK_BYTES_F32;
    uint8_t *mem = aligned_alloc(64, 2 * bytes + 64);
    assert_non_null(mem);
    memset(mem, 0xa5, 2 * bytes + 64);
    void *kv[L] = {mem, mem + bytes};
    apex_config c = paged_config(APEX_DEVICE_NONE, 0);
    apex_context *ctx = (apex_context *)(uintptr_t)1;
    assert_status(apex_paged_context_create(&c, kv, bytes, NULL), APEX_ERR_INVALID_ARG);
    assert_status(apex_paged_context_create(&c, NULL, bytes, &ctx), APEX_ERR_INVALID_ARG);
    assert_null(ctx);
    assert_non_null(strstr(apex_last_error(), "host_layer_kv is NULL"));
    void *with_null[L] = {mem, NULL};
    ctx = (apex_context *)(uintptr_t)1;
    assert_status(apex_paged_context_create(&c, with_null, bytes, &ctx), APEX_ERR_INVALID_ARG);
    assert_null(ctx);
    assert_non_null(strstr(apex_last_error(), "host_layer_kv[1] is NULL"));
    void *misaligned[L] = {mem + 32, mem + bytes + 32};
    assert_status(apex_paged_context_create(&c, misaligned, bytes, &ctx), APEX_ERR_INVALID_ARG);
    assert_non_null(strstr(apex_last_error(), "not a multiple of 64"));
    assert_status(apex_paged_context_create(&c, kv, bytes - 1, &ctx), APEX_ERR_INVALID_ARG);
    assert_non_null(strstr(apex_last_error(), "fewer than host_blocks"));
    apex_config c0 = c;
    c0.host_blocks = 0;
    assert_status(apex_paged_context_create(&c0, kv, BLOCK_BYTES_F32 - 1, &ctx),
                  APEX_ERR_INVALID_ARG);
    assert_non_null(strstr(apex_last_error(), "at least one"));
    void *overlap[L] = {mem, mem + bytes - 64};
    assert_status(apex_paged_context_create(&c, overlap, bytes, &ctx), APEX_ERR_INVALID_ARG);
    assert_non_null(strstr(apex_last_error(), "overlap"));
    void *same[L] = {mem, mem};
    assert_status(apex_paged_context_create(&c, same, bytes, &ctx), APEX_ERR_INVALID_ARG);
    apex_config bad = c;
    bad.head_dim = 72;
    assert_status(apex_paged_context_create(&bad, kv, bytes, &ctx), APEX_ERR_UNSUPPORTED);
    assert_null(ctx);
    for (size_t i = 0; i < 2 * bytes + 64; i++)
        if (mem[i] != 0xa5) fail_msg("byte %zu changed by a refused call", i);
    /* Adjacent layers are fine (they touch, they do not overlap). */
    assert_ok(apex_paged_context_create(&c, kv, bytes, &ctx));
    assert_non_null(ctx);
    assert_ok(apex_context_destroy(ctx));
    assert_status(apex_paged_host_kv(NULL, NULL, NULL, NULL), APEX_ERR_INVALID_ARG);
    free(mem);
}

/* fp16 activations and a bf16 KV cache: the conversions on both paths. */
static void test_half_dtypes(void **state) {
    apex_config c = paged_config(APEX_DEVICE_NONE, 0);
    c.kv_dtype = APEX_DTYPE_BF16;
    c.act_dtype = APEX_DTYPE_F16;
    apex_context *ctx;
    assert_ok(apex_context_create(&c, &ctx));
    assert_ok(apex_paged_claim(ctx, NULL));
    enum { N = 19 };
    uint64_t rng = 7;
    uint16_t kh[N][ROW], vh[N][ROW], qh[HQ * D], oh[HQ * D];
    float kf[N][ROW], vf[N][ROW], qf[HQ * D];
    int64_t slots[N];
    int32_t table[2] = {5, 17};
    for (int t = 0; t < N; t++) {
        slots[t] = (int64_t)table[t / BT] * BT + t % BT;
        for (int x = 0; x < ROW; x++) {
            kh[t][x] = apex_f32_to_f16(test_rand_f(&rng));
            vh[t][x] = apex_f32_to_f16(test_rand_f(&rng));
            /* the reference sees what a bf16 cache holds */
            kf[t][x] = apex_bf16_to_f32(apex_f32_to_bf16(apex_f16_to_f32(kh[t][x])));
            vf[t][x] = apex_bf16_to_f32(apex_f32_to_bf16(apex_f16_to_f32(vh[t][x])));
        }
    }
    for (int i = 0; i < HQ * D; i++) qf[i] = apex_f16_to_f32(qh[i] = apex_f32_to_f16(test_rand_f(&rng)));
    assert_ok(apex_paged_kv_write(ctx, 1, N, slots, kh, ROW, vh, ROW, APEX_DTYPE_F16));
    int32_t qsl[2] = {0, 1}, len = N;
    assert_ok(apex_paged_attention(ctx, 1, 1, qsl, &len, table, 2, qh, oh, NULL));
    float k1[N * D], v1[N * D];
    for (int h = 0; h < HQ; h++) {
        for (int t = 0; t < N; t++)
            for (int x = 0; x < D; x++) {
                k1[t * D + x] = kf[t][(h / (HQ / HK)) * D + x];
                v1[t * D + x] = vf[t][(h / (HQ / HK)) * D + x];
            }
        double ref[D];
        test_naive_attention(qf + h * D, D, k1, v1, D, 0, N, 1.0f / sqrtf((float)D), 0, ref);
        for (int x = 0; x < D; x++) assert_true(fabs(apex_f16_to_f32(oh[h * D + x]) - ref[x]) < 2e-3);
    }
    /* The slab holds what was written where the slot mapping said. */
    void *base;
    int64_t nb;
    assert_ok(apex_paged_layer_kv(ctx, 1, APEX_TIER_HOST, &base, &nb));
    assert_int_equal(nb, NB);
    size_t block_bytes = 2 * (size_t)HK * BT * D * 2;
    const uint16_t *blk = (const uint16_t *)((const uint8_t *)base + 17 * block_bytes);
    /* token 18 = block 17 offset 2; V of kv head 1, element 3: a row's
     * element in the row layout, the odd half of the (2, 3) token pair's
     * element 3 in the pair layout (host mode picks it for bf16) */
    const size_t v_h1 = (size_t)HK * BT * D + (size_t)1 * BT * D;
    const int pairs = apex_context_kv_layout(ctx) == APEX_KV_PAIRS;
    assert_int_equal(pairs, apex_context_host_mode(ctx) && (!strcmp(apex_cpu_isa(), "avx512bf16") || !strcmp(apex_cpu_isa(), "amxbf16")));
    assert_int_equal(blk[v_h1 + (pairs ? (2 / 2) * 2 * D + 2 * 3 + 0 : 2 * D + 3)],
                     apex_f32_to_bf16(apex_f16_to_f32(vh[18][D + 3])));
    /* K of kv head 0, token 18 (row 2 of tile 0), element 5: dim pair 2's
     * odd half in the pair layout */
    assert_int_equal(blk[pairs ? ((5 / 2) * 16 + 2) * 2 + 1 : 2 * D + 5],
                     apex_f32_to_bf16(apex_f16_to_f32(kh[18][5])));
    assert_ok(apex_context_destroy(ctx));
}

/* Every bad call fails with a message and changes neither the pool nor the output. */
static void test_errors_change_nothing(void **state) {
    apex_config c = paged_config(APEX_DEVICE_NONE, 0);
    apex_context *ctx;
    assert_ok(apex_context_create(&c, &ctx));
    float k[ROW] = {0}, q[HQ * D] = {0}, out[HQ * D];
    int64_t slot = 3;
    int32_t qsl[2] = {0, 1}, len = 1, table[1] = {0};
    /* Not claimed yet. */
    assert_status(apex_paged_kv_write(ctx, 0, 1, &slot, k, ROW, k, ROW, APEX_DTYPE_F32),
                  APEX_ERR_INVALID_ARG);
    assert_status(apex_paged_attention(ctx, 0, 1, qsl, &len, table, 1, q, out, NULL),
                  APEX_ERR_INVALID_ARG);
    /* A context with sequences cannot be claimed; without, the claim is idempotent. */
    assert_ok(apex_seq_add(ctx, 0, APEX_TIER_HOST));
    assert_status(apex_paged_claim(ctx, NULL), APEX_ERR_INVALID_ARG);
    assert_ok(apex_seq_free(ctx, 0));
    int64_t n1 = 0, n2 = 0;
    assert_ok(apex_paged_claim(ctx, &n1));
    assert_ok(apex_paged_claim(ctx, &n2));
    assert_int_equal(n1, NB);
    assert_int_equal(n2, NB);
    /* The sequence API is closed: the engine owns every block (a sequence
     * added now used to make the paged calls say "claim first"; fuzz_paged). */
    assert_status(apex_seq_add(ctx, 1, APEX_TIER_HOST), APEX_ERR_INVALID_ARG);
    assert_non_null(strstr(apex_last_error(), "claimed"));

    for (int x = 0; x < ROW; x++) k[x] = 1.0f;
    assert_ok(apex_paged_kv_write(ctx, 0, 1, &slot, k, ROW, k, ROW, APEX_DTYPE_F32));
    for (int i = 0; i < HQ * D; i++) out[i] = -7.0f;
    apex_stats before, after;
    assert_ok(apex_stats_get(ctx, &before));
    void *base;
    assert_ok(apex_paged_layer_kv(ctx, 0, APEX_TIER_HOST, &base, NULL));
    size_t slab_bytes = (size_t)NB * 2 * HK * BT * D * sizeof(float);
    void *snap = malloc(slab_bytes);
    memcpy(snap, base, slab_bytes);

    int64_t bad_slot = (int64_t)NB * BT;
    float nan_row[ROW];
    for (int x = 0; x < ROW; x++) nan_row[x] = x == 5 ? NAN : 0.0f;
    int64_t two[2] = {4, bad_slot};
    assert_status(apex_paged_kv_write(ctx, 0, 2, two, k, 0, k, 0, APEX_DTYPE_F32), APEX_ERR_INVALID_ARG);
    assert_status(apex_paged_kv_write(ctx, 0, 2, two, k, ROW, k, ROW, APEX_DTYPE_F32), APEX_ERR_OUT_OF_RANGE);
    assert_status(apex_paged_kv_write(ctx, 0, 1, &slot, k, ROW, nan_row, ROW, APEX_DTYPE_F32), APEX_ERR_INVALID_ARG);
    assert_status(apex_paged_kv_write(ctx, L, 1, &slot, k, ROW, k, ROW, APEX_DTYPE_F32), APEX_ERR_OUT_OF_RANGE);
    assert_status(apex_paged_kv_write(ctx, 0, 1, &slot, k, ROW, k, ROW, (apex_dtype)9), APEX_ERR_INVALID_ARG);

    int32_t len4 = 4, table_bad[1] = {NB}, qsl_bad[2] = {0, -1}, qsl2[2] = {0, 2};
    assert_status(apex_paged_attention(ctx, 0, 1, qsl, &len, table_bad, 1, q, out, NULL), APEX_ERR_OUT_OF_RANGE);
    assert_status(apex_paged_attention(ctx, 0, 1, qsl_bad, &len, table, 1, q, out, NULL), APEX_ERR_INVALID_ARG);
    assert_status(apex_paged_attention(ctx, 0, 1, qsl2, &len, table, 1, q, out, NULL), APEX_ERR_OUT_OF_RANGE);
    assert_status(apex_paged_attention(ctx, 0, 1, qsl, &len4, table, 0, q, out, NULL), APEX_ERR_INVALID_ARG);
    int32_t too_long = MAXLEN + 1;
    assert_status(apex_paged_attention(ctx, 0, 1, qsl, &too_long, table, 1, q, out, NULL), APEX_ERR_OUT_OF_RANGE);
    assert_status(apex_paged_attention(ctx, -1, 1, qsl, &len, table, 1, q, out, NULL), APEX_ERR_OUT_OF_RANGE);
    q[7] = INFINITY;
    assert_status(apex_paged_attention(ctx, 0, 1, qsl, &len, table, 1, q, out, NULL), APEX_ERR_INVALID_ARG);
    q[7] = 0;
    apex_attn_opts o = apex_attn_opts_default(ctx);
    o.scale = -1;
    assert_status(apex_paged_attention(ctx, 0, 1, qsl, &len, table, 1, q, out, &o), APEX_ERR_INVALID_ARG);

    assert_ok(apex_stats_get(ctx, &after));
    assert_int_equal(after.errors, before.errors + 13);
    assert_int_equal(after.kv_rows_written, before.kv_rows_written);
    assert_int_equal(after.attention_calls, before.attention_calls);
    assert_memory_equal(snap, base, slab_bytes);
    for (int i = 0; i < HQ * D; i++) assert_true(out[i] == -7.0f);
    /* An empty batch is fine and touches nothing. */
    int32_t qsl0[1] = {0};
    assert_ok(apex_paged_attention(ctx, 0, 0, qsl0, NULL, NULL, 0, NULL, NULL, NULL));
    assert_ok(apex_paged_kv_write(ctx, 0, 0, NULL, NULL, HK * D, NULL, HK * D, APEX_DTYPE_F32));
    apex_stats empty;
    assert_ok(apex_stats_get(ctx, &empty));
    assert_int_equal(empty.attention_calls, after.attention_calls); /* no counter moves */
    assert_memory_equal(snap, base, slab_bytes);
    free(snap);
    assert_ok(apex_context_destroy(ctx));
}

/* With a device, engine ids below device_blocks are device-tier blocks and
 * ids past them the host pool's: a row written to either is where the
 * layout says, and attention over either gives its V row back. */
static void test_device_blocks_split_ids(void **state) {
    if (tier_device() == APEX_DEVICE_CUDA) skip(); /* reads the device slab from the host */
    apex_config c = paged_config(APEX_DEVICE_EMULATED, 8);
    apex_context *ctx;
    assert_ok(apex_context_create(&c, &ctx));
    int64_t n = 0;
    assert_ok(apex_paged_claim(ctx, &n));
    assert_int_equal(n, 8 + NB);
    void *dbase, *hbase;
    int64_t dn, hn;
    assert_ok(apex_paged_layer_kv(ctx, 0, APEX_TIER_DEVICE, &dbase, &dn));
    assert_ok(apex_paged_layer_kv(ctx, 0, APEX_TIER_HOST, &hbase, &hn));
    assert_int_equal(dn, 8);
    assert_int_equal(hn, NB);
    float k[ROW], v[ROW], q[HQ * D], out[HQ * D];
    for (int x = 0; x < ROW; x++) {
        k[x] = (float)x / ROW;
        v[x] = 1.0f - (float)x / ROW;
    }
    for (int i = 0; i < HQ * D; i++) q[i] = 0.5f;
    int64_t dslot = 3 * BT, hslot = 8 * BT; /* block 3: device; block 8: host block 0 */
    assert_ok(apex_paged_kv_write(ctx, 0, 1, &dslot, k, ROW, v, ROW, APEX_DTYPE_F32));
    assert_ok(apex_paged_kv_write(ctx, 0, 1, &hslot, v, ROW, k, ROW, APEX_DTYPE_F32));
    /* The emulated device's memory is host memory: read the slabs directly. */
    const float *dk = (const float *)((uint8_t *)dbase + 3 * BLOCK_BYTES_F32);
    const float *hk = (const float *)hbase;
    assert_true(dk[(size_t)1 * BT * D + 5] == k[D + 5]);
    assert_true(dk[(size_t)HK * BT * D + 7] == v[7]);
    assert_true(hk[(size_t)1 * BT * D + 5] == v[D + 5]);
    int32_t qsl[2] = {0, 1}, len = 1, dtab[1] = {3}, htab[1] = {8};
    const float *want[2] = {v, k};
    for (int t = 0; t < 2; t++) {
        assert_ok(apex_paged_attention(ctx, 0, 1, qsl, &len, t ? htab : dtab, 1, q, out, NULL));
        /* One token: the output is its V row (kv head h/2 for q head h). */
        for (int h = 0; h < HQ; h++)
            for (int x = 0; x < D; x++)
                assert_float_equal(out[h * D + x], want[t][(h / 2) * D + x], 1e-6);
    }
    apex_stats st;
    assert_ok(apex_stats_get(ctx, &st));
    assert_int_equal(st.seqs_attended_device, 1);
    assert_int_equal(st.seqs_attended_host, 1);
    assert_ok(apex_context_destroy(ctx));
}

/* Device-tier, host-tier and mixed-tier sequences in one batch: prefill
 * appends, a device-tier chunk longer than max_batch, whole prompts,
 * interleaved decode rows, a decode step whose kv_write crosses tiers. */
static void test_tiers_match_reference(void **state) {
    engine *e = engine_new_tiers(APEX_DTYPE_F32);
    if (!e) skip();
    mixed_batch_matches_reference(e, 1); /* sequence 0's decode row on the device */
    int32_t qsl_chunks[NSEQ + 1] = {0, 12, 13, 14, 17}; /* 12 | 1 | 1 | 3 (whole prompt) */
    check_batch(e, qsl_chunks, APEX_DTYPE_F32, 2e-5, 12 + 3);
    engine_step(e, APEX_DTYPE_F32);
    int32_t qsl_decode[NSEQ + 1] = {0, 1, 2, 3, 4};
    check_batch(e, qsl_decode, APEX_DTYPE_F32, 2e-5, 2);
    if (tier_device() == APEX_DEVICE_CUDA) { /* device memory: not readable here */
        engine_free(e);
        return;
    }
    /* Rows landed on their tier: sequence 0 position 37 (device block 7),
     * sequence 2 position 20 (host block 9). */
    void *dbase, *hbase;
    assert_ok(apex_paged_layer_kv(e->ctx, 1, APEX_TIER_DEVICE, &dbase, NULL));
    assert_ok(apex_paged_layer_kv(e->ctx, 1, APEX_TIER_HOST, &hbase, NULL));
    const float *dk = (const float *)((uint8_t *)dbase + 7 * BLOCK_BYTES_F32);
    const float *hk = (const float *)((uint8_t *)hbase + 9 * BLOCK_BYTES_F32);
    assert_true(dk[(37 % BT) * D + 3] == e->kv[1][0][37][0][3]);
    assert_true(hk[(size_t)HK * BT * D + (20 % BT) * D + 4] == e->kv[1][2][20][1][4]);
    engine_free(e);
}

/* A bf16 KV cache on both tiers with fp16 and bf16 activations, fp16 K/V rows. */
static void test_tiers_half_dtypes(void **state) {
    engine *e = engine_new_tiers(APEX_DTYPE_BF16);
    if (!e) skip();
    engine_append(e, 0, 37);
    engine_append(e, 1, 20);
    engine_append(e, 2, 50);
    engine_append(e, 3, 3);
    int32_t qsl[NSEQ + 1] = {0, 12, 13, 14, 17};
    check_batch(e, qsl, APEX_DTYPE_F16, 2e-3, 15);
    engine_step(e, APEX_DTYPE_F16); /* fp16 rows converted by both tiers */
    int32_t qsl_decode[NSEQ + 1] = {0, 1, 2, 3, 4};
    check_batch(e, qsl_decode, APEX_DTYPE_BF16, 1e-2, 2);
    engine_free(e);
}

/* With device-tier blocks involved, every refused call changes neither
 * tier's blocks nor the output. */
static void test_tiers_errors_change_nothing(void **state) {
    if (tier_device() == APEX_DEVICE_CUDA) skip(); /* reads the device slab from the host */
    engine *e = engine_new_tiers(APEX_DTYPE_F32);
    engine_append(e, 0, 20);
    engine_append(e, 2, 20);
    void *dbase, *hbase;
    assert_ok(apex_paged_layer_kv(e->ctx, 0, APEX_TIER_DEVICE, &dbase, NULL));
    assert_ok(apex_paged_layer_kv(e->ctx, 0, APEX_TIER_HOST, &hbase, NULL));
    size_t dbytes = (size_t)ND * BLOCK_BYTES_F32, hbytes = (size_t)NB * BLOCK_BYTES_F32;
    void *dsnap = malloc(dbytes), *hsnap = malloc(hbytes);
    memcpy(dsnap, dbase, dbytes);
    memcpy(hsnap, hbase, hbytes);
    apex_stats before, after;
    assert_ok(apex_stats_get(e->ctx, &before));

    float k[3][ROW], q[2][HQ * D], out[2][HQ * D];
    for (int r = 0; r < 3; r++)
        for (int x = 0; x < ROW; x++) k[r][x] = 1.0f;
    k[2][9] = NAN;
    /* A device row and a host row first, then the bad one. */
    int64_t nan_slots[3] = {2 * BT + 4, (ND + 11) * BT + 4, 5 * BT + 1};
    assert_status(apex_paged_kv_write(e->ctx, 0, 3, nan_slots, k, ROW, k, ROW, APEX_DTYPE_F32),
                  APEX_ERR_INVALID_ARG);
    int64_t far_slots[2] = {2 * BT + 4, (int64_t)(ND + NB) * BT};
    assert_status(apex_paged_kv_write(e->ctx, 0, 2, far_slots, k, ROW, k, ROW, APEX_DTYPE_F32),
                  APEX_ERR_OUT_OF_RANGE);

    for (int r = 0; r < 2; r++)
        for (int i = 0; i < HQ * D; i++) {
            q[r][i] = 0.1f;
            out[r][i] = -7.0f;
        }
    int32_t qsl[3] = {0, 1, 2}, lens[2] = {20, 20};
    int32_t table[2][2] = {{5, 2}, {6, ND + 9}}; /* device, mixed */
    q[1][3] = INFINITY;
    assert_status(apex_paged_attention(e->ctx, 0, 2, qsl, lens, &table[0][0], 2, q, out, NULL),
                  APEX_ERR_INVALID_ARG);
    q[1][3] = 0.1f;
    table[1][1] = ND + NB;
    assert_status(apex_paged_attention(e->ctx, 0, 2, qsl, lens, &table[0][0], 2, q, out, NULL),
                  APEX_ERR_OUT_OF_RANGE);

    assert_ok(apex_stats_get(e->ctx, &after));
    assert_int_equal(after.errors, before.errors + 4);
    assert_int_equal(after.kv_rows_written, before.kv_rows_written);
    assert_int_equal(after.attention_calls, before.attention_calls);
    assert_memory_equal(dsnap, dbase, dbytes);
    assert_memory_equal(hsnap, hbase, hbytes);
    for (int r = 0; r < 2; r++)
        for (int i = 0; i < HQ * D; i++) assert_true(out[r][i] == -7.0f);
    free(dsnap);
    free(hsnap);
    engine_free(e);
}

/* The two ownership models of a context's blocks are exclusive, and each
 * refusal says which model owns them. */
static void assert_refused(apex_status st, const char *says) {
    assert_int_equal(st, APEX_ERR_INVALID_ARG);
    if (!strstr(apex_last_error(), says))
        fail_msg("message \"%s\" does not say \"%s\"", apex_last_error(), says);
}

static void test_ownership(void **state) {
    (void)state;
    apex_config c = paged_config(APEX_DEVICE_EMULATED, 8);
    apex_context *ctx;
    assert_ok(apex_context_create(&c, &ctx));
    float k[ROW] = {0}, q[HQ * D] = {0}, out[HQ * D];
    int64_t slot = 3;
    int32_t qsl[2] = {0, 1}, len = 1, table[1] = {0}, seq = 0, pos = 0, ntok = 1;
    /* Neither model yet: the paged calls want a claim. */
    assert_refused(apex_paged_kv_write(ctx, 0, 1, &slot, k, ROW, k, ROW, APEX_DTYPE_F32),
                   "call apex_paged_claim first");
    /* APEX's sequences own the blocks: the paged calls and the claim say so. */
    assert_ok(apex_seq_add(ctx, 0, APEX_TIER_HOST));
    assert_refused(apex_paged_kv_write(ctx, 0, 1, &slot, k, ROW, k, ROW, APEX_DTYPE_F32),
                   "belong to APEX's sequences");
    assert_refused(apex_paged_attention(ctx, 0, 1, qsl, &len, table, 1, q, out, NULL),
                   "belong to APEX's sequences");
    assert_refused(apex_paged_claim(ctx, NULL), "sequences exist");
    /* The last sequence freed: free again to claim. */
    assert_ok(apex_seq_free(ctx, 0));
    assert_ok(apex_paged_claim(ctx, NULL));
    apex_stats before, after;
    assert_ok(apex_stats_get(ctx, &before));
    /* The engine owns them: every call of the sequence model is refused. */
    const char *says = "belong to the engine";
    apex_seq_info info;
    apex_step_item item = {0};
    apex_step_decision dec;
    apex_stream s;
    void *dq, *dout;
    assert_ok(apex_stream_create(ctx, &s)); /* device calls are no model's */
    assert_ok(apex_device_alloc(ctx, sizeof q, &dq));
    assert_ok(apex_device_alloc(ctx, sizeof q, &dout));
    assert_refused(apex_seq_add(ctx, 1, APEX_TIER_HOST), says);
    assert_non_null(strstr(apex_last_error(), "claimed")); /* the older message's word */
    assert_refused(apex_seq_reserve(ctx, 0, 1, &pos), says);
    assert_refused(apex_seq_fork(ctx, 0, 1), says);
    assert_refused(apex_seq_free(ctx, 0), says);
    assert_refused(apex_seq_get_info(ctx, 0, &info), says);
    assert_refused(apex_seq_migrate(ctx, 0, APEX_TIER_DEVICE), says);
    assert_refused(apex_kv_write(ctx, 0, 1, &seq, &pos, k, k, APEX_DTYPE_F32), says);
    assert_refused(apex_kv_read(ctx, 0, 1, &seq, &pos, k, k, APEX_DTYPE_F32), says);
    assert_refused(apex_attention(ctx, 0, 1, &seq, q, out, NULL), says);
    assert_refused(apex_kv_write_async(ctx, 0, 1, &seq, &pos, dq, dq, APEX_DTYPE_F32, s), says);
    assert_refused(apex_attention_async(ctx, 0, 1, &seq, dq, dout, NULL, s), says);
    assert_refused(apex_prefill_async(ctx, 0, 1, &seq, &ntok, dq, dq, dq, dout, NULL, s), says);
    /* apex_sched_enable and apex_sched_observe serve apex_sched_place on a
     * claimed context (test_place.c); the sequence scheduler is refused. */
    assert_refused(apex_sched_step(ctx, 1, &item, &dec, NULL), says);
    assert_ok(apex_stats_get(ctx, &after));
    assert_int_equal(after.errors - before.errors, 13); /* each counted, nothing else changed */
    assert_int_equal(after.blocks_free[APEX_TIER_HOST], 0);
    assert_int_equal(after.seqs_active, 0);
    /* ...while the engine's calls work. */
    assert_ok(apex_paged_kv_write(ctx, 0, 1, &slot, k, ROW, k, ROW, APEX_DTYPE_F32));
    apex_device_free(ctx, dq);
    apex_device_free(ctx, dout);
    assert_ok(apex_stream_destroy(ctx, s));
    apex_context_destroy(ctx);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mixed_batch_matches_reference),
        cmocka_unit_test(test_half_dtypes),
        cmocka_unit_test(test_errors_change_nothing),
        cmocka_unit_test(test_ownership),
        cmocka_unit_test(test_device_blocks_split_ids),
        cmocka_unit_test(test_tiers_match_reference),
        cmocka_unit_test(test_tiers_half_dtypes),
        cmocka_unit_test(test_tiers_errors_change_nothing),
        cmocka_unit_test(test_external_host_memory),
        cmocka_unit_test(test_external_huge_pages),
        cmocka_unit_test(test_external_sizes_and_device),
        cmocka_unit_test(test_external_bad_args),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
