/* AVX-512 inner kernel (F/BW/VL/DQ; BF16 only for bf16 output, behind a
 * runtime check). Built with AVX-512 flags; run only where cpuid says so.
 *
 * Per span, tokens go in groups of >= 64 (whole blocks). For each group:
 *  QK  tiles of TT tokens x HT heads (TT*HT <= 16 accumulators), q from L1,
 *      K converted once per tile; the 16 accumulators are summed by one
 *      transpose-reduce into one vector of 16 scores.
 *  softmax  per head: max, rescale of the running sums if it grew, a
 *      polynomial exp over the row of scores.
 *  PV  per KV head and 16-wide slice of head_dim over the whole group, all
 *      q heads' accumulators in registers, V converted once per (token,
 *      slice), p broadcast from memory.
 * The next group's K is prefetched during this group's QK and its V during
 * the PV, a few lines between tiles, since blocks are scattered and the
 * hardware prefetcher cannot guess the next one; without it the kernel ran
 * at about half the speed, and with the lines issued in bursts (or one
 * cursor step per line) about 20% slower than now. */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "cpu_attn/cpu_attn_impl.h"
#include "cpu_attn/dtype_convert.h"
#include "cpu_attn/simd_avx512.h"

#define INL static inline __attribute__((always_inline))
/* Software prefetch hint: T1 (L2) measured ~1.5x faster from DRAM than T0
 * here (Zen 4): T0 fills hold L1 miss buffers the demand loads need. */
#define PF_HINT _MM_HINT_T1

/* ---------------------------------------------------------------- prefetch */

/* A piece of a group: rows [off / rowb, + n) of one block, whose scores
 * sit at column so of the score rows. */
typedef struct {
    const uint8_t *blk;
    size_t off;
    int n, so;
} piece;

/* Lines to prefetch: one contiguous run... */
typedef struct {
    const char *p;
    int left;
} pf_run;

INL void pf_run_some(pf_run *r, int lines) {
    if (lines > r->left) lines = r->left;
    for (int i = 0; i < lines; i++) _mm_prefetch(r->p + (size_t)i * 64, PF_HINT);
    r->p += (size_t)lines * 64;
    r->left -= lines;
}

/* ...and the K (or V) rows of every head of a group's pieces, in address
 * order (a whole block's K heads are one run), handed out a few lines at a
 * time between the tiles of the current group: issued in one burst they
 * stall the core when the miss queue fills, and a per-line cursor costs as
 * much as the prefetches save. */
typedef struct {
    const cpu_attn_span *sp;
    const piece *p;
    size_t panel_off, rowb;
    int np, x, hh;
    pf_run r;
} pf_list;

static pf_run piece_lines(const cpu_attn_span *sp, const piece *p, size_t panel_off, int hh,
                          size_t rowb) {
    const uintptr_t a = (uintptr_t)(p->blk + panel_off + (size_t)hh * sp->panel + p->off);
    const uintptr_t b = a + (size_t)p->n * rowb;
    const uintptr_t a0 = a & ~(uintptr_t)63;
    return (pf_run){(const char *)a0, (int)((((b + 63) & ~(uintptr_t)63) - a0) / 64)};
}

/* Returns the number of lines in the list. */
static int pf_list_init(pf_list *l, const cpu_attn_span *sp, const piece *p, int np,
                        size_t panel_off, size_t rowb) {
    *l = (pf_list){sp, p, panel_off, rowb, np, 0, 0, {NULL, 0}};
    int total = 0;
    for (int x = 0; x < np; x++)
        for (int hh = 0; hh < sp->NH; hh++) total += piece_lines(sp, &p[x], panel_off, hh, rowb).left;
    if (np > 0) l->r = piece_lines(sp, &p[0], panel_off, 0, rowb);
    return total;
}

INL void pf_list_some(pf_list *l, int lines) {
    while (lines > 0 && l->r.left > 0) {
        const int take = lines < l->r.left ? lines : l->r.left;
        pf_run_some(&l->r, take);
        lines -= take;
        if (l->r.left == 0) {
            if (++l->hh == l->sp->NH) l->hh = 0, l->x++;
            if (l->x < l->np) l->r = piece_lines(l->sp, &l->p[l->x], l->panel_off, l->hh, l->rowb);
        }
    }
}

/* A share of a call's lines: *left of them, split evenly over parts. */
INL void pf_share(pf_list *l, int *left, int per) {
    const int take = per < *left ? per : *left;
    pf_list_some(l, take);
    *left -= take;
}

/* ---------------------------------------------------------------- QK */

/* n consecutive rows of one block panel, HT heads; pf_lines of pf spread
 * over the tiles. */
INL void qk_rows(const float *q, int D, const uint8_t *k, size_t rowb, int n, float *s, int dt,
                 int HT, pf_list *pf, int pf_lines) {
    int j = 0, left = pf_lines;
    if (HT == 1) {
        const int per = (pf_lines + (n + 15) / 16 - 1) / ((n + 15) / 16);
        for (; j + 16 <= n; j += 16) {
            avx512_qk_tile(q, D, k + (size_t)j * rowb, rowb, s + j, CPU_ATTN_SROW, (apex_dtype)dt, 16, 1);
            pf_share(pf, &left, per);
        }
        for (; j + 8 <= n; j += 8) avx512_qk_tile(q, D, k + (size_t)j * rowb, rowb, s + j, CPU_ATTN_SROW, (apex_dtype)dt, 8, 1);
    } else {
        const int TT = 16 / HT, per = (pf_lines + (n + TT - 1) / TT - 1) / ((n + TT - 1) / TT);
        for (; j + TT <= n; j += TT) {
            avx512_qk_tile(q, D, k + (size_t)j * rowb, rowb, s + j, CPU_ATTN_SROW, (apex_dtype)dt, TT, HT);
            pf_share(pf, &left, per);
        }
    }
    for (; j < n; j++) avx512_qk_tile(q, D, k + (size_t)j * rowb, rowb, s + j, CPU_ATTN_SROW, (apex_dtype)dt, 1, HT);
    pf_list_some(pf, left);
}

#define QK_CASE(DT, HT) \
    case (DT) * 16 + (HT): qk_rows(qh, D, k, rowb, n, sh, DT, HT, pf, pf_lines); break;
#define QK_CASES(DT) \
    QK_CASE(DT, 1) QK_CASE(DT, 2) QK_CASE(DT, 3) QK_CASE(DT, 4) \
    QK_CASE(DT, 5) QK_CASE(DT, 6) QK_CASE(DT, 7) QK_CASE(DT, 8)

static void qk_block(const float *q, int D, const uint8_t *k, size_t rowb, int n, float *s,
                     int dt, int G, pf_list *pf, int pf_lines) {
    for (int h0 = 0; h0 < G; h0 += 8) {
        const int HT = G - h0 < 8 ? G - h0 : 8;
        const float *qh = q + (size_t)h0 * D;
        float *sh = s + (size_t)h0 * CPU_ATTN_SROW;
        switch (dt * 16 + HT) {
            QK_CASES(APEX_DTYPE_F32)
            QK_CASES(APEX_DTYPE_F16)
            QK_CASES(APEX_DTYPE_BF16)
        default: break;
        }
        pf_lines = 0;
    }
}

/* ---------------------------------------------------------------- PV */

/* One piece of a group: n rows of one block's V panel, their probabilities
 * at column so of the score rows. */
typedef struct {
    const uint8_t *v;
    int n, so;
} pv_piece;

/* acc[h][c..c+16) += sum_t p[h][t] v[t][c..c+16) for HP heads, all pieces,
 * a share of the prefetch list after each. */
INL void pv_slice(const pv_piece *pc, int npc, size_t rowb, const float *s, float *acc, int D,
                  int c, int dt, int HP, pf_list *pf, int *pf_left, int pf_per) {
    const int NS = avx512_pv_sets(HP);
    const size_t esz = dt == APEX_DTYPE_F32 ? 4 : 2;
    __m512 a[16];
#pragma GCC unroll 16
    for (int i = 0; i < NS * HP; i++) a[i] = _mm512_setzero_ps();
    for (int x = 0; x < npc; x++) {
        avx512_pv_run(a, pc[x].v + (size_t)c * esz, rowb, pc[x].n, s + pc[x].so, CPU_ATTN_SROW,
                      (apex_dtype)dt, HP, NS);
        pf_share(pf, pf_left, pf_per);
    }
    avx512_pv_add(a, acc + c, D, HP, NS);
}

INL void pv_heads(const pv_piece *pc, int npc, size_t rowb, const float *s, float *acc, int D,
                  int dt, int HP, pf_list *pf, int pf_lines) {
    const int parts = D / 16 * npc, per = (pf_lines + parts - 1) / parts;
    int left = pf_lines;
    for (int c = 0; c < D; c += 16) pv_slice(pc, npc, rowb, s, acc, D, c, dt, HP, pf, &left, per);
    pf_list_some(pf, left);
}

#define PV_CASE(DT, HP) \
    case (DT) * 32 + (HP): pv_heads(pc, npc, rowb, sh, ah, D, DT, HP, pf, pf_lines); break;
#define PV_CASES(DT)                                                                     \
    PV_CASE(DT, 1) PV_CASE(DT, 2) PV_CASE(DT, 3) PV_CASE(DT, 4) PV_CASE(DT, 5)           \
    PV_CASE(DT, 6) PV_CASE(DT, 7) PV_CASE(DT, 8) PV_CASE(DT, 9) PV_CASE(DT, 10)          \
    PV_CASE(DT, 11) PV_CASE(DT, 12) PV_CASE(DT, 13) PV_CASE(DT, 14) PV_CASE(DT, 15)      \
    PV_CASE(DT, 16)

static void pv_group(const pv_piece *pc, int npc, size_t rowb, const float *s, float *acc, int D,
                     int dt, int G, pf_list *pf, int pf_lines) {
    for (int h0 = 0; h0 < G; h0 += 16) {
        const int HP = G - h0 < 16 ? G - h0 : 16;
        const float *sh = s + (size_t)h0 * CPU_ATTN_SROW;
        float *ah = acc + (size_t)h0 * D;
        switch (dt * 32 + HP) {
            PV_CASES(APEX_DTYPE_F32)
            PV_CASES(APEX_DTYPE_F16)
            PV_CASES(APEX_DTYPE_BF16)
        default: break;
        }
        pf_lines = 0;
    }
}

/* ---------------------------------------------------------------- span */

static int group_pieces(const cpu_attn_span *sp, int32_t gs, int32_t ge, size_t rowb, piece *pc) {
    int npc = 0;
    for (int32_t t = gs; t < ge;) {
        const int32_t be = (t / sp->bt + 1) * sp->bt, e = be < ge ? be : ge;
        pc[npc].blk = sp->kv + (size_t)sp->blocks[t / sp->bt] * sp->block_bytes;
        pc[npc].off = (size_t)(t % sp->bt) * rowb;
        pc[npc].n = e - t;
        pc[npc++].so = t - gs;
        t = e;
    }
    return npc;
}

static void span_avx512(const cpu_attn_span *sp, float *m, float *l, float *acc, float *scratch) {
    const int NH = sp->NH, G = sp->G, NQ = NH * G, D = sp->D, bt = sp->bt, dt = (int)sp->kv_dtype;
    const size_t rowb = (size_t)D * apex_dtype_size(sp->kv_dtype);
    /* Group: whole blocks, at most 256 KiB of K+V (stays in L2 between QK
     * and PV) and 64 tokens, or one block if blocks are bigger. */
    const size_t tok_bytes = 2 * (size_t)NH * rowb;
    int32_t nblk = (int32_t)(262144 / ((size_t)bt * tok_bytes));
    if (nblk > CPU_ATTN_GROUP_TOKENS / bt) nblk = CPU_ATTN_GROUP_TOKENS / bt;
    if (nblk < 1) nblk = 1;
    const int32_t gt = nblk * bt;
    float *sc = scratch + CPU_ATTN_SPAD; /* row h at sc + h*SROW, pad either side */
    for (int h = 0; h < NQ; h++) m[h] = -INFINITY, l[h] = 0.0f;
    memset(acc, 0, (size_t)NQ * (size_t)D * sizeof(float));
    const float cap = sp->softcap;
    const __m512 capv = _mm512_set1_ps(cap), inv_capv = _mm512_set1_ps(cap > 0.0f ? 1.0f / cap : 0.0f);
    piece pieces[2][CPU_ATTN_GROUP_TOKENS / 8 + 1];
    int cur = 0;
    int32_t gs = sp->t0, ge = (gs / gt + 1) * gt;
    if (ge > sp->t1) ge = sp->t1;
    int npc = group_pieces(sp, gs, ge, rowb, pieces[cur]);
    {
        pf_list k, v;
        pf_list_some(&k, pf_list_init(&k, sp, pieces[cur], npc, sp->k_off, rowb));
        pf_list_some(&v, pf_list_init(&v, sp, pieces[cur], npc, sp->v_off, rowb));
    }

    while (gs < sp->t1) {
        const piece *pc = pieces[cur];
        const int n = ge - gs;
        /* The next group's K lines are prefetched during this one's QK,
         * its V lines during the PV, in address order; one group ahead is
         * 256 KiB, what L2 holds beside this one. */
        const int32_t ns = ge, ne = ns + gt < sp->t1 ? ns + gt : sp->t1;
        piece *pn = pieces[cur ^ 1];
        const int npn = ns < sp->t1 ? group_pieces(sp, ns, ne, rowb, pn) : 0;
        pf_list pfk, pfv;
        const int k_lines = pf_list_init(&pfk, sp, pn, npn, sp->k_off, rowb);
        const int v_lines = pf_list_init(&pfv, sp, pn, npn, sp->v_off, rowb);
        const int k_per = (k_lines + npc * NH - 1) / (npc * NH);

        for (int x = 0; x < npc; x++)
            for (int hh = 0; hh < NH; hh++)
                qk_block(sp->q + (size_t)hh * G * D, D,
                         pc[x].blk + sp->k_off + (size_t)hh * sp->panel + pc[x].off, rowb, pc[x].n,
                         sc + (size_t)hh * G * CPU_ATTN_SROW + pc[x].so, dt, G, &pfk, k_per);
        pf_list_some(&pfk, k_lines);

        const __mmask16 tail = (__mmask16)((1u << (n & 15)) - 1);
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
            const __m512 mv = _mm512_set1_ps(m[h]);
            __m512 vsum = _mm512_setzero_ps();
            for (j = 0; j < n; j += 16) {
                const __mmask16 k = j + 16 <= n ? (__mmask16)0xffff : tail;
                const __m512 p = avx512_exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, row + j), mv));
                _mm512_mask_storeu_ps(row + j, k, p);
                vsum = _mm512_mask_add_ps(vsum, k, vsum, p);
            }
            l[h] += _mm512_reduce_add_ps(vsum);
        }

        /* Per KV head, all pieces of the group at once: the accumulators
         * stay in registers over the group's tokens. */
        const int v_per = (v_lines + NH - 1) / NH;
        for (int hh = 0; hh < NH; hh++) {
            pv_piece all[CPU_ATTN_GROUP_TOKENS / 8 + 1];
            for (int x = 0; x < npc; x++)
                all[x] = (pv_piece){pc[x].blk + sp->v_off + (size_t)hh * sp->panel + pc[x].off,
                                    pc[x].n, pc[x].so};
            pv_group(all, npc, rowb, sc + (size_t)hh * G * CPU_ATTN_SROW, acc + (size_t)hh * G * D,
                     D, dt, G, &pfv, v_per);
        }
        pf_list_some(&pfv, v_lines);
        gs = ns;
        ge = ne;
        npc = npn;
        cur ^= 1;
    }
}

/* ---------------------------------------------------------------- store */

__attribute__((target("avx512bf16"))) static void store_bf16_native(uint16_t *o, const float *src,
                                                                      __m512 mv, int32_t n) {
    int32_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(o + i),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(src + i), mv)));
    const float mul = _mm512_cvtss_f32(mv);
    for (; i < n; i++) o[i] = apex_f32_to_bf16(src[i] * mul);
}

static void store_avx512(void *out, apex_dtype dt, const float *src, float mul, int32_t n) {
    const __m512 mv = _mm512_set1_ps(mul);
    int32_t i = 0;
    if (dt == APEX_DTYPE_F32) {
        for (; i + 16 <= n; i += 16)
            _mm512_storeu_ps((float *)out + i, _mm512_mul_ps(_mm512_loadu_ps(src + i), mv));
    } else if (dt == APEX_DTYPE_F16) {
        for (; i + 16 <= n; i += 16)
            _mm256_storeu_si256((__m256i *)((uint16_t *)out + i),
                                _mm512_cvtps_ph(_mm512_mul_ps(_mm512_loadu_ps(src + i), mv),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else if (cpu_attn_have_avx512bf16()) {
        store_bf16_native((uint16_t *)out, src, mv, n);
        return;
    }
    for (; i < n; i++) apex_store_f32(out, dt, (size_t)i, src[i] * mul);
}

const cpu_attn_kernel cpu_attn_kernel_avx512 = {span_avx512, store_avx512};
