/* test_device_emulated.c - the emulated device against device.h's CUDA-like
 * semantics: stream order, cross-stream independence, events, flag waits,
 * capacity, each kernel against a direct computation, argument refusal, and
 * teardown with work still pending. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "test_util.h"

#include "cpu_attn/cpu_attn.h"
#include "cpu_attn/dtype_convert.h"
#include "csrc/device.h"
#include "csrc/env.h"

#define MiB ((size_t)1 << 20)

typedef struct fix {
    apex_device *dev;
    const device_iface *f;
} fix;

static int setup(void **state) {
    fix *x = calloc(1, sizeof *x);
    if (!x || device_emulated_create(64 * MiB, &x->dev) != APEX_OK) return -1;
    x->f = x->dev->iface;
    *state = x;
    return 0;
}

static int teardown(void **state) {
    fix *x = *state;
    x->f->destroy(x->dev);
    free(x);
    return 0;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void set_flag(uint32_t *flag, uint32_t v) { __atomic_store_n(flag, v, __ATOMIC_RELEASE); }

static void fill_u8(uint8_t *p, size_t n, uint8_t seed) {
    for (size_t i = 0; i < n; i++) p[i] = (uint8_t)(seed + i * 7);
}

/* ------------------------------------------------------------ memory */

static void test_memory_capacity(void **state) {
    (void)state;
    apex_device *dev;
    assert_ok(device_emulated_create(1 * MiB, &dev));
    const device_iface *f = dev->iface;
    assert_string_equal(f->name, "emulated");
    assert_int_equal(f->mem_free_bytes(dev), 1 * MiB);

    void *a = NULL, *b = NULL, *c = (void *)1;
    assert_ok(f->mem_alloc(dev, 512 * 1024 + 1, &a));
    assert_non_null(a);
    assert_int_equal((uintptr_t)a % 256, 0);
    memset(a, 0xab, 512 * 1024 + 1); /* really usable */
    size_t left = f->mem_free_bytes(dev);
    assert_int_equal(left, 1 * MiB - (512 * 1024 + 256)); /* rounded to 256 */

    assert_status(f->mem_alloc(dev, 768 * 1024, &c), APEX_ERR_NO_MEMORY);
    assert_null(c);
    assert_int_equal(f->mem_free_bytes(dev), left); /* nothing changed */

    f->mem_free(dev, a);
    assert_int_equal(f->mem_free_bytes(dev), 1 * MiB);
    assert_ok(f->mem_alloc(dev, 768 * 1024, &c));
    assert_ok(f->mem_alloc(dev, 1000, &b));
    f->mem_free(dev, NULL);

    /* Pinned host memory: page-aligned, not charged to the device. */
    void *h = NULL;
    left = f->mem_free_bytes(dev);
    assert_ok(f->host_alloc(dev, 3 * MiB, &h));
    assert_int_equal((uintptr_t)h % (uintptr_t)sysconf(_SC_PAGESIZE), 0);
    memset(h, 1, 3 * MiB);
    assert_int_equal(f->mem_free_bytes(dev), left);
    f->host_free(dev, h);
    void *h2 = NULL;
    assert_ok(f->host_alloc(dev, 10, &h2));

    f->mem_free(dev, b);
    /* c and h2 stay allocated: destroy frees them (LSan would say if not). */
    f->destroy(dev);
}

/* ------------------------------------------------------------ ordering */

static void test_in_order(void **state) {
    fix *x = *state;
    const device_iface *f = x->f;
    device_stream *s;
    assert_ok(f->stream_create(x->dev, &s));
    uint32_t *flag;
    assert_ok(f->host_alloc(x->dev, sizeof *flag, (void **)&flag));
    *flag = 0;
    enum { N = 4096 };
    uint8_t a[N], b[N], c[N], e[N];
    uint8_t *d;
    assert_ok(f->mem_alloc(x->dev, N, (void **)&d));
    fill_u8(a, N, 1);
    fill_u8(b, N, 2);
    fill_u8(c, N, 3);
    memset(d, 0, N);
    memset(e, 0, N);

    /* Everything is queued behind the gate before any of it runs. */
    assert_ok(f->wait_flag(x->dev, s, flag, 1));
    assert_ok(f->memcpy_async(x->dev, d, a, N, s));
    assert_ok(f->memcpy_async(x->dev, d, b, N, s));
    assert_ok(f->memcpy_async(x->dev, d, c, N, s));
    assert_ok(f->memcpy_async(x->dev, e, d, N, s));
    sleep_ms(5);
    assert_int_equal(d[0], 0); /* still blocked */
    set_flag(flag, 1);
    assert_ok(f->stream_sync(x->dev, s));
    assert_memory_equal(e, c, N);
    assert_memory_equal(d, c, N);

    f->mem_free(x->dev, d);
    f->host_free(x->dev, flag);
    f->stream_destroy(x->dev, s);
}

static void test_streams_independent(void **state) {
    fix *x = *state;
    const device_iface *f = x->f;
    device_stream *sa, *sb;
    device_event *ea;
    assert_ok(f->stream_create(x->dev, &sa));
    assert_ok(f->stream_create(x->dev, &sb));
    assert_ok(f->event_create(x->dev, &ea));
    uint32_t flag = 0;
    uint8_t src[256], ya[256], yb[256];
    fill_u8(src, sizeof src, 9);
    memset(ya, 0, sizeof ya);
    memset(yb, 0, sizeof yb);

    assert_ok(f->wait_flag(x->dev, sa, &flag, 1));
    assert_ok(f->memcpy_async(x->dev, ya, src, sizeof src, sa));
    assert_ok(f->event_record(x->dev, ea, sa));
    assert_ok(f->memcpy_async(x->dev, yb, src, sizeof src, sb));
    assert_ok(f->stream_sync(x->dev, sb)); /* B does not wait for blocked A */
    assert_memory_equal(yb, src, sizeof src);
    assert_int_equal(f->event_done(x->dev, ea), 0);
    assert_int_equal(ya[5], 0);

    set_flag(&flag, 1);
    assert_ok(f->event_sync(x->dev, ea));
    assert_int_equal(f->event_done(x->dev, ea), 1);
    assert_memory_equal(ya, src, sizeof src);
    f->event_destroy(x->dev, ea);
    f->stream_destroy(x->dev, sa);
    f->stream_destroy(x->dev, sb);
}

static void test_events(void **state) {
    fix *x = *state;
    const device_iface *f = x->f;
    device_stream *sa, *sb, *sc;
    device_event *e, *eb, *never;
    assert_ok(f->stream_create(x->dev, &sa));
    assert_ok(f->stream_create(x->dev, &sb));
    assert_ok(f->stream_create(x->dev, &sc));
    assert_ok(f->event_create(x->dev, &e));
    assert_ok(f->event_create(x->dev, &eb));
    assert_ok(f->event_create(x->dev, &never));
    uint32_t gate1 = 0, gate2 = 0;
    enum { N = 1000 };
    uint8_t src[N], dst[N], dst2[N];
    uint8_t *mid;
    assert_ok(f->mem_alloc(x->dev, N, (void **)&mid));
    fill_u8(src, N, 5);
    memset(mid, 0, N);
    memset(dst, 0, N);
    memset(dst2, 0, N);

    /* Never recorded: done, sync returns, a wait on it is a no-op. */
    assert_int_equal(f->event_done(x->dev, never), 1);
    assert_ok(f->event_sync(x->dev, never));
    assert_ok(f->event_wait(x->dev, sb, never));
    assert_ok(f->stream_sync(x->dev, sb));

    /* A: gate, src -> mid, record e (record 1). B: wait e, mid -> dst. */
    assert_ok(f->wait_flag(x->dev, sa, &gate1, 1));
    assert_ok(f->memcpy_async(x->dev, mid, src, N, sa));
    assert_ok(f->event_record(x->dev, e, sa));
    assert_ok(f->event_wait(x->dev, sb, e));
    assert_ok(f->memcpy_async(x->dev, dst, mid, N, sb));
    assert_ok(f->event_record(x->dev, eb, sb));
    /* e re-recorded on C behind another gate (record 2): B's wait, taken
     * before it, is for record 1 only. */
    assert_ok(f->wait_flag(x->dev, sc, &gate2, 1));
    assert_ok(f->event_record(x->dev, e, sc));
    sleep_ms(3);
    assert_int_equal(f->event_done(x->dev, e), 0);
    assert_int_equal(f->event_done(x->dev, eb), 0);

    set_flag(&gate1, 1);
    assert_ok(f->event_sync(x->dev, eb));
    assert_memory_equal(dst, src, N);
    assert_int_equal(f->event_done(x->dev, e), 0); /* record 2 still pending */

    /* A wait taken now is for record 2. */
    assert_ok(f->event_wait(x->dev, sb, e));
    assert_ok(f->memcpy_async(x->dev, dst2, dst, N, sb));
    assert_ok(f->event_record(x->dev, eb, sb)); /* re-arms eb */
    sleep_ms(3);
    assert_int_equal(f->event_done(x->dev, eb), 0);
    assert_int_equal(dst2[1], 0);
    set_flag(&gate2, 1);
    assert_ok(f->event_sync(x->dev, e));
    assert_ok(f->stream_sync(x->dev, sb));
    assert_int_equal(f->event_done(x->dev, eb), 1);
    assert_memory_equal(dst2, src, N);

    f->mem_free(x->dev, mid);
    f->event_destroy(x->dev, e);
    f->event_destroy(x->dev, eb);
    f->event_destroy(x->dev, never);
    f->stream_destroy(x->dev, sa);
    f->stream_destroy(x->dev, sb);
    f->stream_destroy(x->dev, sc);
}

typedef struct flag_writer {
    uint32_t *flag;
    uint32_t value;
    int delay_ms;
} flag_writer;

static void *write_flag_later(void *arg) {
    flag_writer *w = arg;
    sleep_ms(w->delay_ms);
    set_flag(w->flag, w->value);
    return NULL;
}

static void test_wait_flag_other_thread(void **state) {
    fix *x = *state;
    const device_iface *f = x->f;
    device_stream *s;
    device_event *ev;
    assert_ok(f->stream_create(x->dev, &s));
    assert_ok(f->event_create(x->dev, &ev));
    uint32_t *flag;
    assert_ok(f->host_alloc(x->dev, 64, (void **)&flag));
    *flag = 0xfffffff0u; /* the comparison is modulo 2^32 */
    uint8_t src[64], dst[64];
    fill_u8(src, 64, 77);
    memset(dst, 0, 64);

    /* Enqueueing returns at once although the stream is blocked. */
    assert_ok(f->wait_flag(x->dev, s, flag, 0x10u));
    assert_ok(f->memcpy_async(x->dev, dst, src, 64, s));
    assert_ok(f->event_record(x->dev, ev, s));
    sleep_ms(2);
    assert_int_equal(f->event_done(x->dev, ev), 0);
    set_flag(flag, 0x0fu); /* wrapped past 0 but still below 0x10 */
    sleep_ms(2);
    assert_int_equal(f->event_done(x->dev, ev), 0);

    pthread_t th;
    flag_writer w = {flag, 0x11u, 10}; /* past the value also releases */
    assert_int_equal(pthread_create(&th, NULL, write_flag_later, &w), 0);
    assert_ok(f->stream_sync(x->dev, s));
    assert_memory_equal(dst, src, 64);
    assert_int_equal(f->event_done(x->dev, ev), 1);
    pthread_join(th, NULL);

    f->event_destroy(x->dev, ev);
    f->host_free(x->dev, flag);
    f->stream_destroy(x->dev, s);
}

/* ------------------------------------------------------------ kernels */

typedef struct decode_case {
    int32_t n_q_heads, n_kv_heads, head_dim, block_tokens;
    apex_dtype kv, q, out;
    float softcap;
    int32_t window;
} decode_case;

static void run_decode_case(fix *x, const decode_case *dc, uint64_t seed) {
    const device_iface *f = x->f;
    enum { NS = 3, STRIDE = 9, NBLK = 20 }; /* 70 tokens in blocks of 8 */
    const int32_t lens[NS] = {1, 37, 70};
    const int32_t H = dc->n_q_heads, KH = dc->n_kv_heads, D = dc->head_dim,
                  BT = dc->block_tokens;
    const size_t block_bytes = 2 * (size_t)KH * BT * D * apex_dtype_size(dc->kv) + 32;
    const size_t q_elems = (size_t)NS * H * D;

    uint8_t *kv;
    void *q, *out;
    int32_t *lens_d, *table_d;
    assert_ok(f->mem_alloc(x->dev, NBLK * block_bytes, (void **)&kv));
    assert_ok(f->mem_alloc(x->dev, q_elems * 4, &q));
    assert_ok(f->mem_alloc(x->dev, q_elems * 4, &out));
    assert_ok(f->mem_alloc(x->dev, sizeof lens, (void **)&lens_d));
    assert_ok(f->mem_alloc(x->dev, NS * STRIDE * sizeof(int32_t), (void **)&table_d));

    for (size_t i = 0; i < NBLK * block_bytes / apex_dtype_size(dc->kv); i++)
        apex_store_f32(kv, dc->kv, i, test_rand_f(&seed));
    for (size_t i = 0; i < q_elems; i++) apex_store_f32(q, dc->q, i, test_rand_f(&seed));
    memcpy(lens_d, lens, sizeof lens);
    for (int i = 0; i < NS * STRIDE; i++) table_d[i] = (i * 7 + 3) % NBLK; /* scattered */
    memset(out, 0x7f, q_elems * 4);

    apex_cuda_decode a = {
        .n_seqs = NS, .n_q_heads = H, .n_kv_heads = KH, .head_dim = D, .block_tokens = BT,
        .kv_dtype = dc->kv, .q_dtype = dc->q, .out_dtype = dc->out, .q = q, .out = out,
        .seq_lens = lens_d, .block_table = table_d, .block_table_stride = STRIDE, .kv = kv,
        .block_bytes = block_bytes, .scale = 1.0f / 8.0f, .softcap = dc->softcap,
        .window = dc->window, .max_seq_len = 70,
    };
    device_stream *s;
    assert_ok(f->stream_create(x->dev, &s));
    assert_ok(f->paged_decode(x->dev, &a, s));
    a.out = NULL; /* the struct was copied at enqueue */
    assert_ok(f->stream_sync(x->dev, s));

    void *want = malloc(q_elems * 4);
    memset(want, 0x7f, q_elems * 4);
    const cpu_attn_geom g = {H, KH, D, BT, dc->kv, 0};
    const cpu_attn_batch b = {NS, q, dc->q, want, dc->out, lens_d, table_d, STRIDE, kv,
                              block_bytes, 1.0f / 8.0f, dc->softcap, dc->window};
    assert_int_equal(cpu_attn_reference(&g, &b), 0);
    assert_memory_equal(out, want, q_elems * 4);
    /* and it really computed something finite */
    for (size_t i = 0; i < q_elems; i++) {
        float v = apex_load_f32(out, dc->out, i);
        assert_true(v == v && v > -2.0f && v < 2.0f);
    }

    free(want);
    f->stream_destroy(x->dev, s);
    f->mem_free(x->dev, kv);
    f->mem_free(x->dev, q);
    f->mem_free(x->dev, out);
    f->mem_free(x->dev, lens_d);
    f->mem_free(x->dev, table_d);
}

static void test_paged_decode(void **state) {
    fix *x = *state;
    const decode_case cases[] = {
        {8, 2, 64, 16, APEX_DTYPE_BF16, APEX_DTYPE_F32, APEX_DTYPE_F32, 0.0f, 0},
        {4, 4, 128, 8, APEX_DTYPE_F16, APEX_DTYPE_F16, APEX_DTYPE_F16, 5.0f, 20},
        {6, 1, 80, 32, APEX_DTYPE_F32, APEX_DTYPE_BF16, APEX_DTYPE_BF16, 0.0f, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        run_decode_case(x, &cases[i], 1000 + i);
}

static void test_kv_append(void **state) {
    fix *x = *state;
    const device_iface *f = x->f;
    enum { ROWS = 5, KH = 2, D = 8, BT = 4, NBLK = 4, KSTR = 20 };
    const apex_dtype kinds[][2] = {{APEX_DTYPE_F32, APEX_DTYPE_F16},
                                   {APEX_DTYPE_BF16, APEX_DTYPE_F32},
                                   {APEX_DTYPE_F16, APEX_DTYPE_BF16}};
    const int64_t slots[ROWS] = {5, -1, 0, 13, 7};
    uint64_t seed = 42;
    device_stream *s;
    assert_ok(f->stream_create(x->dev, &s));
    for (size_t kc = 0; kc < 3; kc++) {
        const apex_dtype src_t = kinds[kc][0], kv_t = kinds[kc][1];
        const size_t es = apex_dtype_size(kv_t);
        const size_t half = (size_t)KH * BT * D * es;
        const size_t block_bytes = 2 * half + 64;
        uint8_t *kv;
        int64_t *slots_d;
        void *k, *v;
        assert_ok(f->mem_alloc(x->dev, NBLK * block_bytes, (void **)&kv));
        assert_ok(f->mem_alloc(x->dev, sizeof slots, (void **)&slots_d));
        assert_ok(f->host_alloc(x->dev, ROWS * KSTR * 4, &k));
        assert_ok(f->host_alloc(x->dev, ROWS * KH * D * 4, &v));
        memcpy(slots_d, slots, sizeof slots);
        for (size_t i = 0; i < ROWS * KSTR; i++) apex_store_f32(k, src_t, i, test_rand_f(&seed));
        for (size_t i = 0; i < ROWS * KH * D; i++) apex_store_f32(v, src_t, i, test_rand_f(&seed));
        memset(kv, 0xcd, NBLK * block_bytes);
        uint8_t *before = malloc(NBLK * block_bytes);
        memcpy(before, kv, NBLK * block_bytes);

        apex_cuda_kv_append a = {.n_rows = ROWS, .n_kv_heads = KH, .head_dim = D,
                                 .block_tokens = BT, .k = k, .v = v, .k_stride = KSTR,
                                 .v_stride = 0, .src_dtype = src_t, .slots = slots_d, .kv = kv,
                                 .block_bytes = block_bytes, .kv_dtype = kv_t};
        assert_ok(f->kv_append(x->dev, &a, s));
        assert_ok(f->stream_sync(x->dev, s));

        /* Build the expected slab from `before` by direct placement. */
        for (int r = 0; r < ROWS; r++) {
            if (slots[r] < 0) continue;
            uint8_t *blk = before + (size_t)(slots[r] / BT) * block_bytes;
            const int off = (int)(slots[r] % BT);
            for (int h = 0; h < KH; h++)
                for (int d = 0; d < D; d++) {
                    const size_t at = ((size_t)h * BT + off) * D + d;
                    apex_store_f32(blk, kv_t, at, apex_load_f32(k, src_t, r * KSTR + h * D + d));
                    apex_store_f32(blk + half, kv_t, at,
                                   apex_load_f32(v, src_t, (size_t)r * KH * D + h * D + d));
                }
        }
        assert_memory_equal(kv, before, NBLK * block_bytes);
        /* one spot check against hand-computed coordinates: slot 13 = block
         * 3 offset 1, V of head 1, dim 2, from row 3 */
        float got = apex_load_f32(kv + 3 * block_bytes + half, kv_t, (size_t)(1 * BT + 1) * D + 2);
        float src = apex_load_f32(v, src_t, 3 * KH * D + 1 * D + 2);
        float want = kv_t == APEX_DTYPE_F16    ? apex_f16_to_f32(apex_f32_to_f16(src))
                     : kv_t == APEX_DTYPE_BF16 ? apex_bf16_to_f32(apex_f32_to_bf16(src))
                                               : src;
        assert_true(got == want);

        free(before);
        f->mem_free(x->dev, kv);
        f->mem_free(x->dev, slots_d);
        f->host_free(x->dev, k);
        f->host_free(x->dev, v);
    }
    f->stream_destroy(x->dev, s);
}

static void test_gather_scatter(void **state) {
    fix *x = *state;
    const device_iface *f = x->f;
    enum { SRC_ROWS = 10, N = 4 };
    device_stream *s;
    assert_ok(f->stream_create(x->dev, &s));
    uint32_t gate = 0;
    /* tensor 0: 48-byte rows, stride 64; tensor 1: 13-byte rows, stride 13 */
    uint8_t a[SRC_ROWS * 64], b[SRC_ROWS * 13], ga[N * 48], gb[N * 20];
    fill_u8(a, sizeof a, 1);
    fill_u8(b, sizeof b, 100);
    memset(ga, 0xee, sizeof ga);
    memset(gb, 0xee, sizeof gb);
    int32_t idx_host[N] = {0, 0, 0, 0};
    int32_t *idx;
    assert_ok(f->mem_alloc(x->dev, sizeof idx_host, (void **)&idx));

    /* idx is copied in by the stream itself: the kernel must read it at
     * execution time, after the host changed the source below. */
    assert_ok(f->wait_flag(x->dev, s, &gate, 1));
    assert_ok(f->memcpy_async(x->dev, idx, idx_host, sizeof idx_host, s));
    apex_cuda_rows t[2] = {{a, ga, 64, 48, 48}, {b, gb, 13, 20, 13}};
    assert_ok(f->gather_rows(x->dev, t, 2, idx, N, s));
    t[0].dst = NULL; /* copied at enqueue */
    const int32_t want_idx[N] = {7, -1, 2, 9};
    memcpy(idx_host, want_idx, sizeof want_idx);
    set_flag(&gate, 1);
    assert_ok(f->stream_sync(x->dev, s));
    for (int i = 0; i < N; i++) {
        uint8_t ea[48], eb[20];
        memset(ea, 0xee, sizeof ea);
        memset(eb, 0xee, sizeof eb);
        if (want_idx[i] >= 0) {
            memcpy(ea, a + (size_t)want_idx[i] * 64, 48);
            memcpy(eb, b + (size_t)want_idx[i] * 13, 13);
        }
        assert_memory_equal(ga + i * 48, ea, 48);
        assert_memory_equal(gb + i * 20, eb, 20);
    }

    /* Scatter back into fresh destinations: row idx[i] = src row i. */
    uint8_t sa[SRC_ROWS * 64], sb[SRC_ROWS * 13];
    memset(sa, 0, sizeof sa);
    memset(sb, 0, sizeof sb);
    apex_cuda_rows u[2] = {{ga, sa, 48, 64, 48}, {gb, sb, 20, 13, 13}};
    assert_ok(f->scatter_rows(x->dev, u, 2, idx, N, s));
    assert_ok(f->stream_sync(x->dev, s));
    for (int r = 0; r < SRC_ROWS; r++) {
        const int hit = r == 7 || r == 2 || r == 9;
        uint8_t za[64] = {0}, zb[13] = {0};
        assert_memory_equal(sa + r * 64, hit ? a + r * 64 : za, 48);
        assert_memory_equal(sa + r * 64 + 48, za, 16); /* past row_bytes untouched */
        assert_memory_equal(sb + r * 13, hit ? b + r * 13 : zb, 13);
    }
    f->mem_free(x->dev, idx);
    f->stream_destroy(x->dev, s);
}

/* ---------------------------------------------------------- bad input */

static void test_bad_args(void **state) {
    fix *x = *state;
    const device_iface *f = x->f;
    device_stream *s;
    device_event *e;
    assert_ok(f->stream_create(x->dev, &s));
    assert_ok(f->event_create(x->dev, &e));
    uint8_t buf[64], out[64];
    uint32_t flag = 0;
    memset(buf, 1, sizeof buf);
    memset(out, 0, sizeof out);

    assert_status(f->memcpy_async(x->dev, out, buf, 64, NULL), APEX_ERR_INVALID_ARG);
    assert_status(f->memcpy_async(x->dev, NULL, buf, 64, s), APEX_ERR_INVALID_ARG);
    assert_status(f->memcpy_async(x->dev, out, NULL, 64, s), APEX_ERR_INVALID_ARG);
    assert_ok(f->memcpy_async(x->dev, NULL, NULL, 0, s)); /* empty copy */
    assert_status(f->wait_flag(x->dev, s, NULL, 1), APEX_ERR_INVALID_ARG);
    assert_status(f->wait_flag(x->dev, s, (const uint32_t *)(buf + 1), 1), APEX_ERR_INVALID_ARG);
    assert_status(f->wait_flag(x->dev, NULL, &flag, 1), APEX_ERR_INVALID_ARG);
    assert_status(f->event_record(x->dev, NULL, s), APEX_ERR_INVALID_ARG);
    assert_status(f->event_record(x->dev, e, NULL), APEX_ERR_INVALID_ARG);
    assert_status(f->event_wait(x->dev, s, NULL), APEX_ERR_INVALID_ARG);
    assert_status(f->stream_sync(x->dev, NULL), APEX_ERR_INVALID_ARG);
    assert_int_equal(f->event_done(x->dev, e), 1); /* refused record left no trace */

    /* A decode that would write `out` if it ran. */
    enum { D = 64, BT = 16 };
    static float kvbuf[2 * BT * D] __attribute__((aligned(16)));
    float q[D];
    int32_t len = 3, table = 0;
    for (int i = 0; i < D; i++) q[i] = 0.1f;
    apex_cuda_decode good = {.n_seqs = 1, .n_q_heads = 1, .n_kv_heads = 1, .head_dim = D,
                             .block_tokens = BT, .kv_dtype = APEX_DTYPE_F32,
                             .q_dtype = APEX_DTYPE_F32, .out_dtype = APEX_DTYPE_F32, .q = q,
                             .out = out, .seq_lens = &len, .block_table = &table,
                             .block_table_stride = 1, .kv = kvbuf,
                             .block_bytes = sizeof kvbuf, .scale = 1.0f, .max_seq_len = 3};
    apex_cuda_decode bad;
    assert_status(f->paged_decode(x->dev, NULL, s), APEX_ERR_INVALID_ARG);
    assert_status(f->paged_decode(x->dev, &good, NULL), APEX_ERR_INVALID_ARG);
    bad = good, bad.head_dim = 63;
    assert_status(f->paged_decode(x->dev, &bad, s), APEX_ERR_UNSUPPORTED);
    bad = good, bad.block_tokens = 12;
    assert_status(f->paged_decode(x->dev, &bad, s), APEX_ERR_UNSUPPORTED);
    bad = good, bad.n_q_heads = 3, bad.n_kv_heads = 2;
    assert_status(f->paged_decode(x->dev, &bad, s), APEX_ERR_INVALID_ARG);
    bad = good, bad.seq_lens = NULL;
    assert_status(f->paged_decode(x->dev, &bad, s), APEX_ERR_INVALID_ARG);
    bad = good, bad.block_bytes = sizeof kvbuf - 16;
    assert_status(f->paged_decode(x->dev, &bad, s), APEX_ERR_INVALID_ARG);
    bad = good, bad.kv = (const char *)kvbuf + 4;
    assert_status(f->paged_decode(x->dev, &bad, s), APEX_ERR_INVALID_ARG);
    bad = good, bad.q_dtype = (apex_dtype)7;
    assert_status(f->paged_decode(x->dev, &bad, s), APEX_ERR_INVALID_ARG);
    bad = good, bad.n_seqs = 0, bad.q = NULL; /* empty batch: nothing to do */
    assert_ok(f->paged_decode(x->dev, &bad, s));

    int64_t slot = 0;
    apex_cuda_kv_append ga = {.n_rows = 1, .n_kv_heads = 1, .head_dim = 8, .block_tokens = 2,
                              .k = buf, .v = buf, .src_dtype = APEX_DTYPE_F16, .slots = &slot,
                              .kv = out, .block_bytes = 64, .kv_dtype = APEX_DTYPE_F16};
    apex_cuda_kv_append ba;
    ba = ga, ba.block_tokens = 3;
    assert_status(f->kv_append(x->dev, &ba, s), APEX_ERR_INVALID_ARG);
    ba = ga, ba.block_bytes = 63;
    assert_status(f->kv_append(x->dev, &ba, s), APEX_ERR_INVALID_ARG);
    ba = ga, ba.slots = NULL;
    assert_status(f->kv_append(x->dev, &ba, s), APEX_ERR_INVALID_ARG);
    ba = ga, ba.k_stride = -1;
    assert_status(f->kv_append(x->dev, &ba, s), APEX_ERR_INVALID_ARG);
    ba = ga, ba.kv_dtype = (apex_dtype)9;
    assert_status(f->kv_append(x->dev, &ba, s), APEX_ERR_INVALID_ARG);
    assert_status(f->kv_append(x->dev, NULL, s), APEX_ERR_INVALID_ARG);

    int32_t idx = 0;
    apex_cuda_rows t[APEX_CUDA_MAX_ROW_TENSORS + 1] = {{buf, out, 64, 64, 64}};
    for (int i = 1; i <= APEX_CUDA_MAX_ROW_TENSORS; i++) t[i] = t[0];
    assert_status(f->gather_rows(x->dev, t, APEX_CUDA_MAX_ROW_TENSORS + 1, &idx, 1, s),
                  APEX_ERR_INVALID_ARG);
    assert_status(f->gather_rows(x->dev, t, 0, &idx, 1, s), APEX_ERR_INVALID_ARG);
    assert_status(f->gather_rows(x->dev, t, 1, NULL, 1, s), APEX_ERR_INVALID_ARG);
    assert_status(f->scatter_rows(x->dev, t, 1, &idx, -1, s), APEX_ERR_INVALID_ARG);
    t[1].row_bytes = 65; /* above its strides */
    assert_status(f->scatter_rows(x->dev, t, 2, &idx, 1, s), APEX_ERR_INVALID_ARG);
    t[1].row_bytes = 64, t[1].src = NULL;
    assert_status(f->gather_rows(x->dev, t, 2, &idx, 1, s), APEX_ERR_INVALID_ARG);
    assert_ok(f->gather_rows(x->dev, t, 1, NULL, 0, s)); /* no rows: nothing to do */

    /* Nothing above was enqueued: out is as it was. */
    assert_ok(f->stream_sync(x->dev, s));
    uint8_t zero[64] = {0};
    assert_memory_equal(out, zero, 64);
    assert_int_equal(f->event_done(x->dev, e), 1);

    /* A malformed delay variable is refused by create. */
    setenv("APEX_EMU_KERNEL_DELAY_US", "12x", 1);
    apex_env_refresh(); /* the snapshot the core reads (csrc/env.h) */
    apex_device *d2 = (apex_device *)1;
    assert_status(device_emulated_create(MiB, &d2), APEX_ERR_INVALID_ARG);
    assert_null(d2);
    unsetenv("APEX_EMU_KERNEL_DELAY_US");
    apex_env_refresh();

    f->event_destroy(x->dev, e);
    f->stream_destroy(x->dev, s);
}

/* ------------------------------------------------------------ teardown */

static void test_destroy_pending(void **state) {
    (void)state;
    setenv("APEX_EMU_KERNEL_DELAY_US", "3000", 1); /* slow kernels */
    apex_device *dev;
    assert_ok(device_emulated_create(4 * MiB, &dev));
    unsetenv("APEX_EMU_KERNEL_DELAY_US");
    apex_env_refresh();
    const device_iface *f = dev->iface;
    device_stream *sa, *sb, *sc, *sd;
    device_event *e1, *e2, *e3;
    assert_ok(f->stream_create(dev, &sa));
    assert_ok(f->stream_create(dev, &sb));
    assert_ok(f->stream_create(dev, &sc));
    assert_ok(f->stream_create(dev, &sd));
    assert_ok(f->event_create(dev, &e1));
    assert_ok(f->event_create(dev, &e2));
    assert_ok(f->event_create(dev, &e3));
    static uint32_t never = 0; /* nobody writes it */
    static uint8_t a[4096], b[4096];
    int32_t idx[4] = {0, 1, 2, 3};
    apex_cuda_rows t = {a, b, 1024, 1024, 1024};
    void *mem;
    assert_ok(f->mem_alloc(dev, MiB, &mem)); /* left for destroy to free */

    /* A: blocked forever, with work and a record behind the wait. */
    assert_ok(f->wait_flag(dev, sa, &never, 1));
    assert_ok(f->memcpy_async(dev, b, a, sizeof a, sa));
    assert_ok(f->event_record(dev, e1, sa));
    /* B: waits on A's record; C: a queue of slow kernels, one running. */
    assert_ok(f->event_wait(dev, sb, e1));
    assert_ok(f->event_record(dev, e2, sb));
    for (int i = 0; i < 4; i++) assert_ok(f->gather_rows(dev, &t, 1, idx, 4, sc));
    assert_int_equal(f->event_done(dev, e1), 0);
    /* The user drops handles with work still naming them. */
    f->event_destroy(dev, e2);
    assert_ok(f->event_record(dev, e3, sc));
    f->stream_destroy(dev, sb);
    /* D: destroyed with pending work, which still runs afterwards. */
    uint8_t src[32], dst[32];
    fill_u8(src, 32, 3);
    memset(dst, 0, 32);
    device_event *ed;
    assert_ok(f->event_create(dev, &ed));
    assert_ok(f->memcpy_async(dev, dst, src, 32, sd));
    assert_ok(f->event_record(dev, ed, sd));
    f->stream_destroy(dev, sd);
    assert_ok(f->event_sync(dev, ed));
    assert_memory_equal(dst, src, 32);
    f->event_destroy(dev, ed);
    sleep_ms(4); /* a kernel of C is likely in flight now */

    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    f->destroy(dev); /* frees e1, e3, sa, sc and mem too */
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
    assert_true(ms < 1000.0); /* discarded, not drained (each kernel takes 3 ms) */
}

/* --------------------------------------------------- host concurrency */

typedef struct worker_arg {
    apex_device *dev;
    int id;
    int ok;
} worker_arg;

/* Each host thread drives its own stream and event while the others do the
 * same; under ThreadSanitizer this is the race check of the locking. */
static void *host_worker(void *p) {
    worker_arg *w = p;
    const device_iface *f = w->dev->iface;
    device_stream *s;
    device_event *e;
    if (f->stream_create(w->dev, &s) || f->event_create(w->dev, &e)) return NULL;
    enum { N = 512 };
    uint8_t src[N], dst[N];
    uint32_t flag = 0;
    int ok = 1;
    for (int round = 0; round < 150 && ok; round++) {
        fill_u8(src, N, (uint8_t)(round + w->id));
        void *tmp = NULL;
        if (f->mem_alloc(w->dev, N, &tmp)) {
            ok = 0;
            break;
        }
        f->wait_flag(w->dev, s, &flag, (uint32_t)round + 1);
        f->memcpy_async(w->dev, tmp, src, N, s);
        f->memcpy_async(w->dev, dst, tmp, N, s);
        f->event_record(w->dev, e, s);
        set_flag(&flag, (uint32_t)round + 1);
        if (round % 2) f->event_sync(w->dev, e);
        else f->stream_sync(w->dev, s);
        ok = memcmp(src, dst, N) == 0 && f->event_done(w->dev, e);
        f->mem_free(w->dev, tmp);
    }
    f->event_destroy(w->dev, e);
    f->stream_destroy(w->dev, s);
    w->ok = ok;
    return NULL;
}

static void test_host_threads(void **state) {
    fix *x = *state;
    enum { T = 4 };
    pthread_t th[T];
    worker_arg w[T];
    for (int i = 0; i < T; i++) {
        w[i] = (worker_arg){x->dev, i, 0};
        assert_int_equal(pthread_create(&th[i], NULL, host_worker, &w[i]), 0);
    }
    for (int i = 0; i < T; i++) {
        pthread_join(th[i], NULL);
        assert_true(w[i].ok);
    }
    assert_int_equal(x->f->mem_free_bytes(x->dev), 64 * MiB);
}

int main(void) {
    unsetenv("APEX_EMU_KERNEL_DELAY_US");
    apex_env_refresh();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_memory_capacity),
        cmocka_unit_test_setup_teardown(test_in_order, setup, teardown),
        cmocka_unit_test_setup_teardown(test_streams_independent, setup, teardown),
        cmocka_unit_test_setup_teardown(test_events, setup, teardown),
        cmocka_unit_test_setup_teardown(test_wait_flag_other_thread, setup, teardown),
        cmocka_unit_test_setup_teardown(test_paged_decode, setup, teardown),
        cmocka_unit_test_setup_teardown(test_kv_append, setup, teardown),
        cmocka_unit_test_setup_teardown(test_gather_scatter, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_args, setup, teardown),
        cmocka_unit_test(test_destroy_pending),
        cmocka_unit_test_setup_teardown(test_host_threads, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
