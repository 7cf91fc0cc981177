/* CPU decode attention: the reference against hand-computed cases, and the
 * optimised kernel (every ISA variant this CPU runs) against the reference
 * over KV/q/out dtypes, head_dim, GQA ratio, block size, ragged lengths,
 * sliding window and soft-cap.
 *
 * Tolerances (|kernel - reference| <= ATOL + rtol(out_dtype) * |reference|,
 * with V in [-1, 1] so outputs are O(1)):
 *   ATOL 2e-5: fp32 accumulation over up to 32768 tokens with a polynomial
 *              exp (~1e-7 relative) against the double reference;
 *   rtol fp32 0, fp16 2^-10, bf16 2^-7: one unit of the output type's
 *              rounding (the kernel and the reference may round to either
 *              side of a midpoint).
 * The avx512bf16 variant on bf16 KV rounds P (and q, when q is not bf16)
 * to bf16 before its dot products, as a GPU flash-attention kernel rounds
 * P before P.V; it is held to that rounding's bound on top (bf16_extra):
 *   P: each weight p_t is off by <= 2^-9 p_t while the sum l is exact, so
 *      |sum (p~ - p) v| / l <= 2^-9 max|v|;
 *   q: each score moves by <= D = 2^-9 scale sum_d |q_d k_d| (softcap only
 *      shrinks it), which moves each normalised weight by a factor within
 *      e^(+-2D): the output moves by <= max|v| (e^(2D) - 1).
 * Both are bounds, reached only by short rows (a few tokens, a window);
 * the worst error seen is printed by test_grid. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_attn/cpu_attn.h"
#include "cpu_attn/dtype_convert.h"
#include "cpu_attn/kv_layout.h"

#define ATOL 2e-5

static double rtol(apex_dtype out) {
    return out == APEX_DTYPE_F16 ? 1.0 / 1024 : out == APEX_DTYPE_BF16 ? 1.0 / 128 : 0.0;
}

/* splitmix64: fixed seed, reproducible. */
static uint64_t rng_state;
static uint64_t rng_next(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static float rng_unit(void) { /* [-1, 1) */
    return (float)((double)(rng_next() >> 11) * (2.0 / 9007199254740992.0) - 1.0);
}

typedef struct {
    int32_t hq, hkv, d, bt;
    apex_dtype kv, q, out;
    int32_t n_seqs;
    const int32_t *lens;
    float softcap;
    int32_t window;
    float q_mag; /* scales q: large values make the softmax peaky */
    int few_threads; /* 1 and 2 threads only (the sweep covers 3) */
} tcase;

/* The bound above for one case: V in [-1, 1], K in [-1, 1]. */
static double bf16_extra(const tcase *c, const void *q) {
    double qmax = 0.0;
    if (c->q != APEX_DTYPE_BF16) {
        const size_t rows = (size_t)c->n_seqs * (size_t)c->hq;
        for (size_t r = 0; r < rows; r++) {
            double l1 = 0.0;
            for (int32_t d = 0; d < c->d; d++) l1 += fabs(apex_load_f32(q, c->q, r * c->d + d));
            if (l1 > qmax) qmax = l1;
        }
    }
    const double dmax = ldexp(1.0, -9) * qmax / sqrt((double)c->d);
    return ldexp(1.0, -9) + expm1(2.0 * dmax);
}

static int n_isas;
static cpu_attn_isa isas[5];

/* Largest fp32-output error of the avx512bf16 variant on bf16 KV with bf16
 * q (P's rounding alone). */
static double worst_bf16;
/* Cases also run in the pair layout. */
static int pairs_cases;

/* Fails (naming the first element out of tolerance) unless every output is
 * within ATOL + extra + rtol of the reference; returns the largest error. */
static double expect_close(const tcase *c, const float *ref, const void *out, size_t n_q,
                           double extra, const char *what, int threads) {
    double err = 0.0;
    size_t bad = SIZE_MAX;
    for (size_t x = 0; x < n_q; x++) {
        double r = ref[x], v = apex_load_f32(out, c->out, x);
        double e = fabs(v - r);
        if (!(e <= ATOL + extra + rtol(c->out) * fabs(r)) && bad == SIZE_MAX) bad = x;
        if (!(e <= err)) err = e;
    }
    if (bad != SIZE_MAX) {
        fprintf(stderr,
                "mismatch isa=%s threads=%d hq=%d hkv=%d d=%d bt=%d kv=%d q=%d out=%d "
                "softcap=%g window=%d q_mag=%g: elem %zu ref %.8g got %.8g\n",
                what, threads, c->hq, c->hkv, c->d, c->bt, c->kv, c->q, c->out, c->softcap,
                c->window, c->q_mag, bad, ref[bad], apex_load_f32(out, c->out, bad));
        fail();
    }
    return err;
}

/* Cases run with 3-4 q heads per KV head (mod 8), [f16, bf16][512-bit,
 * 256-bit q.K tiles]: test_qk_widths checks that each was run. */
static int qk_width_cases[2][2];

/* Builds the case (blocks in shuffled order), runs the reference and the
 * kernel under every ISA and thread count, asserts the tolerance. */
static void run_case(const tcase *c, double *worst) {
    /* The row layout's q.K tile width for 3-4 heads (cpu_attn_qk_ymm):
     * cases alternate, so both widths run on any CPU. */
    static int n_cases;
    const int ymm = n_cases++ & 1;
    cpu_attn_qk_ymm_force(ymm);
    const int g8 = c->hq / c->hkv % 8;
    if ((g8 == 3 || g8 == 4) && (c->kv == APEX_DTYPE_F16 || c->kv == APEX_DTYPE_BF16))
        qk_width_cases[c->kv == APEX_DTYPE_BF16][ymm]++;
    cpu_attn_geom g = {c->hq, c->hkv, c->d, c->bt, c->kv, 0};
    const size_t esz = apex_dtype_size(c->kv);
    const size_t block_bytes = 2 * (size_t)c->hkv * (size_t)c->bt * (size_t)c->d * esz;
    int32_t max_len = 0, stride = 0, n_blocks = 0;
    for (int32_t i = 0; i < c->n_seqs; i++) {
        int32_t nb = (c->lens[i] + c->bt - 1) / c->bt;
        if (c->lens[i] > max_len) max_len = c->lens[i];
        if (nb > stride) stride = nb;
        n_blocks += nb;
    }
    /* Block ids: a shuffled permutation, one extra unused block at id 0 so
     * that no sequence starts at the slab base. */
    int32_t *perm = malloc((size_t)(n_blocks + 1) * sizeof *perm);
    for (int32_t i = 0; i <= n_blocks; i++) perm[i] = i;
    for (int32_t i = n_blocks; i > 1; i--) {
        int32_t j = 1 + (int32_t)(rng_next() % (uint64_t)i);
        int32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    int32_t *table = calloc((size_t)c->n_seqs * (size_t)stride, sizeof *table);
    for (int32_t i = 0, next = 1; i < c->n_seqs; i++)
        for (int32_t b = 0; b < (c->lens[i] + c->bt - 1) / c->bt; b++)
            table[(size_t)i * stride + b] = perm[next++];
    uint8_t *kv = malloc((size_t)(n_blocks + 1) * block_bytes);
    const size_t n_kv = (size_t)(n_blocks + 1) * block_bytes / esz;
    for (size_t x = 0; x < n_kv; x++) apex_store_f32(kv, c->kv, x, rng_unit());
    const size_t n_q = (size_t)c->n_seqs * (size_t)c->hq * (size_t)c->d;
    void *q = malloc(n_q * 4);
    for (size_t x = 0; x < n_q; x++) apex_store_f32(q, c->q, x, rng_unit() * c->q_mag);
    float *ref = malloc(n_q * sizeof *ref);
    void *out = malloc(n_q * 4);

    cpu_attn_batch b = {
        .n_seqs = c->n_seqs, .q = q, .q_dtype = c->q, .out = ref, .out_dtype = APEX_DTYPE_F32,
        .seq_lens = c->lens, .block_table = table, .block_table_stride = stride, .kv = kv,
        .block_bytes = block_bytes, .scale = 1.0f / sqrtf((float)c->d), .softcap = c->softcap,
        .window = c->window,
    };
    assert_int_equal(cpu_attn_reference(&g, &b), 0);

    b.out = out;
    b.out_dtype = c->out;
    cpu_attn_ws *ws = cpu_attn_ws_create(&g, c->n_seqs, max_len, 3);
    assert_non_null(ws);
    static const int32_t threads[] = {1, 2, 3};
    const int n_threads = c->few_threads ? 2 : 3;
    for (int k = 0; k < n_isas; k++) {
        assert_int_equal(cpu_attn_isa_force(isas[k]), 0);
        const int bf = (isas[k] == CPU_ATTN_ISA_AVX512BF16 || isas[k] == CPU_ATTN_ISA_AMXBF16) &&
                       c->kv == APEX_DTYPE_BF16;
        const double extra = bf ? bf16_extra(c, q) : 0.0;
        for (int ti = 0; ti < n_threads; ti++) {
            memset(out, 0xff, n_q * 4); /* NaN everywhere: every output must be written */
            assert_int_equal(cpu_attn_decode(&g, &b, ws, threads[ti]), 0);
            const double err =
                expect_close(c, ref, out, n_q, extra, cpu_attn_isa_name(isas[k]), threads[ti]);
            if (c->out == APEX_DTYPE_F32 && worst && !bf && err > *worst) *worst = err;
            if (c->out == APEX_DTYPE_F32 && bf && c->q == APEX_DTYPE_BF16 && err > worst_bf16)
                worst_bf16 = err;
        }
    }
    /* The same bytes read in the pair layout (kv_layout.h): a different
     * logical KV, so its own reference; the avx512bf16 variant is held to
     * it as above, and the variants that cannot read it refuse it. */
    if (c->kv == APEX_DTYPE_BF16 && c->bt >= APEX_KV_PAIR_TILE) {
        g.kv_pairs = 1;
        b.out = ref;
        b.out_dtype = APEX_DTYPE_F32;
        assert_int_equal(cpu_attn_reference(&g, &b), 0);
        b.out = out;
        b.out_dtype = c->out;
        for (int k = 0; k < n_isas; k++) {
            assert_int_equal(cpu_attn_isa_force(isas[k]), 0);
            if (isas[k] != CPU_ATTN_ISA_AVX512BF16 && isas[k] != CPU_ATTN_ISA_AMXBF16) {
                assert_int_equal(cpu_attn_pairs_ok(&g), 0);
                assert_int_equal(cpu_attn_decode(&g, &b, ws, 1), -1);
                continue;
            }
            assert_int_equal(cpu_attn_pairs_ok(&g), 1);
            const double extra = bf16_extra(c, q);
            for (int ti = 0; ti < n_threads; ti++) {
                memset(out, 0xff, n_q * 4);
                assert_int_equal(cpu_attn_decode(&g, &b, ws, threads[ti]), 0);
                expect_close(c, ref, out, n_q, extra,
                             isas[k] == CPU_ATTN_ISA_AMXBF16 ? "amxbf16, pair layout"
                                                             : "avx512bf16, pair layout",
                             threads[ti]);
            }
        }
        pairs_cases++;
    }
    cpu_attn_qk_ymm_force(-1);
    cpu_attn_ws_destroy(ws);
    free(perm);
    free(table);
    free(kv);
    free(q);
    free(ref);
    free(out);
}

/* ------------------------------------------------------------------ tests */

/* Reference on two tokens, scale 1: scores 0 and ln 3 give weights 1/4 and
 * 3/4, so with V rows of 1s and 5s every output is 4. Then soft-cap 1
 * (scores 0 and tanh(ln 3) = 0.8) and window 1 (only the last token). */
static void test_reference_hand(void **state) {
    (void)state;
    enum { D = 64, BT = 8 };
    cpu_attn_geom g = {1, 1, D, BT, APEX_DTYPE_F32, 0};
    float kv[2 * BT * D] = {0}; /* K panel then V panel of one block */
    float q[D] = {0};
    q[0] = 1.0f;
    kv[1 * D + 0] = logf(3.0f); /* K row 1 */
    for (int d = 0; d < D; d++) {
        kv[BT * D + 0 * D + d] = 1.0f; /* V row 0 */
        kv[BT * D + 1 * D + d] = 5.0f; /* V row 1 */
    }
    int32_t len = 2, table = 0;
    float out[D];
    cpu_attn_batch b = {
        .n_seqs = 1, .q = q, .q_dtype = APEX_DTYPE_F32, .out = out, .out_dtype = APEX_DTYPE_F32,
        .seq_lens = &len, .block_table = &table, .block_table_stride = 1, .kv = kv,
        .block_bytes = sizeof kv, .scale = 1.0f, .softcap = 0.0f, .window = 0,
    };
    assert_int_equal(cpu_attn_reference(&g, &b), 0);
    for (int d = 0; d < D; d++) assert_float_equal(out[d], 4.0f, 1e-6f);

    b.softcap = 1.0f;
    const double w1 = 1.0 / (1.0 + exp(-0.8)); /* weight of token 1 */
    assert_int_equal(cpu_attn_reference(&g, &b), 0);
    for (int d = 0; d < D; d++) assert_float_equal(out[d], (float)(1.0 + 4.0 * w1), 1e-6f);

    b.softcap = 0.0f;
    b.window = 1;
    assert_int_equal(cpu_attn_reference(&g, &b), 0);
    for (int d = 0; d < D; d++) assert_float_equal(out[d], 5.0f, 0.0f);

    /* The kernel agrees on the same hand case (single token window too). */
    cpu_attn_ws *ws = cpu_attn_ws_create(&g, 1, 2, 2);
    assert_non_null(ws);
    for (int k = 0; k < n_isas; k++) {
        assert_int_equal(cpu_attn_isa_force(isas[k]), 0);
        b.window = 0;
        assert_int_equal(cpu_attn_decode(&g, &b, ws, 2), 0);
        for (int d = 0; d < D; d++) assert_float_equal(out[d], 4.0f, 1e-5f);
        b.window = 1;
        assert_int_equal(cpu_attn_decode(&g, &b, ws, 2), 0);
        for (int d = 0; d < D; d++) assert_float_equal(out[d], 5.0f, 1e-6f);
    }
    cpu_attn_ws_destroy(ws);
}

/* Both q.K tile widths were held to the reference for f16 and bf16 KV
 * (run after the sweeps), and the override round-trips. */
static void test_qk_widths(void **state) {
    (void)state;
    for (int dt = 0; dt < 2; dt++)
        for (int w = 0; w < 2; w++) assert_true(qk_width_cases[dt][w] > 0);
    cpu_attn_qk_ymm_force(1);
    assert_int_equal(cpu_attn_qk_ymm(), 1);
    cpu_attn_qk_ymm_force(0);
    assert_int_equal(cpu_attn_qk_ymm(), 0);
    cpu_attn_qk_ymm_force(-1);
    const int v = cpu_attn_qk_ymm();
    assert_true(v == 0 || v == 1);
}

static void test_isa_dispatch(void **state) {
    (void)state;
    cpu_attn_isa sel = cpu_attn_isa_selected();
    assert_true(sel == CPU_ATTN_ISA_SCALAR || sel == CPU_ATTN_ISA_AVX2 ||
                sel == CPU_ATTN_ISA_AVX512 || sel == CPU_ATTN_ISA_AVX512BF16 ||
                sel == CPU_ATTN_ISA_AMXBF16);
    assert_string_equal(cpu_attn_isa_name(CPU_ATTN_ISA_AMXBF16), "amxbf16");
    assert_string_equal(cpu_attn_isa_name(CPU_ATTN_ISA_AVX512BF16), "avx512bf16");
    assert_string_equal(cpu_attn_isa_name(CPU_ATTN_ISA_AVX512), "avx512");
    assert_string_equal(cpu_attn_isa_name(CPU_ATTN_ISA_AVX2), "avx2");
    assert_string_equal(cpu_attn_isa_name(CPU_ATTN_ISA_SCALAR), "scalar");
    assert_int_equal(cpu_attn_isa_force(CPU_ATTN_ISA_SCALAR), 0);
    assert_int_equal(cpu_attn_isa_selected(), CPU_ATTN_ISA_SCALAR);
    assert_int_equal(cpu_attn_isa_force((cpu_attn_isa)7), -1);
    /* Whatever the CPU supports comes back selected when forced. */
    for (int k = 0; k < n_isas; k++) {
        assert_int_equal(cpu_attn_isa_force(isas[k]), 0);
        assert_int_equal(cpu_attn_isa_selected(), isas[k]);
    }
    assert_int_equal(cpu_attn_isa_force(sel), 0);
}

/* Every kv dtype x head_dim x GQA ratio x block size, ragged lengths that
 * end mid-block; q/out dtypes rotate through all nine pairs. */
static void test_sweep(void **state) {
    (void)state;
    static const int32_t lens[] = {1, 7, 16, 33, 130, 257, 64, 9};
#define DIM_ENTRY(d) d,
    static const int32_t dims[] = {APEX_HEAD_DIMS(DIM_ENTRY)}; /* every supported head_dim */
    enum { N_DIMS = sizeof dims / sizeof dims[0] };
    static const int32_t ratio[][2] = {{1, 2}, {4, 2}, {7, 1}, {8, 1}, {3, 3}}; /* {G, hkv} */
    static const int32_t bts[] = {8, 16, 32};
    double worst = 0.0;
    int n = 0;
    for (int kvt = 0; kvt < 3; kvt++) /* every apex_dtype */
        for (int di = 0; di < N_DIMS; di++)
            for (int ri = 0; ri < 5; ri++)
                for (int bi = 0; bi < 3; bi++, n++) {
                    tcase c = {
                        .hq = ratio[ri][0] * ratio[ri][1], .hkv = ratio[ri][1], .d = dims[di],
                        .bt = bts[bi], .kv = (apex_dtype)kvt, .q = (apex_dtype)(n % 3),
                        .out = (apex_dtype)((n / 3) % 3), .n_seqs = 8, .lens = lens,
                        .q_mag = (n % 4 == 0) ? 12.0f : 1.0f,
                    };
                    run_case(&c, &worst);
                }
    fprintf(stderr, "sweep: %d cases, worst fp32 abs error %.3g\n", n, worst);
}

/* The wide grid: GQA 1-16, every head_dim, blocks 8-256, ragged lengths
 * (partial first and last blocks), windows and soft-caps rotating, every
 * kv dtype (bf16 twice as often: it has its own variant). */
static void test_grid(void **state) {
    (void)state;
    static const int32_t lens[] = {1, 300, 77, 640, 129};
    static const int32_t gqa[][2] = {{1, 2}, {2, 2}, {4, 2}, {8, 1}, {16, 1}}; /* {G, hkv} */
    static const int32_t dims[] = {APEX_HEAD_DIMS(DIM_ENTRY)};
#undef DIM_ENTRY
    enum { N_DIMS = sizeof dims / sizeof dims[0] };
    static const int32_t bts[] = {8, 64, 128, 256};
    static const int32_t windows[] = {0, 0, 50, 333};
    static const float caps[] = {0.0f, 0.0f, 0.0f, 30.0f, 5.0f};
    static const apex_dtype kvs[] = {APEX_DTYPE_BF16, APEX_DTYPE_F16, APEX_DTYPE_BF16, APEX_DTYPE_F32};
    double worst = 0.0;
    int n = 0;
    for (int gi = 0; gi < 5; gi++)
        for (int di = 0; di < N_DIMS; di++)
            for (int bi = 0; bi < 4; bi++, n++) {
                tcase c = {
                    .hq = gqa[gi][0] * gqa[gi][1], .hkv = gqa[gi][1], .d = dims[di], .bt = bts[bi],
                    .kv = kvs[n % 4], .q = (apex_dtype)((n / 4) % 3), .out = APEX_DTYPE_F32,
                    .n_seqs = 5, .lens = lens, .softcap = caps[n % 5], .window = windows[n % 4],
                    .q_mag = n % 3 == 0 ? 8.0f : 1.0f, .few_threads = 1,
                };
                run_case(&c, &worst);
            }
    fprintf(stderr,
            "grid: %d cases, worst fp32 abs error %.3g (avx512bf16, bf16 KV and q: %.3g); "
            "%d cases so far also in the pair layout\n",
            n, worst, worst_bf16, pairs_cases);
}

/* Longer sequences, a peaky softmax whose max moves, chunked over threads. */
static void test_long(void **state) {
    (void)state;
    static const int32_t lens_a[] = {32768, 5, 12345};
    static const int32_t lens_b[] = {4099, 2048, 1};
    double worst = 0.0;
    tcase a = {32, 8, 128, 16, APEX_DTYPE_F16, APEX_DTYPE_F32, APEX_DTYPE_F32, 3, lens_a,
               0.0f, 0, 4.0f, 0};
    run_case(&a, &worst);
    tcase b = {8, 1, 64, 32, APEX_DTYPE_BF16, APEX_DTYPE_BF16, APEX_DTYPE_F32, 3, lens_b,
               0.0f, 0, 20.0f, 0};
    run_case(&b, &worst);
    tcase c = {7, 1, 256, 8, APEX_DTYPE_F32, APEX_DTYPE_F16, APEX_DTYPE_F32, 3, lens_b,
               0.0f, 0, 1.0f, 0};
    run_case(&c, &worst);
    fprintf(stderr, "long: worst fp32 abs error %.3g\n", worst);
}

/* Equal lengths, the plans the scheduler simulation picks (cpu_attn_decode.c
 * plan()): whole sequences (4 on 2 threads), one chunk per thread (batch 1),
 * and the fallback split (4 on 3 threads); with a window, so the attended
 * ranges start mid-block. */
static void test_equal_lengths(void **state) {
    (void)state;
    static const int32_t lens4[] = {600, 600, 600, 600};
    static const int32_t lens1[] = {1000};
    double worst = 0.0;
    tcase a = {32, 8, 128, 16, APEX_DTYPE_BF16, APEX_DTYPE_BF16, APEX_DTYPE_F32, 4, lens4,
               0.0f, 0, 4.0f, 0};
    run_case(&a, &worst);
    tcase b = {32, 8, 128, 128, APEX_DTYPE_F16, APEX_DTYPE_F16, APEX_DTYPE_F32, 1, lens1,
               0.0f, 0, 4.0f, 0};
    run_case(&b, &worst);
    tcase c = {9, 3, 64, 64, APEX_DTYPE_BF16, APEX_DTYPE_F32, APEX_DTYPE_BF16, 4, lens4,
               0.0f, 517, 1.0f, 0};
    run_case(&c, &worst);
    fprintf(stderr, "equal lengths: worst fp32 abs error %.3g\n", worst);
}

/* Sliding windows that start mid-block (and windows longer than the
 * sequence), soft-cap, and both together. */
static void test_window_softcap(void **state) {
    (void)state;
    static const int32_t lens[] = {1, 15, 100, 513, 2000, 37};
    static const int32_t windows[] = {0, 1, 5, 17, 100, 1000, 4096};
    static const float caps[] = {0.0f, 30.0f, 2.0f};
    static const int32_t geo[][3] = {{32, 8, 128}, {8, 8, 64}, {14, 2, 80}, {16, 1, 96}};
    double worst = 0.0;
    int n = 0;
    for (int wi = 0; wi < 7; wi++)
        for (int ci = 0; ci < 3; ci++, n++) {
            const int32_t *gg = geo[n % 4];
            tcase c = {gg[0], gg[1], gg[2], n % 2 ? 16 : 32, (apex_dtype)(n % 3),
                       (apex_dtype)((n / 3) % 3), APEX_DTYPE_F32, 6, lens, caps[ci], windows[wi],
                       n % 2 ? 10.0f : 1.0f, 0};
            run_case(&c, &worst);
        }
    fprintf(stderr, "window/softcap: %d cases, worst fp32 abs error %.3g\n", n, worst);
}

/* A workspace sized for fewer threads than asked still works (clamped), and
 * an empty batch is a no-op. */
static void test_workspace(void **state) {
    (void)state;
    cpu_attn_geom g = {4, 1, 64, 16, APEX_DTYPE_F16, 0};
    assert_null(cpu_attn_ws_create(&g, 0, 16, 1));
    cpu_attn_ws *ws = cpu_attn_ws_create(&g, 4, 4096, 1);
    assert_non_null(ws);
    cpu_attn_batch b = {.n_seqs = 0};
    assert_int_equal(cpu_attn_decode(&g, &b, ws, 4), 0);
    cpu_attn_ws_destroy(ws);
    cpu_attn_ws_destroy(NULL);
}

/* With APEX_ISA_EXPECT set (ctest runs this binary so, beside APEX_ISA):
 * the variant chosen at start-up must be the expected one where the CPU
 * has it, else the best one it has (APEX_ISA naming a missing or unknown
 * variant falls back). Returns the process status. */
static int check_isa_env(const char *expect) {
    static const cpu_attn_isa all[] = {CPU_ATTN_ISA_AMXBF16, CPU_ATTN_ISA_AVX512BF16,
                                       CPU_ATTN_ISA_AVX512, CPU_ATTN_ISA_AVX2, CPU_ATTN_ISA_SCALAR};
    const char *sel = cpu_attn_isa_name(cpu_attn_isa_selected()); /* decided from APEX_ISA */
    const char *want = NULL, *best = NULL;
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) {
        if (cpu_attn_isa_force(all[k])) continue; /* the CPU lacks it */
        if (!best) best = cpu_attn_isa_name(all[k]);
        if (!strcmp(expect, cpu_attn_isa_name(all[k]))) want = expect;
    }
    if (!want) want = best;
    fprintf(stderr, "APEX_ISA=%s: selected %s, expected %s\n", getenv("APEX_ISA"), sel, want);
    return strcmp(sel, want) != 0;
}

/* kv_layout.h by hand: K [heads][bt][D] then V, slots block * bt + row. */
static void test_kv_layout(void **state) {
    (void)state;
    const apex_kv_layout l = apex_kv_layout_of(2, 16, 64, apex_dtype_size(APEX_DTYPE_F16));
    assert_int_equal(l.row, 128);
    assert_int_equal(l.panel, 16 * 128);
    assert_int_equal(l.half, 2 * 16 * 128);
    assert_int_equal(l.block, 2 * 2 * 16 * 128);
    assert_int_equal(apex_kv_block_bytes(2, 16, 64, APEX_DTYPE_F32), 2 * 2 * 16 * 64 * 4);
    assert_int_equal(apex_kv_offset(&l, 0, 0, 0), 0);
    assert_int_equal(apex_kv_offset(&l, 1, 1, 3), l.half + l.panel + 3 * l.row);
    assert_int_equal(apex_kv_offset(&l, 1, 1, 15) + l.row, l.block); /* the last row ends it */
    const int32_t blocks[] = {5, 9};
    assert_int_equal(apex_kv_slot_of(blocks, 17, 16), 9 * 16 + 1);
    assert_int_equal(apex_kv_slot_block(9 * 16 + 1, 16), 9);
    assert_int_equal(apex_kv_slot_row(9 * 16 + 1, 16), 1);
}

int main(void) {
    rng_state = 0x5eed;
    const char *expect = getenv("APEX_ISA_EXPECT");
    if (expect) return check_isa_env(expect);
    /* Variants this CPU runs; forcing each is part of the test. */
    static const cpu_attn_isa all[] = {CPU_ATTN_ISA_SCALAR, CPU_ATTN_ISA_AVX2, CPU_ATTN_ISA_AVX512,
                                       CPU_ATTN_ISA_AVX512BF16, CPU_ATTN_ISA_AMXBF16};
    cpu_attn_isa sel = cpu_attn_isa_selected();
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++)
        if (cpu_attn_isa_force(all[k]) == 0) isas[n_isas++] = all[k];
    cpu_attn_isa_force(sel);
    fprintf(stderr, "cpu_attn: selected %s, testing %d variants\n", cpu_attn_isa_name(sel), n_isas);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kv_layout),
        cmocka_unit_test(test_reference_hand),
        cmocka_unit_test(test_isa_dispatch),
        cmocka_unit_test(test_sweep),
        cmocka_unit_test(test_grid),
        cmocka_unit_test(test_long),
        cmocka_unit_test(test_window_softcap),
        cmocka_unit_test(test_equal_lengths),
        cmocka_unit_test(test_workspace),
        cmocka_unit_test(test_qk_widths),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
