/*
 * simd_avx2.h - 256-bit building blocks shared by the avx2 kernel
 * (cpu_attn_avx2.c) and the AVX-512 kernels' 256-bit q.K tiles
 * (simd_avx512.h). The target attribute names only AVX2/FMA/F16C, a
 * subset of every includer's, so these always-inline helpers inline into
 * either.
 */
#ifndef APEX_SIMD_AVX2_H
#define APEX_SIMD_AVX2_H

#include <immintrin.h>
#include <stddef.h>

#include "apex/apex.h"
#include "cpu_attn/dtype_traits.h"

#define AVX2_INL static inline __attribute__((target("avx2,fma,f16c"), always_inline))

/* 8 elements of type dt (f32, f16 or bf16) at p, as fp32. */
AVX2_INL __m256 avx2_ld8(const void *p, apex_dtype dt) {
    if (dt == APEX_DTYPE_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    if (dt == APEX_DTYPE_BF16)
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
    return _mm256_loadu_ps((const float *)p);
}

/* a[h * TT + j] = q[h] . k[j] lane-wise (8 partial sums each, for a
 * transpose-reduce to finish) for TT K rows (rowb bytes apart, type dt) and
 * HT <= 8 query heads (D apart), 8 columns per FMA. TT and HT are
 * compile-time constants at every call, so a[] stays in registers. */
AVX2_INL void avx2_qk_dots(__m256 *a, const float *q, int D, const void *k, size_t rowb,
                           apex_dtype dt, int TT, int HT) {
    const size_t esz = apex_dtype_size(dt);
#pragma GCC unroll 16
    for (int i = 0; i < TT * HT; i++) a[i] = _mm256_setzero_ps();
    for (int c = 0; c < D; c += 8) {
        __m256 qv[8];
#pragma GCC unroll 8
        for (int h = 0; h < HT; h++) qv[h] = _mm256_loadu_ps(q + (size_t)h * D + c);
#pragma GCC unroll 16
        for (int j = 0; j < TT; j++) {
            const __m256 kv = avx2_ld8((const uint8_t *)k + (size_t)j * rowb + (size_t)c * esz, dt);
#pragma GCC unroll 8
            for (int h = 0; h < HT; h++) a[h * TT + j] = _mm256_fmadd_ps(qv[h], kv, a[h * TT + j]);
        }
    }
}

#endif /* APEX_SIMD_AVX2_H */
