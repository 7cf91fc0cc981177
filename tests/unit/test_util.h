/* test_util.h - small helpers shared by the unit tests. */
#ifndef APEX_TEST_UTIL_H
#define APEX_TEST_UTIL_H

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <cmocka.h>

#include "apex/apex.h"

/* Deterministic PRNG (splitmix64): tests replay exactly. */
static inline uint64_t test_rand_u64(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static inline float test_rand_f(uint64_t *s) { /* uniform [-1, 1) */
    return (float)((test_rand_u64(s) >> 40) * (1.0 / 8388608.0)) - 1.0f;
}
static inline int32_t test_rand_int(uint64_t *s, int32_t n) { /* [0, n) */
    return (int32_t)(test_rand_u64(s) % (uint64_t)n);
}

/* Asserts a call's status and, on failure, that it left a message. */
#define assert_status(call, want)                                               \
    do {                                                                        \
        apex_status st_ = (call);                                               \
        if (st_ != (want))                                                      \
            fail_msg("%s returned %s (want %s): %s", #call, apex_status_name(st_), \
                     apex_status_name(want), apex_last_error());                \
        if ((want) != APEX_OK) assert_true(apex_last_error()[0] != '\0');       \
    } while (0)

#define assert_ok(call) assert_status(call, APEX_OK)

/* Naive decode attention of one query head over rows [start, n) of k and v
 * (row r of a head at k + r * stride), in double: the definition every
 * kernel and pipeline test is checked against. */
static inline void test_naive_attention(const float *q, int d, const float *k, const float *v,
                                        size_t stride, int start, int n, float scale,
                                        float softcap, double *out) {
    double mx = -INFINITY, sum = 0;
    double *w = (double *)malloc(sizeof(double) * (size_t)n);
    for (int t = start; t < n; t++) {
        double dot = 0;
        for (int i = 0; i < d; i++) dot += (double)q[i] * k[t * stride + i];
        dot *= scale;
        if (softcap > 0) dot = softcap * tanh(dot / softcap);
        w[t] = dot;
        if (dot > mx) mx = dot;
    }
    for (int t = start; t < n; t++) sum += (w[t] = exp(w[t] - mx));
    for (int i = 0; i < d; i++) out[i] = 0;
    for (int t = start; t < n; t++)
        for (int i = 0; i < d; i++) out[i] += w[t] / sum * v[t * stride + i];
    free(w);
}

#endif
