/* AVX512-BF16 inner kernel for bf16 KV (f16 and f32 KV take the avx512
 * kernel's path). Built with AVX-512 + AVX512-BF16 flags; run only where
 * cpuid reports both.
 *
 * vdpbf16ps multiplies 32 bf16 pairs and adds them into 16 fp32 lanes in
 * one instruction, where the avx512 kernel needs a widen, a shift and an
 * FMA per 16 elements: on Zen 4 that was the compute ceiling (about 0.65
 * of the DRAM bandwidth on two cores).
 *  QK  q is rounded to bf16 once per span (exact when q came as bf16, as
 *      from a bf16 model; q is passed unscaled and the scale applied to the
 *      fp32 scores), K is read as is; tiles of TT tokens x HT heads as in
 *      the avx512 kernel. With 3-4 heads a tile the products are 256-bit
 *      (16 columns), which halves the transpose-reduce's width; else
 *      512-bit (32 columns).
 *  PV  P is rounded to bf16 (as a GPU flash-attention kernel does before
 *      its P.V product; the softmax sum l stays fp32 over unrounded P).
 *      vdpbf16ps sums adjacent pairs, so two V rows are interleaved
 *      (unpacklo/hi) and multiplied by the broadcast pair (p_t, p_t+1):
 *      each accumulator lane gets one column of two tokens. The interleave
 *      permutes the columns; they are put back once per group. With 4
 *      heads a pass covers 64 columns (128 bytes of each row).
 * In the pair layout (kv_layout.h; span_pairs) K and V come already in the
 * order vdpbf16ps wants: q.K needs no reduce, P.V no interleave (below).
 * The span driver (groups, prefetch, online softmax) is avx512_span.h's. */
#include <immintrin.h>
#include <string.h>

#include "cpu_attn/avx512_span.h"
#include "cpu_attn/cpu_attn_impl.h"
#include "cpu_attn/simd_avx512.h"

#define INL static inline __attribute__((always_inline))
/* Stride of the bf16 P rows, in elements: the score rows'. */
#define PROW CPU_ATTN_SROW

typedef struct {
    const uint16_t *q; /* [NH*G][Dq] bf16, unscaled, zero past D      */
    uint16_t *p;       /* [G][PROW] bf16 P of the KV head in PV       */
    uint16_t *qt;      /* amxbf16, rows: [NH][Dq/2][G][2] (q's dim pairs
                        * outermost: an AMX B tile per 32 dims)        */
    uint16_t *vb;      /* amxbf16, rows: one group's V, [MAX_BT/2][Dq][2]
                        * (token pairs interleaved: AMX B tiles)        */
    int D, Dq, G;
    size_t rowb;
    float scale;
    int ymm;           /* cpu_attn_qk_ymm()                          */
} bf_ctx;

INL __m512bh as_bh(__m512i x) { return (__m512bh)x; }

/* CALL(h) with h the compile-time constant equal to n (1-8): the stages
 * keep their accumulators in registers only with a constant head count. */
#define BF_HEADS_CONST(n, CALL)                                                                  \
    switch (n) {                                                                                 \
    case 1: CALL(1); break;                                                                      \
    case 2: CALL(2); break;                                                                      \
    case 3: CALL(3); break;                                                                      \
    case 4: CALL(4); break;                                                                      \
    case 5: CALL(5); break;                                                                      \
    case 6: CALL(6); break;                                                                      \
    case 7: CALL(7); break;                                                                      \
    default: CALL(8); break;                                                                     \
    }

/* ---------------------------------------------------------------- QK */

/* s[h * SROW + j] = scale * q[h] . k[j] for TT rows x HT heads, 32
 * columns per 512-bit vdpbf16ps; a head_dim of 16 mod 32 ends with a
 * 16-column step (K masked, q zero-padded). For one head (TT 16), where
 * each K load feeds one product: the 256-bit form's twice as many loads
 * made it 4-5 % slower there. */
INL void bf_qk_tile512(const uint16_t *q, int Dq, int D, const uint8_t *k, size_t rowb, float *s,
                    float scale, int TT, int HT) {
    __m512 a[16];
#pragma GCC unroll 16
    for (int i = 0; i < TT * HT; i++) a[i] = _mm512_setzero_ps();
    int c = 0;
    for (; c + 32 <= D; c += 32) {
        __m512bh qv[8];
#pragma GCC unroll 8
        for (int h = 0; h < HT; h++) qv[h] = as_bh(_mm512_loadu_si512(q + (size_t)h * Dq + c));
#pragma GCC unroll 16
        for (int j = 0; j < TT; j++) {
            const __m512bh kv = as_bh(_mm512_loadu_si512(k + (size_t)j * rowb + (size_t)c * 2));
#pragma GCC unroll 8
            for (int h = 0; h < HT; h++) a[h * TT + j] = _mm512_dpbf16_ps(a[h * TT + j], qv[h], kv);
        }
    }
    if (c < D) {
        __m512bh qv[8];
#pragma GCC unroll 8
        for (int h = 0; h < HT; h++) qv[h] = as_bh(_mm512_loadu_si512(q + (size_t)h * Dq + c));
#pragma GCC unroll 16
        for (int j = 0; j < TT; j++) {
            const __m512bh kv =
                as_bh(_mm512_maskz_loadu_epi16(0xffff, k + (size_t)j * rowb + (size_t)c * 2));
#pragma GCC unroll 8
            for (int h = 0; h < HT; h++) a[h * TT + j] = _mm512_dpbf16_ps(a[h * TT + j], qv[h], kv);
        }
    }
    avx512_store_tile(s, CPU_ATTN_SROW, _mm512_mul_ps(avx512_hsum16_blend(a, TT * HT), _mm512_set1_ps(scale)), TT, HT);
}

/* The same with 16 columns per 256-bit vdpbf16ps (Zen 4 issues two a
 * cycle: the 512-bit form's rate) and 256-bit accumulators, whose
 * transpose-reduce is half as wide: with 3-4 heads (TT 4-5) the 512-bit
 * one cost about as much as the products it sums (1.5 cycles a 512-bit
 * product in cache, 1.1 with a plain sum in its place). */
INL void bf_qk_tile256(const uint16_t *q, int Dq, int D, const uint8_t *k, size_t rowb, float *s,
                       float scale, int TT, int HT) {
    __m256 a[16];
#pragma GCC unroll 16
    for (int i = 0; i < TT * HT; i++) a[i] = _mm256_setzero_ps();
    for (int c = 0; c < D; c += 16) {
        __m256bh qv[8];
#pragma GCC unroll 8
        for (int h = 0; h < HT; h++)
            qv[h] = (__m256bh)_mm256_loadu_si256((const __m256i *)(q + (size_t)h * Dq + c));
#pragma GCC unroll 16
        for (int j = 0; j < TT; j++) {
            const __m256bh kv =
                (__m256bh)_mm256_loadu_si256((const __m256i *)(k + (size_t)j * rowb + (size_t)c * 2));
#pragma GCC unroll 8
            for (int h = 0; h < HT; h++) a[h * TT + j] = _mm256_dpbf16_ps(a[h * TT + j], qv[h], kv);
        }
    }
    avx512_store_tile(s, CPU_ATTN_SROW, _mm512_mul_ps(avx512_hsum16_ymm(a, TT * HT), _mm512_set1_ps(scale)), TT, HT);
}

/* 256-bit where measured faster on Zen 4 (3 heads +4-7 % in cache, 4 heads
 * +2-3 %; 2 heads lost 10 % from DRAM with it (head_dim 256) and 8 gained
 * nothing), when cpu_attn_qk_ymm says: on a Xeon it was 1.3x slower. */
INL void bf_qk_tile(const uint16_t *q, int Dq, int D, const uint8_t *k, size_t rowb, float *s,
                    float scale, int TT, int HT, int ymm) {
    if (ymm && (HT == 3 || HT == 4)) bf_qk_tile256(q, Dq, D, k, rowb, s, scale, TT, HT);
    else bf_qk_tile512(q, Dq, D, k, rowb, s, scale, TT, HT);
}

INL void bf_qk_rows(const bf_ctx *cx, const uint16_t *q, const uint8_t *k, int n, float *s, int HT,
                    pf_list *pf, int pf_lines) {
    const int TT = 16 / HT, tiles = (n + TT - 1) / TT, per = (pf_lines + tiles - 1) / tiles;
    int j = 0, left = pf_lines;
    for (; j + TT <= n; j += TT) {
        bf_qk_tile(q, cx->Dq, cx->D, k + (size_t)j * cx->rowb, cx->rowb, s + j, cx->scale, TT, HT,
                   cx->ymm);
        pf_share(pf, &left, per);
    }
    for (; j < n; j++)
        bf_qk_tile(q, cx->Dq, cx->D, k + (size_t)j * cx->rowb, cx->rowb, s + j, cx->scale, 1, HT,
                   cx->ymm);
    pf_list_some(pf, left);
}

static void qk_bf16(const void *ctx, int hh, const uint8_t *k, int r, int n, float *s,
                    pf_list *pf, int pf_lines) {
    const bf_ctx *cx = ctx;
    (void)r;
    for (int h0 = 0; h0 < cx->G; h0 += 8) {
        const int HT = cx->G - h0 < 8 ? cx->G - h0 : 8;
        const uint16_t *q = cx->q + ((size_t)hh * cx->G + (size_t)h0) * cx->Dq;
        float *sh = s + (size_t)h0 * CPU_ATTN_SROW;
#define QK_ROWS(h) bf_qk_rows(cx, q, k, n, sh, h, pf, pf_lines)
        BF_HEADS_CONST(HT, QK_ROWS)
#undef QK_ROWS
        pf_lines = 0;
    }
}

/* ---------------------------------------------------------------- PV */

/* Independent token-pair sets, so that >= 8 accumulators (vdpbf16ps
 * latency 6 on Zen 4) are in flight: each head has two (lo, hi). */
INL int bf_pv_sets(int HP) { return HP >= 4 ? 1 : HP >= 2 ? 2 : 4; }

INL uint32_t ld_pair(const uint16_t *p) {
    uint32_t x;
    memcpy(&x, p, sizeof x);
    return x;
}

/* 32 columns (16 if half) of one V row as bf16. */
INL __m512i ld_vrow(const uint8_t *v, int half) {
    return half ? _mm512_maskz_loadu_epi16(0xffff, v) : _mm512_loadu_si512(v);
}

/* a[((u * W + w) * HP + h) * 2 + {0, 1}] += the pair products of the n
 * rows of one run for W adjacent 32-column slices w (v at the first
 * slice's first column), P at p (row h at h * PROW); pairs go to set u
 * round-robin, the tail pair to set 0, an odd last row pairs with a zero
 * row and p = 0. W = 2 reads 128 contiguous bytes of each row per pass and
 * broadcasts each P pair once for both slices. */
INL void bf_pv_run(__m512 *a, const uint8_t *v, size_t rowb, int n, const uint16_t *p, int HP,
                   int NS, int W, int half) {
    int t = 0;
    for (; t + 2 * NS <= n; t += 2 * NS) {
#pragma GCC unroll 4
        for (int u = 0; u < NS; u++) {
            const uint8_t *r = v + (size_t)(t + 2 * u) * rowb;
            __m512bh lo[2], hi[2];
#pragma GCC unroll 2
            for (int w = 0; w < W; w++) {
                const __m512i v0 = ld_vrow(r + 64 * w, half), v1 = ld_vrow(r + rowb + 64 * w, half);
                lo[w] = as_bh(_mm512_unpacklo_epi16(v0, v1));
                hi[w] = as_bh(_mm512_unpackhi_epi16(v0, v1));
            }
#pragma GCC unroll 8
            for (int h = 0; h < HP; h++) {
                const __m512bh pp =
                    as_bh(_mm512_set1_epi32((int)ld_pair(p + (size_t)h * PROW + t + 2 * u)));
#pragma GCC unroll 2
                for (int w = 0; w < W; w++) {
                    const int i = ((u * W + w) * HP + h) * 2;
                    a[i] = _mm512_dpbf16_ps(a[i], lo[w], pp);
                    a[i + 1] = _mm512_dpbf16_ps(a[i + 1], hi[w], pp);
                }
            }
        }
    }
    for (; t < n; t += 2) {
        const uint8_t *r = v + (size_t)t * rowb;
        const int two = t + 1 < n;
        __m512bh lo[2], hi[2];
#pragma GCC unroll 2
        for (int w = 0; w < W; w++) {
            const __m512i v0 = ld_vrow(r + 64 * w, half),
                          v1 = two ? ld_vrow(r + rowb + 64 * w, half) : _mm512_setzero_si512();
            lo[w] = as_bh(_mm512_unpacklo_epi16(v0, v1));
            hi[w] = as_bh(_mm512_unpackhi_epi16(v0, v1));
        }
#pragma GCC unroll 8
        for (int h = 0; h < HP; h++) {
            const uint16_t *ph = p + (size_t)h * PROW + t;
            const __m512bh pp = as_bh(_mm512_set1_epi32((int)(two ? ld_pair(ph) : (uint32_t)ph[0])));
#pragma GCC unroll 2
            for (int w = 0; w < W; w++) {
                a[(w * HP + h) * 2] = _mm512_dpbf16_ps(a[(w * HP + h) * 2], lo[w], pp);
                a[(w * HP + h) * 2 + 1] = _mm512_dpbf16_ps(a[(w * HP + h) * 2 + 1], hi[w], pp);
            }
        }
    }
}

/* acc[h][c..c+32W) (c..c+16 if half, W 1) += P.V for HP heads over all
 * pieces, a share of the prefetch list after each. Of a slice's pair of
 * accumulators, lo holds columns {0-3, 8-11, 16-19, 24-27}, hi the others. */
INL void bf_pv_slice(const pv_piece *pc, int npc, size_t rowb, const uint16_t *p, float *acc,
                     int D, int c, int HP, int NS, int W, int half, pf_list *pf, int *pf_left,
                     int pf_per) {
    __m512 a[16];
#pragma GCC unroll 16
    for (int i = 0; i < 2 * NS * W * HP; i++) a[i] = _mm512_setzero_ps();
    /* Runs of at most 16 rows (whole pairs) with a share of the prefetch
     * list after each: spread that thin, a bf16 slice's fewer, faster
     * steps keep the prefetches ahead as the fp32 kernel's do. */
    for (int x = 0; x < npc; x++)
        for (int r0 = 0; r0 < pc[x].n; r0 += 16) {
            const int n = pc[x].n - r0 < 16 ? pc[x].n - r0 : 16;
            bf_pv_run(a, pc[x].v + (size_t)r0 * rowb + (size_t)c * 2, rowb, n, p + pc[x].so + r0,
                      HP, NS, W, half);
            pf_share(pf, pf_left, pf_per);
        }
    const __m512i idx0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i idx1 =
        _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
#pragma GCC unroll 2
    for (int w = 0; w < W; w++)
#pragma GCC unroll 8
        for (int h = 0; h < HP; h++) {
            __m512 lo = a[(w * HP + h) * 2], hi = a[(w * HP + h) * 2 + 1];
#pragma GCC unroll 4
            for (int u = 1; u < NS; u++) {
                lo = _mm512_add_ps(lo, a[((u * W + w) * HP + h) * 2]);
                hi = _mm512_add_ps(hi, a[((u * W + w) * HP + h) * 2 + 1]);
            }
            float *o = acc + (size_t)h * D + c + 32 * w;
            _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), _mm512_permutex2var_ps(lo, idx0, hi)));
            if (!half)
                _mm512_storeu_ps(o + 16, _mm512_add_ps(_mm512_loadu_ps(o + 16),
                                                        _mm512_permutex2var_ps(lo, idx1, hi)));
        }
}

INL void bf_pv_heads(const bf_ctx *cx, const pv_piece *pc, int npc, const uint16_t *p, float *acc,
                     int HP, pf_list *pf, int pf_lines) {
    /* Two slices a pass for 4 heads (16 accumulators); else one, with
     * bf_pv_sets' sets. */
    const int W = HP == 4 ? 2 : 1;
    const int NS = W == 2 ? 1 : bf_pv_sets(HP);
    int runs = 0;
    for (int x = 0; x < npc; x++) runs += (pc[x].n + 15) / 16;
    const int D = cx->D, parts = (D + 31) / 32 * runs, per = (pf_lines + parts - 1) / parts;
    int left = pf_lines, c = 0;
    if (W == 2)
        for (; c + 64 <= D; c += 64)
            bf_pv_slice(pc, npc, cx->rowb, p, acc, D, c, HP, NS, 2, 0, pf, &left, 2 * per);
    for (; c + 32 <= D; c += 32)
        bf_pv_slice(pc, npc, cx->rowb, p, acc, D, c, HP, bf_pv_sets(HP), 1, 0, pf, &left, per);
    if (c < D) bf_pv_slice(pc, npc, cx->rowb, p, acc, D, c, HP, bf_pv_sets(HP), 1, 1, pf, &left, per);
    pf_list_some(pf, left);
}

/* This KV head's P rows (the group's n tokens) to bf16 in cx->p (round to
 * nearest even). */
INL void bf_round_p(const bf_ctx *cx, const pv_piece *pc, int npc, const float *p) {
    const int n = pc[npc - 1].so + pc[npc - 1].n;
    const __mmask16 tail = (__mmask16)((1u << (n & 15)) - 1);
    for (int h = 0; h < cx->G; h++)
        for (int j = 0; j < n; j += 16) {
            const __mmask16 k = j + 16 <= n ? (__mmask16)0xffff : tail;
            const __m256bh b = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(k, p + (size_t)h * CPU_ATTN_SROW + j));
            _mm256_mask_storeu_epi16(cx->p + (size_t)h * PROW + j, k, (__m256i)b);
        }
}

/* Defined with the pair layout's stages below. */
static void pv_bf16(const void *ctx, int hh, const pv_piece *pc, int npc, const float *p,
                    float *acc, pf_list *pf, int pf_lines);

/* ---------------------------------------------------------------- span */

/* Rounds q to bf16 (zero past D) and runs the driver with the given stages. */
INL void bf_span(const cpu_attn_span *sp, float *m, float *l, float *acc, float *scratch,
                 int pairs, int amx_rows, span_qk_fn qk, span_pv_fn pv) {
    const int NQ = sp->NH * sp->G, D = sp->D, Dq = (D + 31) & ~31;
    /* Scratch: the driver's score rows, then P and q in bf16 (64-byte
     * aligned: SROW floats are a multiple of 64 bytes). */
    uint16_t *pb = (uint16_t *)(scratch + (size_t)NQ * CPU_ATTN_SROW);
    uint16_t *qb = pb + (size_t)NQ * PROW, *qt = qb + (size_t)NQ * Dq, *vb = qt + (size_t)NQ * Dq;
    for (int h = 0; h < NQ; h++)
        for (int c = 0; c < Dq; c += 16) {
            const __m256i v = c < D ? (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(sp->q + (size_t)h * D + c))
                                    : _mm256_setzero_si256();
            _mm256_storeu_si256((__m256i *)(qb + (size_t)h * Dq + c), v);
        }
    if (amx_rows) { /* q's dim pairs outermost, per KV head: qt[hh][pr][g] */
        const int G = sp->G;
        const uint32_t *q2 = (const uint32_t *)qb;
        uint32_t *t2 = (uint32_t *)qt;
        for (int h = 0; h < NQ; h++)
            for (int pr = 0; pr < Dq / 2; pr++)
                t2[((size_t)(h / G) * (Dq / 2) + pr) * G + h % G] = q2[(size_t)h * (Dq / 2) + pr];
    }
    const bf_ctx cx = {qb, pb, qt, vb, D, Dq, sp->G, (size_t)D * 2, sp->q_scale, cpu_attn_qk_ymm()};
    avx512_span_run(sp, m, l, acc, scratch, 1, pairs, qk, pv, &cx);
}

static void span_avx512bf16(const cpu_attn_span *sp, float *m, float *l, float *acc,
                            float *scratch) {
    if (sp->kv_dtype != APEX_DTYPE_BF16) {
        cpu_attn_span_avx512(sp, m, l, acc, scratch);
        return;
    }
    bf_span(sp, m, l, acc, scratch, 0, 0, qk_bf16, pv_bf16);
}

/* ---------------------------------------------------------------- pair layout */

/* acc += k times the bf16 pair at p broadcast to every lane, the pair read
 * by the instruction itself ({1to16}): GCC 12 loads it with a separate
 * vpbroadcastd, and with one broadcast per product q.K in the pair layout
 * ran 1-5 % slower in cache (1 thread; Llama, SmolLM2, MHA, G8). */
INL __m512 dp_bcast(__m512 acc, __m512bh k, const uint16_t *p) {
    __asm__("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(k), "m"(*(const uint32_t *)p));
    return acc;
}

/* QK on K in the pair layout (kv_layout.h): a 64-byte line is one dim pair
 * of a tile's 16 tokens, so vdpbf16ps against the broadcast q pair adds 16
 * tokens' partial scores and nothing is reduced across lanes. CH chains a
 * head keep >= 8 products in flight (latency 6 on Zen 4). Lanes of m are
 * stored, lane j at s[j]. */
INL void bf_qk_pair_tile(const bf_ctx *cx, const uint16_t *q, const uint8_t *tile, float *s,
                         __mmask16 m, int HG, int CH, pf_list *pf, int *pf_left, int pf_per) {
    __m512 a[16];
#pragma GCC unroll 16
    for (int i = 0; i < HG * CH; i++) a[i] = _mm512_setzero_ps();
    const int P = cx->D / 2, qs = cx->Dq / 2;
    for (int p = 0; p < P; p += CH) {
#pragma GCC unroll 8
        for (int c = 0; c < CH; c++) {
            const __m512bh kv = as_bh(_mm512_loadu_si512(tile + (size_t)(p + c) * 64));
#pragma GCC unroll 8
            for (int h = 0; h < HG; h++)
                a[h * CH + c] = dp_bcast(a[h * CH + c], kv, q + 2 * ((size_t)h * qs + p + c));
        }
        /* A share of the prefetches every 16 pairs: a tile's share in one
         * burst fills the miss queue (measured 30 against 41 GB/s from
         * DRAM). */
        if ((p + CH) % 16 == 0) pf_share(pf, pf_left, pf_per);
    }
    const __m512 sc = _mm512_set1_ps(cx->scale);
#pragma GCC unroll 8
    for (int h = 0; h < HG; h++) {
        __m512 x = a[h * CH];
#pragma GCC unroll 8
        for (int c = 1; c < CH; c++) x = _mm512_add_ps(x, a[h * CH + c]);
        _mm512_mask_storeu_ps(s + (size_t)h * CPU_ATTN_SROW, m, _mm512_mul_ps(x, sc));
    }
}

/* Rows [r, r + n) of the block: tiles from the one holding row r, lanes
 * outside the rows masked; a share of the prefetch list after each tile. */
INL void bf_qk_pairs_heads(const bf_ctx *cx, const uint16_t *q, const uint8_t *k, int r, int n,
                           float *s, int HG, pf_list *pf, int pf_lines) {
    const int CH = HG == 1 ? 8 : HG <= 3 ? 4 : 2;
    const int T = APEX_KV_PAIR_TILE, r0 = r % T, tiles = (r0 + n + T - 1) / T;
    const int steps = tiles * ((cx->D / 2 + 15) / 16), per = (pf_lines + steps - 1) / steps;
    int left = pf_lines;
    for (int i = 0; i < tiles; i++) {
        const int lo = i == 0 ? r0 : 0, hi = r0 + n - T * i < T ? r0 + n - T * i : T;
        const __mmask16 m = (__mmask16)(((1u << hi) - 1) & ~((1u << lo) - 1));
        bf_qk_pair_tile(cx, q, k + (size_t)i * T * cx->rowb, s + T * i - r0, m, HG, CH, pf, &left,
                        per);
    }
    pf_list_some(pf, left);
}

static void qk_pairs(const void *ctx, int hh, const uint8_t *k, int r, int n, float *s,
                     pf_list *pf, int pf_lines) {
    const bf_ctx *cx = ctx;
    for (int h0 = 0; h0 < cx->G; h0 += 8) {
        const int HG = cx->G - h0 < 8 ? cx->G - h0 : 8;
        const uint16_t *q = cx->q + ((size_t)hh * cx->G + (size_t)h0) * cx->Dq;
        float *sh = s + (size_t)h0 * CPU_ATTN_SROW;
#define QK_PAIRS(h) bf_qk_pairs_heads(cx, q, k, r, n, sh, h, pf, pf_lines)
        BF_HEADS_CONST(HG, QK_PAIRS)
#undef QK_PAIRS
        pf_lines = 0;
    }
}

/* a[h * VW + w] += P pair (row h of pp) times one V pair row's 16-column
 * vectors w < VW (v at the pass's first column). */
INL void bf_pv_pair_step(__m512 *a, const uint8_t *v, const uint32_t *pp, int HG, int VW) {
    __m512bh w[8];
#pragma GCC unroll 8
    for (int k = 0; k < VW; k++) w[k] = as_bh(_mm512_loadu_si512(v + 64 * k));
#pragma GCC unroll 8
    for (int h = 0; h < HG; h++) {
        const __m512bh b = as_bh(_mm512_set1_epi32((int)pp[h]));
#pragma GCC unroll 8
        for (int k = 0; k < VW; k++) a[h * VW + k] = _mm512_dpbf16_ps(a[h * VW + k], w[k], b);
    }
}

/* acc[h][c, c + 16 VW) += P.V for HG heads over all pieces, V in the pair
 * layout: a V line is one column run of a token pair, times the broadcast
 * (p_t, p_t+1); a pair half outside a piece's rows gets p = 0. */
INL void bf_pv_pairs_pass(const bf_ctx *cx, const pv_piece *pc, int npc, const uint16_t *p,
                          float *acc, int c, int HG, int VW, pf_list *pf, int *pf_left,
                          int pf_per) {
    __m512 a[16];
#pragma GCC unroll 16
    for (int i = 0; i < HG * VW; i++) a[i] = _mm512_setzero_ps();
    const size_t prow = (size_t)cx->D * 4; /* bytes of a V pair row */
    uint32_t pp[8];
    for (int x = 0; x < npc; x++) {
        const int r = pc[x].r, e = r + pc[x].n;
        const uint8_t *v = pc[x].v + (size_t)c * 4;   /* pair row (r & ~1) / 2 */
        const uint16_t *ps = p + pc[x].so;            /* ps[t - r]: P of row t */
        int t = r & ~1;
        if (r & 1) { /* (t, r): t is outside the piece */
#pragma GCC unroll 8
            for (int h = 0; h < HG; h++) pp[h] = (uint32_t)ps[(size_t)h * PROW] << 16;
            bf_pv_pair_step(a, v, pp, HG, VW);
            t += 2;
        }
        for (int t0 = t; t + 2 <= e; t0 = t) {
            const int te = t0 + 16 < (e & ~1) ? t0 + 16 : (e & ~1);
#pragma GCC unroll 8
            for (; t < te; t += 2) {
#pragma GCC unroll 8
                for (int h = 0; h < HG; h++) pp[h] = ld_pair(ps + (size_t)h * PROW + (t - r));
                bf_pv_pair_step(a, v + (size_t)((t - (r & ~1)) / 2) * prow, pp, HG, VW);
            }
            pf_share(pf, pf_left, pf_per);
        }
        if (t < e) { /* (e - 1, e): e is outside the piece */
#pragma GCC unroll 8
            for (int h = 0; h < HG; h++) pp[h] = ps[(size_t)h * PROW + (t - r)];
            bf_pv_pair_step(a, v + (size_t)((t - (r & ~1)) / 2) * prow, pp, HG, VW);
        }
    }
#pragma GCC unroll 8
    for (int h = 0; h < HG; h++)
#pragma GCC unroll 8
        for (int k = 0; k < VW; k++) {
            float *o = acc + (size_t)h * cx->D + c + 16 * k;
            _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), a[h * VW + k]));
        }
}

/* All columns for HG heads: passes of VW vectors (HG * VW <= 16
 * accumulators), then narrower ones for the rest of head_dim. */
INL void bf_pv_pairs_heads(const bf_ctx *cx, const pv_piece *pc, int npc, const uint16_t *p,
                           float *acc, int HG, pf_list *pf, int pf_lines) {
    const int VW = HG <= 2 ? 8 : HG <= 4 ? 4 : 2, D = cx->D;
    int runs = 0;
    for (int x = 0; x < npc; x++) runs += (pc[x].n + 15) / 16;
    const int parts = (D + 16 * VW - 1) / (16 * VW) * runs, per = (pf_lines + parts - 1) / parts;
    int left = pf_lines, c = 0;
    for (; c + 16 * VW <= D; c += 16 * VW) bf_pv_pairs_pass(cx, pc, npc, p, acc, c, HG, VW, pf, &left, per);
    if (VW > 4 && c + 64 <= D) bf_pv_pairs_pass(cx, pc, npc, p, acc, c, HG, 4, pf, &left, per), c += 64;
    if (VW > 2 && c + 32 <= D) bf_pv_pairs_pass(cx, pc, npc, p, acc, c, HG, 2, pf, &left, per), c += 32;
    if (c < D) bf_pv_pairs_pass(cx, pc, npc, p, acc, c, HG, 1, pf, &left, per);
    pf_list_some(pf, left);
}

/* P.V of one KV head in either layout: P rounded to bf16, then each group
 * of up to 8 q heads with a constant head count. */
INL void bf_pv_rounded(const bf_ctx *cx, const pv_piece *pc, int npc, float *acc, pf_list *pf,
                       int pf_lines, int pairs) {
    for (int h0 = 0; h0 < cx->G; h0 += 8) {
        const int HG = cx->G - h0 < 8 ? cx->G - h0 : 8;
        const uint16_t *ph = cx->p + (size_t)h0 * PROW;
        float *ah = acc + (size_t)h0 * cx->D;
#define PV_ROWS(h) bf_pv_heads(cx, pc, npc, ph, ah, h, pf, pf_lines)
#define PV_PAIRS(h) bf_pv_pairs_heads(cx, pc, npc, ph, ah, h, pf, pf_lines)
        if (pairs) {
            BF_HEADS_CONST(HG, PV_PAIRS)
        } else {
            BF_HEADS_CONST(HG, PV_ROWS)
        }
#undef PV_ROWS
#undef PV_PAIRS
        pf_lines = 0;
    }
}

static void pv_bf16(const void *ctx, int hh, const pv_piece *pc, int npc, const float *p,
                    float *acc, pf_list *pf, int pf_lines) {
    (void)hh;
    bf_round_p(ctx, pc, npc, p);
    bf_pv_rounded(ctx, pc, npc, acc, pf, pf_lines, 0);
}

/* The pair layout's P.V on rounded P, one copy for pv_pairs and pv_amx's
 * partial pieces: inlined into both, it was compiled twice (clang's
 * ASan+UBSan+coverage build of this file: 628 s, 498 s with one copy). */
static __attribute__((noinline)) void pv_pairs_rounded(const bf_ctx *cx, const pv_piece *pc,
                                                       int npc, float *acc, pf_list *pf,
                                                       int pf_lines) {
    bf_pv_rounded(cx, pc, npc, acc, pf, pf_lines, 1);
}

static void pv_pairs(const void *ctx, int hh, const pv_piece *pc, int npc, const float *p,
                     float *acc, pf_list *pf, int pf_lines) {
    (void)hh;
    bf_round_p(ctx, pc, npc, p);
    pv_pairs_rounded(ctx, pc, npc, acc, pf, pf_lines);
}

static void span_avx512bf16_pairs(const cpu_attn_span *sp, float *m, float *l, float *acc,
                                  float *scratch) {
    bf_span(sp, m, l, acc, scratch, 1, 0, qk_pairs, pv_pairs);
}

const cpu_attn_kernel cpu_attn_kernel_avx512bf16 = {span_avx512bf16, cpu_attn_store_avx512,
                                                    cpu_attn_load_avx512, 1,
                                                    span_avx512bf16_pairs};

/* ---------------------------------------------------------------- AMX-BF16 */

/* The amxbf16 variant: this kernel with q.K and P.V of the pair layout on
 * AMX tiles wherever a piece is whole 16-token tiles (block-aligned, as
 * every piece is but a window's first and a sequence's last); other pieces
 * and f16/f32 KV take the avx512bf16 stages above (the row layout has AMX
 * stages of its own, further below). The pair
 * layout is AMX's own operand order: a K tile's 16 lines of dim pairs are a
 * B tile (16 pair rows x 16 tokens), and 8 V pair rows' 16 columns are one
 * (8 token-pair rows x 16 columns). tdpbf16ps multiplies bf16 pairs and
 * accumulates in fp32 like vdpbf16ps (denormals flushed), so the tolerance
 * is the bf16 kernel's.
 *
 * Tiles (one configuration per span, rows = G q heads):
 *   0 scores  G x 16 fp32     1 q    G x 32 bf16     2 K  16 pair rows x 16
 *   3 acc     G x 16 fp32     4 P    G x 16 bf16     5 V   8 pair rows x 16
 * The instructions are written as asm with a memory clobber: GCC 12's tile
 * intrinsics tell the compiler neither that tileloadd reads memory nor that
 * ldtilecfg reads all 64 bytes (so stores to either can be dropped or
 * moved past them; ggml's AMX code crashes on exactly that). */
#define AMX_LOAD(t, base, stride)                                                                \
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"(base), "r"((long)(stride)) : "memory")
#define AMX_STORE(t, base, stride)                                                               \
    __asm__ volatile("tilestored %%tmm" #t ", (%0,%1,1)" ::"r"(base), "r"((long)(stride)) : "memory")
#define AMX_ZERO(t) __asm__ volatile("tilezero %%tmm" #t ::: "memory")
#define AMX_DP(c, a, b) __asm__ volatile("tdpbf16ps %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::: "memory")

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_cfg;

/* Tiles 0-5: rows[t] x colsb[t] bytes. */
static void amx_configure(const uint8_t rows[6], const uint16_t colsb[6]) {
    amx_cfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 6; t++) c.rows[t] = rows[t], c.colsb[t] = colsb[t];
    __asm__ volatile("ldtilecfg %0" ::"m"(c) : "memory");
}

/* q.K of one piece: AMX when it is whole tiles, else the avx512bf16 stage. */
static void qk_amx(const void *ctx, int hh, const uint8_t *k, int r, int n, float *s, pf_list *pf,
                   int pf_lines) {
    const bf_ctx *cx = ctx;
    const int T = APEX_KV_PAIR_TILE;
    if (r % T || n % T) {
        qk_pairs(ctx, hh, k, r, n, s, pf, pf_lines);
        return;
    }
    const int G = cx->G, chunks = cx->D / 32, tiles = n / T, per = (pf_lines + tiles - 1) / tiles;
    const uint16_t *q = cx->q + (size_t)hh * G * cx->Dq;
    const __m512 sc = _mm512_set1_ps(cx->scale);
    float tmp[16 * 16] __attribute__((aligned(64)));
    int left = pf_lines;
    for (int i = 0; i < tiles; i++) {
        const uint8_t *tile = k + (size_t)i * T * cx->rowb;
        AMX_ZERO(0);
        for (int c = 0; c < chunks; c++) {
            AMX_LOAD(1, q + 32 * c, cx->Dq * 2);
            AMX_LOAD(2, tile + (size_t)c * 16 * 64, 64);
            AMX_DP(0, 1, 2);
        }
        AMX_STORE(0, tmp, 64);
        for (int h = 0; h < G; h++)
            _mm512_storeu_ps(s + (size_t)h * CPU_ATTN_SROW + T * i,
                             _mm512_mul_ps(_mm512_load_ps(tmp + 16 * h), sc));
        pf_share(pf, &left, per);
    }
    pf_list_some(pf, left);
}

/* A P.V unit on AMX: P's columns from so (tile 4) against the V pair rows
 * at v (tile 5), D * 4 bytes apart (a pair row of head_dim pairs). */
typedef struct {
    const uint8_t *v;
    int so;
} amx_pv_unit;

/* acc (G x D) += the units' products, one 16-column slice at a time:
 * acc's rows are tile 3, loaded and stored once per slice; pf_lines of pf
 * handed out over the slices. */
static void amx_pv_units(const bf_ctx *cx, const amx_pv_unit *un, int nu, float *acc, pf_list *pf,
                         int pf_lines) {
    const int D = cx->D, cols = D / 16, per = (pf_lines + cols - 1) / cols;
    const size_t vstride = (size_t)D * 4;
    int left = pf_lines;
    for (int c = 0; c < cols; c++) {
        float *a = acc + 16 * c;
        AMX_LOAD(3, a, vstride);
        for (int u = 0; u < nu; u++) {
            AMX_LOAD(4, cx->p + un[u].so, PROW * 2);
            AMX_LOAD(5, un[u].v + (size_t)c * 64, vstride);
            AMX_DP(3, 4, 5);
        }
        AMX_STORE(3, a, vstride);
        pf_share(pf, &left, per);
    }
    pf_list_some(pf, left);
}

/* P.V of one KV head: the whole-tile pieces on AMX (acc's rows are the C
 * tile, loaded and stored once per 16 columns), the rest by the
 * avx512bf16 stage. */
static void pv_amx(const void *ctx, int hh, const pv_piece *pc, int npc, const float *p,
                   float *acc, pf_list *pf, int pf_lines) {
    const bf_ctx *cx = ctx;
    (void)hh;
    const int T = APEX_KV_PAIR_TILE;
    bf_round_p(cx, pc, npc, p);
    pv_piece whole[SPAN_MAX_PIECES], rest[SPAN_MAX_PIECES];
    int nw = 0, nr = 0;
    for (int x = 0; x < npc; x++) {
        if (pc[x].r % T == 0 && pc[x].n % T == 0) whole[nw++] = pc[x];
        else rest[nr++] = pc[x];
    }
    if (nr) { /* a group has at most two such pieces (its ends): a quarter
               * of the lines (not tuned) */
        const int lines = nw ? pf_lines / 4 : pf_lines;
        pv_pairs_rounded(cx, rest, nr, acc, pf, lines);
        pf_lines -= lines;
    }
    if (!nw) return;
    amx_pv_unit un[CPU_ATTN_MAX_BT / APEX_KV_PAIR_TILE];
    int nu = 0;
    for (int x = 0; x < nw; x++)
        for (int u = 0; u < whole[x].n / T; u++) /* 16 tokens: 8 pair rows */
            un[nu++] = (amx_pv_unit){whole[x].v + (size_t)u * T * cx->rowb, whole[x].so + T * u};
    amx_pv_units(cx, un, nu, acc, pf, pf_lines);
}

/* AMX needs G <= 16 (tile rows) and head_dim a multiple of 32 (q.K's
 * 32-dim steps), and pays from G 2: a tile's cost does not shrink with its
 * rows, and with one q head per KV head (MHA) it ran at 0.75-0.8x of the
 * avx512bf16 stages in cache, against 1.2x at G 2 and 1.8-3.9x at G 4-16
 * (1 thread, 2-core Xeon VM). Other shapes take the avx512bf16 stages. */
static void span_amxbf16_pairs(const cpu_attn_span *sp, float *m, float *l, float *acc,
                               float *scratch) {
    if (sp->G < 2 || sp->G > 16 || sp->D % 32) {
        span_avx512bf16_pairs(sp, m, l, acc, scratch);
        return;
    }
    const uint8_t G = (uint8_t)sp->G, rows[6] = {G, G, 16, G, G, 8};
    const uint16_t colsb[6] = {64, 64, 64, 64, 32, 64};
    amx_configure(rows, colsb);
    bf_span(sp, m, l, acc, scratch, 1, 0, qk_amx, pv_amx);
    __asm__ volatile("tilerelease" ::: "memory");
}

/* ------------------------------------------------ AMX-BF16, row layout */

/* The row layout (what a context with a device keeps, so a block moves
 * between tiers as a copy) on the same tiles, other operands:
 *  QK  S^T = K q^T: 16 K rows x 32 dims are an A tile as they lie (rows
 *      rowb apart), q's 32 dims of the KV head's G heads a B tile (16 dim
 *      pair rows x G, cx->qt, made once per span); the 16 x G scores are
 *      stored and read back a head at a time by a gather.
 *  PV  as the pair layout's pv_amx on 32-token units, V's token pairs
 *      interleaved into cx->vb first (once per group and KV head), P's
 *      columns past the group zeroed (and V's rows there read as zeros).
 * Tiles (one configuration per span):
 *   0 scores^T 16 x G fp32    1 K  16 x 32 bf16     2 q^T 16 pair rows x G
 *   3 acc      G x 16 fp32    4 P  G x 32 bf16      5 V  16 pair rows x 16 */
static void qk_amx_rows(const void *ctx, int hh, const uint8_t *k, int r, int n, float *s,
                        pf_list *pf, int pf_lines) {
    const bf_ctx *cx = ctx;
    const int G = cx->G, chunks = cx->D / 32, tiles = n / 16;
    const int per = tiles ? (pf_lines + tiles - 1) / tiles : 0;
    const uint16_t *qt = cx->qt + (size_t)hh * cx->Dq * G;
    const __m512 sc = _mm512_set1_ps(cx->scale);
    const __m512i col = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192,
                                          208, 224, 240);
    float tmp[16 * 16] __attribute__((aligned(64)));
    int left = pf_lines;
    for (int i = 0; i < tiles; i++) {
        const uint8_t *kt = k + (size_t)i * 16 * cx->rowb;
        AMX_ZERO(0);
        for (int c = 0; c < chunks; c++) {
            AMX_LOAD(1, kt + (size_t)c * 64, cx->rowb);
            AMX_LOAD(2, qt + (size_t)c * 32 * G, 4 * G);
            AMX_DP(0, 1, 2);
        }
        AMX_STORE(0, tmp, 64);
        for (int h = 0; h < G; h++)
            _mm512_storeu_ps(s + (size_t)h * CPU_ATTN_SROW + 16 * i,
                             _mm512_mul_ps(_mm512_i32gather_ps(col, tmp + h, 4), sc));
        pf_share(pf, &left, per);
    }
    if (n > 16 * tiles)
        qk_bf16(ctx, hh, k + (size_t)tiles * 16 * cx->rowb, r + 16 * tiles, n - 16 * tiles,
                s + 16 * tiles, pf, left);
    else
        pf_list_some(pf, left);
}

static void pv_amx_rows(const void *ctx, int hh, const pv_piece *pc, int npc, const float *p,
                        float *acc, pf_list *pf, int pf_lines) {
    static const uint16_t zero_row[APEX_MAX_HEAD_DIM] __attribute__((aligned(64)));
    const bf_ctx *cx = ctx;
    (void)hh;
    bf_round_p(cx, pc, npc, p);
    const int D = cx->D, n = pc[npc - 1].so + pc[npc - 1].n, n32 = (n + 31) & ~31;
    for (int h = 0; h < cx->G; h++)
        for (int j = n; j < n32; j++) cx->p[(size_t)h * PROW + j] = 0;
    const uint8_t *row[CPU_ATTN_MAX_BT];
    int t = 0;
    for (int x = 0; x < npc; x++)
        for (int j = 0; j < pc[x].n; j++) row[t++] = pc[x].v + (size_t)j * cx->rowb;
    for (; t < n32; t++) row[t] = (const uint8_t *)zero_row;
    /* Pair row j: (token 2j, token 2j+1) for each dim, 32 dims a step. */
    static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                        8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    const __m512i lo = _mm512_loadu_si512(lo_idx), hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int j = 0; j < n32 / 2; j++) {
        const uint8_t *a = row[2 * j], *b = row[2 * j + 1];
        uint16_t *o = cx->vb + (size_t)j * D * 2;
        for (int d = 0; d < D; d += 32) {
            const __m512i va = _mm512_loadu_si512(a + 2 * d), vb = _mm512_loadu_si512(b + 2 * d);
            _mm512_storeu_si512(o + 2 * d, _mm512_permutex2var_epi16(va, lo, vb));
            _mm512_storeu_si512(o + 2 * d + 32, _mm512_permutex2var_epi16(va, hi, vb));
        }
    }
    amx_pv_unit un[CPU_ATTN_MAX_BT / 32];
    for (int u = 0; u < n32 / 32; u++) /* 32 tokens: 16 pair rows */
        un[u] = (amx_pv_unit){(const uint8_t *)(cx->vb + (size_t)u * 32 * D), 32 * u};
    amx_pv_units(cx, un, n32 / 32, acc, pf, pf_lines);
}

/* The same shapes as span_amxbf16_pairs take AMX (G 2-16, head_dim a
 * multiple of 32); others, and f16/f32 KV, the avx512bf16 stages. */
static void span_amxbf16_rows(const cpu_attn_span *sp, float *m, float *l, float *acc,
                              float *scratch) {
    if (sp->kv_dtype != APEX_DTYPE_BF16 || sp->G < 2 || sp->G > 16 || sp->D % 32) {
        span_avx512bf16(sp, m, l, acc, scratch);
        return;
    }
    const uint8_t G = (uint8_t)sp->G, rows[6] = {16, 16, 16, G, G, 16};
    const uint16_t colsb[6] = {(uint16_t)(4 * G), 64, (uint16_t)(4 * G), 64, 64, 64};
    amx_configure(rows, colsb);
    bf_span(sp, m, l, acc, scratch, 0, 1, qk_amx_rows, pv_amx_rows);
    __asm__ volatile("tilerelease" ::: "memory");
}

const cpu_attn_kernel cpu_attn_kernel_amxbf16 = {span_amxbf16_rows, cpu_attn_store_avx512,
                                                 cpu_attn_load_avx512, 1, span_amxbf16_pairs};
