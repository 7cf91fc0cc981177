/*
 * fuzz_util.h - what every fuzz target shares: a reader that turns the
 * input bytes into choices (past the end every read is 0, so any input is
 * a complete program), a PRNG for bulk data, and the invariant checks.
 */
#ifndef APEX_FUZZ_UTIL_H
#define APEX_FUZZ_UTIL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "apex/apex.h"

typedef struct {
    const uint8_t *p;
    size_t n, at;
} fz;

static inline int fz_more(const fz *f) { return f->at < f->n; }
static inline uint8_t fz_u8(fz *f) { return f->at < f->n ? f->p[f->at++] : 0; }
static inline uint32_t fz_u32(fz *f) {
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) v |= (uint32_t)fz_u8(f) << (8 * i);
    return v;
}
/* [0, n) */
static inline int32_t fz_below(fz *f, int32_t n) { return n > 0 ? (int32_t)(fz_u8(f) % (uint32_t)n) : 0; }
/* Mostly small values near a range, sometimes anything: where bugs hide. */
static inline int32_t fz_int(fz *f, int32_t lo, int32_t hi) {
    uint8_t k = fz_u8(f);
    if (k < 200) return lo + (int32_t)(fz_u8(f) % (uint32_t)(hi - lo + 1));
    if (k < 230) return (int32_t)fz_u32(f);
    static const int32_t edge[] = {-1, 0, 1, INT32_MAX, INT32_MIN, 2147483646, 65536, -65536};
    return edge[k % 8];
}
/* A float: ordinary values mostly, sometimes NaN/Inf/huge/negative/denormal. */
static inline float fz_float(fz *f, float typical) {
    uint8_t k = fz_u8(f);
    if (k < 160) return 0.0f;
    if (k < 220) return typical * (float)(fz_u8(f) + 1) / 128.0f;
    static const float edge[] = {NAN, INFINITY, -INFINITY, -1.0f, 1e30f, 1e-40f, -0.0f, 65504.0f};
    return edge[k % 8];
}

static inline uint64_t fz_rand(uint64_t *s) { /* splitmix64 */
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static inline float fz_randf(uint64_t *s) { /* [-1, 1) */
    return (float)((fz_rand(s) >> 40) * (1.0 / 8388608.0)) - 1.0f;
}

/* An invariant broke: report and crash, so libFuzzer keeps the input. */
#define FZ_CHECK(cond, ...)                                                    \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "fuzz invariant failed at %s:%d: %s: ", __FILE__,   \
                    __LINE__, #cond);                                          \
            fprintf(stderr, __VA_ARGS__);                                      \
            fprintf(stderr, " (last error: %s)\n", apex_last_error());         \
            abort();                                                           \
        }                                                                      \
    } while (0)

/* Every failure has a message. */
#define FZ_STATUS(st)                                                          \
    FZ_CHECK((st) == APEX_OK || apex_last_error()[0] != '\0',                  \
             "status %s without a message", apex_status_name(st))

#endif
