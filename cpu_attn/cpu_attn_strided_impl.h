/* cpu_attn_strided_impl.h - what the strided kernel's files share (see
 * cpu_attn_strided.h): the work split (units of a stream, tile of query
 * tokens and KV heads; items, a unit's range of KV rows), the operand
 * accessors, the per-item entry points of each variant (reference.c:
 * scalar, avx512.c: fp32 mode, exact.c: ggml-cpu's arithmetic) and, on
 * x86, the AVX-512 helpers the fp32 and exact loops both use. Internal to
 * cpu_attn/. */
#ifndef APEX_CPU_ATTN_STRIDED_IMPL_H
#define APEX_CPU_ATTN_STRIDED_IMPL_H

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define HAVE_X86 1
#else
#define HAVE_X86 0
#endif

#include "cpu_attn/cpu_attn_strided.h"
#include "cpu_attn/dtype_convert.h"

#define BR 16              /* KV rows per block (one AVX-512 vector of scores) */
#define GROUP 64           /* fp32 mode: rows scored per softmax update        */
#define SPAD 16            /* padding either side of a row of scores           */
#define SROW (GROUP + 2 * SPAD)
#define TILE_T 8           /* query tokens per unit                             */
#define MIN_CHUNK 256      /* fewer rows per chunk cost more to merge than gained */
#define ITEMS_PER_THREAD 4 /* items aimed for per thread, for dynamic balance   */
#define MAX_D 512
#define MAX_Q_UNIT 64      /* queries (heads x tokens) of one multi-head unit  */
#define GROUP_BYTES 262144 /* K+V bytes of a group: stays in L2 until P.V      */
#define F16_NEG_INF 0xfc00u

typedef struct unit {
    int32_t s, t0, tt, kvh; /* stream, first token, tokens, first KV head */
    int32_t nh;             /* KV heads (adjacent in each row; > 1 only
                             * on the fp32 SIMD path)                  */
    int32_t lo, hi;         /* visible row range of the tile         */
    int32_t nsplit, first;  /* chunks, index of the first item       */
    const cpu_attn_strided_desc *d; /* the call's, or one narrowed to
                             * some of a KV head's query heads (exact mode,
                             * few units: cpu_attn_strided)            */
} unit;

typedef struct item {
    int32_t u, r0, r1;
    int32_t part; /* slot in the partials, -1 = write the output directly */
} item;

static inline const char *kv_row(const void *base, size_t nb_stream, size_t nb_head, size_t nb_row,
                                 int32_t s, int32_t h, int32_t r) {
    return (const char *)base + (size_t)s * nb_stream + (size_t)h * nb_head + (size_t)r * nb_row;
}

static inline float mask_at(const cpu_attn_strided_desc *d, int32_t s, int32_t t, int32_t j) {
    if (!d->mask) return 0.0f;
    const uint16_t *row = (const uint16_t *)((const char *)d->mask + (size_t)s * d->mask_nb_stream +
                                             (size_t)t * d->mask_nb_tok);
    return apex_f16_to_f32(row[j]);
}

static inline float *out_row(const cpu_attn_strided_desc *d, int32_t s, int32_t t, int32_t h) {
    return (float *)((char *)d->out + (size_t)s * d->out_nb_stream + (size_t)t * d->out_nb_tok +
                     (size_t)h * d->out_nb_head);
}

static inline const float *q_row(const cpu_attn_strided_desc *d, int32_t s, int32_t t, int32_t h) {
    return (const float *)((const char *)d->q + (size_t)s * d->q_nb_stream + (size_t)t * d->q_nb_tok +
                           (size_t)h * d->q_nb_head);
}

/* Out of line, as GCC compiled them when the kernel was one file: the
 * item loops keep the code they had. */
#define STRIDED_OUTLINE static __attribute__((noinline, unused))

/* q as the dot product sees it: rounded to f16 when K is f16 (as ggml-cpu
 * converts q to K's vec-dot type). */
STRIDED_OUTLINE void load_q(const cpu_attn_strided_desc *d, const float *src, float *dst) {
    for (int32_t i = 0; i < d->head_dim; i++)
        dst[i] = d->kv_dtype == APEX_DTYPE_F16 ? apex_f16_to_f32(apex_f32_to_f16(src[i])) : src[i];
}

STRIDED_OUTLINE void load_row(const cpu_attn_strided_desc *d, const char *src, float *dst) {
    if (d->kv_dtype == APEX_DTYPE_F16) {
        const uint16_t *h = (const uint16_t *)src;
        for (int32_t i = 0; i < d->head_dim; i++) dst[i] = apex_f16_to_f32(h[i]);
    } else {
        memcpy(dst, src, (size_t)d->head_dim * sizeof(float));
    }
}

/* Scratch floats one thread needs for an item. */
static inline size_t scratch_floats(int32_t D, int32_t nq) {
    return (size_t)nq * D              /* q                          */
           + (size_t)nq * SROW         /* scores (fp32 mode)         */
           + (size_t)TILE_T * GROUP    /* mask                       */
           + 2 * (size_t)BR * D        /* K, V block (scalar, exact) */
           + 2 * (size_t)BR + 16;
}

/* Loads the mask of block [r, r+nr) for the tile into mv[t][BR]; returns
 * whether any entry is visible. */
STRIDED_OUTLINE int load_mask_block(const cpu_attn_strided_desc *d, const unit *u, int32_t r, int32_t nr,
                           float *mv) {
    int any = 0;
    for (int32_t t = 0; t < u->tt; t++) {
        float *row = mv + (size_t)t * BR;
        if (!d->mask) {
            for (int32_t rr = 0; rr < nr; rr++) row[rr] = 0.0f;
            any = 1;
        } else {
            const uint16_t *m = (const uint16_t *)((const char *)d->mask +
                                                   (size_t)u->s * d->mask_nb_stream +
                                                   (size_t)(u->t0 + t) * d->mask_nb_tok) + r;
            for (int32_t rr = 0; rr < nr; rr++) {
                row[rr] = m[rr] == F16_NEG_INF ? -INFINITY : apex_f16_to_f32(m[rr]);
                any |= m[rr] != F16_NEG_INF;
            }
        }
        for (int32_t rr = nr; rr < BR; rr++) row[rr] = -INFINITY;
    }
    return any;
}

/* Runs rows [r0, r1) of unit u into m[nq], l[nq], acc[nq][D] (unnormalised;
 * query qi = g * tt + t is head kvh * G + g at token t0 + t), scr being the
 * thread's scratch_floats. One per variant; the driver picks one per call. */
typedef void (*strided_item_fn)(const cpu_attn_strided_desc *, const unit *, int32_t, int32_t, float *, float *,
                                float *, float *);
void cpu_attn_strided_item_scalar(const cpu_attn_strided_desc *d, const unit *u, int32_t r0, int32_t r1,
                                  float *scr, float *m, float *l, float *acc);

#if HAVE_X86
#define T512 __attribute__((target("avx512f,avx2,fma,f16c")))
#include "cpu_attn/simd_avx512.h"
/* The strided kernel knows f16 and f32 KV: a flag picks the type. */
#define F16_DT(f16) ((f16) ? APEX_DTYPE_F16 : APEX_DTYPE_F32)
/* S = S*ms + vs as ggml-cpu's compiled code evaluates it. */
#ifndef COMPAT_SUM
#define COMPAT_SUM(S, ms, vs) fmaf((S), (ms), (vs))
#endif

T512 static inline void load_row16(const cpu_attn_strided_desc *d, const char *src, float *dst) {
    const int32_t nv = d->head_dim / 16;
    if (d->kv_dtype == APEX_DTYPE_F16) {
        for (int32_t v = 0; v < nv; v++)
            _mm512_storeu_ps(dst + 16 * v,
                             _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + 32 * v))));
    } else {
        memcpy(dst, src, (size_t)d->head_dim * sizeof(float));
    }
}

/* load_q with F16C: the same f16 rounding (to nearest even, as ggml-cpu's
 * own F16C conversion of q), at a fraction of the scalar conversion's
 * cost, which was a quarter of the exact kernel's samples at 8 short
 * sequences (perf, SmolLM2, 128-token contexts). */
T512 static inline void load_q16(const cpu_attn_strided_desc *d, const float *src, float *dst) {
    int32_t i = 0;
    if (d->kv_dtype == APEX_DTYPE_F16)
        for (; i + 16 <= d->head_dim; i += 16)
            _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm512_cvtps_ph(_mm512_loadu_ps(src + i),
                                                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    for (; i < d->head_dim; i++)
        dst[i] = d->kv_dtype == APEX_DTYPE_F16 ? apex_f16_to_f32(apex_f32_to_f16(src[i])) : src[i];
}

#define INL static inline __attribute__((always_inline))

/* Software prefetch over the rows [row, end) of one KV head: the rows are a
 * stride apart (other heads' rows between), which the hardware prefetcher
 * does not follow across pages, so the next group is fetched in shares
 * while the current one computes. T1 (to L2) leaves the L1 fill buffers to
 * the demand loads. */
typedef struct pf_cursor {
    const char *base;
    size_t stride;
    int32_t row, end, line, lines;
} pf_cursor;

static inline void pf_init(pf_cursor *c, const char *base, size_t stride, size_t row_bytes, int32_t r0, int32_t r1) {
    c->base = base, c->stride = stride, c->row = r0, c->end = r1, c->line = 0;
    /* One more line when rows do not start on a line. */
    c->lines = (int32_t)((row_bytes + 63) / 64) + ((((uintptr_t)base | stride) & 63) != 0);
    c->base = (const char *)((uintptr_t)base & ~(uintptr_t)63);
}

/* A row's lines in one tight loop: a cursor step per line cost about as
 * much as the prefetches saved. */
T512 INL void pf_step(pf_cursor *c, int32_t n) {
    while (n > 0 && c->row < c->end) {
        const char *p = c->base + (size_t)c->row * c->stride + (size_t)c->line * 64;
        const int32_t take = c->lines - c->line < n ? c->lines - c->line : n;
        for (int32_t i = 0; i < take; i++) _mm_prefetch(p + (size_t)i * 64, _MM_HINT_T1);
        n -= take;
        if ((c->line += take) == c->lines) c->line = 0, c->row++;
    }
}

void cpu_attn_strided_item_avx512(const cpu_attn_strided_desc *d, const unit *u, int32_t r0, int32_t r1,
                                  float *scr, float *m, float *l, float *acc);
void cpu_attn_strided_item_exact(const cpu_attn_strided_desc *d, const unit *u, int32_t r0, int32_t r1,
                                 float *scr, float *m, float *l, float *acc);
#endif /* HAVE_X86 */

#endif /* APEX_CPU_ATTN_STRIDED_IMPL_H */
