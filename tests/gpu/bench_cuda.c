/*
 * bench_cuda.c - GPU decode attention bandwidth against a same-run
 * device-to-device copy, and pinned host<->device copy bandwidth.
 *
 * Geometry: Llama-3.1-8B attention (32 q heads, 8 kv heads, head_dim 128,
 * fp16 KV in blocks of 16 tokens, fp16 q/out), at several batch x context
 * points, KV blocks scattered through the pool. Times are medians of event-
 * timed repetitions after warm-up. Bandwidths:
 *   decode_gbps      bytes the kernel must move (KV once, q, out) / time
 *   copy_rw_gbps     a cudaMemcpy D2D of the KV byte count: (read + write) / time
 *   decode_vs_copy   decode_gbps / copy_rw_gbps (1.0 = the HBM rate a copy gets)
 * Prints one JSON object; exit 77 without a GPU.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime_api.h>

#include "cpu_attn/dtype_convert.h"
#include "cuda/apex_cuda.h"
#include "tests/gpu/gpu_check.h"


static int cmp_f(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

static float median(float *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_f);
    return n % 2 ? v[n / 2] : 0.5f * (v[n / 2 - 1] + v[n / 2]);
}

static uint64_t g_rng = 0x2545f4914f6cdd1dull;
static uint64_t rnd(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return g_rng;
}

#define REPS 20
#define WARM 3

/* Median milliseconds of one decode launch. */
static float time_decode(const apex_cuda_decode *a, cudaStream_t s, cudaEvent_t e0,
                         cudaEvent_t e1) {
    float ms[REPS];
    for (int i = 0; i < WARM + REPS; i++) {
        CK(cudaEventRecord(e0, s));
        int rc = apex_cuda_paged_decode(a, s);
        if (rc) {
            fprintf(stderr, "decode failed: %s\n", apex_cuda_error_string(rc));
            exit(1);
        }
        CK(cudaEventRecord(e1, s));
        CK(cudaEventSynchronize(e1));
        if (i >= WARM) CK(cudaEventElapsedTime(&ms[i - WARM], e0, e1));
    }
    return median(ms, REPS);
}

static float time_copy(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind,
                       cudaStream_t s, cudaEvent_t e0, cudaEvent_t e1, int reps) {
    float ms[REPS];
    if (reps > REPS) reps = REPS;
    for (int i = 0; i < WARM + reps; i++) {
        CK(cudaEventRecord(e0, s));
        CK(cudaMemcpyAsync(dst, src, n, kind, s));
        CK(cudaEventRecord(e1, s));
        CK(cudaEventSynchronize(e1));
        if (i >= WARM) CK(cudaEventElapsedTime(&ms[i - WARM], e0, e1));
    }
    return median(ms, reps);
}

int main(void) {
    if (apex_cuda_device_count() == 0) {
        printf("{\"bench\":\"bench_cuda\",\"skipped\":\"no CUDA driver or device\"}\n");
        return 77;
    }
    struct cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    cudaStream_t s;
    cudaEvent_t e0, e1;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));

    const int HQ = 32, HKV = 8, D = 128, BT = 16;
    const size_t block_bytes = 2 * (size_t)HKV * BT * D * 2;
    static const int points[][2] = {{1, 32768}, {8, 4096}, {16, 8192}, {64, 2048}, {256, 1024}};
    const int n_points = (int)(sizeof points / sizeof points[0]);

    printf("{\"bench\":\"bench_cuda\",\"device\":\"%s\",\"sm\":\"%d%d\",\"sms\":%d,"
           "\"geometry\":{\"n_q_heads\":%d,\"n_kv_heads\":%d,\"head_dim\":%d,\"kv_dtype\":\"f16\","
           "\"block_tokens\":%d},\"decode\":[",
           prop.name, prop.major, prop.minor, prop.multiProcessorCount, HQ, HKV, D, BT);
    for (int pi = 0; pi < n_points; pi++) {
        const int B = points[pi][0], L = points[pi][1];
        const int nb = (L + BT - 1) / BT;
        const int64_t blocks = (int64_t)B * nb;
        const size_t pool_bytes = (size_t)blocks * block_bytes;
        void *pool, *pool2, *q, *out, *lens_d, *table_d, *ws;
        CK(cudaMalloc(&pool, pool_bytes));
        CK(cudaMalloc(&pool2, pool_bytes));
        /* random-ish fp16 content: 0x3c00 ^ noise keeps values finite */
        uint16_t *h = malloc(pool_bytes);
        for (size_t i = 0; i < pool_bytes / 2; i++)
            h[i] = apex_f32_to_f16((float)((int)(rnd() % 2001) - 1000) / 1000.0f);
        CK(cudaMemcpy(pool, h, pool_bytes, cudaMemcpyHostToDevice));
        free(h);
        int32_t *perm = malloc((size_t)blocks * sizeof *perm);
        for (int64_t b = 0; b < blocks; b++) perm[b] = (int32_t)b;
        for (int64_t b = blocks - 1; b > 0; b--) {
            int64_t j = (int64_t)(rnd() % (uint64_t)(b + 1));
            int32_t t = perm[b];
            perm[b] = perm[j];
            perm[j] = t;
        }
        int32_t *lens = malloc((size_t)B * sizeof *lens);
        for (int i = 0; i < B; i++) lens[i] = L;
        const size_t qbytes = (size_t)B * HQ * D * 2;
        uint16_t *hq = malloc(qbytes);
        for (size_t i = 0; i < qbytes / 2; i++)
            hq[i] = apex_f32_to_f16((float)((int)(rnd() % 2001) - 1000) / 1000.0f);
        CK(cudaMalloc(&q, qbytes));
        CK(cudaMalloc(&out, qbytes));
        CK(cudaMalloc(&lens_d, (size_t)B * sizeof *lens));
        CK(cudaMalloc(&table_d, (size_t)blocks * sizeof *perm));
        CK(cudaMemcpy(q, hq, qbytes, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(lens_d, lens, (size_t)B * sizeof *lens, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(table_d, perm, (size_t)blocks * sizeof *perm, cudaMemcpyHostToDevice));
        const size_t ws_bytes = apex_cuda_decode_workspace_bytes(B, HQ, D);
        CK(cudaMalloc(&ws, ws_bytes));

        apex_cuda_decode a;
        memset(&a, 0, sizeof a);
        a.n_seqs = B;
        a.n_q_heads = HQ;
        a.n_kv_heads = HKV;
        a.head_dim = D;
        a.block_tokens = BT;
        a.kv_dtype = a.q_dtype = a.out_dtype = APEX_DTYPE_F16;
        a.q = q;
        a.out = out;
        a.seq_lens = lens_d;
        a.block_table = table_d;
        a.block_table_stride = nb;
        a.kv = pool;
        a.block_bytes = block_bytes;
        a.scale = 0.08838834764831845f;
        a.max_seq_len = L;
        a.workspace = ws;
        a.workspace_bytes = ws_bytes;
        const int splits = apex_cuda_decode_splits(&a);
        const float t_dec = time_decode(&a, s, e0, e1);
        a.num_splits = 1;
        const float t_one = splits > 1 ? time_decode(&a, s, e0, e1) : t_dec;
        const size_t kv_bytes = (size_t)B * L * HKV * D * 2 * 2;
        const float t_copy = time_copy(pool2, pool, kv_bytes, cudaMemcpyDeviceToDevice, s, e0, e1, REPS);
        const double dec_gbps = (double)(kv_bytes + 2 * qbytes) / (t_dec * 1e-3) / 1e9;
        const double copy_gbps = 2.0 * (double)kv_bytes / (t_copy * 1e-3) / 1e9;
        printf("%s{\"batch\":%d,\"ctx\":%d,\"kv_bytes\":%zu,\"splits\":%d,\"decode_us\":%.1f,"
               "\"decode_gbps\":%.1f,\"decode_nosplit_us\":%.1f,\"copy_us\":%.1f,"
               "\"copy_rw_gbps\":%.1f,\"decode_vs_copy\":%.3f}",
               pi ? "," : "", B, L, kv_bytes, splits, t_dec * 1e3, dec_gbps, t_one * 1e3,
               t_copy * 1e3, copy_gbps, dec_gbps / copy_gbps);
        fprintf(stderr, "decode B=%-4d ctx=%-6d splits=%-3d %8.1f us %7.1f GB/s | no-split %8.1f us | copy r+w %7.1f GB/s | ratio %.2f\n",
                B, L, splits, t_dec * 1e3, dec_gbps, t_one * 1e3, copy_gbps, dec_gbps / copy_gbps);
        free(perm);
        free(lens);
        free(hq);
        CK(cudaFree(pool));
        CK(cudaFree(pool2));
        CK(cudaFree(q));
        CK(cudaFree(out));
        CK(cudaFree(lens_d));
        CK(cudaFree(table_d));
        CK(cudaFree(ws));
    }
    printf("],\"pinned\":[");
    static const size_t sizes[] = {64u << 10, 1u << 20, 16u << 20, 256u << 20};
    const size_t max_sz = sizes[3];
    void *hbuf, *dbuf;
    CK(cudaHostAlloc(&hbuf, max_sz, cudaHostAllocDefault));
    CK(cudaMalloc(&dbuf, max_sz));
    memset(hbuf, 1, max_sz);
    for (int i = 0; i < 4; i++) {
        const size_t n = sizes[i];
        const float h2d = time_copy(dbuf, hbuf, n, cudaMemcpyHostToDevice, s, e0, e1, 10);
        const float d2h = time_copy(hbuf, dbuf, n, cudaMemcpyDeviceToHost, s, e0, e1, 10);
        printf("%s{\"bytes\":%zu,\"h2d_us\":%.1f,\"h2d_gbps\":%.2f,\"d2h_us\":%.1f,\"d2h_gbps\":%.2f}",
               i ? "," : "", n, h2d * 1e3, n / (h2d * 1e-3) / 1e9, d2h * 1e3,
               n / (d2h * 1e-3) / 1e9);
        fprintf(stderr, "pinned %10zu B: H2D %7.2f GB/s (%8.1f us)  D2H %7.2f GB/s (%8.1f us)\n", n,
                n / (h2d * 1e-3) / 1e9, h2d * 1e3, n / (d2h * 1e-3) / 1e9, d2h * 1e3);
    }
    printf("]}\n");
    CK(cudaFreeHost(hbuf));
    CK(cudaFree(dbuf));
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    CK(cudaStreamDestroy(s));
    return 0;
}
