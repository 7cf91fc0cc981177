/* ggml_apex_buffer.c - llama.cpp's KV cache in APEX's host pool: the
 * buffer types APEX_Host and APEX_Hybrid (see ggml_apex.h) and their
 * buffers, whose memory is libapex's host KV memory (apex_strided.h). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "apex/apex_strided.h"
#include "shim/ggml_apex_impl.h"
#include "shim/ggml_apex_tier.h"

int shim_kv_hook_asked;
static struct ggml_backend_buffer_type g_kv_buft, g_kv_hybrid_buft;

/* ------------------------------------------ the KV cache in APEX's host pool
 *
 * llama.cpp (patched: integration/llama_cpp/llama-kv-cache-buft-hook.patch)
 * asks every registered backend, through the proc address
 * "ggml_backend_kv_cache_buffer_type", whether it supplies the buffer type of
 * a layer's KV cache. APEX answers with APEX_Host for host-resident KV (the
 * placement llama.cpp gives CPU layers and -nkvo: ggml's CPU buffer type) of
 * a geometry it runs. Its buffers are APEX's host-pool memory: libapex's
 * host KV memory (apex_host_kv_alloc: page-aligned mmap, transparent huge
 * pages, bound to the NUMA nodes of the worker cores, APEX_CPUSET), and
 * registered with CUDA (apex_host_kv_pin: cudaHostRegister, portable) when
 * the process has the CUDA runtime, as the core pins its host pool
 * (APEX_PIN_HOST_POOL=0 skips it). The layout is ggml's own (token-major rows) and the type is_host, so
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


/* 1 if t's memory is in APEX's host pool. */
int shim_in_pool(const struct ggml_tensor *t) {
    const struct ggml_backend_buffer *b = shim_root_of(t)->buffer;
    return b && (b->buft == &g_kv_buft || b->buft == &g_kv_hybrid_buft);
}

gpu_tier *shim_tier_of(const struct ggml_tensor *t) {
    const struct ggml_backend_buffer *b = shim_root_of(t)->buffer;
    return b && b->buft == &g_kv_hybrid_buft ? ((const kv_pool_buf *)b->context)->tier : NULL;
}

/* Bytes [off, off + size) of t (a KV tensor or a view of one) were written
 * on the host: the GPU tier of an APEX_Hybrid buffer marks them stale. */
void shim_kv_written(const struct ggml_tensor *t, size_t off, size_t size) {
    gpu_tier *tier = shim_tier_of(t);
    const struct ggml_tensor *root = shim_root_of(t);
    if (tier) gpu_tier_written(tier, root, (size_t)((const char *)t->data - (const char *)root->data) + off, size);
}

static int g_logged_kv_off, g_logged_kv_device, g_logged_numa;

static int kv_pool_enabled(void) {
    const char *e = getenv("APEX_GGML_KV_POOL");
    return !(e && strcmp(e, "0") == 0);
}

/* The NUMA nodes libapex binds the pool to (into nodes; "" for none); one
 * line, once, when the worker cores' topology is not there. */
static void kv_pool_nodes(char *nodes, size_t n) {
    if (apex_host_kv_nodes(nodes, n) != APEX_OK && shim_first_time(&g_logged_numa))
        fprintf(stderr, "APEX: KV pool not NUMA-bound (%s)\n", apex_last_error());
}

/* 1 if p is now pinned; else 0. why: what happened, for the log line. */
static int kv_pool_pin(void *p, size_t bytes, char *why, size_t n) {
    if (apex_host_kv_pin(p, bytes) != APEX_OK) {
        snprintf(why, n, "not pinned: %s", apex_last_error());
        return 0;
    }
    snprintf(why, n, "pinned for CUDA");
    return 1;
}

static void kv_buf_free(ggml_backend_buffer_t buf) {
    kv_pool_buf *b = (kv_pool_buf *)buf->context;
    if (b->pinned) apex_host_kv_unpin(b->mem); /* a failure leaves nothing to do */
    apex_host_kv_free(b->mem, b->bytes);
    gpu_tier_free(b->tier);
    pthread_mutex_lock(&shim_lock);
    shim_stats.kv_bytes_apex -= b->bytes;
    if (b->tier) shim_stats.kv_bytes_hybrid -= b->bytes;
    shim_stats.kv_buffers_apex--;
    if (b->pinned) shim_stats.kv_bytes_pinned -= b->bytes;
    pthread_mutex_unlock(&shim_lock);
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
    shim_kv_written(t, off, size);
}

static void kv_buf_set(ggml_backend_buffer_t buf, struct ggml_tensor *t, const void *data, size_t off, size_t size) {
    (void)buf;
    memcpy((char *)t->data + off, data, size);
    shim_kv_written(t, off, size);
}

static void kv_buf_get(ggml_backend_buffer_t buf, const struct ggml_tensor *t, void *data, size_t off, size_t size) {
    (void)buf;
    memcpy(data, (const char *)t->data + off, size);
}

static bool kv_buf_cpy(ggml_backend_buffer_t buf, const struct ggml_tensor *src, struct ggml_tensor *dst) {
    (void)buf;
    if (!src->buffer || !ggml_backend_buffer_is_host(src->buffer)) return false;
    memcpy(dst->data, src->data, ggml_nbytes(src));
    shim_kv_written(dst, 0, ggml_nbytes(src));
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
    pthread_mutex_lock(&shim_lock);
    const uint64_t used = shim_stats.kv_bytes_apex;
    const int fits = cap == 0 || (cap > 0 && used + size <= (unsigned long long)cap);
    if (fits) shim_stats.kv_bytes_apex += size;
    pthread_mutex_unlock(&shim_lock);
    void *mem = NULL;
    char nodes[64] = "";
    if (fits) kv_pool_nodes(nodes, sizeof nodes);
    if (cap > 0 && !fits)
        snprintf(why, sizeof why, "APEX_GGML_KV_POOL_MAX_MB=%lld allows %lld MiB and %.1f MiB are in use",
                 cap >> 20, cap >> 20, (double)used / (1024.0 * 1024.0));
    else if (fits && apex_host_kv_alloc(size, &mem) != APEX_OK)
        snprintf(why, sizeof why, "%s", apex_last_error());
    const int hybrid = buft == &g_kv_hybrid_buft;
    kv_pool_buf *b = mem ? calloc(1, sizeof *b) : NULL;
    if (b && hybrid && !(b->tier = gpu_tier_new())) {
        free(b);
        b = NULL;
    }
    if (mem && !b) snprintf(why, sizeof why, "out of memory for the buffer's record");
    if (!b) {
        if (mem) apex_host_kv_free(mem, size);
        pthread_mutex_lock(&shim_lock);
        if (fits) shim_stats.kv_bytes_apex -= size;
        shim_stats.kv_pool_failures++;
        pthread_mutex_unlock(&shim_lock);
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
    pthread_mutex_lock(&shim_lock);
    shim_stats.kv_buffers_apex++;
    if (b->pinned) shim_stats.kv_bytes_pinned += size;
    if (hybrid) shim_stats.kv_bytes_hybrid += size;
    if (shim_stats.kv_bytes_apex > shim_stats.kv_bytes_apex_peak) shim_stats.kv_bytes_apex_peak = shim_stats.kv_bytes_apex;
    pthread_mutex_unlock(&shim_lock);
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

static struct ggml_backend_buffer_type g_kv_buft = {.iface = KV_BUFT_IFACE, .device = &shim_dev, .context = NULL};

/* The KV of layers llama.cpp puts on a GPU: the same host pool, plus APEX's
 * GPU tier for the sequences within its budget (ggml_apex_tier.h). */
static struct ggml_backend_buffer_type g_kv_hybrid_buft = {.iface = KV_BUFT_IFACE, .device = &shim_dev,
                                                           .context = NULL};

/* The hook llama.cpp calls per layer (proc "ggml_backend_kv_cache_buffer_type"):
 * buft is what llama.cpp would use. APEX_Host, or NULL to leave it. */
ggml_backend_buffer_type_t shim_kv_cache_buffer_type(ggml_backend_buffer_type_t buft, enum ggml_type type_k,
                                                     enum ggml_type type_v, int64_t n_embd_head_k,
                                                     int64_t n_embd_head_v, bool v_trans) {
    shim_kv_hook_asked = 1;
    if (shim_ops_mask() == 0) return NULL; /* APEX_GGML_DISABLE=1 / APEX_GGML_OPS=none */
    if (!kv_pool_enabled()) {
        const int first = shim_first_time(&g_logged_kv_off);
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
    pthread_mutex_lock(&shim_lock);
    if (gpu_layer && gpu_tier && dev && ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_GPU && !hybrid_dev)
        hybrid_dev = dev;
    const int hybrid_here = gpu_layer && dev && dev == hybrid_dev;
    pthread_mutex_unlock(&shim_lock);
    if (gpu_layer && !hybrid_here) {
        const int first = shim_first_time(&g_logged_kv_device);
        if (first)
            fprintf(stderr, "APEX: the KV cache of layers on %s stays in llama.cpp's %s buffers (%s)\n",
                    dev ? ggml_backend_dev_name(dev) : "a device", buft ? ggml_backend_buft_name(buft) : "device",
                    !gpu_tier ? "APEX_GGML_GPU_TIER=0" : "APEX's GPU tier serves one GPU");
        return NULL;
    }
    /* Flash attention off (a transposed V cache): APEX takes nothing. A
     * geometry APEX declines: shim_supports_fa says so once, at the first graph. */
    char why[200];
    if (v_trans || shim_kv_geometry_why(type_k, type_v, n_embd_head_k, n_embd_head_v, why, sizeof why)) return NULL;
    /* APEX_GGML_HYBRID=1: host-resident KV gets the GPU tier too (with
     * APEX_DEVICE=emulated, the tests' way to run it without a GPU). */
    const int hybrid = hybrid_here || shim_env_on("APEX_GGML_HYBRID");
    if ((hybrid ? shim_exact_hybrid() : shim_exact_mode()) && !shim_exact_compat(n_embd_head_k, type_k)) return NULL;
    return hybrid ? &g_kv_hybrid_buft : &g_kv_buft;
}
