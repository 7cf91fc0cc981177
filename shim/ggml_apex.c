/* ggml_apex.c - the APEX ggml backend: see ggml_apex.h.
 *
 * ggml's backend interface (ggml-backend-impl.h) is plain C structs of
 * function pointers, so this adapter is C. The device's buffer type is the
 * CPU buffer type: ggml's scheduler then hands APEX the FLASH_ATTN_EXT and
 * KV-cache SET_ROWS nodes (pass 1 for writes into the host KV buffer, pass 3
 * "upgrade to a higher-priority backend with the same buffer type" for
 * attention) with no copies, and llama.cpp keeps every weight and other op
 * on its own backends (make_cpu_buft_list skips an ACCEL device whose buffer
 * type is the CPU one).
 *
 * The KV tensors themselves come from APEX's host pool when llama.cpp (with
 * the patch of integration/llama_cpp/) asks for a KV-cache buffer type: see
 * "the KV cache in APEX's host pool" below. */
#include <dlfcn.h>
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml-backend-impl.h"
#include "ggml-backend.h"
#include "ggml.h"

#include "cpu_attn/cpu_attn_strided.h"
#include "cpu_attn/dtype_convert.h"
#include "csrc/cpu_workers.h"
#include "csrc/host_mem.h"
#include "shim/ggml_apex.h"
#include "shim/ggml_apex_metrics.h"
#include "shim/ggml_apex_tier.h"
#include "shim/ggml_apex_trace.h"

#define EXPORT __attribute__((visibility("default")))

EXPORT ggml_backend_reg_t ggml_backend_init(void);
EXPORT ggml_backend_reg_t ggml_apex_reg(void);
EXPORT int ggml_apex_mark_preloaded(void);
EXPORT void apex_ggml_stats_get(apex_ggml_stats *out);
EXPORT int apex_ggml_step_summary(apex_step_summary *out, int reset);

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static apex_ggml_stats g_stats = {.max_stream = -1};
static int g_registered_by_preload;
/* Exact mode (default): APEX reproduces ggml-cpu's attention arithmetic and
 * leaves to ggml-cpu the shapes where ggml-cpu itself switches to a
 * differently-rounded path. APEX_GGML_EXACT=0: fp32-exact math, every shape. */
static int g_exact = -1;

static int exact_mode(void) {
    if (g_exact < 0) {
        const char *e = getenv("APEX_GGML_EXACT");
        g_exact = !(e && strcmp(e, "0") == 0);
    }
    return g_exact;
}
static int g_logged_takeover, g_logged_fa_off, g_logged_decline;
/* llama.cpp asked for the KV cache's buffer type (the patch's hook): an
 * unpatched build never does, and APEX says so when it takes over. */
static int g_kv_hook_asked;

/* KV in an APEX_Hybrid buffer (a GPU build): the engine's reference is its
 * GPU kernel, not ggml-cpu, so APEX's CPU side runs fp32 math unless
 * APEX_GGML_EXACT=1 asks for ggml-cpu's rounding; multi-token (>= 64)
 * attention stays with the GPU backend either way. */
static int exact_hybrid(void) {
    const char *e = getenv("APEX_GGML_EXACT");
    return e && strcmp(e, "1") == 0;
}

/* The device, and the buffer type of llama.cpp's KV cache in APEX's host
 * pool (both defined below). */
static struct ggml_backend_device g_dev;
static struct ggml_backend_buffer_type g_kv_buft, g_kv_hybrid_buft;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int env_on(const char *name) {
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

/* 1 the first time for *flag (a log-once flag), 0 after, under g_lock. */
static int first_time(int *flag) {
    pthread_mutex_lock(&g_lock);
    const int first = !*flag;
    *flag = 1;
    pthread_mutex_unlock(&g_lock);
    return first;
}

/* APEX_GGML_OPS: which ops APEX takes ("fa,kv" by default; "none");
 * APEX_GGML_DISABLE=1: none. Bit 1: attention, bit 2: KV writes. */
static int ops_mask(void) {
    static int ops = -1;
    if (ops < 0) {
        const char *e = getenv("APEX_GGML_OPS");
        int o = e ? (strstr(e, "fa") ? 1 : 0) | (strstr(e, "kv") ? 2 : 0) : 3;
        if (env_on("APEX_GGML_DISABLE")) o = 0;
        ops = o;
    }
    return ops;
}

/* ---------------------------------------------------------------- ops */

static int head_dim_ok(int64_t d) { return d == 64 || d == 80 || d == 96 || d == 128 || d == 256; }

static const char *type_name(enum ggml_type t) { return ggml_type_name(t); }

/* One line, once, when APEX declines a model's attention. */
static void log_decline(const char *why) {
    pthread_mutex_lock(&g_lock);
    const int first = !g_logged_decline;
    g_logged_decline = 1;
    g_stats.declined++;
    const int kv_in_pool = g_stats.kv_bytes_apex > 0;
    pthread_mutex_unlock(&g_lock);
    /* The KV geometry is checked before the KV is placed (kv_cache_buffer_type);
     * what only the graph shows (ALiBi, attention sinks) comes after it. */
    if (first)
        fprintf(stderr, "APEX: declining this model's attention (%s); llama.cpp runs it natively%s\n", why,
                kv_in_pool ? " (its KV cache stays in APEX's host pool: host memory in ggml's layout, which "
                             "ggml-cpu reads as it reads its own)"
                           : "");
}

/* The KV geometry APEX runs: NULL, or why not (the checks of supports_fa
 * that the KV cache's types and head sizes decide). */
static const char *kv_geometry_why(enum ggml_type tk, enum ggml_type tv, int64_t dk, int64_t dv, char *why,
                                   size_t n) {
    if (tk != GGML_TYPE_F16 && tk != GGML_TYPE_F32)
        snprintf(why, n, "KV cache type %s; APEX supports f16 and f32", type_name(tk));
    else if (tv != tk)
        snprintf(why, n, "K cache %s and V cache %s differ", type_name(tk), type_name(tv));
    else if (!head_dim_ok(dk) || dv != dk)
        snprintf(why, n, "head_dim %lld (V %lld); APEX supports 64, 80, 96, 128, 256", (long long)dk,
                 (long long)dv);
    else
        return NULL;
    return why;
}

static int exact_compat(int64_t d, enum ggml_type t) {
    return cpu_attn_strided_compat_ok((int32_t)d, t == GGML_TYPE_F16 ? APEX_DTYPE_F16 : APEX_DTYPE_F32);
}

static const struct ggml_tensor *root_of(const struct ggml_tensor *t) {
    return t->view_src ? t->view_src : t;
}

static int is_kv_cache(const struct ggml_tensor *t) {
    return strncmp(root_of(t)->name, "cache_k_l", 9) == 0 || strncmp(root_of(t)->name, "cache_v_l", 9) == 0;
}

/* 1 if t's memory is in APEX's host pool. */
static int in_pool(const struct ggml_tensor *t) {
    const struct ggml_backend_buffer *b = root_of(t)->buffer;
    return b && (b->buft == &g_kv_buft || b->buft == &g_kv_hybrid_buft);
}

/* The GPU tier of t's APEX_Hybrid buffer, or NULL; and what tells it of
 * host writes into such a buffer (both with the buffers, below). */
static gpu_tier *tier_of(const struct ggml_tensor *t);
static void kv_written(const struct ggml_tensor *t, size_t off, size_t size);

/* KV-cache writes: dst rows of ne0 elements (f16/f32) from f32 rows. The V
 * writes of a transposed V cache (flash attention off) store single elements;
 * those stay with llama.cpp, since APEX only owns attention's operands. */
static int supports_set_rows(const struct ggml_tensor *op) {
    const struct ggml_tensor *src = op->src[0], *idx = op->src[1];
    if (!op->view_src || !is_kv_cache(op)) return 0;
    if (op->ne[0] < 16 || src->ne[0] != op->ne[0]) {
        const int first = first_time(&g_logged_fa_off);
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
    pthread_mutex_lock(&g_lock);
    const int declined = g_logged_decline;
    pthread_mutex_unlock(&g_lock);
    if (declined) return 0;
    return 1;
}

static int supports_fa(const struct ggml_tensor *op) {
    const struct ggml_tensor *q = op->src[0], *k = op->src[1], *v = op->src[2], *mask = op->src[3];
    char why[200];
    float max_bias;
    memcpy(&max_bias, (const float *)op->op_params + 1, sizeof max_bias);
    why[0] = 0;
    if (!kv_geometry_why(k->type, v->type, k->ne[0], v->ne[0], why, sizeof why)) {
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
    /* Op params the kernel refuses (cpu_attn_strided_check) stay with ggml-cpu,
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
    if (q->ne[3] > 1 && !is_kv_cache(k)) return 0;
    const int hybrid = tier_of(k) != NULL;
    if (hybrid && q->ne[1] >= 64) return 0;
    if (hybrid ? exact_hybrid() : exact_mode()) {
        if (!exact_compat(k->ne[0], k->type)) {
            snprintf(why, sizeof why, "exact mode needs f16 KV, head_dim a multiple of 64 and AVX-512 "
                                      "(APEX_GGML_EXACT=0 lifts this)");
            log_decline(why);
            return 0;
        }
        /* ggml-cpu's tiled path (>= 64 query tokens) rounds differently:
         * ggml-cpu runs it. Its split-KV decode (one sequence, one token, >= 512
         * rows) the kernel reproduces, given ggml's thread count (run_fa). */
        if (q->ne[1] >= 64) return 0;
    }
    const int first = first_time(&g_logged_takeover);
    if (first)
        fprintf(stderr,
                "APEX: taking over llama.cpp's attention: FLASH_ATTN_EXT (%lld query heads, %lld KV heads, "
                "head_dim %lld, %s KV) and the KV-cache writes run on APEX (%s); everything else stays with "
                "llama.cpp; %s\n",
                (long long)q->ne[2], (long long)k->ne[2], (long long)k->ne[0], type_name(k->type),
                hybrid ? "APEX_Hybrid KV: the GPU tier for the sequences within its budget, the CPU kernel for the others"
                       : "host tier: APEX's CPU kernel",
                hybrid ? (exact_hybrid() ? "CPU side in exact mode (APEX_GGML_EXACT=1); prefill ubatches of >= 64 "
                                           "tokens per sequence stay on llama.cpp's GPU backend"
                                         : "fp32 math (APEX_GGML_EXACT=1: ggml-cpu's rounding on the CPU side); "
                                           "prefill ubatches of >= 64 tokens per sequence stay on llama.cpp's GPU backend")
                : exact_mode() ? "exact mode (ggml-cpu's rounding; prefill ubatches of >= 64 tokens per sequence "
                                 "stay on ggml-cpu)"
                               : "fp32 mode (APEX_GGML_EXACT=0)");
    if (first && !g_kv_hook_asked)
        fprintf(stderr, "APEX: this llama.cpp never asked the backends for its KV cache's buffer type (built without "
                        "APEX's patch, integration/llama_cpp/llama-kv-cache-buft-hook.patch?): the KV cache stays "
                        "in llama.cpp's buffers, where APEX reads and writes it\n");
    return 1;
}

/* The model layer of a KV tensor (llama.cpp's "cache_k_l<il>"), or -1. */
static int kv_layer(const struct ggml_tensor *t) {
    int il;
    char kind;
    return sscanf(root_of(t)->name, "cache_%c_l%d", &kind, &il) == 2 ? il : -1;
}

static int64_t row_index(const struct ggml_tensor *idx, int64_t i) {
    return idx->type == GGML_TYPE_I64 ? ((const int64_t *)idx->data)[i] : ((const int32_t *)idx->data)[i];
}

/* The rows are checked first (a bad index changes nothing), converted on
 * n_threads (a prefill writes many), then reported to the GPU tier. */
static enum ggml_status run_set_rows(struct ggml_tensor *op, int n_threads) {
    const struct ggml_tensor *src = op->src[0], *idx = op->src[1];
    const struct ggml_tensor *root = root_of(op);
    gpu_tier *tier = tier_of(op);
    const double t0 = now_s();
    const int64_t n = src->ne[1], w = op->ne[0];
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = row_index(idx, i);
        if (r < 0 || r >= op->ne[1]) {
            fprintf(stderr, "APEX: KV write row %lld out of range [0, %lld)\n", (long long)r, (long long)op->ne[1]);
            return GGML_STATUS_FAILED;
        }
    }
    SHIM_TRACE_BEGIN(APEX_TRACE_COPY, "KV rows (SET_ROWS)", kv_layer(op));
    const int par = n * w >= (1 << 16) ? n_threads : 1;
#pragma omp parallel for num_threads(par) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *s = (const float *)((const char *)src->data + i * src->nb[1]);
        char *d = (char *)op->data + row_index(idx, i) * op->nb[1];
        if (op->type == GGML_TYPE_F16) {
            uint16_t *h = (uint16_t *)d;
            for (int64_t j = 0; j < w; j++) h[j] = apex_f32_to_f16(s[j]);
        } else {
            memcpy(d, s, (size_t)w * sizeof(float));
        }
    }
    for (int64_t i = 0; tier && i < n; i++)
        gpu_tier_written(tier, root, (size_t)((const char *)op->data - (const char *)root->data) +
                                         (size_t)row_index(idx, i) * op->nb[1],
                         (size_t)w * ggml_type_size(op->type));
    SHIM_TRACE_END();
    const double dt = now_s() - t0;
    pthread_mutex_lock(&g_lock);
    g_stats.kv_write_calls++;
    g_stats.kv_writes_in_pool += (uint64_t)in_pool(op);
    g_stats.kv_rows_written += (uint64_t)n;
    g_stats.kv_write_seconds += dt;
    pthread_mutex_unlock(&g_lock);
    return GGML_STATUS_SUCCESS;
}

/* The CPU kernel over the streams j of d with gpu[j] == which, in runs of
 * adjacent streams; 1 if it ran. */
static int run_streams(const cpu_attn_strided_desc *d, const unsigned char *gpu, int which, int n_threads) {
    for (int32_t j = 0; j < d->n_streams;) {
        int32_t e = j;
        while (e < d->n_streams && gpu[e] == which) e++;
        if (e > j) {
            cpu_attn_strided_desc r = *d;
            r.n_streams = e - j;
            r.q = (const float *)((const char *)d->q + j * d->q_nb_stream);
            r.k = (const char *)d->k + j * d->k_nb_stream;
            r.v = (const char *)d->v + j * d->v_nb_stream;
            if (d->mask) r.mask = (const uint16_t *)((const char *)d->mask + j * d->mask_nb_stream);
            r.out = (float *)((char *)d->out + j * d->out_nb_stream);
            if (cpu_attn_strided(&r, n_threads) != 0) return 0;
        }
        j = e + 1;
    }
    return 1;
}

static enum ggml_status run_fa(struct ggml_tensor *op, int n_threads) {
    const struct ggml_tensor *q = op->src[0], *k = op->src[1], *v = op->src[2], *mask = op->src[3];
    cpu_attn_strided_desc d;
    memset(&d, 0, sizeof d);
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
    gpu_tier *tier = tier_of(k);
    d.ggml_compat = tier ? exact_hybrid() : exact_mode();
    d.ggml_n_threads = n_threads; /* llama.cpp gives ggml-cpu and APEX the same count */
    d.ggml_streams = d.n_streams;
    /* The first stream of this op: K is a view of the cache starting there. */
    int64_t s0 = 0;
    if (k->view_src && k->view_src->nb[2] > 0 && k->view_src->ne[2] > 1 && is_kv_cache(k))
        s0 = (int64_t)(k->view_offs / k->view_src->nb[2]);
    const double t0 = now_s();
    /* The streams the GPU tier holds attend there, on its thread, while the
     * others attend on the CPU (one thread fewer: the tier's waits on the
     * device). */
    unsigned char gpu[APEX_GGML_MAX_STREAMS];
    memset(gpu, 0, sizeof gpu);
    int n_plan = 0, tier_failed = 0;
    const int layer = kv_layer(k);
    SHIM_TRACE_BEGIN(APEX_TRACE_INFO, "GPU tier: plan", layer);
    if (tier && d.n_streams <= APEX_GGML_MAX_STREAMS && tier_of(v) == tier)
        n_plan = gpu_tier_plan(tier, op, s0, gpu);
    SHIM_TRACE_END();
    SHIM_TRACE_BEGIN(APEX_TRACE_INFO, "GPU tier: start", layer);
    if (n_plan) gpu_tier_start(tier);
    SHIM_TRACE_END();
    SHIM_TRACE_BEGIN(APEX_TRACE_CPU_ATTN, "CPU kernel (cpu_attn_strided)", layer);
    int ok = run_streams(&d, gpu, 0, n_plan && n_threads > 2 ? n_threads - 1 : n_threads);
    SHIM_TRACE_END();
    if (n_plan) {
        SHIM_TRACE_BEGIN(APEX_TRACE_WAIT, "wait for the GPU tier", layer);
        const int tier_ok = gpu_tier_wait(tier) == 0;
        SHIM_TRACE_END();
        /* APEX_GGML_TIER_CHECK=1: the CPU kernel recomputes the tier's
         * streams, its results are kept, and the largest difference counted. */
        float *gpu_out = tier_ok && env_on("APEX_GGML_TIER_CHECK") ? malloc(ggml_nbytes(op)) : NULL;
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
            pthread_mutex_lock(&g_lock);
            if (worst > g_stats.tier_check_max_diff) g_stats.tier_check_max_diff = worst;
            pthread_mutex_unlock(&g_lock);
        }
    }
    if (!ok) {
        pthread_mutex_lock(&g_lock);
        g_stats.errors++;
        pthread_mutex_unlock(&g_lock);
        fprintf(stderr, "APEX: attention failed (bad operands or out of memory)\n");
        return GGML_STATUS_FAILED;
    }
    const double dt = now_s() - t0;
    pthread_mutex_lock(&g_lock);
    g_stats.attention_calls++;
    g_stats.tier_fallbacks += (uint64_t)tier_failed;
    g_stats.attention_kv_in_pool += (uint64_t)(in_pool(k) && in_pool(v));
    g_stats.attention_seconds += dt;
    g_stats.n_threads = n_threads;
    if (d.n_tokens == 1)
        g_stats.decode_attn += (uint64_t)d.n_streams;
    else
        g_stats.prefill_tokens += (uint64_t)d.n_tokens * (uint64_t)d.n_streams;
    for (int64_t s = s0; s < s0 + d.n_streams; s++) {
        if (s < APEX_GGML_MAX_STREAMS) g_stats.stream_attn[s]++;
        const int on_gpu = gpu[s - s0];
        if (s < APEX_GGML_MAX_STREAMS && on_gpu) g_stats.stream_gpu[s]++;
        g_stats.gpu_attn += (uint64_t)on_gpu;
        if (s > g_stats.max_stream) g_stats.max_stream = (int32_t)s;
    }
    pthread_mutex_unlock(&g_lock);
    return GGML_STATUS_SUCCESS;
}

/* ------------------------------------------------------------ backend */

typedef struct backend_ctx {
    int n_threads;
    /* Other ops writing into an APEX_Hybrid buffer run on a CPU backend of
     * APEX's own, one node at a time (made at the first such op). */
    ggml_backend_t cpu;
    struct ggml_context *gctx;
    struct ggml_cgraph *g1;
} backend_ctx;

/* ggml-cpu's device (libggml's registry, resolved at run time: this library
 * links only ggml-base). */
static ggml_backend_dev_t cpu_dev(void) {
    typedef ggml_backend_dev_t (*by_type_fn)(enum ggml_backend_dev_type);
    static by_type_fn by_type;
    static int tried;
    if (!tried) {
        *(void **)&by_type = dlsym(RTLD_DEFAULT, "ggml_backend_dev_by_type");
        tried = 1;
    }
    return by_type ? by_type(GGML_BACKEND_DEVICE_TYPE_CPU) : NULL;
}

/* An op other than the KV writes APEX runs itself (K-shift's RoPE, a copy)
 * that writes into an APEX_Hybrid buffer: APEX takes it, so that the GPU
 * tier learns which rows changed, and ggml-cpu computes it. */
static int supports_hybrid_write(const struct ggml_tensor *op) {
    if (op->op == GGML_OP_FLASH_ATTN_EXT || !tier_of(op)) return 0;
    ggml_backend_dev_t d = cpu_dev();
    return d && ggml_backend_dev_supports_op(d, op);
}

static enum ggml_status run_hybrid_write(backend_ctx *c, struct ggml_tensor *op) {
    if (!c->cpu) {
        ggml_backend_dev_t d = cpu_dev();
        struct ggml_init_params ip = {ggml_graph_overhead_custom(1, false) + 256, NULL, true};
        c->cpu = d ? ggml_backend_dev_init(d, NULL) : NULL;
        c->gctx = c->cpu ? ggml_init(ip) : NULL;
        c->g1 = c->gctx ? ggml_new_graph_custom(c->gctx, 1, false) : NULL;
        if (!c->g1) {
            fprintf(stderr, "APEX: cannot start ggml-cpu for %s into the KV cache\n", ggml_op_name(op->op));
            return GGML_STATUS_FAILED;
        }
        typedef void (*set_threads_fn)(ggml_backend_t, int);
        set_threads_fn set = (set_threads_fn)ggml_backend_reg_get_proc_address(ggml_backend_dev_backend_reg(d),
                                                                                "ggml_backend_set_n_threads");
        if (set) set(c->cpu, c->n_threads);
    }
    ggml_graph_clear(c->g1);
    ggml_graph_add_node(c->g1, op);
    SHIM_TRACE_BEGIN(APEX_TRACE_COPY, "ggml-cpu op into hybrid KV", kv_layer(op));
    const enum ggml_status st = ggml_backend_graph_compute(c->cpu, c->g1);
    kv_written(op, 0, ggml_nbytes(op));
    SHIM_TRACE_END();
    return st;
}

static ggml_guid g_guid = {0x41, 0x50, 0x45, 0x58, 0x2d, 0x67, 0x67, 0x6d,
                           0x6c, 0x2d, 0x61, 0x74, 0x74, 0x6e, 0x00, 0x01};

static const char *be_get_name(ggml_backend_t b) { (void)b; return "APEX"; }

static void be_free(ggml_backend_t b) {
    backend_ctx *c = (backend_ctx *)b->context;
    if (c->cpu) ggml_backend_free(c->cpu);
    if (c->gctx) ggml_free(c->gctx);
    free(c);
    free(b);
}

static enum ggml_status compute_nodes(backend_ctx *c, struct ggml_cgraph *g) {
    const int n = ggml_graph_n_nodes(g);
    for (int i = 0; i < n; i++) {
        struct ggml_tensor *node = ggml_graph_node(g, i);
        enum ggml_status st = GGML_STATUS_SUCCESS;
        switch (node->op) {
        case GGML_OP_NONE:
        case GGML_OP_RESHAPE:
        case GGML_OP_VIEW:
        case GGML_OP_PERMUTE:
        case GGML_OP_TRANSPOSE:
            break;
        case GGML_OP_SET_ROWS:
            st = (ops_mask() & 2) && supports_set_rows(node) ? run_set_rows(node, c->n_threads) : run_hybrid_write(c, node);
            break;
        case GGML_OP_FLASH_ATTN_EXT:
            st = run_fa(node, c->n_threads);
            break;
        default:
            if (tier_of(node)) {
                st = run_hybrid_write(c, node);
                break;
            }
            fprintf(stderr, "APEX: was given an op it does not run (%s)\n", ggml_op_name(node->op));
            st = GGML_STATUS_FAILED;
        }
        if (st != GGML_STATUS_SUCCESS) return st;
    }
    return GGML_STATUS_SUCCESS;
}

/* One graph split given to APEX is one engine call into APEX (the time
 * between two is the engine's): an attention call when it holds the
 * layer's FLASH_ATTN_EXT, else a KV write. */
static enum ggml_status be_graph_compute(ggml_backend_t b, struct ggml_cgraph *g) {
    apex_trace_kind kind = APEX_TRACE_CALL;
    int layer = -1;
    for (int i = 0; shim_trace_active() && i < ggml_graph_n_nodes(g); i++) {
        const struct ggml_tensor *node = ggml_graph_node(g, i);
        if (node->op == GGML_OP_FLASH_ATTN_EXT) kind = APEX_TRACE_CALL_ATTN, layer = kv_layer(node->src[1]);
        else if (node->op == GGML_OP_SET_ROWS && layer < 0) layer = kv_layer(node);
    }
    SHIM_TRACE_BEGIN(kind, kind == APEX_TRACE_CALL_ATTN ? "APEX attention (ggml split)" : "APEX KV write (ggml split)",
                     layer);
    const enum ggml_status st = compute_nodes((backend_ctx *)b->context, g);
    SHIM_TRACE_END();
    return st;
}

static const struct ggml_backend_i g_backend_iface = {
    .get_name = be_get_name,
    .free = be_free,
    .graph_compute = be_graph_compute,
};

static void set_n_threads(ggml_backend_t b, int n_threads) {
    if (b && b->iface.get_name == be_get_name && n_threads > 0) ((backend_ctx *)b->context)->n_threads = n_threads;
}

/* ------------------------------------------------------------- device */

static const char *dev_get_name(ggml_backend_dev_t d) { (void)d; return "APEX"; }
static const char *dev_get_desc(ggml_backend_dev_t d) {
    (void)d;
    return "APEX hybrid attention (CPU kernel; GPU tier for APEX_Hybrid KV)";
}
static void dev_get_memory(ggml_backend_dev_t d, size_t *free_b, size_t *total) {
    (void)d;
    *free_b = 0, *total = 0;
}
static enum ggml_backend_dev_type dev_get_type(ggml_backend_dev_t d) {
    (void)d;
    return GGML_BACKEND_DEVICE_TYPE_ACCEL;
}
static void dev_get_props(ggml_backend_dev_t d, struct ggml_backend_dev_props *p) {
    memset(p, 0, sizeof *p);
    p->name = dev_get_name(d);
    p->description = dev_get_desc(d);
    p->type = GGML_BACKEND_DEVICE_TYPE_ACCEL;
}

static ggml_backend_t dev_init_backend(ggml_backend_dev_t dev, const char *params) {
    (void)params;
    ggml_backend_t b = calloc(1, sizeof *b);
    backend_ctx *c = calloc(1, sizeof *c);
    if (!b || !c) {
        free(b), free(c);
        return NULL;
    }
    c->n_threads = omp_get_max_threads();
    shim_trace_init();
    b->guid = &g_guid;
    b->iface = g_backend_iface;
    b->device = dev;
    b->context = c;
    return b;
}

static ggml_backend_buffer_type_t dev_get_buft(ggml_backend_dev_t d) {
    (void)d;
    return ggml_backend_cpu_buffer_type();
}

static bool dev_supports_op(ggml_backend_dev_t d, const struct ggml_tensor *op) {
    (void)d;
    const int ops = ops_mask();
    switch (op->op) {
    case GGML_OP_SET_ROWS: return ((ops & 2) && supports_set_rows(op)) || supports_hybrid_write(op);
    case GGML_OP_FLASH_ATTN_EXT: return (ops & 1) && supports_fa(op);
    default: return supports_hybrid_write(op);
    }
}

/* Host buffers: ggml's CPU buffers and APEX's own pool (APEX_Host). */
static bool dev_supports_buft(ggml_backend_dev_t d, ggml_backend_buffer_type_t buft) {
    (void)d;
    return ggml_backend_buft_is_host(buft);
}

static const struct ggml_backend_device_i g_dev_iface = {
    .get_name = dev_get_name,
    .get_description = dev_get_desc,
    .get_memory = dev_get_memory,
    .get_type = dev_get_type,
    .get_props = dev_get_props,
    .init_backend = dev_init_backend,
    .get_buffer_type = dev_get_buft,
    .supports_op = dev_supports_op,
    .supports_buft = dev_supports_buft,
};


/* ------------------------------------------ the KV cache in APEX's host pool
 *
 * llama.cpp (patched: integration/llama_cpp/llama-kv-cache-buft-hook.patch)
 * asks every registered backend, through the proc address
 * "ggml_backend_kv_cache_buffer_type", whether it supplies the buffer type of
 * a layer's KV cache. APEX answers with APEX_Host for host-resident KV (the
 * placement llama.cpp gives CPU layers and -nkvo: ggml's CPU buffer type) of
 * a geometry it runs. Its buffers are APEX's host-pool memory: the core's
 * host-tier allocator (csrc/host_mem.c: page-aligned mmap, transparent huge
 * pages, bound to the NUMA nodes of the worker cores, APEX_CPUSET), and
 * registered with CUDA (cudaHostRegister, portable) when the process has the
 * CUDA runtime, as the core pins its host pool (APEX_PIN_HOST_POOL=0 skips
 * it). The layout is ggml's own (token-major rows) and the type is_host, so
 * ggml-cpu's ops, ggml_backend_tensor_get/set/copy, buffer clears, K-shift
 * and state save/load work on it unchanged, and APEX's kernel reads it in
 * place. An allocation the pool cannot make returns NULL with one line on
 * stderr: llama.cpp then fails the context cleanly ("failed to allocate
 * buffer for kv cache"); nothing aborts. */

typedef struct kv_pool_buf {
    void *mem;
    size_t bytes;
    int pinned;
    gpu_tier *tier; /* APEX_Hybrid: the GPU tier; APEX_Host: NULL */
} kv_pool_buf;

static gpu_tier *tier_of(const struct ggml_tensor *t) {
    const struct ggml_backend_buffer *b = root_of(t)->buffer;
    return b && b->buft == &g_kv_hybrid_buft ? ((const kv_pool_buf *)b->context)->tier : NULL;
}

/* Bytes [off, off + size) of t (a KV tensor or a view of one) were written
 * on the host: the GPU tier of an APEX_Hybrid buffer marks them stale. */
static void kv_written(const struct ggml_tensor *t, size_t off, size_t size) {
    gpu_tier *tier = tier_of(t);
    const struct ggml_tensor *root = root_of(t);
    if (tier) gpu_tier_written(tier, root, (size_t)((const char *)t->data - (const char *)root->data) + off, size);
}

static cpu_workers g_workers;
static int g_workers_state; /* 0: not yet, 1: loaded, -1: unavailable */
static int g_logged_kv_off, g_logged_kv_device;

static int kv_pool_enabled(void) {
    const char *e = getenv("APEX_GGML_KV_POOL");
    return !(e && strcmp(e, "0") == 0);
}

/* The worker cores' topology (for the NUMA binding), loaded once. */
static const cpu_workers *kv_pool_workers(void) {
    pthread_mutex_lock(&g_lock);
    if (g_workers_state == 0) {
        const char *set = getenv("APEX_CPUSET");
        if (cpu_workers_init(&g_workers, set, 0, NULL) == APEX_OK) {
            g_workers_state = 1;
        } else {
            g_workers_state = -1;
            fprintf(stderr, "APEX: KV pool not NUMA-bound (%s)\n", apex_last_error());
        }
    }
    const cpu_workers *w = g_workers_state == 1 ? &g_workers : NULL;
    pthread_mutex_unlock(&g_lock);
    return w;
}

/* A CUDA runtime function, if the process already has the runtime (a CUDA
 * build of ggml); never loads it. */
static void *cuda_rt_sym(const char *name) {
    void *f = dlsym(RTLD_DEFAULT, name);
    static const char *const libs[] = {"libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0",
                                       "libcudart.so"};
    for (size_t i = 0; !f && i < sizeof libs / sizeof *libs; i++) {
        void *h = dlopen(libs[i], RTLD_NOW | RTLD_NOLOAD);
        if (h && !(f = dlsym(h, name))) dlclose(h);
    }
    return f;
}

typedef int (*cuda_host_register_fn)(void *p, size_t bytes, unsigned int flags);
typedef int (*cuda_host_unregister_fn)(void *p);
typedef int (*cuda_get_last_error_fn)(void);

/* 1 if p is now pinned; else 0 and why. */
static int kv_pool_pin(void *p, size_t bytes, char *why, size_t n) {
    const char *e = getenv("APEX_PIN_HOST_POOL");
    if (e && strcmp(e, "0") == 0) {
        snprintf(why, n, "not pinned: APEX_PIN_HOST_POOL=0");
        return 0;
    }
    cuda_host_register_fn reg = (cuda_host_register_fn)cuda_rt_sym("cudaHostRegister");
    if (!reg) {
        snprintf(why, n, "not pinned: no CUDA runtime in this process");
        return 0;
    }
    const int rc = reg(p, bytes, 1u /* cudaHostRegisterPortable */);
    if (rc != 0) {
        /* Not a sticky error, but ggml-cuda's next cudaGetLastError check
         * would see it: clear it. */
        cuda_get_last_error_fn last = (cuda_get_last_error_fn)cuda_rt_sym("cudaGetLastError");
        if (last) last();
        snprintf(why, n, "not pinned: cudaHostRegister failed with CUDA error %d; copies to the GPU are slower", rc);
        return 0;
    }
    snprintf(why, n, "pinned for CUDA");
    return 1;
}

static void kv_buf_free(ggml_backend_buffer_t buf) {
    kv_pool_buf *b = (kv_pool_buf *)buf->context;
    if (b->pinned) {
        cuda_host_unregister_fn unreg = (cuda_host_unregister_fn)cuda_rt_sym("cudaHostUnregister");
        if (unreg && unreg(b->mem) != 0) {
            cuda_get_last_error_fn last = (cuda_get_last_error_fn)cuda_rt_sym("cudaGetLastError");
            if (last) last();
        }
    }
    host_mem_free(b->mem, b->bytes);
    gpu_tier_free(b->tier);
    pthread_mutex_lock(&g_lock);
    g_stats.kv_bytes_apex -= b->bytes;
    if (b->tier) g_stats.kv_bytes_hybrid -= b->bytes;
    g_stats.kv_buffers_apex--;
    if (b->pinned) g_stats.kv_bytes_pinned -= b->bytes;
    pthread_mutex_unlock(&g_lock);
    free(b);
}

static void *kv_buf_base(ggml_backend_buffer_t buf) { return ((kv_pool_buf *)buf->context)->mem; }

/* APEX_Hybrid: the GPU tier learns the KV tensors of the buffer. */
static enum ggml_status kv_buf_init_tensor(ggml_backend_buffer_t buf, struct ggml_tensor *t) {
    kv_pool_buf *b = (kv_pool_buf *)buf->context;
    if (b->tier && !t->view_src) gpu_tier_add_tensor(b->tier, t);
    return GGML_STATUS_SUCCESS;
}

static void kv_buf_memset(ggml_backend_buffer_t buf, struct ggml_tensor *t, uint8_t value, size_t off, size_t size) {
    (void)buf;
    memset((char *)t->data + off, value, size);
    kv_written(t, off, size);
}

static void kv_buf_set(ggml_backend_buffer_t buf, struct ggml_tensor *t, const void *data, size_t off, size_t size) {
    (void)buf;
    memcpy((char *)t->data + off, data, size);
    kv_written(t, off, size);
}

static void kv_buf_get(ggml_backend_buffer_t buf, const struct ggml_tensor *t, void *data, size_t off, size_t size) {
    (void)buf;
    memcpy(data, (const char *)t->data + off, size);
}

static bool kv_buf_cpy(ggml_backend_buffer_t buf, const struct ggml_tensor *src, struct ggml_tensor *dst) {
    (void)buf;
    if (!src->buffer || !ggml_backend_buffer_is_host(src->buffer)) return false;
    memcpy(dst->data, src->data, ggml_nbytes(src));
    kv_written(dst, 0, ggml_nbytes(src));
    return true;
}

static void kv_buf_clear(ggml_backend_buffer_t buf, uint8_t value) {
    kv_pool_buf *b = (kv_pool_buf *)buf->context;
    memset(b->mem, value, buf->size);
    gpu_tier_written_all(b->tier);
}

static const struct ggml_backend_buffer_i g_kv_buf_iface = {
    .free_buffer = kv_buf_free,
    .get_base = kv_buf_base,
    .init_tensor = kv_buf_init_tensor,
    .memset_tensor = kv_buf_memset,
    .set_tensor = kv_buf_set,
    .get_tensor = kv_buf_get,
    .cpy_tensor = kv_buf_cpy,
    .clear = kv_buf_clear,
};

static const char *kv_buft_name(ggml_backend_buffer_type_t buft) {
    return buft == &g_kv_hybrid_buft ? "APEX_Hybrid" : "APEX_Host";
}

/* APEX_GGML_KV_POOL_MAX_MB: the most the pool holds (unset: no cap).
 * 0 = no cap; -1 = malformed (message in why). */
static long long kv_pool_cap_bytes(char *why, size_t n) {
    const char *e = getenv("APEX_GGML_KV_POOL_MAX_MB");
    if (!e || !*e) return 0;
    char *end;
    const long long mb = strtoll(e, &end, 10);
    if (*end || mb <= 0 || mb > (1LL << 40)) {
        snprintf(why, n, "APEX_GGML_KV_POOL_MAX_MB='%s' is not a positive number of MiB", e);
        return -1;
    }
    return mb << 20;
}

static ggml_backend_buffer_t kv_buft_alloc(ggml_backend_buffer_type_t buft, size_t size) {
    const double mib = (double)size / (1024.0 * 1024.0);
    char why[256] = "";
    const long long cap = kv_pool_cap_bytes(why, sizeof why);
    /* Counted (against the cap) before the memory is mapped, so two
     * contexts made at once cannot both pass the cap. */
    pthread_mutex_lock(&g_lock);
    const uint64_t used = g_stats.kv_bytes_apex;
    const int fits = cap == 0 || (cap > 0 && used + size <= (unsigned long long)cap);
    if (fits) g_stats.kv_bytes_apex += size;
    pthread_mutex_unlock(&g_lock);
    void *mem = NULL;
    if (cap > 0 && !fits)
        snprintf(why, sizeof why, "APEX_GGML_KV_POOL_MAX_MB=%lld allows %lld MiB and %.1f MiB are in use",
                 cap >> 20, cap >> 20, (double)used / (1024.0 * 1024.0));
    else if (fits && !(mem = host_mem_alloc(kv_pool_workers(), size)))
        snprintf(why, sizeof why, "%s", apex_last_error());
    const int hybrid = buft == &g_kv_hybrid_buft;
    kv_pool_buf *b = mem ? calloc(1, sizeof *b) : NULL;
    if (b && hybrid && !(b->tier = gpu_tier_new())) {
        free(b);
        b = NULL;
    }
    if (mem && !b) snprintf(why, sizeof why, "out of memory for the buffer's record");
    if (!b) {
        if (mem) host_mem_free(mem, size);
        pthread_mutex_lock(&g_lock);
        if (fits) g_stats.kv_bytes_apex -= size;
        g_stats.kv_pool_failures++;
        pthread_mutex_unlock(&g_lock);
        fprintf(stderr,
                "APEX: cannot allocate llama.cpp's KV cache (%.1f MiB) in APEX's host pool: %s; llama.cpp will "
                "fail to create this context (%s, or set APEX_GGML_KV_POOL=0 to let llama.cpp allocate its KV "
                "cache itself)\n",
                mib, why, cap < 0 ? "fix the variable" : "lower the context size (-c) or the sequences (-np)");
        return NULL;
    }
    b->mem = mem;
    b->bytes = size;
    b->pinned = kv_pool_pin(mem, size, why, sizeof why);
    ggml_backend_buffer_t buf = ggml_backend_buffer_init(buft, g_kv_buf_iface, b, size);
    pthread_mutex_lock(&g_lock);
    g_stats.kv_buffers_apex++;
    if (b->pinned) g_stats.kv_bytes_pinned += size;
    if (hybrid) g_stats.kv_bytes_hybrid += size;
    if (g_stats.kv_bytes_apex > g_stats.kv_bytes_apex_peak) g_stats.kv_bytes_apex_peak = g_stats.kv_bytes_apex;
    pthread_mutex_unlock(&g_lock);
    char nodes[64] = "";
    const cpu_workers *w = kv_pool_workers();
    hwloc_nodeset_t ns = w ? cpu_workers_nodeset(w) : NULL;
    if (ns) {
        char *list = NULL;
        if (hwloc_bitmap_list_asprintf(&list, ns) >= 0 && list) snprintf(nodes, sizeof nodes, "%s", list);
        free(list);
        hwloc_bitmap_free(ns);
    }
    fprintf(stderr,
            "APEX: llama.cpp's KV cache lives in APEX's host pool: %.1f MiB (buffer %s; mmap, transparent "
            "huge pages, %s%s; %s)%s\n",
            mib, kv_buft_name(buft), nodes[0] ? "bound to NUMA node(s) " : "no NUMA binding", nodes, why,
            hybrid ? "; APEX's GPU tier mirrors the sequences within its budget (set up at the first attention)" : "");
    return buf;
}

static size_t kv_buft_alignment(ggml_backend_buffer_type_t buft) {
    (void)buft;
    return 64; /* a cache line, and an AVX-512 register */
}

static bool kv_buft_is_host(ggml_backend_buffer_type_t buft) {
    (void)buft;
    return true;
}

#define KV_BUFT_IFACE                                                                                   \
    {.get_name = kv_buft_name, .alloc_buffer = kv_buft_alloc, .get_alignment = kv_buft_alignment,             \
     .is_host = kv_buft_is_host}

static struct ggml_backend_buffer_type g_kv_buft = {.iface = KV_BUFT_IFACE, .device = &g_dev, .context = NULL};

/* The KV of layers llama.cpp puts on a GPU: the same host pool, plus APEX's
 * GPU tier for the sequences within its budget (ggml_apex_tier.h). */
static struct ggml_backend_buffer_type g_kv_hybrid_buft = {.iface = KV_BUFT_IFACE, .device = &g_dev,
                                                           .context = NULL};

/* The hook llama.cpp calls per layer (proc "ggml_backend_kv_cache_buffer_type"):
 * buft is what llama.cpp would use. APEX_Host, or NULL to leave it. */
static ggml_backend_buffer_type_t kv_cache_buffer_type(ggml_backend_buffer_type_t buft, enum ggml_type type_k,
                                                       enum ggml_type type_v, int64_t n_embd_head_k,
                                                       int64_t n_embd_head_v, bool v_trans) {
    g_kv_hook_asked = 1;
    if (ops_mask() == 0) return NULL; /* APEX_GGML_DISABLE=1 / APEX_GGML_OPS=none */
    if (!kv_pool_enabled()) {
        const int first = first_time(&g_logged_kv_off);
        if (first)
            fprintf(stderr, "APEX: APEX_GGML_KV_POOL=0: llama.cpp allocates its KV cache itself (attention and "
                            "KV writes still run through APEX)\n");
        return NULL;
    }
    /* A GPU layer's KV (a CUDA build, KV offload on): APEX_Hybrid, the host
     * pool plus APEX's GPU tier, for the first GPU llama.cpp asks about;
     * APEX_GGML_GPU_TIER=0 leaves it to llama.cpp. */
    static ggml_backend_dev_t hybrid_dev;
    ggml_backend_dev_t dev = buft ? ggml_backend_buft_get_device(buft) : NULL;
    const int gpu_layer = buft != ggml_backend_cpu_buffer_type();
    const char *gt = getenv("APEX_GGML_GPU_TIER");
    const int gpu_tier = !(gt && strcmp(gt, "0") == 0);
    pthread_mutex_lock(&g_lock);
    if (gpu_layer && gpu_tier && dev && ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_GPU && !hybrid_dev)
        hybrid_dev = dev;
    const int hybrid_here = gpu_layer && dev && dev == hybrid_dev;
    pthread_mutex_unlock(&g_lock);
    if (gpu_layer && !hybrid_here) {
        const int first = first_time(&g_logged_kv_device);
        if (first)
            fprintf(stderr, "APEX: the KV cache of layers on %s stays in llama.cpp's %s buffers (%s)\n",
                    dev ? ggml_backend_dev_name(dev) : "a device", buft ? ggml_backend_buft_name(buft) : "device",
                    !gpu_tier ? "APEX_GGML_GPU_TIER=0" : "APEX's GPU tier serves one GPU");
        return NULL;
    }
    /* Flash attention off (a transposed V cache): APEX takes nothing. A
     * geometry APEX declines: supports_fa says so once, at the first graph. */
    char why[200];
    if (v_trans || kv_geometry_why(type_k, type_v, n_embd_head_k, n_embd_head_v, why, sizeof why)) return NULL;
    /* APEX_GGML_HYBRID=1: host-resident KV gets the GPU tier too (with
     * APEX_DEVICE=emulated, the tests' way to run it without a GPU). */
    const int hybrid = hybrid_here || env_on("APEX_GGML_HYBRID");
    if ((hybrid ? exact_hybrid() : exact_mode()) && !exact_compat(n_embd_head_k, type_k)) return NULL;
    return hybrid ? &g_kv_hybrid_buft : &g_kv_buft;
}

/* --------------------------------------------------------------- reg */

static struct ggml_backend_reg g_reg;
static struct ggml_backend_device g_dev;

static const char *reg_get_name(ggml_backend_reg_t r) { (void)r; return "APEX"; }
static size_t reg_dev_count(ggml_backend_reg_t r) { (void)r; return 1; }
static ggml_backend_dev_t reg_dev_get(ggml_backend_reg_t r, size_t i) {
    (void)r;
    return i == 0 ? &g_dev : NULL;
}
static void *reg_proc(ggml_backend_reg_t r, const char *name) {
    (void)r;
    if (strcmp(name, "ggml_backend_set_n_threads") == 0) return (void *)set_n_threads;
    if (strcmp(name, APEX_GGML_STATS_GET) == 0) return (void *)apex_ggml_stats_get;
    if (strcmp(name, APEX_GGML_STEP_SUMMARY) == 0) return (void *)apex_ggml_step_summary;
    if (strcmp(name, "ggml_backend_kv_cache_buffer_type") == 0) return (void *)kv_cache_buffer_type;
    return NULL;
}

static const struct ggml_backend_reg_i g_reg_iface = {
    .get_name = reg_get_name,
    .get_device_count = reg_dev_count,
    .get_device = reg_dev_get,
    .get_proc_address = reg_proc,
};

static void init_reg(void) {
    g_dev.iface = g_dev_iface;
    g_dev.reg = &g_reg;
    g_dev.context = NULL;
    g_reg.api_version = GGML_BACKEND_API_VERSION;
    g_reg.iface = g_reg_iface;
    g_reg.context = NULL;
    ggml_apex_metrics_start(apex_ggml_stats_get, apex_ggml_step_summary);
}

ggml_backend_reg_t ggml_apex_reg(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, init_reg);
    return &g_reg;
}

/* GGML_BACKEND_PATH entry. When the preload library already registered APEX
 * in this process, a second registration would add a second device. */
ggml_backend_reg_t ggml_backend_init(void) {
    if (g_registered_by_preload) {
        fprintf(stderr, "APEX: already registered through LD_PRELOAD; ignoring GGML_BACKEND_PATH\n");
        return NULL;
    }
    return ggml_apex_reg();
}

/* Called by the preload library before it registers the backend (it links
 * ggml's registry, which this library does not); returns 1 the first time. */
int ggml_apex_mark_preloaded(void) {
    if (g_registered_by_preload) return 0;
    g_registered_by_preload = 1;
    return 1;
}

void apex_ggml_stats_get(apex_ggml_stats *out) {
    pthread_mutex_lock(&g_lock);
    *out = g_stats;
    pthread_mutex_unlock(&g_lock);
    gpu_tier_counters(&out->sched_steps, &out->migrations_to_device, &out->migrations_to_host);
}

/* libapex's per-step summary (the backend's spans with libapex's): see
 * ggml_apex.h. */
int apex_ggml_step_summary(apex_step_summary *out, int reset) {
    if (!shim_trace_active()) return 0;
    apex_step_summary s;
    const int ok = shim_trace_.summary(out ? out : &s) == APEX_OK;
    if (reset) shim_trace_.summary_reset();
    return ok;
}

/* At exit: where each sequence's attention ran, and the counters as JSON. */
__attribute__((destructor)) static void report(void) {
    ggml_apex_metrics_stop(); /* its last write: the final counters */
    apex_ggml_stats s;
    apex_ggml_stats_get(&s);
    const char *path = getenv("APEX_STATS_FILE");
    if (path && *path) {
        FILE *f = fopen(path, "w");
        if (f) {
            fprintf(f,
                    "{\"attention_calls\": %llu, \"decode_attn\": %llu, \"prefill_tokens\": %llu, "
                    "\"kv_write_calls\": %llu, \"kv_rows_written\": %llu, \"declined\": %llu, "
                    "\"attention_seconds\": %.6f, \"kv_write_seconds\": %.6f, \"n_threads\": %d, "
                    "\"isa\": \"%s\", \"tier\": \"%s\", \"gpu_attn\": %llu, \"tier_check_max_diff\": %g, "
                    "\"kv_bytes_hybrid\": %llu, \"kv_bytes_apex_peak\": %llu, "
                    "\"kv_pool_failures\": %llu, \"attention_kv_in_pool\": %llu, \"kv_writes_in_pool\": %llu, "
                    "\"stream_attn\": [",
                    (unsigned long long)s.attention_calls, (unsigned long long)s.decode_attn,
                    (unsigned long long)s.prefill_tokens, (unsigned long long)s.kv_write_calls,
                    (unsigned long long)s.kv_rows_written, (unsigned long long)s.declined,
                    s.attention_seconds, s.kv_write_seconds, s.n_threads, cpu_attn_strided_isa(),
                    s.gpu_attn ? "hybrid" : "host", (unsigned long long)s.gpu_attn, (double)s.tier_check_max_diff,
                    (unsigned long long)s.kv_bytes_hybrid,
                    (unsigned long long)s.kv_bytes_apex_peak, (unsigned long long)s.kv_pool_failures,
                    (unsigned long long)s.attention_kv_in_pool, (unsigned long long)s.kv_writes_in_pool);
            for (int i = 0; i <= s.max_stream && i < APEX_GGML_MAX_STREAMS; i++)
                fprintf(f, "%s%llu", i ? ", " : "", (unsigned long long)s.stream_attn[i]);
            fprintf(f, "], \"stream_gpu\": [");
            for (int i = 0; i <= s.max_stream && i < APEX_GGML_MAX_STREAMS; i++)
                fprintf(f, "%s%llu", i ? ", " : "", (unsigned long long)s.stream_gpu[i]);
            fprintf(f, "]");
            apex_step_summary ss;
            if (apex_ggml_step_summary(&ss, 0))
                fprintf(f,
                        ", \"step_summary\": {\"steps\": %llu, \"layer_steps\": %llu, \"engine_us_per_layer\": %.3f, "
                        "\"apex_us_per_layer\": %.3f, \"cpu_attn_us_per_layer\": %.3f, \"gpu_attn_us_per_layer\": %.3f, "
                        "\"gpu_kernel_us_per_layer\": %.3f, \"copy_us_per_layer\": %.3f, \"wait_us_per_layer\": %.3f, "
                        "\"apex_overhead_us_per_layer\": %.3f, \"step_gap_us\": %.3f}",
                        (unsigned long long)ss.steps, (unsigned long long)ss.layer_steps, ss.engine_us, ss.apex_us,
                        ss.cpu_attn_us, ss.gpu_attn_us, ss.gpu_kernel_us, ss.copy_us, ss.wait_us,
                        ss.apex_overhead_us, ss.step_gap_us);
            fprintf(f, "}\n");
            fclose(f);
        }
    }
    if (s.attention_calls == 0 || env_on("APEX_GGML_QUIET")) return;
    fprintf(stderr, "APEX: %llu attention ops (%llu single-token sequence-layer attentions, %llu multi-token query rows) "
                    "in %.3f s, %llu KV rows written; %s (CPU kernel %s, %d threads):",
            (unsigned long long)s.attention_calls, (unsigned long long)s.decode_attn,
            (unsigned long long)s.prefill_tokens, s.attention_seconds, (unsigned long long)s.kv_rows_written,
            s.gpu_attn ? "GPU tier and host tier" : "every sequence on the host tier", cpu_attn_strided_isa(),
            s.n_threads);
    for (int i = 0; i <= s.max_stream && i < APEX_GGML_MAX_STREAMS; i++) {
        const unsigned long long g = s.stream_gpu[i], cpu = s.stream_attn[i] - s.stream_gpu[i];
        if (g && cpu) fprintf(stderr, " seq%d=GPU(%llu)+CPU(%llu)", i, g, cpu);
        else if (g) fprintf(stderr, " seq%d=GPU(%llu)", i, g);
        else fprintf(stderr, " seq%d=CPU(%llu)", i, cpu);
    }
    if (s.kv_bytes_apex_peak)
        fprintf(stderr, "; KV cache in APEX's host pool (up to %.1f MiB; %llu of %llu attention ops read it there)",
                (double)s.kv_bytes_apex_peak / (1024.0 * 1024.0), (unsigned long long)s.attention_kv_in_pool,
                (unsigned long long)s.attention_calls);
    else
        fprintf(stderr, "; KV cache in llama.cpp's own buffers");
    fprintf(stderr, "\n");
    apex_step_summary ss;
    if (apex_ggml_step_summary(&ss, 0) && ss.layer_steps)
        fprintf(stderr,
                "APEX: per layer per step (%llu steps): engine %.1f us, APEX %.1f us (CPU attention %.1f, copies %.1f, "
                "waits %.1f, overhead %.1f); GPU tier attention %.1f us beside it\n",
                (unsigned long long)ss.steps, ss.engine_us, ss.apex_us, ss.cpu_attn_us, ss.copy_us, ss.wait_us,
                ss.apex_overhead_us, ss.gpu_attn_us);
}
