/* test_cpu_attn_strided: the strided (ggml-layout) kernel against its scalar
 * reference and, for f32 KV, against double-precision naive attention; on
 * decode and prefill masks, GQA/MHA, f16/f32, head dims on and off the SIMD
 * path, softcap, split chunks, and rejected descriptors. Exact mode is held
 * bit for bit to a scalar emulation of ggml-cpu's row-by-row f16 path. */
#include "test_util.h"

#include <string.h>

#include "cpu_attn/cpu_attn_strided.h"
#include "cpu_attn/dtype_convert.h"

typedef struct fixture {
    cpu_attn_strided_desc d;
    float *q, *out, *out_ref;
    void *k, *v;
    uint16_t *mask;
} fixture;

/* KV in llama.cpp's layout: [stream][row][kv head][D]; q [stream][token][head][D];
 * mask [stream or 1][token][n_kv]. */
static void fx_init(fixture *f, int D, int hq, int hkv, int T, int S, int n_kv, apex_dtype dt,
                    int mask_per_stream, uint64_t seed) {
    memset(f, 0, sizeof *f);
    cpu_attn_strided_desc *d = &f->d;
    d->head_dim = D, d->n_q_heads = hq, d->n_kv_heads = hkv, d->n_tokens = T, d->n_streams = S;
    d->n_kv = n_kv, d->kv_dtype = dt, d->scale = 1.0f / sqrtf((float)D);
    const size_t es = dt == APEX_DTYPE_F16 ? 2 : 4;
    const size_t nq = (size_t)S * T * hq * D, nkv = (size_t)S * n_kv * hkv * D;
    f->q = malloc(nq * 4), f->out = malloc(nq * 4), f->out_ref = malloc(nq * 4);
    f->k = malloc(nkv * es), f->v = malloc(nkv * es);
    const int ms = mask_per_stream ? S : 1;
    f->mask = malloc((size_t)ms * T * n_kv * 2);
    for (size_t i = 0; i < nq; i++) f->q[i] = 2.0f * test_rand_f(&seed);
    for (size_t i = 0; i < nkv; i++) {
        const float a = test_rand_f(&seed), b = test_rand_f(&seed);
        if (dt == APEX_DTYPE_F16) {
            ((uint16_t *)f->k)[i] = apex_f32_to_f16(a), ((uint16_t *)f->v)[i] = apex_f32_to_f16(b);
        } else {
            ((float *)f->k)[i] = a, ((float *)f->v)[i] = b;
        }
    }
    d->q = f->q, d->q_nb_head = (size_t)D * 4, d->q_nb_tok = (size_t)hq * D * 4;
    d->q_nb_stream = (size_t)T * hq * D * 4;
    d->k = f->k, d->v = f->v;
    d->k_nb_head = d->v_nb_head = (size_t)D * es;
    d->k_nb_row = d->v_nb_row = (size_t)hkv * D * es;
    d->k_nb_stream = d->v_nb_stream = (size_t)n_kv * hkv * D * es;
    d->mask = f->mask, d->mask_nb_tok = (size_t)n_kv * 2;
    d->mask_nb_stream = mask_per_stream ? (size_t)T * n_kv * 2 : 0;
    d->out = f->out, d->out_nb_head = (size_t)D * 4, d->out_nb_tok = (size_t)hq * D * 4;
    d->out_nb_stream = (size_t)T * hq * D * 4;
}

static uint16_t *mask_row(fixture *f, int s, int t) {
    return (uint16_t *)((char *)f->mask + (size_t)s * f->d.mask_nb_stream + (size_t)t * f->d.mask_nb_tok);
}

static void fx_free(fixture *f) {
    free(f->q), free(f->out), free(f->out_ref), free(f->k), free(f->v), free(f->mask);
}

/* Runs the fast path (on n_threads) and the reference; asserts agreement. */
static void fx_check(fixture *f, int n_threads, float tol) {
    const size_t n = (size_t)f->d.n_streams * f->d.n_tokens * f->d.n_q_heads * f->d.head_dim;
    memset(f->out, 0x7f, n * 4); /* poison: every element must be written */
    assert_int_equal(cpu_attn_strided(&f->d, n_threads), 0);
    cpu_attn_strided_desc r = f->d;
    r.out = f->out_ref;
    assert_int_equal(cpu_attn_strided_reference(&r), 0);
    float worst = 0;
    for (size_t i = 0; i < n; i++) {
        assert_false(isnan(f->out[i]));
        const float e = fabsf(f->out[i] - f->out_ref[i]);
        if (e > worst) worst = e;
    }
    if (worst > tol) fail_msg("max |fast - reference| = %g > %g", worst, tol);
}

/* Decode: one token per stream, each stream its own prefix length (one empty),
 * n_kv padded past every length as llama.cpp pads it. */
static void test_decode_gqa_prefix(void **state) {
    (void)state;
    fixture f;
    fx_init(&f, 64, 9, 3, 1, 5, 320, APEX_DTYPE_F16, 1, 1);
    const int lens[5] = {1, 17, 300, 0, 129};
    for (int s = 0; s < 5; s++)
        for (int j = 0; j < 320; j++) mask_row(&f, s, 0)[j] = j < lens[s] ? 0 : 0xfc00;
    fx_check(&f, 2, 2e-5f);
    /* The empty stream yields zeros, as ggml's kernel does. */
    for (int i = 0; i < 9 * 64; i++) assert_true(f.out[3 * 9 * 64 + i] == 0.0f);
    fx_free(&f);
}

/* Prefill: causal mask over a cached prefix, token count off the tile size,
 * one mask shared by two streams. */
static void test_prefill_causal(void **state) {
    (void)state;
    fixture f;
    const int T = 13, past = 27, n_kv = 64;
    fx_init(&f, 128, 8, 2, T, 2, n_kv, APEX_DTYPE_F16, 0, 2);
    for (int t = 0; t < T; t++)
        for (int j = 0; j < n_kv; j++) mask_row(&f, 0, t)[j] = j <= past + t ? 0 : 0xfc00;
    fx_check(&f, 2, 2e-5f);
    fx_check(&f, 1, 2e-5f);
    fx_free(&f);
}

/* MHA, f32 KV, head_dim 80 (off the 16-wide path), softcap, finite non-zero
 * mask values and holes; checked against double naive attention too. */
static void test_mha_f32_softcap_holes(void **state) {
    (void)state;
    fixture f;
    const int D = 80, H = 4, n_kv = 150;
    fx_init(&f, D, H, H, 3, 2, n_kv, APEX_DTYPE_F32, 1, 3);
    f.d.softcap = 30.0f;
    uint64_t seed = 99;
    for (int s = 0; s < 2; s++)
        for (int t = 0; t < 3; t++)
            for (int j = 0; j < n_kv; j++) {
                const int hole = test_rand_int(&seed, 5) == 0;
                mask_row(&f, s, t)[j] = hole ? 0xfc00 : apex_f32_to_f16(-0.25f * (float)(j % 3));
            }
    fx_check(&f, 2, 2e-5f);
    /* Double-precision check of one (stream, token, head): the mask folded in. */
    const int s = 1, t = 2, h = 3;
    double ref[80], mx = -INFINITY, sum = 0, w[150];
    const float *q = f.q + ((size_t)(s * 3 + t) * H + h) * D;
    for (int j = 0; j < n_kv; j++) {
        const uint16_t mv = mask_row(&f, s, t)[j];
        if (mv == 0xfc00) { w[j] = -INFINITY; continue; }
        const float *k = (const float *)f.k + (((size_t)s * n_kv + j) * H + h) * D;
        double dot = 0;
        for (int i = 0; i < D; i++) dot += (double)q[i] * k[i];
        w[j] = 30.0 * tanh(dot / sqrt((double)D) / 30.0) + apex_f16_to_f32(mv);
        if (w[j] > mx) mx = w[j];
    }
    for (int i = 0; i < D; i++) ref[i] = 0;
    for (int j = 0; j < n_kv; j++) {
        if (w[j] == -INFINITY) continue;
        const double p = exp(w[j] - mx);
        sum += p;
        const float *v = (const float *)f.v + (((size_t)s * n_kv + j) * H + h) * D;
        for (int i = 0; i < D; i++) ref[i] += p * v[i];
    }
    const float *o = f.out + ((size_t)(s * 3 + t) * H + h) * D;
    for (int i = 0; i < D; i++) assert_true(fabs(o[i] - ref[i] / sum) < 1e-5);
    fx_free(&f);
}

/* One long sequence: the range is cut into chunks merged by log-sum-exp. */
static void test_long_split(void **state) {
    (void)state;
    fixture f;
    const int n_kv = 5000;
    fx_init(&f, 128, 32, 8, 1, 1, n_kv, APEX_DTYPE_F16, 1, 4);
    for (int j = 0; j < n_kv; j++) mask_row(&f, 0, 0)[j] = j < 4999 ? 0 : 0xfc00;
    fx_check(&f, 2, 2e-5f);
    fx_check(&f, 7, 2e-5f);
    /* A sliding window: only the last 1000 visible rows. */
    for (int j = 0; j < n_kv; j++) mask_row(&f, 0, 0)[j] = j >= 3999 && j < 4999 ? 0 : 0xfc00;
    fx_check(&f, 4, 2e-5f);
    /* No mask at all. */
    f.d.mask = NULL;
    fx_check(&f, 3, 2e-5f);
    fx_free(&f);
}

/* ggml_compute_forward_flash_attn_ext_f16_one_chunk on an AVX-512 build,
 * in scalar C: q rounded to f16; ggml_vec_dot_f16's four 16-lane FMA
 * accumulators, folded (0+2)+(1+3), then _mm512_reduce_add_ps's tree (lanes
 * i+8, i+4, i+2, i+1); libm expf; the accumulator rounded to f16 after
 * every scale and every FMA; S = S*ms + vs contracted to an FMA. */
static void ggml_emulate(const cpu_attn_strided_desc *d) {
    const int D = d->head_dim, G = d->n_q_heads / d->n_kv_heads;
    float q[512], acc[512], lanes[4][16], x[16];
    const float scale = d->softcap != 0.0f ? d->scale / d->softcap : d->scale;
    for (int s = 0; s < d->n_streams; s++)
        for (int t = 0; t < d->n_tokens; t++)
            for (int h = 0; h < d->n_q_heads; h++) {
                const float *qs = (const float *)((const char *)d->q + s * d->q_nb_stream + t * d->q_nb_tok +
                                                  h * d->q_nb_head);
                for (int i = 0; i < D; i++) q[i] = apex_f16_to_f32(apex_f32_to_f16(qs[i])), acc[i] = 0.0f;
                const uint16_t *mr = (const uint16_t *)((const char *)d->mask + s * d->mask_nb_stream +
                                                        t * d->mask_nb_tok);
                float M = -INFINITY, S = 0.0f;
                for (int j = 0; j < d->n_kv; j++) {
                    const float mv = apex_f16_to_f32(mr[j]);
                    if (mv == -INFINITY) continue;
                    const uint16_t *k = (const uint16_t *)((const char *)d->k + s * d->k_nb_stream +
                                                           (h / G) * d->k_nb_head + j * d->k_nb_row);
                    const uint16_t *v = (const uint16_t *)((const char *)d->v + s * d->v_nb_stream +
                                                           (h / G) * d->v_nb_head + j * d->v_nb_row);
                    memset(lanes, 0, sizeof lanes);
                    for (int i = 0; i < D; i += 64)
                        for (int a = 0; a < 4; a++)
                            for (int e = 0; e < 16; e++)
                                lanes[a][e] = fmaf(apex_f16_to_f32(k[i + 16 * a + e]), q[i + 16 * a + e], lanes[a][e]);
                    for (int e = 0; e < 16; e++)
                        x[e] = (lanes[0][e] + lanes[2][e]) + (lanes[1][e] + lanes[3][e]);
                    for (int w = 8; w >= 1; w /= 2)
                        for (int e = 0; e < w; e++) x[e] = x[e] + x[e + w];
                    float sc = x[0] * scale;
                    if (d->softcap != 0.0f) sc = d->softcap * tanhf(sc);
                    sc += mv;
                    const float Mold = M;
                    float ms = 1.0f, vs = 1.0f;
                    if (sc > M) {
                        M = sc;
                        ms = expf(Mold - M);
                        for (int i = 0; i < D; i++) acc[i] = apex_f16_to_f32(apex_f32_to_f16(acc[i] * ms));
                    } else {
                        vs = expf(sc - M);
                    }
                    for (int i = 0; i < D; i++)
                        acc[i] = apex_f16_to_f32(apex_f32_to_f16(fmaf(apex_f16_to_f32(v[i]), vs, acc[i])));
                    S = fmaf(S, ms, vs);
                }
                float *o = (float *)((char *)d->out + s * d->out_nb_stream + t * d->out_nb_tok + h * d->out_nb_head);
                const float inv = S == 0.0f ? 0.0f : 1.0f / S;
                for (int i = 0; i < D; i++) o[i] = acc[i] * inv;
            }
}

/* Exact mode equals the emulation bit for bit: GQA decode over prefixes
 * (one empty), a causal prefill over tiles with finite mask values and
 * holes, softcap, and head dims with and without a register accumulator. */
static void test_exact_bitwise(void **state) {
    (void)state;
    if (!cpu_attn_strided_compat_ok(64, APEX_DTYPE_F16)) skip();
    const struct {
        int D, hq, hkv, T, S, n_kv;
        float softcap;
    } cs[] = {{128, 32, 8, 1, 4, 700, 0.0f}, {64, 9, 3, 13, 2, 90, 0.0f}, {64, 4, 1, 3, 2, 200, 30.0f},
              {192, 4, 2, 2, 2, 70, 0.0f}, {256, 8, 8, 1, 3, 130, 0.0f},
              /* one sequence, fewer KV heads than threads want: query heads cut into parts */
              {64, 9, 3, 1, 1, 300, 0.0f}, {128, 32, 8, 1, 1, 400, 0.0f}};
    for (size_t c = 0; c < sizeof cs / sizeof cs[0]; c++) {
        fixture f;
        fx_init(&f, cs[c].D, cs[c].hq, cs[c].hkv, cs[c].T, cs[c].S, cs[c].n_kv, APEX_DTYPE_F16, 1, 10 + c);
        f.d.softcap = cs[c].softcap;
        f.d.ggml_compat = 1;
        uint64_t seed = 77 + c;
        for (int s = 0; s < cs[c].S; s++) {
            const int len = s == 1 && cs[c].T == 1 ? 0 : cs[c].n_kv - 7 * s - cs[c].T;
            for (int t = 0; t < cs[c].T; t++)
                for (int j = 0; j < cs[c].n_kv; j++) {
                    uint16_t mv = j <= len + t ? 0 : 0xfc00;
                    if (mv == 0 && c == 1) {
                        const int r = test_rand_int(&seed, 6);
                        mv = r == 0 ? 0xfc00 : apex_f32_to_f16(-0.5f * (float)r);
                    }
                    mask_row(&f, s, t)[j] = mv;
                }
        }
        const size_t n = (size_t)cs[c].S * cs[c].T * cs[c].hq * cs[c].D;
        cpu_attn_strided_desc e = f.d;
        e.out = f.out_ref;
        ggml_emulate(&e);
        for (int th = 1; th <= 3; th++) {
            memset(f.out, 0x7f, n * 4);
            assert_int_equal(cpu_attn_strided(&f.d, th), 0);
            for (size_t i = 0; i < n; i++)
                if (memcmp(&f.out[i], &f.out_ref[i], 4) != 0)
                    fail_msg("case %zu: out[%zu] = %.9g, ggml's %.9g", c, i, f.out[i], f.out_ref[i]);
        }
        fx_free(&f);
    }
}

static void test_rejects(void **state) {
    (void)state;
    fixture f;
    fx_init(&f, 64, 9, 3, 1, 1, 16, APEX_DTYPE_F16, 1, 5);
    for (int j = 0; j < 16; j++) mask_row(&f, 0, 0)[j] = 0;
    assert_int_equal(cpu_attn_strided_check(&f.d), 0);
    cpu_attn_strided_desc b = f.d;
    b.n_kv_heads = 2; /* 9 query heads do not share 2 KV heads evenly */
    assert_int_equal(cpu_attn_strided(&b, 2), -1);
    b = f.d, b.kv_dtype = APEX_DTYPE_BF16;
    assert_int_equal(cpu_attn_strided(&b, 2), -1);
    b = f.d, b.scale = 0.0f;
    assert_int_equal(cpu_attn_strided_reference(&b), -1);
    b = f.d, b.head_dim = 1024;
    assert_int_equal(cpu_attn_strided_check(&b), -1);
    b = f.d, b.q = NULL;
    assert_int_equal(cpu_attn_strided(&b, 2), -1);
    assert_int_equal(cpu_attn_strided_check(NULL), -1);
    const char *isa = cpu_attn_strided_isa();
    assert_true(strcmp(isa, "avx512") == 0 || strcmp(isa, "scalar") == 0);
    fx_free(&f);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_decode_gqa_prefix),
        cmocka_unit_test(test_prefill_causal),
        cmocka_unit_test(test_mha_f32_softcap_holes),
        cmocka_unit_test(test_long_split),
        cmocka_unit_test(test_exact_bitwise),
        cmocka_unit_test(test_rejects),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
