/* apex-bench attn: CPU decode attention bandwidth against a STREAM read
 * measured in the same process, with the same threads, just before each
 * case.
 *
 * Each case lays out batch x ctx tokens of KV in blocks of a shuffled order
 * (as a long-running pool would), in enough layer copies that the case's
 * footprint is far beyond the last-level cache, and times cpu_attn_decode
 * layer after layer. kv_gbps = K+V bytes attended / time; ratio =
 * kv_gbps / stream_gbps. in_cache_gbps, measured first, is the kernel on a
 * small KV re-read from the caches: its compute ceiling, so a case can be
 * read as memory- or compute-bound; product_peak_gbps (product_peak.h) is
 * the bound that ceiling is under, measured in the same process (the
 * kernel's dot-product instruction alone at its issue rate, as KV bytes).
 * Times are the best of the timed iterations (the
 * median is reported too); the STREAM figure is the best of its reads.
 * --json also gives pair_*: STREAM reads and kernel calls alternated one
 * for one, medians, and the median of the per-pair ratios (the memory
 * speed of this VM changes between the STREAM read and the timed loop). */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "bench/bench.h"
#include "bench/product_peak.h"
#include "bench/stream.h"
#include "csrc/host_mem.h"
#include "cpu_attn/cpu_attn.h"
#include "cpu_attn/dtype_convert.h"
#include "cpu_attn/kv_layout.h"

#define MAX_LIST 32
/* Footprint of a case's layer copies: well past any LLC. */
#define MIN_FOOTPRINT (512ull << 20)
#define STREAM_BYTES (1ull << 30)

typedef struct {
    int32_t batch[MAX_LIST], n_batch;
    int32_t ctx[MAX_LIST], n_ctx;
    int32_t threads, q_heads, kv_heads, head_dim, block_tokens, iters;
    apex_dtype kv_dtype;
    double max_gb, min_seconds;
    int json, small_pages, pairs;
} opts;

static int parse_list(const char *s, int32_t *out, int32_t *n) {
    *n = 0;
    while (*s) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v <= 0 || v > INT32_MAX || *n == MAX_LIST) return -1;
        out[(*n)++] = (int32_t)v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') return -1;
    }
    return *n ? 0 : -1;
}

static int parse_int(const char *s, int32_t *out) {
    char *end;
    long v = strtol(s, &end, 10);
    if (end == s || *end || v <= 0 || v > INT32_MAX) return -1;
    *out = (int32_t)v;
    return 0;
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: apex-bench attn [--json] [--batch N,..] [--ctx N,..] [--threads N]\n"
            "         [--kv-dtype f16|bf16|f32] [--head-dim N] [--q-heads N] [--kv-heads N]\n"
            "         [--block N] [--iters N] [--min-seconds S] [--max-gb G] [--small-pages]\n"
            "         [--kv-layout rows|pairs]\n"
            "defaults: Llama-3.1-8B attention (32 q heads, 8 KV heads, head_dim 128,\n"
            "f16 KV, block 16), batch 1,4,16,64, ctx 512,2048,8192,32768, one thread\n"
            "per CPU, cases with more than --max-gb (10) GB of KV skipped.\n"
            "--iters caps the timed iterations (default: as many as fit in\n"
            "--min-seconds, 0.5, at least 5). KV memory comes from the host pool's\n"
            "allocator (transparent huge pages); --small-pages uses 4 KiB pages.\n"
            "--kv-layout pairs: bf16 KV in the CPU pair layout (cpu_attn/kv_layout.h;\n"
            "block >= 16, the avx512bf16 or amxbf16 kernel).\n"
            "APEX_ISA=amxbf16|avx512bf16|avx512|avx2|scalar\n"
            "picks the kernel.\n");
}

static int parse(int argc, char **argv, opts *o) {
    *o = (opts){.n_batch = 4, .batch = {1, 4, 16, 64}, .n_ctx = 4, .ctx = {512, 2048, 8192, 32768},
                .threads = omp_get_num_procs(), .q_heads = 32, .kv_heads = 8, .head_dim = 128,
                .block_tokens = 16, .iters = 0, .kv_dtype = APEX_DTYPE_F16, .max_gb = 10.0,
                .min_seconds = 0.5};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int bad = 0;
        if (!strcmp(a, "--json")) { o->json = 1; continue; }
        if (!strcmp(a, "--small-pages")) { o->small_pages = 1; continue; }
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); exit(0); }
        if (!v) bad = 1;
        else if (!strcmp(a, "--batch")) bad = parse_list(v, o->batch, &o->n_batch);
        else if (!strcmp(a, "--ctx")) bad = parse_list(v, o->ctx, &o->n_ctx);
        else if (!strcmp(a, "--threads")) bad = parse_int(v, &o->threads);
        else if (!strcmp(a, "--q-heads")) bad = parse_int(v, &o->q_heads);
        else if (!strcmp(a, "--kv-heads")) bad = parse_int(v, &o->kv_heads);
        else if (!strcmp(a, "--head-dim")) bad = parse_int(v, &o->head_dim);
        else if (!strcmp(a, "--block")) bad = parse_int(v, &o->block_tokens);
        else if (!strcmp(a, "--iters")) bad = parse_int(v, &o->iters);
        else if (!strcmp(a, "--max-gb")) bad = !((o->max_gb = atof(v)) > 0.0);
        else if (!strcmp(a, "--min-seconds")) bad = !((o->min_seconds = atof(v)) >= 0.0);
        else if (!strcmp(a, "--kv-layout")) {
            if (!strcmp(v, "rows")) o->pairs = 0;
            else if (!strcmp(v, "pairs")) o->pairs = 1;
            else bad = 1;
        } else if (!strcmp(a, "--kv-dtype")) {
            if (!strcmp(v, "f16") || !strcmp(v, "fp16")) o->kv_dtype = APEX_DTYPE_F16;
            else if (!strcmp(v, "bf16")) o->kv_dtype = APEX_DTYPE_BF16;
            else if (!strcmp(v, "f32") || !strcmp(v, "fp32")) o->kv_dtype = APEX_DTYPE_F32;
            else bad = 1;
        } else {
            fprintf(stderr, "apex-bench attn: unknown option %s\n", a);
            usage(stderr);
            return -1;
        }
        if (bad) {
            fprintf(stderr, "apex-bench attn: bad value for %s\n", a);
            return -1;
        }
        i++;
    }
    const int hd = o->head_dim;
    int hd_ok = 0, bt_ok = 0;
#define BENCH_HD(d) hd_ok |= hd == d;
#define BENCH_BT(b) bt_ok |= o->block_tokens == b;
    APEX_HEAD_DIMS(BENCH_HD) APEX_BLOCK_TOKENS(BENCH_BT)
#undef BENCH_HD
#undef BENCH_BT
    if (o->q_heads % o->kv_heads || !hd_ok || !bt_ok) {
        fprintf(stderr, "apex-bench attn: q-heads must be a multiple of kv-heads, head-dim and "
                        "block one the build supports (cpu_attn/kv_layout.h)\n");
        return -1;
    }
    return 0;
}

/* Fills n bytes with values of magnitude [0.5, 1) and random sign in the
 * given dtype: one xorshift step per 8 bytes, masked into range. */
static void fill_kv(void *p, size_t n, apex_dtype dt, int threads) {
    uint64_t and_mask, or_mask;
    if (dt == APEX_DTYPE_F16) and_mask = 0x83ff83ff83ff83ffull, or_mask = 0x3800380038003800ull;
    else if (dt == APEX_DTYPE_BF16) and_mask = 0x807f807f807f807full, or_mask = 0x3f003f003f003f00ull;
    else and_mask = 0x807fffff807fffffull, or_mask = 0x3f0000003f000000ull;
    const size_t words = n / 8;
#pragma omp parallel num_threads(threads)
    {
        const size_t t = (size_t)omp_get_thread_num(), nt = (size_t)omp_get_num_threads();
        const size_t w0 = words * t / nt, w1 = words * (t + 1) / nt;
        uint64_t x = 0x9e3779b97f4a7c15ull * (t + 1);
        uint64_t *w = p;
        for (size_t i = w0; i < w1; i++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            w[i] = (x & and_mask) | or_mask;
        }
    }
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef struct {
    double seconds, seconds_median, kv_gbps, kv_gbps_median, stream_gbps;
    /* Paired: one STREAM read, then one kernel call, PAIRS times; medians
     * of each and of the per-pair ratio. This VM flips between two memory
     * speeds (~33 and ~60 GB/s STREAM) within seconds, so a STREAM read
     * before the timed loop can be in the other mode than the kernel. */
    double pair_kv_gbps, pair_stream_gbps, pair_ratio;
    int iters, layers, pairs;
} result;

#define PAIRS 15

/* One case; returns 0, or -1 (with a message) if memory ran out. in_cache:
 * one layer, re-read every iteration (it stays in the caches), and no
 * STREAM read: the kernel's own compute ceiling on this machine. */
static int run_case(const opts *o, int32_t batch, int32_t ctx, double kv_bytes, result *r,
                    int in_cache) {
    const int32_t H = o->kv_heads, D = o->head_dim, bt = o->block_tokens;
    const size_t esz = apex_dtype_size(o->kv_dtype);
    const size_t block_bytes = apex_kv_layout_of(H, bt, D, esz).block;
    const int32_t nb_seq = (ctx + bt - 1) / bt;
    const size_t n_blocks = (size_t)batch * (size_t)nb_seq;
    const size_t slab = n_blocks * block_bytes;
    int layers = in_cache ? 1 : (int)((MIN_FOOTPRINT + slab - 1) / slab);
    if (layers < 1) layers = 1;

    cpu_attn_geom g = {o->q_heads, H, D, bt, o->kv_dtype, o->pairs};
    int32_t *table = malloc(n_blocks * sizeof *table);
    int32_t *lens = malloc((size_t)batch * sizeof *lens);
    const size_t nq = (size_t)batch * (size_t)o->q_heads * (size_t)D;
    float *q = malloc(nq * sizeof *q), *out = malloc(nq * sizeof *out);
    /* The host pool's own allocator (huge pages, NUMA binding) unless
     * --small-pages asks for plain 4 KiB pages, for comparison. */
    size_t kv_alloc = ((size_t)layers * slab + 4095) & ~(size_t)4095;
    uint8_t *kv = o->small_pages ? aligned_alloc(4096, kv_alloc) : host_mem_alloc(NULL, kv_alloc);
    cpu_attn_ws *ws = cpu_attn_ws_create(&g, batch, ctx, o->threads);
    double *times = NULL;
    stream_buf sb = {0};
    int rc = -1;
    if (!table || !lens || !q || !out || !kv || !ws) {
        fprintf(stderr, "apex-bench attn: out of memory for batch %d ctx %d\n", batch, ctx);
        goto done;
    }
    /* Block ids: a random permutation (fixed seed), so consecutive blocks of
     * a sequence are scattered over the slab. */
    uint64_t x = 0x2545f4914f6cdd1dull;
    for (size_t i = 0; i < n_blocks; i++) table[i] = (int32_t)i;
    for (size_t i = n_blocks - 1; i > 0; i--) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        size_t j = x % (i + 1);
        int32_t t = table[i];
        table[i] = table[j];
        table[j] = t;
    }
    for (int32_t i = 0; i < batch; i++) lens[i] = ctx;
    for (size_t i = 0; i < nq; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        q[i] = (float)((double)(x >> 11) / 9007199254740992.0 * 2.0 - 1.0);
    }
    fill_kv(kv, (size_t)layers * slab, o->kv_dtype, o->threads);

    cpu_attn_batch b = {
        .n_seqs = batch, .q = q, .q_dtype = APEX_DTYPE_F32, .out = out,
        .out_dtype = APEX_DTYPE_F32, .seq_lens = lens, .block_table = table,
        .block_table_stride = nb_seq, .kv = kv, .block_bytes = block_bytes,
        .scale = 1.0f / sqrtf((float)D), .softcap = 0.0f, .window = 0,
    };
    /* Warm-up: one pass over every layer (page tables, OpenMP team). */
    for (int l = 0; l < layers; l++) {
        b.kv = kv + (size_t)l * slab;
        cpu_attn_decode(&g, &b, ws, o->threads);
    }

    r->stream_gbps = 0;
    r->pairs = 0;
    if (!in_cache && stream_init(&sb, STREAM_BYTES, o->threads)) {
        fprintf(stderr, "apex-bench attn: out of memory for the STREAM buffer\n");
        goto done;
    }
    if (!in_cache) r->stream_gbps = stream_read_gbps(&sb, o->threads, 5);

    int cap = o->iters ? o->iters : 100000;
    times = malloc((size_t)cap * sizeof *times);
    if (!times) goto done;
    int n = 0;
    double t_start = omp_get_wtime();
    while (n < cap) {
        b.kv = kv + (size_t)(n % layers) * slab;
        double t0 = omp_get_wtime();
        cpu_attn_decode(&g, &b, ws, o->threads);
        double t1 = omp_get_wtime();
        times[n++] = t1 - t0;
        if (!o->iters && n >= 5 && t1 - t_start >= o->min_seconds) break;
    }
    qsort(times, (size_t)n, sizeof *times, cmp_double);
    r->iters = n;
    r->layers = layers;
    r->seconds = times[0];
    r->seconds_median = n % 2 ? times[n / 2] : 0.5 * (times[n / 2 - 1] + times[n / 2]);
    r->kv_gbps = kv_bytes / r->seconds / 1e9;
    r->kv_gbps_median = kv_bytes / r->seconds_median / 1e9;
    if (!in_cache) {
        double pk[PAIRS], ps[PAIRS], pr[PAIRS];
        for (int i = 0; i < PAIRS; i++) {
            ps[i] = stream_read_gbps(&sb, o->threads, 1);
            b.kv = kv + (size_t)((n + i) % layers) * slab;
            double t0 = omp_get_wtime();
            cpu_attn_decode(&g, &b, ws, o->threads);
            pk[i] = kv_bytes / (omp_get_wtime() - t0) / 1e9;
            pr[i] = pk[i] / ps[i];
        }
        qsort(pk, PAIRS, sizeof *pk, cmp_double);
        qsort(ps, PAIRS, sizeof *ps, cmp_double);
        qsort(pr, PAIRS, sizeof *pr, cmp_double);
        r->pairs = PAIRS;
        r->pair_kv_gbps = pk[PAIRS / 2];
        r->pair_stream_gbps = ps[PAIRS / 2];
        r->pair_ratio = pr[PAIRS / 2];
    }
    rc = 0;
done:
    if (sb.p) stream_free(&sb);
    free(times);
    cpu_attn_ws_destroy(ws);
    if (o->small_pages) free(kv);
    else host_mem_free(kv, kv_alloc);
    free(table);
    free(lens);
    free(q);
    free(out);
    return rc;
}

int bench_attn_main(int argc, char **argv) {
    opts o;
    if (parse(argc, argv, &o)) return 2;
    const char *isa = cpu_attn_isa_name(cpu_attn_isa_selected());
    const cpu_attn_geom pg = {o.q_heads, o.kv_heads, o.head_dim, o.block_tokens, o.kv_dtype, 1};
    if (o.pairs && !cpu_attn_pairs_ok(&pg)) {
        fprintf(stderr, "apex-bench attn: --kv-layout pairs needs bf16 KV, --block >= 16 and the "
                        "avx512bf16 or amxbf16 kernel (selected: %s)\n", isa);
        return 2;
    }
    /* The kernel's compute ceiling: one sequence per thread, 128 tokens,
     * re-read from the caches. A DRAM case near it is compute-bound. */
    result cr;
    const double c_bytes = 2.0 * o.threads * 128.0 * o.kv_heads * o.head_dim *
                           (double)apex_dtype_size(o.kv_dtype);
    double ceiling = run_case(&o, o.threads, 128, c_bytes, &cr, 1) ? 0 : cr.kv_gbps;
    /* The bound the ceiling is read against: the kernel's dot-product
     * instruction at its issue rate, as KV bytes (a token of one KV head
     * is 2 G D multiply-adds for 2 D elements). 0: not measured. */
    const double G = (double)o.q_heads / o.kv_heads;
    const double peak = product_peak_macs_per_s(isa, o.kv_dtype, o.threads) *
                        (double)apex_dtype_size(o.kv_dtype) / G / 1e9;
    if (o.json)
        printf("{\"bench\":\"attn\",\"isa\":\"%s\",\"timing\":\"best of iters (median also "
               "given); stream: best of 5 reads of %llu bytes\",\"small_pages\":%s,\"kv_layout\":\"%s\","
               "\"in_cache_gbps\":%.4g,\"product_peak_gbps\":%.4g,\"in_cache_of_peak\":%.3f,"
               "\"cases\":[",
               isa, (unsigned long long)STREAM_BYTES, o.small_pages ? "true" : "false",
               o.pairs ? "pairs" : "rows", ceiling,
               peak, peak > 0 ? ceiling / peak : 0.0);
    else
        printf("apex-bench attn: isa %s, %d threads, %d q / %d kv heads, head_dim %d, %s KV, "
               "block %d\ntimes: best of the timed iterations (median in brackets)\n"
               "compute ceiling: %.2f GB/s (the kernel on KV re-read from the caches)\n"
               "product peak: %.2f GB/s (its dot-product instruction alone at its issue rate; "
               "0: not measured)\n\n"
               "%6s %7s %7s %15s %8s %17s %11s %14s\n",
               isa, o.threads, o.q_heads, o.kv_heads, o.head_dim, apex_dtype_name(o.kv_dtype),
               o.block_tokens, ceiling, peak, "batch", "ctx", "iters", "ms", "KV GB", "kv GB/s",
               "stream GB/s", "ratio");
    int first = 1, rc = 0;
    for (int bi = 0; bi < o.n_batch; bi++)
        for (int ci = 0; ci < o.n_ctx; ci++) {
            const int32_t batch = o.batch[bi], ctx = o.ctx[ci];
            const double kv_bytes = 2.0 * batch * (double)ctx * o.kv_heads * o.head_dim *
                                    (double)apex_dtype_size(o.kv_dtype);
            if (o.json)
                printf("%s{\"batch\":%d,\"ctx\":%d,\"q_heads\":%d,\"kv_heads\":%d,\"head_dim\":%d,"
                       "\"block_tokens\":%d,\"kv_dtype\":\"%s\",\"threads\":%d,\"kv_bytes\":%.0f",
                       first ? "" : ",", batch, ctx, o.q_heads, o.kv_heads, o.head_dim,
                       o.block_tokens, apex_dtype_name(o.kv_dtype), o.threads, kv_bytes);
            first = 0;
            if (kv_bytes > o.max_gb * 1e9) {
                if (o.json) printf(",\"skipped\":\"KV %.2f GB exceeds --max-gb %g\"}", kv_bytes / 1e9, o.max_gb);
                else printf("%6d %7d   skipped: KV %.2f GB exceeds --max-gb %g\n", batch, ctx, kv_bytes / 1e9, o.max_gb);
                fflush(stdout);
                continue;
            }
            result r;
            if (run_case(&o, batch, ctx, kv_bytes, &r, 0)) {
                if (o.json) printf(",\"skipped\":\"out of memory\"}");
                rc = 1;
                continue;
            }
            const double ratio = r.kv_gbps / r.stream_gbps;
            if (o.json)
                printf(",\"iters\":%d,\"layers\":%d,\"seconds\":%.6g,\"seconds_median\":%.6g,"
                       "\"kv_gbps\":%.4g,\"kv_gbps_median\":%.4g,\"stream_gbps\":%.4g,"
                       "\"ratio\":%.4f,\"ratio_median\":%.4f,\"pairs\":%d,\"pair_kv_gbps_median\":%.4g,"
                       "\"pair_stream_gbps_median\":%.4g,\"pair_ratio_median\":%.4f}",
                       r.iters, r.layers, r.seconds, r.seconds_median, r.kv_gbps, r.kv_gbps_median,
                       r.stream_gbps, ratio, r.kv_gbps_median / r.stream_gbps, r.pairs,
                       r.pair_kv_gbps, r.pair_stream_gbps, r.pair_ratio);
            else
                printf("%6d %7d %7d %6.2f (%6.2f) %8.3f %7.2f (%7.2f) %11.2f %6.3f (%.3f)\n", batch,
                       ctx, r.iters, r.seconds * 1e3, r.seconds_median * 1e3, kv_bytes / 1e9,
                       r.kv_gbps, r.kv_gbps_median, r.stream_gbps, ratio,
                       r.kv_gbps_median / r.stream_gbps);
            fflush(stdout);
        }
    if (o.json) printf("]}\n");
    return rc;
}
