/*
 * fuzz_ggml.c - the ggml backend's entry points (shim/ggml_apex*.c) under
 * libFuzzer, against ggml-cpu as the reference:
 *  - FLASH_ATTN_EXT with arbitrary head dims, head counts, KV lengths,
 *    query tokens, streams, K/V types, views (strides), masks and op params
 *    (scale, ALiBi bias, softcap): supports_op must not crash; what APEX
 *    accepts it computes successfully and equal to ggml-cpu (where the mask
 *    leaves every query row something to attend);
 *  - SET_ROWS into a KV-cache tensor with arbitrary row indices: accepted
 *    ops store exactly the rows ggml-cpu stores; an out-of-range index fails
 *    the op and changes nothing;
 *  - the KV buffer type (the proc "ggml_backend_kv_cache_buffer_type" with
 *    arbitrary types and head dims): a buffer it hands out allocates,
 *    clears, and stores and returns tensor bytes.
 * Graphs are only built within what ggml's own constructors accept (their
 * asserts are ggml's, not the backend's). Only geometries the backend
 * takes are generated: one it declines (head_dim, KV type, ALiBi) turns
 * the backend's KV writes off for the rest of the process, by design, which
 * would end the SET_ROWS half of the run. fp32 mode (APEX_GGML_EXACT=0):
 * exact mode needs AVX-512, and declines everything on a CPU without it.
 */
#include <float.h>

#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"
#include "fuzz_util.h"
#include "shim/ggml_apex.h"

ggml_backend_reg_t ggml_apex_reg(void);

typedef ggml_backend_buffer_type_t (*kv_buft_fn)(ggml_backend_buffer_type_t, enum ggml_type, enum ggml_type,
                                                 int64_t, int64_t, bool);

static ggml_backend_t apex_be, cpu_be;
static ggml_backend_dev_t apex_dev;
static kv_buft_fn kv_buft;

static void init_once(void) {
    if (apex_be) return;
    setenv("APEX_GGML_QUIET", "1", 1);
    setenv("APEX_GGML_EXACT", "0", 1);
    ggml_backend_reg_t reg = ggml_apex_reg();
    apex_dev = ggml_backend_reg_dev_get(reg, 0);
    apex_be = ggml_backend_dev_init(apex_dev, NULL);
    void (*set_threads)(ggml_backend_t, int) =
        (void (*)(ggml_backend_t, int))ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads");
    if (set_threads) set_threads(apex_be, 1);
    kv_buft = (kv_buft_fn)ggml_backend_reg_get_proc_address(reg, "ggml_backend_kv_cache_buffer_type");
    cpu_be = ggml_backend_cpu_init();
    ggml_backend_cpu_set_n_threads(cpu_be, 1);
}

static void fill(struct ggml_tensor *t, uint64_t *rng) {
    int64_t n = ggml_nelements(t);
    if (t->type == GGML_TYPE_F32)
        for (int64_t i = 0; i < n; i++) ((float *)t->data)[i] = fz_randf(rng);
    else if (t->type == GGML_TYPE_F16)
        for (int64_t i = 0; i < n; i++) ((ggml_fp16_t *)t->data)[i] = ggml_fp32_to_fp16(fz_randf(rng));
    else
        for (size_t i = 0; i < ggml_nbytes(t); i++) ((uint8_t *)t->data)[i] = (uint8_t)fz_rand(rng);
}

static enum ggml_status compute(ggml_backend_t be, struct ggml_context *ctx, struct ggml_tensor *node) {
    struct ggml_cgraph *g = ggml_new_graph(ctx);
    ggml_build_forward_expand(g, node);
    return ggml_backend_graph_compute(be, g);
}

static const int64_t dims[] = {64, 80, 96, 128, 256};
static const enum ggml_type kv_types[] = {GGML_TYPE_F16, GGML_TYPE_F32};

/* Masks whose rows start past 0 (sliding windows) once gave NaN rows where
 * ggml-cpu had numbers: the fp32 kernel read score lanes past a group's end
 * from scratch memory (regression input: corpus/ggml/regress-windowed-mask-nan). */

static void fuzz_fa(fz *f, uint64_t *rng) {
    int64_t D = dims[fz_below(f, 5)], Dv = D;
    int64_t hk = 1 + fz_below(f, 4), hq = hk * (1 + fz_below(f, 4));
    int64_t nkv = 1 + fz_below(f, 96) * (fz_u8(f) > 200 ? 8 : 1);
    int64_t T = 1 + (fz_u8(f) > 200 ? fz_below(f, 70) : fz_below(f, 4));
    int64_t S = 1 + fz_below(f, 3);
    enum ggml_type tk = kv_types[fz_below(f, 2)], tv = tk;
    int cache = fz_u8(f) & 1;         /* views of a named KV cache */
    int64_t extra = cache ? fz_below(f, 40) : 0; /* cache rows past the view */
    size_t mem = 64u << 20;
    struct ggml_init_params ip = {mem, NULL, false};
    struct ggml_context *ctx = ggml_init(ip);
    if (!ctx) return;
    struct ggml_tensor *q = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, D, T, hq, S);
    struct ggml_tensor *k, *v;
    if (cache) {
        struct ggml_tensor *kc = ggml_new_tensor_4d(ctx, tk, D, nkv + extra, hk, S);
        struct ggml_tensor *vc = ggml_new_tensor_4d(ctx, tv, Dv, nkv + extra, hk, S);
        ggml_set_name(kc, "cache_k_l0");
        ggml_set_name(vc, "cache_v_l0");
        fill(kc, rng);
        fill(vc, rng);
        k = ggml_view_4d(ctx, kc, D, nkv, hk, S, kc->nb[1], kc->nb[2], kc->nb[3], 0);
        v = ggml_view_4d(ctx, vc, Dv, nkv, hk, S, vc->nb[1], vc->nb[2], vc->nb[3], 0);
    } else {
        k = ggml_new_tensor_4d(ctx, tk, D, nkv, hk, S);
        v = ggml_new_tensor_4d(ctx, tv, Dv, nkv, hk, S);
        fill(k, rng);
        fill(v, rng);
    }
    fill(q, rng);
    struct ggml_tensor *mask = NULL;
    int all_visible_rows = 1;
    if (fz_u8(f) > 60) {
        int64_t tpad = T + fz_below(f, 4); /* rows past T: padding, as llama.cpp has it */
        int64_t ms = fz_u8(f) & 1 ? S : 1;
        mask = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, nkv, tpad, 1, ms);
        for (int64_t s = 0; s < ms; s++)
            for (int64_t t = 0; t < tpad; t++) {
                /* Each row sees [lo, hi): causal-like windows, sometimes nothing. */
                int64_t hi = nkv - (T - 1 - (t < T ? t : T - 1));
                int64_t lo = fz_u8(f) > 220 ? fz_below(f, (int32_t)nkv) : 0;
                if (hi < 1) hi = 1;
                if (lo >= hi) all_visible_rows = 0;
                for (int64_t j = 0; j < nkv; j++)
                    ((ggml_fp16_t *)mask->data)[(s * tpad + t) * nkv + j] =
                        ggml_fp32_to_fp16(j >= lo && j < hi ? 0.0f : -INFINITY);
            }
    }
    float scale = fz_u8(f) > 230 ? fz_float(f, 0.1f) : 1.0f / sqrtf((float)D);
    float max_bias = 0.0f; /* ALiBi: declined (see the top) */
    float softcap = fz_u8(f) > 200 ? fz_float(f, 30.0f) : 0.0f;
    struct ggml_tensor *out = ggml_flash_attn_ext(ctx, q, k, v, mask, scale, max_bias, softcap);
    int ok = ggml_backend_dev_supports_op(apex_dev, out);
    if (ok) {
        enum ggml_status st = compute(apex_be, ctx, out);
        FZ_CHECK(st == GGML_STATUS_SUCCESS, "APEX accepted FLASH_ATTN_EXT but failed it (D %lld hq %lld hk %lld "
                 "nkv %lld T %lld S %lld scale %g softcap %g)", (long long)D, (long long)hq, (long long)hk,
                 (long long)nkv, (long long)T, (long long)S, scale, softcap);
        size_t nb = ggml_nbytes(out);
        float *got = malloc(nb);
        memcpy(got, out->data, nb);
        /* The reference, where every number is ordinary. */
        int plain = all_visible_rows && isfinite(scale) && scale > 0 && scale < 10 && isfinite(softcap) &&
                    softcap >= 0 && softcap < 1e4 && (softcap == 0 || softcap > 1e-3);
        if (plain && compute(cpu_be, ctx, out) == GGML_STATUS_SUCCESS) {
            const float *want = out->data;
            for (size_t i = 0; i < nb / sizeof(float); i++)
                FZ_CHECK(fabsf(got[i] - want[i]) <= 2e-2f + 2e-2f * fabsf(want[i]),
                         "FLASH_ATTN_EXT element %zu: APEX %g, ggml-cpu %g (D %lld hq %lld hk %lld nkv %lld T "
                         "%lld S %lld types %d/%d softcap %g)", i, got[i], want[i], (long long)D,
                         (long long)hq, (long long)hk, (long long)nkv, (long long)T, (long long)S, tk, tv,
                         softcap);
        }
        free(got);
    }
    ggml_free(ctx);
}

static void fuzz_set_rows(fz *f, uint64_t *rng) {
    int64_t W = 16 * (1 + fz_below(f, 16)) + (fz_u8(f) > 240 ? fz_below(f, 16) : 0);
    int64_t R = 1 + fz_below(f, 64), N = 1 + fz_below(f, 16);
    enum ggml_type dt = fz_u8(f) & 1 ? GGML_TYPE_F16 : GGML_TYPE_F32;
    enum ggml_type it = fz_u8(f) & 1 ? GGML_TYPE_I64 : GGML_TYPE_I32;
    struct ggml_init_params ip = {16u << 20, NULL, false};
    struct ggml_context *ctx = ggml_init(ip);
    if (!ctx) return;
    struct ggml_tensor *dst = ggml_new_tensor_2d(ctx, dt, W, R);
    ggml_set_name(dst, fz_u8(f) > 20 ? "cache_k_l3" : "not_a_cache");
    struct ggml_tensor *src = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, W, N);
    struct ggml_tensor *idx = ggml_new_tensor_1d(ctx, it, N);
    fill(dst, rng);
    fill(src, rng);
    int in_range = 1;
    for (int64_t i = 0; i < N; i++) {
        int64_t r = fz_u8(f) > 235 ? (int64_t)(int32_t)fz_u32(f) : fz_below(f, (int32_t)R);
        in_range &= r >= 0 && r < R;
        if (it == GGML_TYPE_I64) ((int64_t *)idx->data)[i] = r;
        else ((int32_t *)idx->data)[i] = (int32_t)r;
    }
    struct ggml_tensor *node = ggml_set_rows(ctx, dst, src, idx);
    if (ggml_backend_dev_supports_op(apex_dev, node)) {
        size_t nb = ggml_nbytes(dst);
        uint8_t *before = malloc(nb);
        memcpy(before, dst->data, nb);
        enum ggml_status st = compute(apex_be, ctx, node);
        if (!in_range) {
            FZ_CHECK(st != GGML_STATUS_SUCCESS, "SET_ROWS with an out-of-range row succeeded");
            FZ_CHECK(!memcmp(before, dst->data, nb), "a failed SET_ROWS changed the cache");
        } else {
            FZ_CHECK(st == GGML_STATUS_SUCCESS, "SET_ROWS failed");
            uint8_t *got = malloc(nb);
            memcpy(got, dst->data, nb);
            memcpy(dst->data, before, nb);
            FZ_CHECK(compute(cpu_be, ctx, node) == GGML_STATUS_SUCCESS, "ggml-cpu SET_ROWS");
            FZ_CHECK(!memcmp(got, dst->data, nb), "SET_ROWS stored other bytes than ggml-cpu");
            free(got);
        }
        free(before);
    }
    ggml_free(ctx);
}

static void fuzz_buffer(fz *f) {
    if (!kv_buft) return;
    static const enum ggml_type types[] = {GGML_TYPE_F16, GGML_TYPE_F32, GGML_TYPE_Q8_0, GGML_TYPE_BF16};
    ggml_backend_buffer_type_t b =
        kv_buft(ggml_backend_cpu_buffer_type(), types[fz_below(f, 4)], types[fz_below(f, 4)],
                fz_int(f, 0, 300), fz_int(f, 0, 300), fz_u8(f) > 200);
    if (!b) return;
    size_t size = (size_t)fz_below(f, 64) * 4096 + (size_t)fz_below(f, 64);
    ggml_backend_buffer_t buf = ggml_backend_buft_alloc_buffer(b, size);
    if (!buf) return;
    uint8_t v = fz_u8(f);
    ggml_backend_buffer_clear(buf, v);
    uint8_t *base = ggml_backend_buffer_get_base(buf);
    size_t n = ggml_backend_buffer_get_size(buf);
    for (size_t i = 0; i < n; i++) FZ_CHECK(base[i] == v, "clear left byte %zu", i);
    if (n >= 256) { /* a tensor in the buffer: set, get back */
        struct ggml_init_params ip = {ggml_tensor_overhead() * 2, NULL, true};
        struct ggml_context *ctx = ggml_init(ip);
        struct ggml_tensor *t = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, 32);
        size_t off = (size_t)fz_below(f, (int32_t)((n - 128) / 64)) * 64;
        FZ_CHECK(ggml_backend_tensor_alloc(buf, t, base + off) == GGML_STATUS_SUCCESS, "tensor_alloc");
        float in[32], back[32];
        for (int i = 0; i < 32; i++) in[i] = (float)i * 0.5f;
        ggml_backend_tensor_set(t, in, 0, sizeof in);
        ggml_backend_tensor_get(t, back, 0, sizeof back);
        FZ_CHECK(!memcmp(in, back, sizeof in), "tensor bytes differ after set/get");
        ggml_free(ctx);
    }
    ggml_backend_buffer_free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    init_once();
    fz f = {data, size, 0};
    uint64_t rng = 99;
    switch (fz_u8(&f) % 4) {
    case 0: case 1: fuzz_fa(&f, &rng); break;
    case 2: fuzz_set_rows(&f, &rng); break;
    case 3: fuzz_buffer(&f); break;
    }
    return 0;
}
