/* apex-bench prefetch-model: the AVX-512 span driver (cpu_attn/avx512_span.h:
 * its groups, its software prefetch of the next group, its online softmax)
 * with the q.K and P.V stages swapped for synthetic ones that read the same
 * K and V bytes in the same order, hand out the prefetch lines as the real
 * stages do (a share per 16-row tile, per piece), and spend a chosen number
 * of FMAs on each 64-byte line instead of real arithmetic.
 *
 * Why: a kernel that reads KV from DRAM below the STREAM read is either
 * limited by its arithmetic or by the prefetch scheme on this machine. Swept
 * over the synthetic cost, this gives DRAM read speed as a function of
 * in-cache speed for the scheme alone: where a kernel's (in-cache, DRAM) pair
 * lies on that curve, the scheme, not the kernel's arithmetic, is what a
 * faster DRAM read needs changed.
 *
 * Geometry: Llama-3.1-8B's KV (8 KV heads, 4 q heads each, head_dim 128),
 * bf16, row layout, block 16, blocks in random order; each thread runs whole
 * sequences (one span each, all KV heads). */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench.h"
#include "bench/prefetch_model.h"
#include "bench/stream.h"
#include "cpu_attn/cpu_attn_impl.h"
#include "cpu_attn/kv_layout.h"
#include "csrc/host_mem.h"

#define DRAM_BYTES ((size_t)1 << 30) /* KV read per DRAM pass: beyond any cache */
#define CACHE_CTX 128                /* tokens per thread in cache: 512 KiB of K+V */

static int32_t *random_table(size_t n) {
    int32_t *t = malloc(n * sizeof *t);
    if (!t) return NULL;
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < n; i++) t[i] = (int32_t)i;
    for (size_t i = n - 1; i > 0; i--) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        const size_t j = x % (i + 1);
        const int32_t v = t[i];
        t[i] = t[j], t[j] = v;
    }
    return t;
}

int bench_prefetch_model_main(int argc, char **argv) {
    int json = 0, threads = omp_get_num_procs(), pairs = 0;
    int fmas[16] = {0, 1, 2, 4, 8}, n_fma = 5;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--json")) json = 1;
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--kv-layout") && i + 1 < argc &&
                 (!strcmp(argv[i + 1], "pairs") || !strcmp(argv[i + 1], "rows")))
            pairs = !strcmp(argv[++i], "pairs");
        else if (!strcmp(argv[i], "--fma") && i + 1 < argc) {
            n_fma = 0;
            for (char *s = argv[++i]; *s && n_fma < 16;) {
                fmas[n_fma++] = (int)strtol(s, &s, 10);
                if (*s == ',') s++;
                else break;
            }
        } else {
            fprintf(stderr, "usage: apex-bench prefetch-model [--json] [--threads N] [--fma N,..]\n"
                            "         [--kv-layout rows|pairs]\n"
                            "  --fma: synthetic FMAs per 64-byte line, one row each (default 0,1,2,4,8)\n");
            return 2;
        }
    }
    if (threads < 1 || n_fma < 1) return 2;
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
        !__builtin_cpu_supports("avx512dq") || !__builtin_cpu_supports("avx512vl")) {
        printf(json ? "{\"bench\":\"prefetch-model\",\"skipped\":\"no AVX-512\"}\n"
                    : "prefetch-model: this CPU has no AVX-512; skipped\n");
        return 0;
    }
    const apex_kv_layout lay = apex_kv_layout_of(PM_H, PM_BT, PM_D, 2);
    const int ctx = 8192, nb = ctx / PM_BT;
    const int n_seqs = (int)(DRAM_BYTES / ((size_t)nb * lay.block));
    const size_t n_blocks = (size_t)n_seqs * nb, bytes = n_blocks * lay.block;
    /* Per thread: q, acc, m, l (what the span reads and writes), the
     * driver's scratch. */
    const size_t scratch_floats = 2 * PM_H * PM_G * PM_D + 2 * PM_H * PM_G +
                                  cpu_attn_scratch_floats(PM_H * PM_G, PM_D) + 64;
    uint8_t *kv = host_mem_alloc(NULL, bytes);
    int32_t *table = random_table(n_blocks);
    int32_t *cache_table = random_table((size_t)threads * (CACHE_CTX / PM_BT));
    float *scratch = aligned_alloc(64, ((size_t)threads * scratch_floats * 4 + 63) & ~(size_t)63);
    stream_buf sb = {0};
    int rc = 1;
    if (!kv || !table || !cache_table || !scratch || stream_init(&sb, DRAM_BYTES, threads)) {
        fprintf(stderr, "apex-bench prefetch-model: out of memory\n");
        goto done;
    }
    /* bf16 1.0 everywhere: finite, and the pages backed by the threads. */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (size_t i = 0; i < bytes / 2; i++) ((uint16_t *)kv)[i] = 0x3f80;
    const double stream = stream_read_gbps(&sb, threads, 5);
    if (json) printf("{\"bench\":\"prefetch-model\",\"threads\":%d,\"kv_layout\":\"%s\",\"kv_bytes\":%zu,"
                     "\"stream_gbps\":%.2f,\"rows\":[", threads, pairs ? "pairs" : "rows", bytes, stream);
    else printf("threads %d, STREAM read %.2f GB/s, %zu MiB of bf16 KV (Llama-3.1-8B heads, "
                "block 16, %s)\n%12s %16s %12s %8s\n", threads, stream, bytes >> 20,
                pairs ? "pair layout" : "row layout", "fma/line", "in-cache GB/s", "DRAM GB/s", "ratio");
    for (int f = 0; f < n_fma; f++) {
        const int fma = fmas[f] < 0 ? 0 : fmas[f];
        /* In cache: each thread's own CACHE_CTX-token sequence, re-read. */
        double best_c = 1e30, best_d = 1e30;
        for (int rep = 0; rep < 20; rep++) {
            const double t = prefetch_model_run(kv, cache_table, threads, CACHE_CTX, threads, fma,
                                                pairs, scratch, scratch_floats);
            if (t < best_c) best_c = t;
        }
        for (int rep = 0; rep < 3; rep++) {
            const double t =
                prefetch_model_run(kv, table, n_seqs, ctx, threads, fma, pairs, scratch, scratch_floats);
            if (t < best_d) best_d = t;
        }
        const double cache = (double)threads * (CACHE_CTX / PM_BT) * lay.block / best_c / 1e9;
        const double dram = (double)bytes / best_d / 1e9;
        if (json)
            printf("%s{\"fma_per_line\":%d,\"in_cache_gbps\":%.2f,\"dram_gbps\":%.2f,\"ratio\":%.4f}",
                   f ? "," : "", fma, cache, dram, dram / stream);
        else printf("%12d %16.2f %12.2f %8.3f\n", fma, cache, dram, dram / stream);
    }
    if (json) printf("]}\n");
    rc = 0;
done:
    stream_free(&sb);
    if (kv) host_mem_free(kv, bytes);
    free(table);
    free(cache_table);
    free(scratch);
    return rc;
}
