/* apex-bench pipeline: how much of the CPU cohort's attention the hybrid
 * pipeline hides under the device cohort's, on the context's device.
 *
 * One step = decode attention for every layer through apex_attention_async,
 * then a stream sync. Three runs over the same KV: the device cohort alone
 * (gpu_only_s), the host cohort alone (cpu_only_s, copies included) and both
 * in one batch (hybrid_s). hidden_s = gpu_only + cpu_only - hybrid, and
 * hidden_frac = hidden_s / min(gpu_only, cpu_only): 1 when the shorter
 * branch is hidden entirely, 0 when the two run back to back. Best of
 * --iters steps each. Needs a device (APEX_DEVICE=cuda, or emulated for a
 * dry run whose timings mean nothing). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "apex/apex.h"
#include "bench/bench.h"

typedef struct {
    int32_t g, c, ctx, layers, iters;
    int json;
} opts;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#define CHECK(call)                                                                  \
    do {                                                                             \
        apex_status st_ = (call);                                                    \
        if (st_) {                                                                   \
            fprintf(stderr, "apex-bench pipeline: %s: %s\n", #call, apex_last_error()); \
            return -1;                                                               \
        }                                                                            \
    } while (0)

/* Best wall time of one step (all layers) over the listed sequences. */
static double best_step(apex_context *ctx, apex_stream s, const opts *o, int32_t n,
                        const int32_t *seqs, const void *d_q, void *d_out) {
    double best = 1e30;
    for (int it = 0; it < o->iters + 1; it++) { /* +1: warm-up */
        double t0 = now();
        for (int32_t l = 0; l < o->layers; l++)
            CHECK(apex_attention_async(ctx, l, n, seqs, d_q, d_out, NULL, s));
        CHECK(apex_stream_sync(ctx, s));
        double t = now() - t0;
        if (it > 0 && t < best) best = t;
    }
    return best;
}

/* Fills every sequence's KV through the async write path, max_batch rows a
 * call, from one device buffer of small values. */
static int fill(apex_context *ctx, apex_stream s, const opts *o, int32_t n, int32_t batch,
                void *d_k, void *d_v) {
    int32_t *seqs = malloc(sizeof(int32_t) * (size_t)batch);
    int32_t *pos = malloc(sizeof(int32_t) * (size_t)batch);
    int32_t rows = 0;
    for (int32_t i = 0; i < n; i++)
        for (int32_t p = 0; p < o->ctx; p++) {
            seqs[rows] = i;
            pos[rows++] = p;
            if (rows == batch || (i == n - 1 && p == o->ctx - 1)) {
                for (int32_t l = 0; l < o->layers; l++)
                    if (apex_kv_write_async(ctx, l, rows, seqs, pos, d_k, d_v, APEX_DTYPE_F16,
                                            s)) {
                        fprintf(stderr, "apex-bench pipeline: fill: %s\n", apex_last_error());
                        free(seqs);
                        free(pos);
                        return -1;
                    }
                /* seqs/pos are read at enqueue: reuse them at once. */
                rows = 0;
            }
        }
    free(seqs);
    free(pos);
    return apex_stream_sync(ctx, s) ? -1 : 0;
}

static int run(const opts *o) {
    apex_config c;
    CHECK(apex_config_init(&c));
    c.n_layers = o->layers;
    c.n_q_heads = 32;
    c.n_kv_heads = 8;
    c.head_dim = 128;
    c.kv_dtype = APEX_DTYPE_F16;
    c.act_dtype = APEX_DTYPE_F16;
    c.block_tokens = 16;
    int32_t per_seq = (o->ctx + 15) / 16;
    c.device_blocks = (int64_t)o->g * per_seq;
    c.host_blocks = (int64_t)o->c * per_seq + 1;
    c.max_seqs = o->g + o->c;
    c.max_batch = c.max_seqs;
    c.max_seq_len = o->ctx;
    apex_context *ctx;
    CHECK(apex_context_create(&c, &ctx));
    if (apex_context_host_mode(ctx)) {
        fprintf(stderr, "apex-bench pipeline: no device (set APEX_DEVICE=cuda, or emulated "
                        "for a dry run)\n");
        apex_context_destroy(ctx);
        return -1;
    }
    apex_config got; /* threads as resolved by the context */
    CHECK(apex_context_config(ctx, &got));
    apex_stream s;
    CHECK(apex_stream_create(ctx, &s));
    int32_t n = o->g + o->c;
    size_t qbytes = (size_t)n * 32 * 128 * 2, kvbytes = (size_t)c.max_batch * 8 * 128 * 2;
    void *d_q, *d_out, *d_k, *d_v;
    CHECK(apex_device_alloc(ctx, qbytes, &d_q));
    CHECK(apex_device_alloc(ctx, qbytes, &d_out));
    CHECK(apex_device_alloc(ctx, kvbytes, &d_k));
    CHECK(apex_device_alloc(ctx, kvbytes, &d_v));
    uint16_t *h = malloc(qbytes > kvbytes ? qbytes : kvbytes);
    for (size_t i = 0; i < (qbytes > kvbytes ? qbytes : kvbytes) / 2; i++)
        h[i] = (uint16_t)(0x2c00 + (i * 7919) % 0x400); /* fp16 in [0.0625, 0.125) */
    CHECK(apex_memcpy_async(ctx, d_q, h, qbytes, s));
    CHECK(apex_memcpy_async(ctx, d_k, h, kvbytes, s));
    CHECK(apex_memcpy_async(ctx, d_v, h, kvbytes, s));
    int32_t *seqs = malloc(sizeof(int32_t) * (size_t)n);
    for (int32_t i = 0; i < n; i++) {
        seqs[i] = i;
        CHECK(apex_seq_add(ctx, i, i < o->g ? APEX_TIER_DEVICE : APEX_TIER_HOST));
        CHECK(apex_seq_reserve(ctx, i, o->ctx, NULL));
    }
    if (fill(ctx, s, o, n, c.max_batch, d_k, d_v)) return -1;
    double tg = o->g ? best_step(ctx, s, o, o->g, seqs, d_q, d_out) : 0;
    double tc = o->c ? best_step(ctx, s, o, o->c, seqs + o->g, d_q, d_out) : 0;
    double th = best_step(ctx, s, o, n, seqs, d_q, d_out);
    double hidden = tg + tc - th, shorter = tg < tc ? tg : tc;
    /* Clamped: run-to-run noise can push the raw ratio past [0, 1]. */
    double frac = shorter > 0 ? hidden / shorter : 0;
    frac = frac < 0 ? 0 : frac > 1 ? 1 : frac;
    const char *dev = getenv("APEX_DEVICE") ? getenv("APEX_DEVICE") : "auto";
    if (o->json)
        printf("{\"device\":\"%s\",\"g_seqs\":%d,\"c_seqs\":%d,\"ctx\":%d,\"layers\":%d,"
               "\"q_heads\":32,\"kv_heads\":8,\"head_dim\":128,\"kv_dtype\":\"f16\","
               "\"cpu_threads\":%d,\"gpu_only_s\":%.6f,\"cpu_only_s\":%.6f,\"hybrid_s\":%.6f,"
               "\"hidden_s\":%.6f,\"hidden_frac\":%.3f}\n",
               dev, o->g, o->c, o->ctx, o->layers, got.n_threads, tg, tc, th,
               hidden, frac);
    else
        printf("device %s: %d device + %d host sequences x %d tokens, %d layers\n"
               "  device cohort alone %.3f ms, host cohort alone %.3f ms, together %.3f ms\n"
               "  hidden %.3f ms = %.0f%% of the shorter branch\n",
               dev, o->g, o->c, o->ctx, o->layers, tg * 1e3, tc * 1e3, th * 1e3, hidden * 1e3,
               frac * 100);
    free(h);
    free(seqs);
    apex_device_free(ctx, d_q);
    apex_device_free(ctx, d_out);
    apex_device_free(ctx, d_k);
    apex_device_free(ctx, d_v);
    apex_stream_destroy(ctx, s);
    apex_context_destroy(ctx);
    return 0;
}

int bench_pipeline_main(int argc, char **argv) {
    opts o = {.g = 32, .c = 8, .ctx = 2048, .layers = 8, .iters = 5};
    for (int i = 1; i < argc; i++) {
        int32_t *dst = NULL;
        if (!strcmp(argv[i], "--json")) o.json = 1;
        else if (!strcmp(argv[i], "--g-seqs")) dst = &o.g;
        else if (!strcmp(argv[i], "--c-seqs")) dst = &o.c;
        else if (!strcmp(argv[i], "--ctx")) dst = &o.ctx;
        else if (!strcmp(argv[i], "--layers")) dst = &o.layers;
        else if (!strcmp(argv[i], "--iters")) dst = &o.iters;
        else {
            fprintf(stderr, "apex-bench pipeline: unknown option '%s'\n", argv[i]);
            return 2;
        }
        if (dst) {
            if (i + 1 >= argc || atoi(argv[i + 1]) < 0) {
                fprintf(stderr, "apex-bench pipeline: %s needs a number\n", argv[i]);
                return 2;
            }
            *dst = atoi(argv[++i]);
        }
    }
    if (o.g + o.c < 1 || o.ctx < 1 || o.layers < 1 || o.iters < 1) {
        fprintf(stderr, "apex-bench pipeline: need sequences, ctx, layers and iters >= 1\n");
        return 2;
    }
    return run(&o) ? 1 : 0;
}
