/*
 * avx512_span.h - the span driver both AVX-512 paged kernels share
 * (cpu_attn_avx512.c: fp32 FMA on converted K/V; cpu_attn_avx512bf16.c:
 * vdpbf16ps on bf16 K/V). Include only from a file compiled with AVX-512
 * flags. The driver owns the token groups, the software prefetch of the
 * next group and the online softmax; the including kernel supplies the two
 * dot-product stages (QK, PV) as callbacks with its own context.
 *
 * Per span, tokens go in groups of >= 64 (whole blocks). For each group:
 *  QK  the kernel's qk() per (piece, KV head) writes scores into rows of
 *      CPU_ATTN_SROW floats, one row per q head.
 *  softmax  per head: max, rescale of the running sums if it grew, a
 *      polynomial exp over the row of scores (the row then holds P).
 *  PV  the kernel's pv() per KV head over all pieces of the group.
 * The next group's K is prefetched during this group's QK and its V during
 * the PV (the first group's K before it starts, its V during its QK), a
 * few lines between tiles, since blocks are scattered and the
 * hardware prefetcher cannot guess the next one; without it the kernel ran
 * at about half the speed, and with the lines issued in bursts (or one
 * cursor step per line) about 20% slower than now.
 */
#ifndef APEX_AVX512_SPAN_H
#define APEX_AVX512_SPAN_H

#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "cpu_attn/cpu_attn_impl.h"
#include "cpu_attn/dtype_convert.h"
#include "cpu_attn/kv_layout.h"
#include "cpu_attn/simd_avx512.h"

#define SPAN_INL static inline __attribute__((always_inline))
/* Software prefetch hint: T1 (L2) measured ~1.5x faster from DRAM than T0
 * here (Zen 4): T0 fills hold L1 miss buffers the demand loads need. */
#define SPAN_PF_HINT _MM_HINT_T1
/* Pieces of one group: a group of <= 64 tokens spans at most 64/8 + 1
 * blocks (a group starting mid-block). */
#define SPAN_MAX_PIECES (CPU_ATTN_GROUP_TOKENS / 8 + 1)

/* ---------------------------------------------------------------- prefetch */

/* A piece of a group: rows [r, r + n) of one block, whose scores sit at
 * column so of the score rows. In a head's K (V) panel its bytes start at
 * off[0] (off[1]): its first row in the row layout; in the pair layout
 * (kv_layout.h) the 16-token tile (the token pair) that holds it. (Kept
 * small: 16 bytes more here cost the fp32 kernel 3-4 % in cache.) */
typedef struct {
    const uint8_t *blk;
    size_t off[2];
    int n, so, r;
} span_piece;

/* Lines to prefetch: one contiguous run... */
typedef struct {
    const char *p;
    int left;
} pf_run;

/* Four prefetches per loop step: with one per step (and its add and
 * branch) the AMX kernels ran up to 15 % slower in cache and 2-3 % from
 * DRAM, the f16 one 1-2 % faster from DRAM (Xeon, kern10); with no
 * software prefetch at all, 25 % faster in cache but a quarter slower from
 * DRAM. */
SPAN_INL void pf_run_some(pf_run *r, int lines) {
    if (lines > r->left) lines = r->left;
    int i = 0;
    for (; i + 4 <= lines; i += 4) {
        const char *a = r->p + (size_t)i * 64;
        _mm_prefetch(a, SPAN_PF_HINT);
        _mm_prefetch(a + 64, SPAN_PF_HINT);
        _mm_prefetch(a + 128, SPAN_PF_HINT);
        _mm_prefetch(a + 192, SPAN_PF_HINT);
    }
    for (; i < lines; i++) _mm_prefetch(r->p + (size_t)i * 64, SPAN_PF_HINT);
    r->p += (size_t)lines * 64;
    r->left -= lines;
}

/* ...and the K (or V) rows of every head of a group's pieces, in address
 * order (a whole block's K heads are one run), handed out a few lines at a
 * time between the tiles of the current group: issued in one burst they
 * stall the core when the miss queue fills, and a per-line cursor costs as
 * much as the prefetches save. */
typedef struct pf_list_s {
    const cpu_attn_span *sp;
    const span_piece *p;
    int which, pairs, np, x, hh;
    pf_run r;
    const struct pf_list_s *then;
} pf_list;

/* The lines of piece p's K (which 0) or V (1) rows of head hh: the rows,
 * or in the pair layout the whole tiles (K) or token pairs (V) holding
 * them. */
static inline pf_run piece_lines(const cpu_attn_span *sp, const span_piece *p, int which,
                                 int pairs, int hh) {
    const uint8_t *panel = p->blk + (which ? sp->v_off : sp->k_off) + (size_t)hh * sp->panel;
    const int T = APEX_KV_PAIR_TILE, re = p->r + p->n;
    const int end = !pairs ? re : which ? (re + 1) & ~1 : (re + T - 1) / T * T;
    const size_t rowb = (size_t)sp->D * apex_dtype_size(sp->kv_dtype);
    const uintptr_t a = (uintptr_t)(panel + p->off[which]);
    const uintptr_t b = (uintptr_t)(panel + (size_t)end * rowb);
    const uintptr_t a0 = a & ~(uintptr_t)63;
    return (pf_run){(const char *)a0, (int)((((b + 63) & ~(uintptr_t)63) - a0) / 64)};
}

/* Returns the number of lines in the list. */
static inline int pf_list_init(pf_list *l, const cpu_attn_span *sp, const span_piece *p, int np,
                               int which, int pairs) {
    *l = (pf_list){sp, p, which, pairs, np, 0, 0, {NULL, 0}, NULL};
    int total = 0;
    for (int x = 0; x < np; x++)
        for (int hh = 0; hh < sp->NH; hh++) total += piece_lines(sp, &p[x], which, pairs, hh).left;
    if (np > 0) l->r = piece_lines(sp, &p[0], which, pairs, 0);
    return total;
}

/* The next run of the list (once per piece and head): out of line, so
 * that the loops that hand out lines stay small. */
static __attribute__((noinline)) void pf_list_next(pf_list *l) {
    if (++l->hh == l->sp->NH) l->hh = 0, l->x++;
    if (l->x < l->np) l->r = piece_lines(l->sp, &l->p[l->x], l->which, l->pairs, l->hh);
    else if (l->then) *l = *l->then;
}

SPAN_INL void pf_list_some(pf_list *l, int lines) {
    while (lines > 0 && l->r.left > 0) {
        const int take = lines < l->r.left ? lines : l->r.left;
        pf_run_some(&l->r, take);
        lines -= take;
        if (l->r.left == 0) pf_list_next(l);
    }
}

/* A share of a call's lines: *left of them, split evenly over parts. */
SPAN_INL void pf_share(pf_list *l, int *left, int per) {
    const int take = per < *left ? per : *left;
    pf_list_some(l, take);
    *left -= take;
}

/* ---------------------------------------------------------------- driver */

/* One piece of a group for PV: n rows of one block's V panel (one KV
 * head), their probabilities at column so of the P rows. */
typedef struct {
    const uint8_t *v;   /* the piece's first row (pair layout: its pair) */
    int n, so, r;       /* rows [r, r + n) of the block                   */
} pv_piece;

/* Scores of n rows of K (one block panel of KV head hh, rows rowb apart;
 * pair layout: k is the 16-token tile holding row r, the piece's first)
 * for the head's G q heads: s[g * CPU_ATTN_SROW + j]; pf_lines of pf
 * handed out between tiles. */
typedef void (*span_qk_fn)(const void *ctx, int hh, const uint8_t *k, int r, int n, float *s,
                           pf_list *pf, int pf_lines);
/* acc[g][D] of KV head hh's G q heads += P (rows p, stride CPU_ATTN_SROW)
 * times V over the pieces of one group. */
typedef void (*span_pv_fn)(const void *ctx, int hh, const pv_piece *pc, int npc, const float *p,
                           float *acc, pf_list *pf, int pf_lines);

SPAN_INL int group_pieces(const cpu_attn_span *sp, int32_t gs, int32_t ge, size_t rowb,
                          int pairs, span_piece *pc) {
    int npc = 0;
    for (int32_t t = gs; t < ge;) {
        const int32_t be = (t / sp->bt + 1) * sp->bt, e = be < ge ? be : ge;
        const int32_t r = t % sp->bt;
        pc[npc].blk = sp->kv + (size_t)sp->blocks[t / sp->bt] * sp->block_bytes;
        if (pairs) {
            pc[npc].off[0] = (size_t)(r / APEX_KV_PAIR_TILE * APEX_KV_PAIR_TILE) * rowb;
            pc[npc].off[1] = (size_t)(r & ~1) * rowb;
        } else {
            pc[npc].off[0] = pc[npc].off[1] = (size_t)r * rowb;
        }
        pc[npc].r = r;
        pc[npc].n = e - t;
        pc[npc++].so = t - gs;
        t = e;
    }
    return npc;
}

/* e^(s - m) for P that is rounded to bf16 next, given s and m log2(e):
 * 2^t with t = s log2(e) - m log2(e) (one FMA for the subtraction and the
 * scaling), t = n + r with |r| <= 1/2, and 2^r by a degree-4 polynomial
 * fitted for relative error (< 2.7e-6 in fp32, far below bf16's 2^-9).
 * Eight vector ops where the Taylor form on e^r took twelve; the rounding
 * of t costs up to ~1e-5 relative for |s| ~ 100, also far below 2^-9.
 * t is clamped so that a score of -inf gives 0, not NaN. */
#define SPAN_LOG2E 1.44269504088896341f
SPAN_INL __m512 span_exp16_bf(__m512 s, __m512 m_log2e) {
    __m512 t = _mm512_fmsub_ps(s, _mm512_set1_ps(SPAN_LOG2E), m_log2e);
    t = _mm512_max_ps(t, _mm512_set1_ps(-150.0f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(9.570101936e-03f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.591786165e-02f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.402474484e-01f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.931218146e-01f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.999992614e-01f));
    return _mm512_scalef_ps(p, n);
}

/* Online softmax over the span (see cpu_attn_kernel.span); scratch holds
 * the NH*G score rows first (the kernel may use what follows). The rows
 * hold P (fp32) for pv(); p_bf16: the kernel rounds P to bf16 for its PV,
 * so its exp is the cheaper span_exp16_bf. (Writing P as bf16 here, and
 * so dropping the kernel's rounding pass, was 4-5% slower with MHA in
 * cache in the two forms tried, all heads' P to one buffer and each KV
 * head's just before its PV, though up to 10% faster with GQA; re-measured
 * after kern7's changes, all rows to one buffer: within 1 %.) pairs:
 * the span's KV is in the pair layout (kv_layout.h), which qk and pv read;
 * a constant at each call, so the row kernels compile as before. */
SPAN_INL void avx512_span_run(const cpu_attn_span *sp, float *m, float *l, float *acc,
                              float *scratch, int p_bf16, int pairs, span_qk_fn qk,
                              span_pv_fn pv, const void *ctx) {
    const int NH = sp->NH, G = sp->G, NQ = NH * G, D = sp->D, bt = sp->bt;
    const size_t rowb = (size_t)D * apex_dtype_size(sp->kv_dtype);
    /* Group: whole blocks, at most 256 KiB of K+V (stays in L2 between QK
     * and PV) and 64 tokens, or one block if blocks are bigger; a block
     * bigger than 256 KiB (block 128 of 8 heads x 128 x bf16: 512 KiB) is
     * cut into groups of a multiple of 16 rows that fit: a whole one, with
     * the next one prefetched beside it, filled Zen 4's 1 MiB L2 and ran
     * 15-20% slower from DRAM. */
    const size_t tok_bytes = 2 * (size_t)NH * rowb;
    const int32_t fit = (int32_t)(262144 / tok_bytes);
    int32_t gt;
    if (bt > fit) {
        gt = fit / 16 * 16;
        if (gt < 16) gt = 16;
    } else {
        int32_t nblk = fit / bt;
        if (nblk > CPU_ATTN_GROUP_TOKENS / bt) nblk = CPU_ATTN_GROUP_TOKENS / bt;
        if (nblk < 1) nblk = 1;
        gt = nblk * bt;
    }
    float *sc = scratch + CPU_ATTN_SPAD; /* row h at sc + h*SROW, pad either side */
    for (int h = 0; h < NQ; h++) m[h] = -INFINITY, l[h] = 0.0f;
    memset(acc, 0, (size_t)NQ * (size_t)D * sizeof(float));
    const float cap = sp->softcap;
    const __m512 capv = _mm512_set1_ps(cap), inv_capv = _mm512_set1_ps(cap > 0.0f ? 1.0f / cap : 0.0f);
    span_piece pieces[2][SPAN_MAX_PIECES];
    int cur = 0;
    int32_t gs = sp->t0, ge = (gs / gt + 1) * gt;
    if (ge > sp->t1) ge = sp->t1;
    int npc = group_pieces(sp, gs, ge, rowb, pairs, pieces[cur]);
    /* The first group's K lines go out at once (there is nothing yet to
     * hide them behind); its V lines are handed out during its q.K, ahead
     * of the next group's K. From DRAM, spans of 128 tokens ran 4-17 %
     * faster than with both in the opening burst (batch 8/64, 2 threads;
     * bf16 and f16), longer ones the same. */
    pf_list v_first;
    {
        pf_list k;
        pf_list_some(&k, pf_list_init(&k, sp, pieces[cur], npc, 0, pairs));
    }
    int v_first_lines = pf_list_init(&v_first, sp, pieces[cur], npc, 1, pairs);

    while (gs < sp->t1) {
        const span_piece *pc = pieces[cur];
        const int n = ge - gs;
        /* The next group's K lines are prefetched during this one's QK,
         * its V lines during the PV, in address order; one group ahead is
         * 256 KiB, what L2 holds beside this one. */
        const int32_t ns = ge, ne = ns + gt < sp->t1 ? ns + gt : sp->t1;
        span_piece *pn = pieces[cur ^ 1];
        const int npn = ns < sp->t1 ? group_pieces(sp, ns, ne, rowb, pairs, pn) : 0;
        pf_list pfk, pfv, k_next;
        int k_lines = pf_list_init(&pfk, sp, pn, npn, 0, pairs);
        const int v_lines = pf_list_init(&pfv, sp, pn, npn, 1, pairs);
        if (v_first_lines) { /* the first group: its V, then the next K */
            k_next = pfk;
            pfk = v_first;
            pfk.then = &k_next;
            k_lines += v_first_lines;
            v_first_lines = 0;
        }
        /* In the pair layout q.K is a third shorter, and the next group's
         * K lines all handed out in it came faster than one core's misses
         * drain (1 thread from DRAM, batch 16 ctx 8192: 19.8-21.0 GB/s
         * against rows' 22.4-23.3); a sixth of them during the softmax:
         * 23.6-24.6 (an eighth to a fifth alike, a third or a half slower). */
        const int k_sm_lines = pairs ? k_lines / 6 : 0;
        const int k_per = (k_lines - k_sm_lines + npc * NH - 1) / (npc * NH);

        for (int x = 0; x < npc; x++)
            for (int hh = 0; hh < NH; hh++)
                qk(ctx, hh, pc[x].blk + sp->k_off + (size_t)hh * sp->panel + pc[x].off[0], pc[x].r,
                   pc[x].n, sc + (size_t)hh * G * CPU_ATTN_SROW + pc[x].so, &pfk, k_per);
        if (!pairs) pf_list_some(&pfk, k_lines);
        int k_left = k_sm_lines;
        const int k_sm = (k_sm_lines + NQ - 1) / NQ;

        const __mmask16 tail = (__mmask16)((1u << (n & 15)) - 1);
        /* An eighth of the next group's V lines go out during the softmax,
         * a few after each row, the rest during the PV: with none here the
         * PV phase asked for lines faster than one core's misses drain
         * (1 thread from DRAM, batch 16 ctx 8192: 18.3 -> 19.5 GB/s, mean
         * of 4 alternating runs' medians); a quarter measured about the
         * same, a third or a half (bigger bursts per row) slower, 16 GB/s
         * at a half. The fp32 kernel (f16 KV) too: on one core it is
         * compute-bound and gained nothing, but on two in the slow memory
         * mode it is DRAM-bound and gained 4-9 % (block 128, batch 1-16,
         * ctx 1k-8k, 2 alternating rounds), in-cache ceiling the same. */
        int v_left = v_lines;
        const int v_sm = (v_lines / 8 + NQ - 1) / NQ;
        for (int h = 0; h < NQ; h++) {
            float *row = sc + (size_t)h * CPU_ATTN_SROW;
            __m512 vmax = _mm512_set1_ps(-INFINITY);
            int j = 0;
            for (; j < n; j += 16) {
                const __mmask16 k = j + 16 <= n ? (__mmask16)0xffff : tail;
                __m512 x = _mm512_maskz_loadu_ps(k, row + j);
                if (cap > 0.0f) {
                    x = _mm512_mul_ps(capv, avx512_tanh16(_mm512_mul_ps(x, inv_capv)));
                    _mm512_mask_storeu_ps(row + j, k, x);
                }
                vmax = _mm512_mask_max_ps(vmax, k, vmax, x);
            }
            const float mx = _mm512_reduce_max_ps(vmax);
            if (mx > m[h]) {
                /* The running max grew: rescale what was summed so far. */
                const float alpha = m[h] == -INFINITY ? 0.0f : expf(m[h] - mx);
                l[h] *= alpha;
                const __m512 av = _mm512_set1_ps(alpha);
                float *ah = acc + (size_t)h * D;
                for (int d = 0; d < D; d += 16)
                    _mm512_storeu_ps(ah + d, _mm512_mul_ps(av, _mm512_loadu_ps(ah + d)));
                m[h] = mx;
            }
            __m512 vsum = _mm512_setzero_ps();
            if (p_bf16) {
                const __m512 ml = _mm512_set1_ps(m[h] * SPAN_LOG2E);
                for (j = 0; j < n; j += 16) {
                    const __mmask16 k = j + 16 <= n ? (__mmask16)0xffff : tail;
                    const __m512 p = span_exp16_bf(_mm512_maskz_loadu_ps(k, row + j), ml);
                    _mm512_mask_storeu_ps(row + j, k, p);
                    vsum = _mm512_mask_add_ps(vsum, k, vsum, p);
                }
            } else {
                const __m512 mv = _mm512_set1_ps(m[h]);
                for (j = 0; j < n; j += 16) {
                    const __mmask16 k = j + 16 <= n ? (__mmask16)0xffff : tail;
                    const __m512 p = avx512_exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, row + j), mv));
                    _mm512_mask_storeu_ps(row + j, k, p);
                    vsum = _mm512_mask_add_ps(vsum, k, vsum, p);
                }
            }
            l[h] += _mm512_reduce_add_ps(vsum);
            pf_share(&pfv, &v_left, v_sm);
            if (pairs) pf_share(&pfk, &k_left, k_sm);
        }
        if (pairs) pf_list_some(&pfk, k_lines);

        /* Per KV head, all pieces of the group at once: the accumulators
         * stay in registers over the group's tokens. */
        const int v_per = (v_left + NH - 1) / NH;
        for (int hh = 0; hh < NH; hh++) {
            pv_piece all[SPAN_MAX_PIECES];
            for (int x = 0; x < npc; x++)
                all[x] = (pv_piece){pc[x].blk + sp->v_off + (size_t)hh * sp->panel + pc[x].off[1],
                                    pc[x].n, pc[x].so, pc[x].r};
            pv(ctx, hh, all, npc, sc + (size_t)hh * G * CPU_ATTN_SROW, acc + (size_t)hh * G * D,
               &pfv, v_per);
        }
        pf_list_some(&pfv, v_lines);
        gs = ns;
        ge = ne;
        npc = npn;
        cur ^= 1;
    }
}

#endif /* APEX_AVX512_SPAN_H */
