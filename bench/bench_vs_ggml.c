/* apex-bench vs-ggml: APEX's CPU attention kernels against ggml-cpu's
 * FLASH_ATTN_EXT (through ggml's own graph API), same thread count, same data,
 * on decode shapes (batch x context grid; Llama-3.1-8B, SmolLM2-135M and an MHA
 * geometry; fp16 KV in llama.cpp's token-major layout, one stream per
 * sequence, a prefix mask as llama.cpp builds it).
 *   apex_seconds        cpu_attn_strided on llama.cpp's layout in place: the
 *                       kernel the APEX ggml backend runs inside llama.cpp,
 *                       fp32 mode (APEX_GGML_EXACT=0)
 *   apex_exact_seconds  the same in exact mode (the backend's default: ggml's
 *                       f16 arithmetic bit for bit); null where unsupported
 *   apex_paged_seconds  cpu_attn_decode on the same values in APEX's block
 *                       layout (the pools of apex.h)
 *   ggml_seconds        ggml_graph_compute of one FLASH_ATTN_EXT node
 * Each case also reports the largest |APEX - ggml| of the outputs. Exact mode
 * must match ggml bit for bit in every case: ggml's row-by-row path (batch >
 * 1, or fewer than 512 rows) and its split-KV path (one sequence over >= 512
 * rows, cut into one chunk per thread), which exact mode reproduces with
 * ggml's thread count.
 *   apex-bench vs-ggml [--json] [--quick] [--threads N] [--reps N] */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml-cpu.h"
#include "ggml.h"

#include "cpu_attn/cpu_attn.h"
#include "cpu_attn/cpu_attn_strided.h"
#include "cpu_attn/dtype_convert.h"

typedef struct geom {
    const char *name;
    int hq, hkv, d;
} geom;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static uint64_t rng_state = 0x1234567;
static float rnd(void) {
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng_state >> 40) * (1.0 / 8388608.0)) - 1.0f;
}

/* The rows per stream the bench allocates (llama.cpp pads the cache to 256). */
static int ctx_padded(int ctx) { return (ctx + 255) / 256 * 256; }

typedef struct result {
    double apex, exact, paged, ggml, err, err_exact, err_paged;
    int has_exact;
} result;

/* One case: batch sequences of ctx tokens each (the mask hides the padding
 * llama.cpp adds: the cache holds ctx_pad rows per stream). */
static int run_case(const geom *g, int batch, int ctx, int n_threads, int reps, result *r) {
    const int D = g->d, hq = g->hq, hkv = g->hkv;
    const int ctx_pad = ctx_padded(ctx);
    const size_t row = (size_t)hkv * D; /* elements of one cache row */
    const size_t kv_elems = row * (size_t)ctx_pad * batch;
    const size_t mem = 2 * kv_elems * 2 + (size_t)batch * hq * D * 8 + (size_t)ctx_pad * batch * 2 +
                       64 * ggml_tensor_overhead() + ggml_graph_overhead() + (32u << 20) +
                       (size_t)n_threads * ((size_t)batch * hq * (D + 2) + 4 * (size_t)D) * 8;
    struct ggml_init_params ip = {.mem_size = mem, .mem_buffer = NULL, .no_alloc = false};
    struct ggml_context *gc = ggml_init(ip);
    if (!gc) return -1;
    /* llama.cpp's cache: [row, ctx_pad, stream], viewed [D, n_kv, hkv, stream]. */
    struct ggml_tensor *kc = ggml_new_tensor_3d(gc, GGML_TYPE_F16, (int64_t)row, ctx_pad, batch);
    struct ggml_tensor *vc = ggml_new_tensor_3d(gc, GGML_TYPE_F16, (int64_t)row, ctx_pad, batch);
    struct ggml_tensor *q = ggml_new_tensor_4d(gc, GGML_TYPE_F32, D, 1, hq, batch);
    struct ggml_tensor *mask = ggml_new_tensor_4d(gc, GGML_TYPE_F16, ctx_pad, 1, 1, batch);
    uint16_t *kd = kc->data, *vd = vc->data, *md = mask->data;
    for (size_t i = 0; i < kv_elems; i++) kd[i] = apex_f32_to_f16(rnd()), vd[i] = apex_f32_to_f16(rnd());
    float *qd = q->data;
    for (size_t i = 0; i < (size_t)batch * hq * D; i++) qd[i] = 2.0f * rnd();
    for (int s = 0; s < batch; s++)
        for (int j = 0; j < ctx_pad; j++) md[(size_t)s * ctx_pad + j] = j < ctx ? 0 : 0xfc00;
    struct ggml_tensor *k = ggml_view_4d(gc, kc, D, ctx_pad, hkv, batch, kc->nb[1], (size_t)D * 2, kc->nb[2], 0);
    struct ggml_tensor *v = ggml_view_4d(gc, vc, D, ctx_pad, hkv, batch, vc->nb[1], (size_t)D * 2, vc->nb[2], 0);
    const float scale = 1.0f / sqrtf((float)D);
    struct ggml_tensor *out = ggml_flash_attn_ext(gc, q, k, v, mask, scale, 0.0f, 0.0f);
    ggml_prec_set_acc(out, GGML_PREC_F32);
    struct ggml_cgraph *gf = ggml_new_graph(gc);
    ggml_build_forward_expand(gf, out);

    const size_t n_out = (size_t)batch * hq * D;
    float *o_apex = malloc(n_out * 4), *o_paged = malloc(n_out * 4), *o_exact = malloc(n_out * 4);
    cpu_attn_strided_desc d = {
        .head_dim = D, .n_q_heads = hq, .n_kv_heads = hkv, .n_tokens = 1, .n_streams = batch,
        .n_kv = ctx_pad, .q = qd, .q_nb_tok = q->nb[1], .q_nb_head = q->nb[2], .q_nb_stream = q->nb[3],
        .kv_dtype = APEX_DTYPE_F16, .k = kd, .k_nb_row = k->nb[1], .k_nb_head = k->nb[2],
        .k_nb_stream = k->nb[3], .v = vd, .v_nb_row = v->nb[1], .v_nb_head = v->nb[2],
        .v_nb_stream = v->nb[3], .mask = md, .mask_nb_tok = mask->nb[1], .mask_nb_stream = mask->nb[3],
        .out = o_apex, .out_nb_head = (size_t)D * 4, .out_nb_tok = (size_t)hq * D * 4,
        .out_nb_stream = (size_t)hq * D * 4, .scale = scale, .softcap = 0.0f};
    cpu_attn_strided_desc dx = d;
    dx.out = o_exact, dx.ggml_compat = 1, dx.ggml_n_threads = n_threads;
    r->has_exact = cpu_attn_strided_compat_ok(D, APEX_DTYPE_F16);

    /* APEX's block layout: blocks of 16 tokens, K then V per block. */
    const int bt = 16, nblk = (ctx + bt - 1) / bt;
    const size_t block_bytes = 2 * (size_t)hkv * bt * D * 2;
    uint16_t *pool = aligned_alloc(64, block_bytes * nblk * batch);
    int32_t *table = malloc(sizeof(int32_t) * nblk * batch), *lens = malloc(sizeof(int32_t) * batch);
    if (!o_apex || !o_paged || !o_exact || !pool || !table || !lens) return -1;
    for (int s = 0; s < batch; s++) {
        lens[s] = ctx;
        for (int b = 0; b < nblk; b++) {
            const int id = s * nblk + b;
            table[id] = id;
            uint16_t *blk = (uint16_t *)((char *)pool + (size_t)id * block_bytes);
            for (int h = 0; h < hkv; h++)
                for (int t = 0; t < bt; t++) {
                    const int pos = b * bt + t;
                    const size_t src = ((size_t)s * ctx_pad + (pos < ctx ? pos : 0)) * row + (size_t)h * D;
                    memcpy(blk + ((size_t)h * bt + t) * D, kd + src, (size_t)D * 2);
                    memcpy(blk + (size_t)hkv * bt * D + ((size_t)h * bt + t) * D, vd + src, (size_t)D * 2);
                }
        }
    }
    cpu_attn_geom pg = {.n_q_heads = hq, .n_kv_heads = hkv, .head_dim = D, .block_tokens = bt,
                        .kv_dtype = APEX_DTYPE_F16};
    cpu_attn_batch pb = {.n_seqs = batch, .q = qd, .q_dtype = APEX_DTYPE_F32, .out = o_paged,
                         .out_dtype = APEX_DTYPE_F32, .seq_lens = lens, .block_table = table,
                         .block_table_stride = nblk, .kv = pool, .block_bytes = block_bytes,
                         .scale = scale, .softcap = 0.0f, .window = 0};
    cpu_attn_ws *ws = cpu_attn_ws_create(&pg, batch, ctx, n_threads);
    if (!ws) return -1;

    /* Warm-up, then the median of reps for each, interleaved. */
    double *ta = malloc(sizeof(double) * reps), *tp = malloc(sizeof(double) * reps),
           *tg = malloc(sizeof(double) * reps), *tx = malloc(sizeof(double) * reps);
    if (!ta || !tp || !tg || !tx) return -1;
    if (ggml_graph_compute_with_ctx(gc, gf, n_threads) != GGML_STATUS_SUCCESS) return -1;
    if (cpu_attn_strided(&d, n_threads) != 0 || cpu_attn_decode(&pg, &pb, ws, n_threads) != 0) return -1;
    if (r->has_exact && cpu_attn_strided(&dx, n_threads) != 0) return -1;
    for (int i = 0; i < reps; i++) {
        double t0 = now_s();
        ggml_graph_compute_with_ctx(gc, gf, n_threads);
        tg[i] = now_s() - t0;
        t0 = now_s();
        cpu_attn_strided(&d, n_threads);
        ta[i] = now_s() - t0;
        tx[i] = 0;
        if (r->has_exact) {
            t0 = now_s();
            cpu_attn_strided(&dx, n_threads);
            tx[i] = now_s() - t0;
        }
        t0 = now_s();
        cpu_attn_decode(&pg, &pb, ws, n_threads);
        tp[i] = now_s() - t0;
    }
    r->ggml = median(tg, reps);
    r->apex = median(ta, reps);
    r->exact = median(tx, reps);
    r->paged = median(tp, reps);
    /* ggml's output is [D, hq, 1, batch]: the same order as APEX's. */
    const float *og = out->data;
    r->err = r->err_paged = r->err_exact = 0;
    for (size_t i = 0; i < n_out; i++) {
        const double e = fabs((double)o_apex[i] - og[i]), ep = fabs((double)o_paged[i] - og[i]);
        if (!(e <= r->err)) r->err = e;
        if (!(ep <= r->err_paged)) r->err_paged = ep;
        if (r->has_exact) {
            const double ex = fabs((double)o_exact[i] - og[i]);
            if (!(ex <= r->err_exact)) r->err_exact = ex;
        }
    }
    cpu_attn_ws_destroy(ws);
    free(ta), free(tp), free(tg), free(tx), free(o_apex), free(o_paged), free(o_exact), free(pool), free(table), free(lens);
    ggml_free(gc);
    return 0;
}

int bench_vs_ggml_main(int argc, char **argv);

/* argv[0] is the subcommand's name, as apex-bench passes it. */
int bench_vs_ggml_main(int argc, char **argv) {
    int json = 0, quick = 0, n_threads = omp_get_max_threads(), reps = 5, one_batch = 0, one_ctx = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--json")) json = 1;
        else if (!strcmp(argv[i], "--quick")) quick = 1;
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) n_threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--batch") && i + 1 < argc) one_batch = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--ctx") && i + 1 < argc) one_ctx = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: apex-bench vs-ggml [--json] [--quick] [--threads N] [--reps N] [--batch N] [--ctx N]\n");
            return 2;
        }
    }
    if (n_threads < 1 || reps < 1 || one_batch < 0 || one_ctx < 0) return 2;
    ggml_cpu_init();
    const geom geoms[] = {
        {"llama-3.1-8b", 32, 8, 128},
        {"smollm2-135m", 9, 3, 64},
        {"mha-128", 32, 32, 128},
    };
    const int batches_full[] = {1, 8, 32}, ctxs_full[] = {1024, 4096, 16384};
    const int batches_quick[] = {1, 8}, ctxs_quick[] = {1024, 4096};
    const int *batches = quick ? batches_quick : batches_full, *ctxs = quick ? ctxs_quick : ctxs_full;
    int nb = quick ? 2 : 3, nc = quick ? 2 : 3;
    /* --batch / --ctx pin one point of the grid (e.g. the harness's short contexts). */
    if (one_batch) batches = &one_batch, nb = 1;
    if (one_ctx) ctxs = &one_ctx, nc = 1;
    int ok = 1, first = 1;
    if (json)
        printf("{\"benchmark\": \"vs-ggml\", \"threads\": %d, \"isa\": \"%s\", \"kv_dtype\": \"f16\", \"cases\": [",
               n_threads, cpu_attn_strided_isa());
    else
        printf("%-14s %5s %6s %3s %3s %4s %10s %10s %10s %10s %8s %8s %9s %9s\n", "model", "batch", "ctx", "hq",
               "hkv", "d", "fp32_s", "exact_s", "paged_s", "ggml_s", "fp32_x", "exact_x", "fp32_err",
               "exact_err");
    for (size_t gi = 0; gi < sizeof geoms / sizeof geoms[0]; gi++)
        for (int bi = 0; bi < nb; bi++)
            for (int ci = 0; ci < nc; ci++) {
                const geom *g = &geoms[gi];
                const int batch = batches[bi], ctx = ctxs[ci];
                /* Keep each case's KV within ~1.2 GB. */
                if ((double)batch * ctx * g->hkv * g->d * 4 > 1.2e9) continue;
                result r;
                if (run_case(g, batch, ctx, n_threads, reps, &r) != 0) {
                    fprintf(stderr, "vs-ggml: case %s b=%d ctx=%d failed\n", g->name, batch, ctx);
                    return 1;
                }
                const double speedup = r.ggml / r.apex;
                if (r.err > 4e-3 || r.err_paged > 4e-3) ok = 0; /* ggml accumulates V in f16: ~1e-3 */
                /* Exact mode: bitwise (see the top). */
                if (r.has_exact && r.err_exact != 0.0) ok = 0;
                char xs[32] = "null", xx[32] = "null", xe[32] = "null";
                if (r.has_exact) {
                    snprintf(xs, sizeof xs, json ? "%.6e" : "%.3e", r.exact);
                    snprintf(xx, sizeof xx, "%.3f", r.ggml / r.exact);
                    snprintf(xe, sizeof xe, "%.3e", r.err_exact);
                }
                if (json) {
                    printf("%s\n  {\"model\": \"%s\", \"batch\": %d, \"ctx\": %d, \"q_heads\": %d, \"kv_heads\": %d, "
                           "\"head_dim\": %d, \"apex_seconds\": %.6e, \"apex_exact_seconds\": %s, "
                           "\"apex_paged_seconds\": %.6e, \"ggml_seconds\": %.6e, \"speedup\": %.3f, "
                           "\"exact_speedup\": %s, \"paged_speedup\": %.3f, \"max_abs_diff\": %.3e, "
                           "\"exact_max_abs_diff\": %s, "
                           "\"paged_max_abs_diff\": %.3e}",
                           first ? "" : ",", g->name, batch, ctx, g->hq, g->hkv, g->d, r.apex, xs, r.paged,
                           r.ggml, speedup, xx, r.ggml / r.paged, r.err, xe, r.err_paged);
                } else {
                    printf("%-14s %5d %6d %3d %3d %4d %10.3e %10s %10.3e %10.3e %7.2fx %7.2fx %9.2e %9s\n", g->name,
                           batch, ctx, g->hq, g->hkv, g->d, r.apex, xs, r.paged, r.ggml, speedup,
                           r.has_exact ? r.ggml / r.exact : 0.0, r.err, xe);
                }
                fflush(stdout);
                first = 0;
            }
    if (json) printf("\n], \"outputs_agree\": %s}\n", ok ? "true" : "false");
    return ok ? 0 : 1;
}

#ifdef APEX_VS_GGML_STANDALONE
/* A stand-alone binary for builds without apex-bench's dispatcher. */
int main(int argc, char **argv) { return bench_vs_ggml_main(argc, argv); }
#endif
