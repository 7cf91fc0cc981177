/* ggml_apex_ops.c - the ops APEX takes in llama.cpp's graphs (see
 * ggml_apex.h): which FLASH_ATTN_EXT and KV-cache SET_ROWS nodes it accepts
 * (supports_op), and their compute: KV rows stored in place, attention by
 * libapex's strided kernel (apex_strided.h) over ggml's tensors in place,
 * beside the GPU tier of an APEX_Hybrid KV cache (ggml_apex_tier.h). */
#include <math.h>
#include <pthread.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "apex/apex_strided.h"
#include "cpu_attn/dtype_convert.h"
#include "shim/ggml_apex_impl.h"
#include "shim/ggml_apex_tier.h"
#include "shim/ggml_apex_trace.h"

static int g_logged_takeover, g_logged_fa_off, g_logged_decline;

/* The head dims libapex runs (apex_limits_get: the one list), and the
 * list as text for the decline message. */
static int head_dim_ok(int64_t d, char *list, size_t n) {
    apex_limits l;
    int ok = 0;
    size_t at = 0;
    list[0] = '\0';
    if (apex_limits_get(&l) != APEX_OK) return 0;
    for (size_t i = 0; i < sizeof l.head_dims / sizeof l.head_dims[0] && l.head_dims[i] > 0; i++) {
        ok |= l.head_dims[i] == d;
        if (at < n) at += (size_t)snprintf(list + at, n - at, "%s%d", i ? ", " : "", l.head_dims[i]);
    }
    return ok;
}

static const char *type_name(enum ggml_type t) { return ggml_type_name(t); }

/* One line, once, when APEX declines a model's attention. */
static void log_decline(const char *why) {
    pthread_mutex_lock(&shim_lock);
    const int first = !g_logged_decline;
    g_logged_decline = 1;
    shim_stats.declined++;
    const int kv_in_pool = shim_stats.kv_bytes_apex > 0;
    pthread_mutex_unlock(&shim_lock);
    /* The KV geometry is checked before the KV is placed (shim_kv_cache_buffer_type);
     * what only the graph shows (ALiBi, attention sinks) comes after it. */
    if (first)
        fprintf(stderr, "APEX: declining this model's attention (%s); llama.cpp runs it natively%s\n", why,
                kv_in_pool ? " (its KV cache stays in APEX's host pool: host memory in ggml's layout, which "
                             "ggml-cpu reads as it reads its own)"
                           : "");
}

/* The KV geometry APEX runs: NULL, or why not (the checks of shim_supports_fa
 * that the KV cache's types and head sizes decide). */
const char *shim_kv_geometry_why(enum ggml_type tk, enum ggml_type tv, int64_t dk, int64_t dv, char *why,
                                 size_t n) {
    char dims[64];
    if (tk != GGML_TYPE_F16 && tk != GGML_TYPE_F32)
        snprintf(why, n, "KV cache type %s; APEX supports f16 and f32", type_name(tk));
    else if (tv != tk)
        snprintf(why, n, "K cache %s and V cache %s differ", type_name(tk), type_name(tv));
    else if (!head_dim_ok(dk, dims, sizeof dims) || dv != dk)
        snprintf(why, n, "head_dim %lld (V %lld); APEX supports %s", (long long)dk, (long long)dv, dims);
    else
        return NULL;
    return why;
}

int shim_exact_compat(int64_t d, enum ggml_type t) {
    return apex_strided_exact_ok((int32_t)d, t == GGML_TYPE_F16 ? APEX_DTYPE_F16 : APEX_DTYPE_F32);
}

/* KV-cache writes: dst rows of ne0 elements (f16/f32) from f32 rows. The V
 * writes of a transposed V cache (flash attention off) store single elements;
 * those stay with llama.cpp, since APEX only owns attention's operands. */
int shim_supports_set_rows(const struct ggml_tensor *op) {
    const struct ggml_tensor *src = op->src[0], *idx = op->src[1];
    if (!op->view_src || !shim_is_kv_cache(op)) return 0;
    if (op->ne[0] < 16 || src->ne[0] != op->ne[0]) {
        const int first = shim_first_time(&g_logged_fa_off);
        if (first)
            fprintf(stderr, "APEX: flash attention is off in this context (transposed V cache): APEX "
                            "takes over attention only with flash attention on (-fa on)\n");
        return 0;
    }
    if (src->type != GGML_TYPE_F32 || (op->type != GGML_TYPE_F16 && op->type != GGML_TYPE_F32)) return 0;
    if (idx->type != GGML_TYPE_I64 && idx->type != GGML_TYPE_I32) return 0;
    if (src->ne[2] != 1 || src->ne[3] != 1 || op->ne[2] != 1 || op->ne[3] != 1) return 0;
    if (src->nb[0] != sizeof(float) || op->nb[0] != ggml_type_size(op->type)) return 0;
    /* A model whose attention APEX declined keeps its KV writes native too. */
    pthread_mutex_lock(&shim_lock);
    const int declined = g_logged_decline;
    pthread_mutex_unlock(&shim_lock);
    if (declined) return 0;
    return 1;
}

int shim_supports_fa(const struct ggml_tensor *op) {
    const struct ggml_tensor *q = op->src[0], *k = op->src[1], *v = op->src[2], *mask = op->src[3];
    char why[200];
    float max_bias;
    memcpy(&max_bias, (const float *)op->op_params + 1, sizeof max_bias);
    why[0] = 0;
    if (!shim_kv_geometry_why(k->type, v->type, k->ne[0], v->ne[0], why, sizeof why)) {
        if (op->src[4])
            snprintf(why, sizeof why, "attention sinks");
        else if (max_bias != 0.0f)
            snprintf(why, sizeof why, "ALiBi (max_bias %g)", (double)max_bias);
    }
    if (why[0]) {
        log_decline(why);
        return 0;
    }
    /* Shapes outside llama.cpp's usual ones: not a model decision, no log. */
    if (q->type != GGML_TYPE_F32 || op->type != GGML_TYPE_F32) return 0;
    /* Op params the kernel refuses (apex_strided_check) stay with ggml-cpu,
     * which takes any (fuzz_ggml: a negative softcap was accepted, then failed). */
    float scale, softcap;
    memcpy(&scale, (const float *)op->op_params + 0, sizeof scale);
    memcpy(&softcap, (const float *)op->op_params + 2, sizeof softcap);
    if (!(scale != 0.0f) || !isfinite(scale) || !(softcap >= 0.0f) || !isfinite(softcap)) return 0;
    if (q->ne[0] != k->ne[0] || q->ne[2] % k->ne[2] != 0 || v->ne[2] != k->ne[2]) return 0;
    if (k->ne[1] != v->ne[1] || q->ne[3] != k->ne[3] || v->ne[3] != k->ne[3]) return 0;
    if (q->nb[0] != sizeof(float) || k->nb[0] != ggml_type_size(k->type) || v->nb[0] != ggml_type_size(v->type))
        return 0;
    if (op->nb[0] != sizeof(float)) return 0;
    if (mask) {
        if (mask->type != GGML_TYPE_F16 || mask->ne[0] < k->ne[1] || mask->ne[1] < q->ne[1] || mask->ne[2] != 1)
            return 0;
        if (mask->ne[3] != 1 && mask->ne[3] != q->ne[3]) return 0;
        if (mask->nb[0] != sizeof(uint16_t)) return 0;
    }
    if (q->ne[3] > 1 && !shim_is_kv_cache(k)) return 0;
    const int hybrid = shim_tier_of(k) != NULL;
    if (hybrid && q->ne[1] >= 64) return 0;
    if (hybrid ? shim_exact_hybrid() : shim_exact_mode()) {
        if (!shim_exact_compat(k->ne[0], k->type)) {
            snprintf(why, sizeof why, "exact mode needs f16 KV, head_dim a multiple of 64 and AVX-512 "
                                      "(APEX_GGML_EXACT=0 lifts this)");
            log_decline(why);
            return 0;
        }
        /* ggml-cpu's tiled path (>= 64 query tokens) rounds differently:
         * ggml-cpu runs it. Its split-KV decode (one sequence, one token, >= 512
         * rows) the kernel reproduces, given ggml's thread count (shim_run_fa). */
        if (q->ne[1] >= 64) return 0;
    }
    const int first = shim_first_time(&g_logged_takeover);
    if (first)
        fprintf(stderr,
                "APEX: taking over llama.cpp's attention: FLASH_ATTN_EXT (%lld query heads, %lld KV heads, "
                "head_dim %lld, %s KV) and the KV-cache writes run on APEX (%s); everything else stays with "
                "llama.cpp; %s\n",
                (long long)q->ne[2], (long long)k->ne[2], (long long)k->ne[0], type_name(k->type),
                hybrid ? "APEX_Hybrid KV: the GPU tier for the sequences within its budget, the CPU kernel for the others"
                       : "host tier: APEX's CPU kernel",
                hybrid ? (shim_exact_hybrid() ? "CPU side in exact mode (APEX_GGML_EXACT=1); prefill ubatches of >= 64 "
                                           "tokens per sequence stay on llama.cpp's GPU backend"
                                         : "fp32 math (APEX_GGML_EXACT=1: ggml-cpu's rounding on the CPU side); "
                                           "prefill ubatches of >= 64 tokens per sequence stay on llama.cpp's GPU backend")
                : shim_exact_mode() ? "exact mode (ggml-cpu's rounding; prefill ubatches of >= 64 tokens per sequence "
                                 "stay on ggml-cpu)"
                               : "fp32 mode (APEX_GGML_EXACT=0)");
    if (first && !shim_kv_hook_asked)
        fprintf(stderr, "APEX: this llama.cpp never asked the backends for its KV cache's buffer type (built without "
                        "APEX's patch, integration/llama_cpp/llama-kv-cache-buft-hook.patch?): the KV cache stays "
                        "in llama.cpp's buffers, where APEX reads and writes it\n");
    return 1;
}

static int64_t row_index(const struct ggml_tensor *idx, int64_t i) {
    return idx->type == GGML_TYPE_I64 ? ((const int64_t *)idx->data)[i] : ((const int32_t *)idx->data)[i];
}

/* f32 -> f16, round to nearest even: F16C where the CPU has it (ggml-cpu's
 * own conversion, so the bits are the ones native SET_ROWS stores), eight at
 * a time; the scalar conversion (identical for every non-NaN value) for the
 * tail and other CPUs. A decode step's rows are a few hundred values per
 * layer: the scalar loop alone cost 5-15 us per layer. */
#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx,f16c"))) static int64_t f16c_row(uint16_t *h, const float *s, int64_t w) {
    int64_t j = 0;
    for (; j + 8 <= w; j += 8)
        _mm_storeu_si128((__m128i *)(h + j), _mm256_cvtps_ph(_mm256_loadu_ps(s + j), _MM_FROUND_TO_NEAREST_INT));
    return j;
}

static int have_f16c(void) {
    static int cached = -1;
    if (cached < 0) {
        /* cpuid leaf 1 for F16C: clang's __builtin_cpu_supports has no "f16c" */
        unsigned a, b, c, d;
        cached = __builtin_cpu_supports("avx") && __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
    }
    return cached;
}
#endif

void shim_row_to_f16(uint16_t *h, const float *s, int64_t w) {
    int64_t j = 0;
#if defined(__x86_64__) || defined(__i386__)
    if (have_f16c()) j = f16c_row(h, s, w);
#endif
    for (; j < w; j++) h[j] = apex_f32_to_f16(s[j]);
}

/* Source row i into its cache row. */
static void store_row(struct ggml_tensor *op, const struct ggml_tensor *src, const struct ggml_tensor *idx, int64_t i,
                      int64_t w) {
    const float *s = (const float *)((const char *)src->data + i * src->nb[1]);
    char *d = (char *)op->data + row_index(idx, i) * op->nb[1];
    if (op->type == GGML_TYPE_F16)
        shim_row_to_f16((uint16_t *)d, s, w);
    else
        memcpy(d, s, (size_t)w * sizeof(float));
}

/* The rows are checked first (a bad index changes nothing), converted on
 * n_threads (a prefill writes many), then reported to the GPU tier. */
enum ggml_status shim_run_set_rows(struct ggml_tensor *op, int n_threads) {
    const struct ggml_tensor *src = op->src[0], *idx = op->src[1];
    const struct ggml_tensor *root = shim_root_of(op);
    gpu_tier *tier = shim_tier_of(op);
    const double t0 = shim_now_s();
    const int64_t n = src->ne[1], w = op->ne[0];
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = row_index(idx, i);
        if (r < 0 || r >= op->ne[1]) {
            fprintf(stderr, "APEX: KV write row %lld out of range [0, %lld)\n", (long long)r, (long long)op->ne[1]);
            return GGML_STATUS_FAILED;
        }
    }
    SHIM_TRACE_BEGIN(APEX_TRACE_COPY, "KV rows (SET_ROWS)", shim_kv_layer(op));
    /* A decode step's few rows stay on this thread: a one-thread OpenMP
     * team would cost more than converting them. */
    const int par = n * w >= (1 << 16) ? n_threads : 1;
#if defined(__x86_64__) || defined(__i386__)
    (void)have_f16c(); /* cached before the threads read it */
#endif
    if (par > 1) {
#pragma omp parallel for num_threads(par) schedule(static)
        for (int64_t i = 0; i < n; i++) store_row(op, src, idx, i, w);
    } else {
        for (int64_t i = 0; i < n; i++) store_row(op, src, idx, i, w);
    }
    for (int64_t i = 0; tier && i < n; i++)
        gpu_tier_written(tier, root, (size_t)((const char *)op->data - (const char *)root->data) +
                                         (size_t)row_index(idx, i) * op->nb[1],
                         (size_t)w * ggml_type_size(op->type));
    SHIM_TRACE_END();
    const double dt = shim_now_s() - t0;
    pthread_mutex_lock(&shim_lock);
    shim_stats.kv_write_calls++;
    shim_stats.kv_writes_in_pool += (uint64_t)shim_in_pool(op);
    shim_stats.kv_rows_written += (uint64_t)n;
    shim_stats.kv_write_seconds += dt;
    pthread_mutex_unlock(&shim_lock);
    return GGML_STATUS_SUCCESS;
}

/* The CPU kernel over the streams j of d with gpu[j] == which, in runs of
 * adjacent streams; 1 if it ran. */
static int run_streams(const apex_strided_desc *d, const unsigned char *gpu, int which, int n_threads) {
    for (int32_t j = 0; j < d->n_streams;) {
        int32_t e = j;
        while (e < d->n_streams && gpu[e] == which) e++;
        if (e > j) {
            apex_strided_desc r = *d;
            r.n_streams = e - j;
            r.q = (const float *)((const char *)d->q + j * d->q_nb_stream);
            r.k = (const char *)d->k + j * d->k_nb_stream;
            r.v = (const char *)d->v + j * d->v_nb_stream;
            if (d->mask) r.mask = (const uint16_t *)((const char *)d->mask + j * d->mask_nb_stream);
            r.out = (float *)((char *)d->out + j * d->out_nb_stream);
            if (apex_strided_attention(&r, n_threads) != APEX_OK) return 0;
        }
        j = e + 1;
    }
    return 1;
}

enum ggml_status shim_run_fa(struct ggml_tensor *op, int n_threads) {
    const struct ggml_tensor *q = op->src[0], *k = op->src[1], *v = op->src[2], *mask = op->src[3];
    apex_strided_desc d;
    apex_strided_desc_init(&d);
    d.head_dim = (int32_t)k->ne[0];
    d.n_q_heads = (int32_t)q->ne[2];
    d.n_kv_heads = (int32_t)k->ne[2];
    d.n_tokens = (int32_t)q->ne[1];
    d.n_streams = (int32_t)q->ne[3];
    d.n_kv = (int32_t)k->ne[1];
    d.q = (const float *)q->data;
    d.q_nb_tok = q->nb[1], d.q_nb_head = q->nb[2], d.q_nb_stream = q->nb[3];
    d.kv_dtype = k->type == GGML_TYPE_F16 ? APEX_DTYPE_F16 : APEX_DTYPE_F32;
    d.k = k->data, d.k_nb_row = k->nb[1], d.k_nb_head = k->nb[2], d.k_nb_stream = k->nb[3];
    d.v = v->data, d.v_nb_row = v->nb[1], d.v_nb_head = v->nb[2], d.v_nb_stream = v->nb[3];
    if (mask) {
        d.mask = (const uint16_t *)mask->data;
        d.mask_nb_tok = mask->nb[1];
        d.mask_nb_stream = mask->ne[3] == 1 ? 0 : mask->nb[3];
    }
    d.out = (float *)op->data;
    d.out_nb_head = op->nb[1], d.out_nb_tok = op->nb[2], d.out_nb_stream = op->nb[3];
    memcpy(&d.scale, (const float *)op->op_params + 0, sizeof(float));
    memcpy(&d.softcap, (const float *)op->op_params + 2, sizeof(float));
    gpu_tier *tier = shim_tier_of(k);
    d.ggml_compat = tier ? shim_exact_hybrid() : shim_exact_mode();
    d.ggml_n_threads = n_threads; /* llama.cpp gives ggml-cpu and APEX the same count */
    d.ggml_streams = d.n_streams;
    /* The first stream of this op: K is a view of the cache starting there. */
    int64_t s0 = 0;
    if (k->view_src && k->view_src->nb[2] > 0 && k->view_src->ne[2] > 1 && shim_is_kv_cache(k))
        s0 = (int64_t)(k->view_offs / k->view_src->nb[2]);
    const double t0 = shim_now_s();
    /* The streams the GPU tier holds attend there: submitted to the device
     * from this thread (no tier thread), while the others attend on the
     * CPU, then waited for. */
    unsigned char gpu[APEX_GGML_MAX_STREAMS];
    memset(gpu, 0, sizeof gpu);
    int n_plan = 0, tier_failed = 0;
    const int layer = shim_kv_layer(k);
    SHIM_TRACE_BEGIN(APEX_TRACE_INFO, "GPU tier: plan", layer);
    if (tier && d.n_streams <= APEX_GGML_MAX_STREAMS && shim_tier_of(v) == tier)
        n_plan = gpu_tier_plan(tier, op, s0, gpu);
    SHIM_TRACE_END();
    /* Its own spans directly in the attention's: the stale rows' gather
     * (COPY), the submit (GPU_ATTN: the tier's attention, host side). */
    if (n_plan) gpu_tier_start(tier);
    SHIM_TRACE_BEGIN(APEX_TRACE_CPU_ATTN, "CPU kernel (cpu_attn_strided)", layer);
    int ok = run_streams(&d, gpu, 0, n_threads);
    SHIM_TRACE_END();
    if (n_plan) {
        SHIM_TRACE_BEGIN(APEX_TRACE_WAIT, "wait for the GPU tier", layer);
        const int tier_ok = gpu_tier_wait(tier) == 0;
        SHIM_TRACE_END();
        /* APEX_GGML_TIER_CHECK=1: the CPU kernel recomputes the tier's
         * streams, its results are kept, and the largest difference counted. */
        float *gpu_out = tier_ok && shim_env_on("APEX_GGML_TIER_CHECK") ? malloc(ggml_nbytes(op)) : NULL;
        if (gpu_out) memcpy(gpu_out, op->data, ggml_nbytes(op));
        if (!tier_ok || gpu_out) ok = run_streams(&d, gpu, 1, n_threads) && ok;
        if (!tier_ok) memset(gpu, 0, sizeof gpu);
        tier_failed = !tier_ok;
        if (gpu_out) {
            float worst = 0.0f;
            for (int32_t j = 0; j < d.n_streams; j++) {
                if (!gpu[j]) continue;
                for (int32_t h = 0; h < d.n_q_heads; h++) {
                    const size_t off = (size_t)h * op->nb[1] + (size_t)j * op->nb[3];
                    const float *x = (const float *)((const char *)op->data + off);
                    const float *y = (const float *)((const char *)gpu_out + off);
                    for (int32_t i = 0; i < d.head_dim; i++) worst = fmaxf(worst, fabsf(x[i] - y[i]));
                }
            }
            free(gpu_out);
            pthread_mutex_lock(&shim_lock);
            if (worst > shim_stats.tier_check_max_diff) shim_stats.tier_check_max_diff = worst;
            pthread_mutex_unlock(&shim_lock);
        }
    }
    if (!ok) {
        pthread_mutex_lock(&shim_lock);
        shim_stats.errors++;
        pthread_mutex_unlock(&shim_lock);
        fprintf(stderr, "APEX: attention failed (%s)\n", apex_last_error());
        return GGML_STATUS_FAILED;
    }
    const double dt = shim_now_s() - t0;
    pthread_mutex_lock(&shim_lock);
    shim_stats.attention_calls++;
    shim_stats.tier_fallbacks += (uint64_t)tier_failed;
    shim_stats.attention_kv_in_pool += (uint64_t)(shim_in_pool(k) && shim_in_pool(v));
    shim_stats.attention_seconds += dt;
    shim_stats.n_threads = n_threads;
    if (d.n_tokens == 1)
        shim_stats.decode_attn += (uint64_t)d.n_streams;
    else
        shim_stats.prefill_tokens += (uint64_t)d.n_tokens * (uint64_t)d.n_streams;
    for (int64_t s = s0; s < s0 + d.n_streams; s++) {
        if (s < APEX_GGML_MAX_STREAMS) shim_stats.stream_attn[s]++;
        const int on_gpu = gpu[s - s0];
        if (s < APEX_GGML_MAX_STREAMS && on_gpu) shim_stats.stream_gpu[s]++;
        shim_stats.gpu_attn += (uint64_t)on_gpu;
        if (s > shim_stats.max_stream) shim_stats.max_stream = (int32_t)s;
    }
    pthread_mutex_unlock(&shim_lock);
    return GGML_STATUS_SUCCESS;
}

