/*
 * test_cuda_kernels.c - every CUDA kernel of the GPU tier against a CPU
 * definition: paged decode against cpu_attn_reference, prefill against a
 * causal reference written here, KV append and cohort gather/scatter
 * bit-exact, and the driver's stream memory operations.
 *
 * Prints one JSON object on stdout (diagnostics go to stderr). Exit status:
 * 0 all passed, 1 a check failed, 77 no CUDA device (skipped).
 * Usage: test_cuda_kernels [--quick]
 */
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda_runtime_api.h>

#include "cpu_attn/cpu_attn.h"
#include "cpu_attn/cpu_prefill.h"
#include "cpu_attn/dtype_convert.h"
#include "csrc/device.h"
#include "cuda/apex_cuda.h"
#include "tests/gpu/gpu_check.h"

/* ------------------------------------------------------------ harness */

static int g_failed;
static int g_checks;
static char g_fail_log[8192];

static void fail(const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "FAIL: %s\n", msg);
    g_failed++;
    size_t used = strlen(g_fail_log);
    if (g_failed <= 20 && used + strlen(msg) + 8 < sizeof g_fail_log) {
        char *o = g_fail_log + used;
        if (used) *o++ = ',';
        *o++ = '"';
        for (const char *c = msg; *c; c++)
            if (*c != '"' && *c != '\\') *o++ = *c;
        *o++ = '"';
        *o = 0;
    }
}


static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return g_rng;
}
static float frand(void) { return (float)((double)(rnd() >> 11) / 9007199254740992.0) * 2.0f - 1.0f; }
static int irand(int n) { return (int)(rnd() % (uint64_t)n); }

static const char *dt_name(apex_dtype t) {
    return t == APEX_DTYPE_F16 ? "f16" : t == APEX_DTYPE_BF16 ? "bf16" : "f32";
}

static void *dmalloc(size_t n) {
    void *p = NULL;
    CK(cudaMalloc(&p, n ? n : 16));
    return p;
}
static void *upload(const void *h, size_t n) {
    void *d = dmalloc(n);
    if (n) CK(cudaMemcpy(d, h, n, cudaMemcpyHostToDevice));
    return d;
}
static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 16);
    if (!p) {
        fprintf(stderr, "out of host memory\n");
        exit(1);
    }
    return p;
}

/* Fills n elements of type t with uniform [-1, 1) values. */
static void fill_rand(void *p, apex_dtype t, size_t n) {
    for (size_t i = 0; i < n; i++) apex_store_f32(p, t, i, frand());
}

/* Worst error per output dtype, over every case. */
static double g_max_err[3];
static double out_tol(apex_dtype t) {
    /* half an ulp at |x| < 1 plus fp32 accumulation noise */
    return t == APEX_DTYPE_BF16 ? 6e-3 : t == APEX_DTYPE_F16 ? 1e-3 : 5e-5;
}

/* Compares n outputs (type t, from the GPU) against fp32 expectations.
 * Returns the max abs error; NaN (an unwritten poisoned output) fails. */
static double compare_out(const void *got, apex_dtype t, const float *want, size_t n,
                          const char *what) {
    double worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        float g = apex_load_f32(got, t, i);
        double e = fabs((double)g - (double)want[i]);
        if (!(e == e) || isinf(g)) e = INFINITY;
        if (e > worst) worst = e;
    }
    g_checks++;
    if (worst > g_max_err[t]) g_max_err[t] = worst;
    if (!(worst <= out_tol(t))) fail("%s: max abs err %.3g > %.3g", what, worst, out_tol(t));
    return worst;
}

/* ------------------------------------------------------------ decode */

typedef struct {
    apex_dtype kv, q, out;
    int D, hq, hkv, bt;
    int n;
    const int *lens;
    int window;
    float softcap;
    int splits; /* 0 = auto */
} decode_case;

static int g_decode_cases, g_decode_split_cases, g_decode_max_splits;

static void run_decode(const decode_case *c) {
    const int D = c->D, n = c->n;
    const size_t ksz = apex_dtype_size(c->kv);
    const size_t block_bytes = 2 * (size_t)c->hkv * c->bt * D * ksz;
    int max_len = 0, stride = 0;
    int64_t blocks = 0;
    for (int i = 0; i < n; i++) {
        int nb = (c->lens[i] + c->bt - 1) / c->bt;
        if (c->lens[i] > max_len) max_len = c->lens[i];
        if (nb + 1 > stride) stride = nb + 1;
        blocks += nb;
    }
    blocks += 3; /* spare blocks nobody owns */
    /* A random permutation of block ids: sequences' blocks are scattered. */
    int32_t *perm = xmalloc((size_t)blocks * sizeof *perm);
    for (int64_t b = 0; b < blocks; b++) perm[b] = (int32_t)b;
    for (int64_t b = blocks - 1; b > 0; b--) {
        int64_t j = (int64_t)(rnd() % (uint64_t)(b + 1));
        int32_t t = perm[b];
        perm[b] = perm[j];
        perm[j] = t;
    }
    int32_t *table = xmalloc((size_t)n * stride * sizeof *table);
    int64_t next = 0;
    for (int i = 0; i < n; i++) {
        int nb = (c->lens[i] + c->bt - 1) / c->bt;
        for (int b = 0; b < stride; b++) table[(size_t)i * stride + b] = b < nb ? perm[next++] : -1;
    }
    uint8_t *pool = xmalloc((size_t)blocks * block_bytes);
    fill_rand(pool, c->kv, (size_t)blocks * block_bytes / ksz);
    /* Rows past each sequence's end get large values: reading one shows. */
    for (int i = 0; i < n; i++) {
        int nb = (c->lens[i] + c->bt - 1) / c->bt;
        for (int t = c->lens[i]; t < nb * c->bt; t++) {
            uint8_t *blk = pool + (size_t)table[(size_t)i * stride + t / c->bt] * block_bytes;
            for (int w = 0; w < 2; w++)
                for (int h = 0; h < c->hkv; h++)
                    for (int d = 0; d < D; d++)
                        apex_store_f32(blk, c->kv,
                                       (((size_t)w * c->hkv + h) * c->bt + t % c->bt) * D + d,
                                       50.0f);
        }
    }
    const size_t qn = (size_t)n * c->hq * D;
    void *q = xmalloc(qn * apex_dtype_size(c->q));
    fill_rand(q, c->q, qn);
    int32_t *lens = xmalloc((size_t)n * sizeof *lens);
    for (int i = 0; i < n; i++) lens[i] = c->lens[i];
    const float scale = c->softcap > 0 ? 2.0f : 1.0f / sqrtf((float)D);

    float *ref = xmalloc(qn * sizeof *ref);
    cpu_attn_geom g = {c->hq, c->hkv, D, c->bt, c->kv, 0};
#pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < n; i++) {
        cpu_attn_batch b;
        memset(&b, 0, sizeof b);
        b.n_seqs = 1;
        b.q = (const uint8_t *)q + (size_t)i * c->hq * D * apex_dtype_size(c->q);
        b.q_dtype = c->q;
        b.out = ref + (size_t)i * c->hq * D;
        b.out_dtype = APEX_DTYPE_F32;
        b.seq_lens = lens + i;
        b.block_table = table + (size_t)i * stride;
        b.block_table_stride = stride;
        b.kv = pool;
        b.block_bytes = block_bytes;
        b.scale = scale;
        b.softcap = c->softcap;
        b.window = c->window;
        cpu_attn_reference(&g, &b);
    }

    apex_cuda_decode a;
    memset(&a, 0, sizeof a);
    a.n_seqs = n;
    a.n_q_heads = c->hq;
    a.n_kv_heads = c->hkv;
    a.head_dim = D;
    a.block_tokens = c->bt;
    a.kv_dtype = c->kv;
    a.q_dtype = c->q;
    a.out_dtype = c->out;
    a.q = upload(q, qn * apex_dtype_size(c->q));
    const size_t out_bytes = qn * apex_dtype_size(c->out);
    a.out = dmalloc(out_bytes);
    CK(cudaMemset(a.out, 0xff, out_bytes)); /* NaN in every dtype */
    a.seq_lens = upload(lens, (size_t)n * sizeof *lens);
    a.block_table = upload(table, (size_t)n * stride * sizeof *table);
    a.block_table_stride = stride;
    a.kv = upload(pool, (size_t)blocks * block_bytes);
    a.block_bytes = block_bytes;
    a.scale = scale;
    a.softcap = c->softcap;
    a.window = c->window;
    a.max_seq_len = max_len;
    a.workspace_bytes = apex_cuda_decode_workspace_bytes(n, c->hq, D);
    if (c->splits) a.workspace_bytes *= 4;
    a.workspace = dmalloc(a.workspace_bytes);
    a.num_splits = c->splits;
    const int splits = apex_cuda_decode_splits(&a);

    char what[200];
    snprintf(what, sizeof what,
             "decode kv=%s q=%s out=%s D=%d hq=%d hkv=%d bt=%d n=%d maxlen=%d win=%d cap=%g splits=%d",
             dt_name(c->kv), dt_name(c->q), dt_name(c->out), D, c->hq, c->hkv, c->bt, n, max_len,
             c->window, c->softcap, splits);
    int rc = apex_cuda_paged_decode(&a, NULL);
    cudaError_t se = cudaDeviceSynchronize();
    if (rc || se != cudaSuccess) {
        fail("%s: launch rc=%d (%s), sync %s", what, rc, apex_cuda_error_string(rc),
             cudaGetErrorString(se));
        if (se != cudaSuccess) exit(1); /* the context is gone */
    } else {
        void *got = xmalloc(out_bytes);
        CK(cudaMemcpy(got, a.out, out_bytes, cudaMemcpyDeviceToHost));
        compare_out(got, c->out, ref, qn, what);
        free(got);
    }
    g_decode_cases++;
    if (splits > 1) g_decode_split_cases++;
    if (splits > g_decode_max_splits) g_decode_max_splits = splits;

    cudaFree((void *)a.q);
    cudaFree(a.out);
    cudaFree((void *)a.seq_lens);
    cudaFree((void *)a.block_table);
    cudaFree((void *)a.kv);
    cudaFree(a.workspace);
    free(perm);
    free(table);
    free(pool);
    free(q);
    free(lens);
    free(ref);
}

static void test_decode(int quick) {
    static const apex_dtype dts[3] = {APEX_DTYPE_F16, APEX_DTYPE_BF16, APEX_DTYPE_F32};
    static const int dims[5] = {64, 80, 96, 128, 256};
    static const int heads[5][2] = {{4, 4}, {8, 2}, {16, 2}, {12, 1}, {6, 2}}; /* G 1,4,8,12,3 */
    static const int bts[3] = {8, 16, 32};
    int k = 0;
    for (int di = 0; di < 3; di++)
        for (int dd = 0; dd < 5; dd++)
            for (int hh = 0; hh < 5; hh++)
                for (int bb = 0; bb < 3; bb++, k++) {
                    if (quick && k % 7) continue;
                    int lens[5];
                    const int n = 1 + irand(5);
                    for (int i = 0; i < n; i++) lens[i] = 1 + irand(i == 0 ? 700 : 90);
                    if (k % 3 == 0) lens[0] = 1;
                    decode_case c = {dts[di], dts[(di + k) % 3], dts[(di + 2 * k) % 3],
                                     dims[dd], heads[hh][0], heads[hh][1], bts[bb], n, lens,
                                     k % 4 == 1 ? 1 + irand(64) : 0, k % 5 == 2 ? 30.0f : 0.0f,
                                     k % 6 == 3 ? 2 + irand(9) : 0};
                    run_decode(&c);
                }

    /* Split-K: long and ragged batches with the automatic split count. */
    const int l1[1] = {32768};
    const int l2[3] = {32768, 17, 5001};
    const int l3[4] = {1, 8191, 300, 12000};
    const int l4[2] = {20000, 3};
    decode_case longs[] = {
        {APEX_DTYPE_F16, APEX_DTYPE_F16, APEX_DTYPE_F16, 128, 32, 8, 16, 1, l1, 0, 0, 0},
        {APEX_DTYPE_F16, APEX_DTYPE_F32, APEX_DTYPE_F32, 128, 32, 8, 16, 3, l2, 0, 0, 0},
        {APEX_DTYPE_BF16, APEX_DTYPE_BF16, APEX_DTYPE_BF16, 256, 16, 2, 32, 4, l3, 0, 0, 0},
        {APEX_DTYPE_BF16, APEX_DTYPE_F32, APEX_DTYPE_F32, 64, 8, 1, 8, 2, l4, 4096, 0, 0},
        {APEX_DTYPE_F32, APEX_DTYPE_F32, APEX_DTYPE_F32, 80, 8, 8, 16, 4, l3, 0, 50.0f, 0},
        {APEX_DTYPE_F16, APEX_DTYPE_BF16, APEX_DTYPE_F16, 96, 24, 3, 8, 2, l4, 0, 0, 0},
        /* forced counts: empty splits for the short sequences, odd chunks */
        {APEX_DTYPE_F16, APEX_DTYPE_F16, APEX_DTYPE_F32, 128, 32, 8, 16, 4, l3, 0, 0, 128},
        {APEX_DTYPE_F16, APEX_DTYPE_F16, APEX_DTYPE_F32, 128, 32, 8, 16, 4, l3, 777, 0, 33},
        {APEX_DTYPE_BF16, APEX_DTYPE_F16, APEX_DTYPE_F32, 256, 64, 4, 32, 3, l2, 0, 20.0f, 7},
    };
    const int n_long = (int)(sizeof longs / sizeof longs[0]);
    for (int i = 0; i < n_long; i++) {
        if (quick && i % 3) continue;
        run_decode(&longs[i]);
    }
}

/* ------------------------------------------------------------ KV append */

static int g_append_cases;

/* The pool a correct append leaves: the old pool with converted rows. */
static void append_expect(uint8_t *pool, apex_dtype kvt, size_t block_bytes, int hkv, int bt,
                          int D, int n, const int64_t *slots, const void *k, const void *v,
                          int64_t k_stride, int64_t v_stride, apex_dtype st) {
    for (int r = 0; r < n; r++) {
        if (slots[r] < 0) continue;
        uint8_t *blk = pool + (size_t)(slots[r] / bt) * block_bytes;
        int off = (int)(slots[r] % bt);
        for (int w = 0; w < 2; w++)
            for (int h = 0; h < hkv; h++)
                for (int d = 0; d < D; d++) {
                    float x = apex_load_f32(w ? v : k, st,
                                            (size_t)r * (size_t)(w ? v_stride : k_stride) +
                                                (size_t)h * D + d);
                    apex_store_f32(blk, kvt, (((size_t)w * hkv + h) * bt + off) * D + d, x);
                }
    }
}

static void test_kv_append(void) {
    static const apex_dtype dts[3] = {APEX_DTYPE_F32, APEX_DTYPE_F16, APEX_DTYPE_BF16};
    for (int si = 0; si < 3; si++)
        for (int di = 0; di < 3; di++) {
            const int hkv = 1 + irand(4), D = (int[]){64, 80, 96, 128, 256}[irand(5)];
            const int bt = (int[]){8, 16, 32}[irand(3)], nblocks = 9, n = 37;
            const apex_dtype st = dts[si], kvt = dts[di];
            const size_t bb = 2 * (size_t)hkv * bt * D * apex_dtype_size(kvt);
            const int64_t kst = (int64_t)hkv * D + 8 * (si == 1); /* a strided case */
            uint8_t *pool = xmalloc(nblocks * bb);
            fill_rand(pool, kvt, nblocks * bb / apex_dtype_size(kvt));
            void *k = xmalloc((size_t)n * kst * 4), *v = xmalloc((size_t)n * hkv * D * 4);
            fill_rand(k, st, (size_t)n * kst);
            fill_rand(v, st, (size_t)n * hkv * D);
            /* distinct slots, a few skipped */
            int64_t *slots = xmalloc(n * sizeof *slots);
            int total = nblocks * bt;
            int *taken = calloc((size_t)total, sizeof *taken);
            for (int r = 0; r < n; r++) {
                int s;
                do s = irand(total); while (taken[s]);
                taken[s] = 1;
                slots[r] = r % 10 == 3 ? -1 : s;
            }
            apex_cuda_kv_append a = {n, hkv, D, bt, upload(k, (size_t)n * kst * apex_dtype_size(st)),
                                     upload(v, (size_t)n * hkv * D * apex_dtype_size(st)), kst, 0, st,
                                     upload(slots, n * sizeof *slots), upload(pool, nblocks * bb), bb,
                                     kvt};
            int rc = apex_cuda_kv_append_rows(&a, NULL);
            CK(cudaDeviceSynchronize());
            append_expect(pool, kvt, bb, hkv, bt, D, n, slots, k, v, kst, (int64_t)hkv * D, st);
            uint8_t *got = xmalloc(nblocks * bb);
            CK(cudaMemcpy(got, a.kv, nblocks * bb, cudaMemcpyDeviceToHost));
            g_checks++;
            if (rc || memcmp(got, pool, nblocks * bb))
                fail("kv_append %s->%s D=%d hkv=%d bt=%d: rc=%d, pool differs", dt_name(st),
                     dt_name(kvt), D, hkv, bt, rc);
            g_append_cases++;
            cudaFree((void *)a.k);
            cudaFree((void *)a.v);
            cudaFree((void *)a.slots);
            cudaFree(a.kv);
            free(pool), free(k), free(v), free(slots), free(taken), free(got);
        }
}

/* ------------------------------------------------------------ prefill */

static int g_prefill_cases;

static void run_prefill(apex_dtype act, apex_dtype outt, apex_dtype kvt, int D, int hq, int hkv,
                        int bt, int n_seqs, const int *lens, int window, float softcap, int fused) {
    int cu[17];
    cu[0] = 0;
    int max_len = 0;
    for (int s = 0; s < n_seqs; s++) {
        cu[s + 1] = cu[s] + lens[s];
        if (lens[s] > max_len) max_len = lens[s];
    }
    const int T = cu[n_seqs];
    const size_t as = apex_dtype_size(act);
    /* fused: one [T][hq + 2 hkv][D] buffer, as a QKV projection writes it */
    const int64_t row = fused ? (int64_t)(hq + 2 * hkv) * D : 0;
    const int64_t qs = fused ? row : (int64_t)hq * D, ks = fused ? row : (int64_t)hkv * D;
    void *qkv = NULL, *q, *k, *v;
    if (fused) {
        qkv = xmalloc((size_t)T * row * as);
        fill_rand(qkv, act, (size_t)T * row);
        q = qkv;
        k = (uint8_t *)qkv + (size_t)hq * D * as;
        v = (uint8_t *)qkv + (size_t)(hq + hkv) * D * as;
    } else {
        q = xmalloc((size_t)T * qs * as);
        k = xmalloc((size_t)T * ks * as);
        v = xmalloc((size_t)T * ks * as);
        fill_rand(q, act, (size_t)T * qs);
        fill_rand(k, act, (size_t)T * ks);
        fill_rand(v, act, (size_t)T * ks);
    }
    const float scale = softcap > 0 ? 1.5f : 1.0f / sqrtf((float)D);
    float *ref = xmalloc((size_t)T * hq * D * sizeof *ref);
    const cpu_prefill_batch rb = {
        .n_seqs = n_seqs, .cu_seqlens = cu, .n_q_heads = hq, .n_kv_heads = hkv, .head_dim = D,
        .q = q, .k = k, .v = v, .q_stride = qs, .k_stride = ks, .v_stride = ks,
        .act_dtype = act, .out = ref, .out_dtype = APEX_DTYPE_F32, .scale = scale,
        .softcap = softcap, .window = window,
    };
    if (cpu_prefill_reference(&rb)) {
        fprintf(stderr, "prefill reference: out of memory\n");
        exit(1);
    }

    /* pool: every sequence's positions land in shuffled blocks */
    int nblocks = 2;
    for (int s = 0; s < n_seqs; s++) nblocks += (lens[s] + bt - 1) / bt;
    const size_t bb = 2 * (size_t)hkv * bt * D * apex_dtype_size(kvt);
    uint8_t *pool = xmalloc((size_t)nblocks * bb);
    fill_rand(pool, kvt, (size_t)nblocks * bb / apex_dtype_size(kvt));
    int *perm = xmalloc(nblocks * sizeof *perm);
    for (int b = 0; b < nblocks; b++) perm[b] = b;
    for (int b = nblocks - 1; b > 0; b--) {
        int j = irand(b + 1), t = perm[b];
        perm[b] = perm[j];
        perm[j] = t;
    }
    int64_t *slots = xmalloc((size_t)T * sizeof *slots);
    int nb = 0;
    for (int s = 0; s < n_seqs; s++) {
        for (int i = 0; i < lens[s]; i++) slots[cu[s] + i] = (int64_t)perm[nb + i / bt] * bt + i % bt;
        nb += (lens[s] + bt - 1) / bt;
    }

    apex_cuda_prefill a;
    memset(&a, 0, sizeof a);
    a.n_seqs = n_seqs;
    a.n_tokens = T;
    a.n_q_heads = hq;
    a.n_kv_heads = hkv;
    a.head_dim = D;
    a.cu_seqlens = upload(cu, (size_t)(n_seqs + 1) * sizeof(int));
    a.max_seq_len = max_len;
    void *dq, *dk, *dv;
    if (fused) {
        dq = upload(qkv, (size_t)T * row * as);
        dk = (uint8_t *)dq + (size_t)hq * D * as;
        dv = (uint8_t *)dq + (size_t)(hq + hkv) * D * as;
    } else {
        dq = upload(q, (size_t)T * qs * as);
        dk = upload(k, (size_t)T * ks * as);
        dv = upload(v, (size_t)T * ks * as);
    }
    a.q = dq;
    a.k = dk;
    a.v = dv;
    a.q_stride = fused ? row : 0;
    a.k_stride = fused ? row : 0;
    a.v_stride = fused ? row : 0;
    a.act_dtype = act;
    const size_t ob = (size_t)T * hq * D * apex_dtype_size(outt);
    a.out = dmalloc(ob);
    CK(cudaMemset(a.out, 0xff, ob));
    a.out_dtype = outt;
    a.scale = scale;
    a.softcap = softcap;
    a.window = window;
    a.kv = upload(pool, (size_t)nblocks * bb);
    a.block_bytes = bb;
    a.block_tokens = bt;
    a.kv_dtype = kvt;
    a.slots = upload(slots, (size_t)T * sizeof *slots);

    char what[200];
    snprintf(what, sizeof what, "prefill act=%s out=%s kv=%s D=%d hq=%d hkv=%d seqs=%d T=%d win=%d cap=%g fused=%d",
             dt_name(act), dt_name(outt), dt_name(kvt), D, hq, hkv, n_seqs, T, window, softcap, fused);
    int rc = apex_cuda_prefill_attention(&a, NULL);
    cudaError_t se = cudaDeviceSynchronize();
    if (rc || se != cudaSuccess) {
        fail("%s: rc=%d (%s) sync %s", what, rc, apex_cuda_error_string(rc), cudaGetErrorString(se));
        if (se != cudaSuccess) exit(1);
    } else {
        void *got = xmalloc(ob);
        CK(cudaMemcpy(got, a.out, ob, cudaMemcpyDeviceToHost));
        compare_out(got, outt, ref, (size_t)T * hq * D, what);
        free(got);
        append_expect(pool, kvt, bb, hkv, bt, D, T, slots, k, v, ks, ks, act);
        uint8_t *gp = xmalloc((size_t)nblocks * bb);
        CK(cudaMemcpy(gp, a.kv, (size_t)nblocks * bb, cudaMemcpyDeviceToHost));
        g_checks++;
        if (memcmp(gp, pool, (size_t)nblocks * bb)) fail("%s: KV pool differs", what);
        free(gp);
    }
    g_prefill_cases++;
    cudaFree((void *)a.cu_seqlens);
    cudaFree(dq);
    if (!fused) {
        cudaFree(dk);
        cudaFree(dv);
    }
    cudaFree(a.out);
    cudaFree(a.kv);
    cudaFree((void *)a.slots);
    if (fused) free(qkv);
    else free(q), free(k), free(v);
    free(ref), free(pool), free(perm), free(slots);
}

static void test_prefill(int quick) {
    static const apex_dtype dts[3] = {APEX_DTYPE_F16, APEX_DTYPE_BF16, APEX_DTYPE_F32};
    static const int dims[5] = {64, 80, 96, 128, 256};
    static const int heads[4][2] = {{4, 4}, {8, 2}, {12, 1}, {6, 2}};
    int k = 0;
    for (int dd = 0; dd < 5; dd++)
        for (int hh = 0; hh < 4; hh++)
            for (int di = 0; di < 3; di++, k++) {
                if (quick && k % 5) continue;
                int lens[4] = {1 + irand(200), 1, 1 + irand(40), 33 + irand(100)};
                run_prefill(dts[di], dts[(di + k) % 3], dts[(di + 1) % 3], dims[dd], heads[hh][0],
                            heads[hh][1], (int[]){8, 16, 32}[k % 3], 4, lens,
                            k % 4 == 1 ? 1 + irand(50) : 0, k % 5 == 2 ? 25.0f : 0.0f, k % 3 == 0);
            }
    const int big[2] = {1500, 700};
    run_prefill(APEX_DTYPE_F16, APEX_DTYPE_F16, APEX_DTYPE_F16, 128, 32, 8, 16, 2, big, 0, 0, 1);
    if (!quick)
        run_prefill(APEX_DTYPE_BF16, APEX_DTYPE_BF16, APEX_DTYPE_BF16, 256, 8, 4, 32, 2, big, 300,
                    0, 0);
}

/* ------------------------------------------------------- cohort copies */

static int g_cohort_cases;

static void test_cohort(void) {
    /* q, k, v rows of a batch of 50; the cohort is 13 of them; plus an
     * odd-sized tensor that takes the byte path. */
    const int B = 50, C = 13;
    const size_t rb[4] = {32 * 128 * 2, 8 * 128 * 2, 8 * 128 * 2, 6};
    const size_t sst[4] = {rb[0], (32 + 16) * 128 * 2, (32 + 16) * 128 * 2, 7};
    int32_t idx[13];
    int used[50] = {0};
    for (int i = 0; i < C; i++) {
        int j;
        do j = irand(B); while (used[j]);
        used[j] = 1;
        idx[i] = j;
    }
    int32_t *didx = upload(idx, sizeof idx);
    apex_cuda_rows t[4];
    uint8_t *hsrc[4], *dsrc[4], *ddst[4];
    for (int k = 0; k < 4; k++) {
        hsrc[k] = xmalloc(B * sst[k]);
        for (size_t i = 0; i < B * sst[k]; i++) hsrc[k][i] = (uint8_t)rnd();
        dsrc[k] = upload(hsrc[k], B * sst[k]);
        ddst[k] = dmalloc(C * rb[k]);
        t[k] = (apex_cuda_rows){dsrc[k], ddst[k], sst[k], rb[k], rb[k]};
    }
    int rc = apex_cuda_gather_rows(t, 4, didx, C, NULL);
    CK(cudaDeviceSynchronize());
    int bad = rc != 0;
    for (int k = 0; k < 4 && !bad; k++) {
        uint8_t *got = xmalloc(C * rb[k]);
        CK(cudaMemcpy(got, ddst[k], C * rb[k], cudaMemcpyDeviceToHost));
        for (int i = 0; i < C; i++)
            if (memcmp(got + i * rb[k], hsrc[k] + (size_t)idx[i] * sst[k], rb[k])) bad = 1;
        free(got);
    }
    g_checks++;
    if (bad) fail("cohort gather: rc=%d or rows differ", rc);

    /* scatter the staged rows into zeroed outputs: exactly the cohort's rows
     * change */
    for (int k = 0; k < 4; k++) {
        CK(cudaMemset(dsrc[k], 0, B * sst[k]));
        t[k] = (apex_cuda_rows){ddst[k], dsrc[k], rb[k], sst[k], rb[k]};
    }
    rc = apex_cuda_scatter_rows(t, 4, didx, C, NULL);
    CK(cudaDeviceSynchronize());
    bad = rc != 0;
    for (int k = 0; k < 4 && !bad; k++) {
        uint8_t *got = xmalloc(B * sst[k]);
        CK(cudaMemcpy(got, dsrc[k], B * sst[k], cudaMemcpyDeviceToHost));
        for (int r = 0; r < B && !bad; r++)
            for (size_t b = 0; b < rb[k]; b++)
                if (got[r * sst[k] + b] != (used[r] ? hsrc[k][r * sst[k] + b] : 0)) {
                    bad = 1;
                    break;
                }
        free(got);
    }
    g_checks++;
    if (bad) fail("cohort scatter: rc=%d or rows differ", rc);

    /* gather straight into mapped pinned memory (zero-copy staging) */
    void *pinned = NULL;
    CK(cudaHostAlloc(&pinned, C * rb[0], cudaHostAllocMapped));
    memset(pinned, 0, C * rb[0]);
    CK(cudaMemcpy(dsrc[0], hsrc[0], B * sst[0], cudaMemcpyHostToDevice));
    t[0] = (apex_cuda_rows){dsrc[0], pinned, sst[0], rb[0], rb[0]};
    rc = apex_cuda_gather_rows(t, 1, didx, C, NULL);
    CK(cudaDeviceSynchronize());
    bad = rc != 0;
    for (int i = 0; i < C && !bad; i++)
        if (memcmp((uint8_t *)pinned + i * rb[0], hsrc[0] + (size_t)idx[i] * sst[0], rb[0])) bad = 1;
    g_checks++;
    if (bad) fail("cohort gather into mapped pinned memory: rc=%d or rows differ", rc);
    CK(cudaFreeHost(pinned));
    for (int k = 0; k < 4; k++) {
        cudaFree(dsrc[k]);
        cudaFree(ddst[k]);
        free(hsrc[k]);
    }
    cudaFree(didx);
    g_cohort_cases = 3;
}

/* ------------------------------------------------- driver memory ops */

static const char *g_memops = "untested";

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void test_memops(void) {
    volatile uint32_t *flag = NULL;
    CK(cudaHostAlloc((void **)&flag, 64, cudaHostAllocMapped));
    flag[0] = 0;
    flag[1] = 0;
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    /* The stream waits for a host-written flag, then writes its own. */
    int rc = apex_cuda_stream_wait_value32(s, (void *)flag, 1, APEX_CUDA_WAIT_GEQ);
    int rc2 = rc ? rc : apex_cuda_stream_write_value32(s, (void *)(flag + 1), 7);
    /* ENODRIVER: entry point missing; 801: CUDA_ERROR_NOT_SUPPORTED */
    if (rc == APEX_CUDA_ENODRIVER || rc2 == APEX_CUDA_ENODRIVER || rc == 801 || rc2 == 801) {
        g_memops = "unsupported";
    } else if (rc || rc2) {
        fail("stream memops: rc=%d/%d", rc, rc2);
        g_memops = "failed";
    } else {
        double t0 = now_s();
        while (now_s() - t0 < 0.05) {
        }
        int early = cudaStreamQuery(s) != cudaErrorNotReady || flag[1] != 0;
        flag[0] = 1;
        CK(cudaStreamSynchronize(s));
        g_checks++;
        if (early || flag[1] != 7) {
            fail("stream memops: stream %s the host flag (flag[1]=%u)",
                 early ? "did not wait for" : "waited but did not write after", flag[1]);
            g_memops = "failed";
        } else {
            g_memops = "ok";
        }
    }
    CK(cudaStreamDestroy(s));
    CK(cudaFreeHost((void *)flag));
}

/* The device table on the GPU: a copy queued behind a host flag waits for
 * it without blocking this thread, then completes. */
static const char *g_device_iface = "untested";

static void test_device_iface(void) {
    apex_device *dev = NULL;
    apex_status st = device_cuda_create(0, &dev);
    g_checks++;
    if (st) {
        fail("device_cuda_create: %s", apex_last_error());
        g_device_iface = "failed";
        return;
    }
    const device_iface *f = dev->iface;
    uint32_t *flag = NULL, *src = NULL;
    void *dst = NULL;
    device_stream *s = NULL;
    device_event *e = NULL;
    const size_t n = 1 << 20;
    int ok = !f->host_alloc(dev, 64, (void **)&flag) && !f->host_alloc(dev, n, (void **)&src) &&
             !f->mem_alloc(dev, n, &dst) && !f->stream_create(dev, &s) && !f->event_create(dev, &e);
    if (ok) {
        flag[0] = 0;
        for (size_t i = 0; i < n / 4; i++) src[i] = (uint32_t)i * 2654435761u;
        ok = !f->wait_flag(dev, s, flag, 1) && !f->memcpy_async(dev, dst, src, n, s) &&
             !f->event_record(dev, e, s);
    }
    if (ok) {
        double t0 = now_s();
        while (now_s() - t0 < 0.05) {
        }
        const int early = f->event_done(dev, e);
        *(volatile uint32_t *)flag = 1;
        ok = !early && !f->event_sync(dev, e) && f->event_done(dev, e);
        if (ok) {
            uint32_t *back = xmalloc(n);
            CK(cudaMemcpy(back, dst, n, cudaMemcpyDeviceToHost));
            ok = !memcmp(back, src, n);
            free(back);
        }
        if (early) fail("device iface: the stream did not wait for the host flag");
    }
    if (!ok) fail("device iface: %s", apex_last_error());
    g_device_iface = ok ? "ok" : "failed";
    if (e) f->event_destroy(dev, e);
    if (s) f->stream_destroy(dev, s);
    f->mem_free(dev, dst);
    f->host_free(dev, src);
    f->host_free(dev, flag);
    f->destroy(dev);
}

/* ------------------------------------------------------------ main */

int main(int argc, char **argv) {
    int quick = argc > 1 && !strcmp(argv[1], "--quick");
    const int ndev = apex_cuda_device_count();
    if (ndev == 0) {
        printf("{\"test\":\"test_cuda_kernels\",\"skipped\":\"no CUDA driver or device\"}\n");
        return 77;
    }
    struct cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    fprintf(stderr, "device: %s (sm_%d%d, %d SMs), driver %d\n", prop.name, prop.major, prop.minor,
            prop.multiProcessorCount, apex_cuda_driver_version());
    const double t0 = now_s();
    test_kv_append();
    test_cohort();
    test_memops();
    test_device_iface();
    test_decode(quick);
    test_prefill(quick);
    CK(cudaDeviceSynchronize());

    printf("{\"test\":\"test_cuda_kernels\",\"device\":\"%s\",\"sm\":\"%d%d\",\"quick\":%s,"
           "\"passed\":%s,\"checks\":%d,\"failed\":%d,\"seconds\":%.1f,"
           "\"decode\":{\"cases\":%d,\"split_cases\":%d,\"max_splits\":%d},"
           "\"prefill\":{\"cases\":%d},\"kv_append\":{\"cases\":%d},\"cohort\":{\"cases\":%d},"
           "\"stream_memops\":\"%s\",\"device_iface\":\"%s\","
           "\"max_abs_err\":{\"f32\":%.3g,\"f16\":%.3g,\"bf16\":%.3g},"
           "\"tolerance\":{\"f32\":%.3g,\"f16\":%.3g,\"bf16\":%.3g},\"failures\":[%s]}\n",
           prop.name, prop.major, prop.minor, quick ? "true" : "false",
           g_failed ? "false" : "true", g_checks, g_failed, now_s() - t0, g_decode_cases,
           g_decode_split_cases, g_decode_max_splits, g_prefill_cases, g_append_cases,
           g_cohort_cases, g_memops, g_device_iface, g_max_err[APEX_DTYPE_F32], g_max_err[APEX_DTYPE_F16],
           g_max_err[APEX_DTYPE_BF16], out_tol(APEX_DTYPE_F32), out_tol(APEX_DTYPE_F16),
           out_tol(APEX_DTYPE_BF16), g_fail_log);
    return g_failed ? 1 : 0;
}
