/*
 * simd_avx512.h - AVX-512 building blocks shared by the paged kernel
 * (cpu_attn_avx512.c, compiled with AVX-512 flags) and the strided kernel
 * (cpu_attn_strided.c, compiled without them: its AVX-512 functions carry
 * a target attribute). The attribute here names only features both have,
 * so these always-inline helpers inline into either.
 */
#ifndef APEX_SIMD_AVX512_H
#define APEX_SIMD_AVX512_H

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

#include "apex/apex.h"
#include "cpu_attn/dtype_traits.h"
#include "cpu_attn/simd_avx2.h"

#define AVX512_INL \
    static inline __attribute__((target("avx512f,avx2,fma,f16c"), always_inline))

/* 16 elements of type dt (f32, f16 or bf16) at p, as fp32. */
AVX512_INL __m512 avx512_ld16(const void *p, apex_dtype dt) {
    if (dt == APEX_DTYPE_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    if (dt == APEX_DTYPE_BF16)
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
    return _mm512_loadu_ps((const float *)p);
}

/* Lane j of the result = the sum of the lanes of x[j] (x[n..15] read as 0):
 * a transpose folded into the reduction, 15 adds for 16 sums. Each level
 * adds lanes i and i+8, then i+4, i+2, i+1 of every input, the pairing of
 * _mm512_reduce_add_ps, so each sum is bitwise that of a per-vector reduce
 * (the strided kernel's exact mode relies on it). The network leaves input
 * k's sum in lane PERM[k] (PERM is an involution), so inputs are fed in
 * PERM order. */
AVX512_INL __m512 avx512_hsum16(const __m512 *x, int n) {
    static const int PERM[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};
    __m512 y[16], a[8], b[4], c[2];
#pragma GCC unroll 16
    for (int k = 0; k < 16; k++) y[k] = PERM[k] < n ? x[PERM[k]] : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(y[i], y[i + 8], 0x44),
                             _mm512_shuffle_f32x4(y[i], y[i + 8], 0xEE));
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++)
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 4], 0x88),
                             _mm512_shuffle_f32x4(a[i], a[i + 4], 0xDD));
#pragma GCC unroll 2
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[i], b[i + 2], 0x44),
                             _mm512_shuffle_ps(b[i], b[i + 2], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
}

/* avx512_hsum16's sums, bitwise (the same pairing), by another network:
 * a level merges two vectors A, B into one holding half of each's pair
 * sums, a blend taking A's lanes of one half and B's of the other and one
 * shuffle bringing the partners: one shuffle per add where
 * avx512_hsum16 shuffles each operand. On Zen 4 it is ~1.5% faster in
 * the avx512bf16 kernel's QK (in-cache, 1 thread) and ~2% slower in the
 * fp32 kernel's QK on f16 KV, so only the former uses it. Input k's sum
 * lands in lane REV[k] (4-bit reversal, an involution), so inputs are fed
 * in REV order. */
AVX512_INL __m512 avx512_hsum16_blend(const __m512 *x, int n) {
    static const int REV[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
    __m512 y[16], a[8], b[4], c[2];
#pragma GCC unroll 16
    for (int k = 0; k < 16; k++) y[k] = REV[k] < n ? x[REV[k]] : _mm512_setzero_ps();
    /* Lanes i, i+8: 256-bit halves. */
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_ps(_mm512_mask_blend_ps(0xFF00, y[2 * i], y[2 * i + 1]),
                             _mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0x4E));
    /* Lanes i, i+4: 128-bit quarters (one blend more: shuffle_f32x4 takes
     * its low half from its first operand). */
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) {
        const __m512 e = _mm512_mask_blend_ps(0xF0F0, a[2 * i + 1], a[2 * i]);
        b[i] = _mm512_add_ps(_mm512_mask_blend_ps(0xF0F0, a[2 * i], a[2 * i + 1]),
                             _mm512_shuffle_f32x4(e, e, 0xB1));
    }
    /* Lanes i, i+2 within each 128 bits. */
#pragma GCC unroll 2
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_ps(_mm512_mask_blend_ps(0xCCCC, b[2 * i], b[2 * i + 1]),
                             _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x4E));
    /* Lanes i, i+1. */
    return _mm512_add_ps(_mm512_mask_blend_ps(0xAAAA, c[0], c[1]),
                         _mm512_permute_ps(_mm512_mask_blend_ps(0xAAAA, c[1], c[0]), 0xB1));
}

/* The 16 horizontal sums of x[0..n) (8 lanes each; zero past n), sum k in
 * lane k: a transpose-reduce in 256-bit halves, 3 levels of blend, shuffle
 * and add on 8 vectors, 4 and 2. Inputs are taken in ORD order (an
 * involution) so that sums land in input order. The avx512bf16 kernel's
 * q.K with 3-4 heads a tile: half the width of avx512_hsum16_blend. */
AVX512_INL __m512 avx512_hsum16_ymm(const __m256 *x, int n) {
    static const int ORD[16] = {0, 4, 2, 6, 1, 5, 3, 7, 8, 12, 10, 14, 9, 13, 11, 15};
    __m256 y[16], a[8], b[4], c[2];
#pragma GCC unroll 16
    for (int k = 0; k < 16; k++) y[k] = ORD[k] < n ? x[ORD[k]] : _mm256_setzero_ps();
    /* Lanes i, i+4: the 128-bit halves. */
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++)
        a[i] = _mm256_add_ps(_mm256_blend_ps(y[2 * i], y[2 * i + 1], 0xF0),
                             _mm256_permute2f128_ps(y[2 * i], y[2 * i + 1], 0x21));
    /* Lanes i, i+2 within each 128 bits. */
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++)
        b[i] = _mm256_add_ps(_mm256_blend_ps(a[2 * i], a[2 * i + 1], 0xCC),
                             _mm256_shuffle_ps(a[2 * i], a[2 * i + 1], 0x4E));
    /* Lanes i, i+1. */
#pragma GCC unroll 2
    for (int i = 0; i < 2; i++)
        c[i] = _mm256_add_ps(_mm256_blend_ps(b[2 * i], b[2 * i + 1], 0xAA),
                             _mm256_permute_ps(_mm256_blend_ps(b[2 * i + 1], b[2 * i], 0xAA), 0xB1));
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(c[0])),
                                               _mm256_castps_pd(c[1]), 1));
}

/* e^x, relative error ~2e-7 (Cephes expf polynomial on x - n ln2, scaled by
 * 2^n with vscalefps). x is clamped to >= -104, where e^x is 0 in fp32. */
AVX512_INL __m512 avx512_exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    x = _mm512_min_ps(x, _mm512_set1_ps(88.7f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* tanh(y) = sign(y) (1 - e^-2|y|) / (1 + e^-2|y|). */
AVX512_INL __m512 avx512_tanh16(__m512 y) {
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u), yi = _mm512_castps_si512(y);
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 ay = _mm512_castsi512_ps(_mm512_andnot_si512(sign, yi));
    const __m512 e = avx512_exp16(_mm512_mul_ps(ay, _mm512_set1_ps(-2.0f)));
    const __m512 t = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t), _mm512_and_si512(sign, yi)));
}

/* Stores a tile's transpose-reduced scores r: lanes [h*TT, h*TT+TT) belong
 * to head h, one masked store per head, addressed so that lane h*TT lands
 * on s[h*srow] (score rows are padded either side). */
AVX512_INL void avx512_store_tile(float *s, ptrdiff_t srow, __m512 r, int TT, int HT) {
#pragma GCC unroll 8
    for (int h = 0; h < HT; h++)
        _mm512_mask_storeu_ps(s + h * srow - h * TT, (__mmask16)(((1u << TT) - 1) << (h * TT)), r);
}

/* Scores of TT consecutive K rows (rowb bytes apart, type dt) against HT
 * query heads (q, head_dim D apart): s[h * srow + j] = q[h] . k[j], with
 * TT * HT <= 16 accumulators and one transpose-reduce. TT and HT are
 * compile-time constants at every call, so the loops unroll. */
AVX512_INL void avx512_qk_tile(const float *q, int D, const void *k, size_t rowb, float *s,
                               ptrdiff_t srow, apex_dtype dt, int TT, int HT) {
    const size_t esz = apex_dtype_size((apex_dtype)dt);
    __m512 a[16];
#pragma GCC unroll 16
    for (int i = 0; i < TT * HT; i++) a[i] = _mm512_setzero_ps();
    for (int c = 0; c < D; c += 16) {
        __m512 qv[8];
#pragma GCC unroll 8
        for (int h = 0; h < HT; h++) qv[h] = _mm512_loadu_ps(q + (size_t)h * D + c);
#pragma GCC unroll 16
        for (int j = 0; j < TT; j++) {
            const __m512 kv = avx512_ld16((const uint8_t *)k + (size_t)j * rowb + (size_t)c * esz, dt);
#pragma GCC unroll 8
            for (int h = 0; h < HT; h++) a[h * TT + j] = _mm512_fmadd_ps(qv[h], kv, a[h * TT + j]);
        }
    }
    avx512_store_tile(s, srow, avx512_hsum16(a, TT * HT), TT, HT);
}

/* avx512_qk_tile with 8 columns per 256-bit FMA (Zen 4 issues two a cycle,
 * the 512-bit rate) into 256-bit accumulators, whose transpose-reduce
 * (avx512_hsum16_ymm) is half as wide. Not bitwise avx512_qk_tile's sums. */
AVX512_INL void avx512_qk_tile_ymm(const float *q, int D, const void *k, size_t rowb, float *s,
                                   ptrdiff_t srow, apex_dtype dt, int TT, int HT) {
    __m256 a[16];
    avx2_qk_dots(a, q, D, k, rowb, dt, TT, HT);
    avx512_store_tile(s, srow, avx512_hsum16_ymm(a, TT * HT), TT, HT);
}

/* P.V in 16-wide column slices. Independent token sets (avx512_pv_sets)
 * keep >= 8 FMA chains in flight when few heads share a V row. */
AVX512_INL int avx512_pv_sets(int HP) { return HP >= 8 ? 1 : HP >= 4 ? 2 : HP >= 2 ? 4 : 8; }

/* a[u * HP + h] += p[h * srow + t] * v[t] over the n rows of one run (v at
 * the slice's first column, rows rowb bytes apart, type dt); token t goes
 * to set u = t % NS (the tail to set 0). HP and NS are compile-time
 * constants at every call, so a[] stays in registers. */
AVX512_INL void avx512_pv_run(__m512 *a, const uint8_t *v, size_t rowb, int n, const float *p,
                              ptrdiff_t srow, apex_dtype dt, int HP, int NS) {
    int t = 0;
    for (; t + NS <= n; t += NS) {
#pragma GCC unroll 8
        for (int u = 0; u < NS; u++) {
            const __m512 vv = avx512_ld16(v + (size_t)(t + u) * rowb, dt);
#pragma GCC unroll 16
            for (int h = 0; h < HP; h++)
                a[u * HP + h] = _mm512_fmadd_ps(_mm512_set1_ps(p[h * srow + t + u]), vv, a[u * HP + h]);
        }
    }
    for (; t < n; t++) {
        const __m512 vv = avx512_ld16(v + (size_t)t * rowb, dt);
#pragma GCC unroll 16
        for (int h = 0; h < HP; h++) a[h] = _mm512_fmadd_ps(_mm512_set1_ps(p[h * srow + t]), vv, a[h]);
    }
}

/* acc[h * D + i] += the NS sets' sums of a[.. h], i < 16, for HP heads. */
AVX512_INL void avx512_pv_add(const __m512 *a, float *acc, int D, int HP, int NS) {
#pragma GCC unroll 16
    for (int h = 0; h < HP; h++) {
        __m512 sum = a[h];
#pragma GCC unroll 8
        for (int u = 1; u < NS; u++) sum = _mm512_add_ps(sum, a[u * HP + h]);
        float *o = acc + (size_t)h * D;
        _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), sum));
    }
}

#endif /* APEX_SIMD_AVX512_H */
