/* STREAM-style read bandwidth, see stream.h. */
#include "bench/stream.h"
#include "csrc/host_mem.h"

#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));

/* Sum of n bytes (a multiple of 512) at p; eight accumulators of 64 bytes. */
static inline __attribute__((always_inline)) float read_sum(const char *p, size_t n) {
    v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
    for (size_t i = 0; i < n; i += 512) {
        const v16 *v = (const v16 *)(const void *)(p + i);
        a0 += v[0], a1 += v[1], a2 += v[2], a3 += v[3];
        a4 += v[4], a5 += v[5], a6 += v[6], a7 += v[7];
    }
    v16 s = (a0 + a1) + (a2 + a3) + (a4 + a5) + (a6 + a7);
    float r = 0.0f;
    for (int i = 0; i < 16; i++) r += s[i];
    return r;
}

__attribute__((target("avx512f"))) static float read_avx512(const char *p, size_t n) {
    return read_sum(p, n);
}
__attribute__((target("avx2"))) static float read_avx2(const char *p, size_t n) {
    return read_sum(p, n);
}
static float read_base(const char *p, size_t n) { return read_sum(p, n); }

int stream_init(stream_buf *s, size_t bytes, int n_threads) {
    bytes = (bytes + 4095) & ~(size_t)4095;
    /* The host pool's allocator: the same page size as the KV it is
     * compared with (huge pages read faster; a fair baseline uses them). */
    s->p = host_mem_alloc(NULL, bytes);
    s->bytes = s->p ? bytes : 0;
    if (!s->p) return -1;
    const size_t pages = bytes / 4096;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (size_t i = 0; i < pages; i++) memset((char *)s->p + i * 4096, 0x3c, 4096);
    return 0;
}

void stream_free(stream_buf *s) {
    host_mem_free(s->p, s->bytes);
    s->p = NULL;
    s->bytes = 0;
}

double stream_read_gbps(const stream_buf *s, int n_threads, int reps) {
    float (*fn)(const char *, size_t) = read_base;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) fn = read_avx512;
    else if (__builtin_cpu_supports("avx2")) fn = read_avx2;
    static volatile float sink;
    (void)sink;
    double best = 0.0;
    for (int r = 0; r < reps; r++) {
        double t0 = omp_get_wtime();
        float tot = 0.0f;
#pragma omp parallel num_threads(n_threads) reduction(+ : tot)
        {
            const int t = omp_get_thread_num(), nt = omp_get_num_threads();
            /* Slices in 512-byte units, as equal as possible. */
            const size_t units = s->bytes / 512;
            const size_t u0 = units * (size_t)t / (size_t)nt, u1 = units * (size_t)(t + 1) / (size_t)nt;
            tot += fn((const char *)s->p + u0 * 512, (u1 - u0) * 512);
        }
        double dt = omp_get_wtime() - t0;
        sink = tot;
        double gbps = (double)(s->bytes / 512 * 512) / dt / 1e9;
        if (gbps > best) best = gbps;
    }
    return best;
}
