/* ggml_apex_tier.c - the GPU tier of llama.cpp's KV cache: see ggml_apex_tier.h.
 *
 * Block ids of the paged context: the device tier is n_gpu slots of bps =
 * kv_size / block_tokens blocks (block_tokens divides kv_size). A stream
 * placed in slot k keeps cell c of a layer at paged slot k * kv_size + c,
 * block (k * kv_size + c) / block_tokens, so its block table is [k * bps,
 * (k + 1) * bps). Which stream holds which slot is the scheduler's
 * (place_step, once per decode step). The context's host tier (one block)
 * is never used: the host copy is llama.cpp's tensor. */
#include "shim/ggml_apex_tier.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "apex/apex.h"
#include "apex/apex_paged.h"
#include "cpu_attn/dtype_convert.h"
#include "shim/ggml_apex_impl.h"
#include "shim/ggml_apex_trace.h"

#define TIER_MAX_LAYERS 1024
#define TIER_MAX_STREAMS 256
#define F16_NEG_INF 0xFC00u

/* libapex's entry points the tier calls. */
typedef struct tier_layer {
    int il;                           /* llama.cpp's layer index            */
    const struct ggml_tensor *k, *v;  /* the layer's KV tensors             */
    uint64_t *stale;                  /* [n_gpu slots][words]: cells to store */
} tier_layer;

struct gpu_tier {
    pthread_mutex_t lock;
    int n_layers;
    tier_layer layers[TIER_MAX_LAYERS];
    int state; /* 0 not yet, 1 on, -1 off */
    /* Geometry, fixed at the first attention. */
    int64_t kv_size, n_stream, words;
    int32_t bt, bps, n_gpu, head_dim, n_q_heads, n_kv_heads;
    int first_li; /* the layer whose decode attention starts a step */
    /* Placement: the slot each stream holds (-1: none; its KV attends on
     * the CPU) and the stream each slot holds (-1: free). */
    int32_t slot_of[TIER_MAX_STREAMS], stream_of[TIER_MAX_STREAMS];
    int32_t last_len[TIER_MAX_STREAMS]; /* cells in use when last seen decoding */
    uint64_t seen[TIER_MAX_STREAMS];    /* the placement (1, 2, ...) it last decoded in */
    apex_place_item items[TIER_MAX_STREAMS];
    int32_t item_stream[TIER_MAX_STREAMS];
    unsigned char item_here[TIER_MAX_STREAMS]; /* decodes in this op */
    apex_tier placed[TIER_MAX_STREAMS];
    uint64_t steps;     /* decode steps placed by this tier */
    double step_t0;     /* when the last one started (s), for apex_sched_observe */
    size_t row_bytes; /* one cell's K (or V): n_kv_heads * head_dim elements */
    apex_dtype kv_dtype;
    apex_context *ctx;
    /* Scratch, grown as needed. */
    void *k_rows, *v_rows;
    int64_t *slots;
    size_t cap_rows;
    float *q, *out;
    int32_t *qsl, *lens, *table;
    size_t cap_seqs;
    /* The planned attention (gpu_tier_plan) ... */
    const struct ggml_tensor *op;
    int li, n;
    int64_t streams[TIER_MAX_STREAMS], js[TIER_MAX_STREAMS];
    int32_t plan_slots[TIER_MAX_STREAMS];
    int32_t plan_lens[TIER_MAX_STREAMS];
    /* ... is submitted by start (apex_paged_submit, on the caller's
     * thread) and runs on the device while the caller attends the other
     * streams on the CPU; wait collects it. submitted: a wait is due. */
    int submitted, rc;
};

/* Process-wide placement counters (every tier). */
static uint64_t g_sched_steps, g_to_device, g_to_host;

void gpu_tier_counters(uint64_t *sched_steps, uint64_t *to_device, uint64_t *to_host) {
    *sched_steps = __atomic_load_n(&g_sched_steps, __ATOMIC_RELAXED);
    *to_device = __atomic_load_n(&g_to_device, __ATOMIC_RELAXED);
    *to_host = __atomic_load_n(&g_to_host, __ATOMIC_RELAXED);
}

/* APEX_GGML_PLACE_LOG: one JSON line per placed step, every tier of the
 * process (g_log_lock keeps lines whole). */
static pthread_mutex_t g_log_lock = PTHREAD_MUTEX_INITIALIZER;
static FILE *g_log;
static int g_log_state; /* 0 not opened, 1 open, -1 off */

/* The log, or NULL; call with g_log_lock held. */
static FILE *place_log(void) {
    if (g_log_state == 0) {
        const char *path = getenv("APEX_GGML_PLACE_LOG");
        g_log_state = -1;
        if (path && *path) {
            g_log = fopen(path, "w");
            if (g_log) g_log_state = 1;
            else fprintf(stderr, "APEX: cannot write APEX_GGML_PLACE_LOG=%s; no placement log\n", path);
        }
    }
    return g_log_state == 1 ? g_log : NULL;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

gpu_tier *gpu_tier_new(void) {
    gpu_tier *t = calloc(1, sizeof *t);
    if (t) pthread_mutex_init(&t->lock, NULL);
    return t;
}

void gpu_tier_free(gpu_tier *t) {
    if (!t) return;
    if (t->ctx) apex_context_destroy(t->ctx); /* drops a submission never waited for */
    for (int i = 0; i < t->n_layers; i++) free(t->layers[i].stale);
    free(t->k_rows), free(t->v_rows), free(t->slots);
    free(t->q), free(t->out), free(t->qsl), free(t->lens), free(t->table);
    pthread_mutex_destroy(&t->lock);
    free(t);
}

/* The layer of root (K or V), or NULL. */
static tier_layer *layer_of(gpu_tier *t, const struct ggml_tensor *root) {
    for (int i = 0; i < t->n_layers; i++)
        if (t->layers[i].k == root || t->layers[i].v == root) return &t->layers[i];
    return NULL;
}

void gpu_tier_add_tensor(gpu_tier *t, const struct ggml_tensor *kv) {
    int il;
    char kind;
    if (sscanf(kv->name, "cache_%c_l%d", &kind, &il) != 2 || (kind != 'k' && kind != 'v')) return;
    pthread_mutex_lock(&t->lock);
    tier_layer *l = NULL;
    for (int i = 0; i < t->n_layers && !l; i++)
        if (t->layers[i].il == il) l = &t->layers[i];
    if (!l && t->n_layers < TIER_MAX_LAYERS && t->state == 0) {
        l = &t->layers[t->n_layers++];
        memset(l, 0, sizeof *l);
        l->il = il;
    }
    if (l) {
        if (kind == 'k') l->k = kv;
        else l->v = kv;
    }
    pthread_mutex_unlock(&t->lock);
}

static void mark_cell(gpu_tier *t, tier_layer *l, int64_t row) {
    const int64_t s = row / t->kv_size, c = row % t->kv_size;
    const int32_t k = t->slot_of[s];
    if (k >= 0) l->stale[k * t->words + c / 64] |= 1ull << (c % 64);
}

void gpu_tier_written(gpu_tier *t, const struct ggml_tensor *root, size_t off, size_t size) {
    if (!t || size == 0) return;
    pthread_mutex_lock(&t->lock);
    tier_layer *l = t->state == 1 ? layer_of(t, root) : NULL;
    if (l) {
        const size_t nb1 = root->nb[1];
        const int64_t r0 = (int64_t)(off / nb1), r1 = (int64_t)((off + size - 1) / nb1);
        const int64_t rows = t->kv_size * t->n_stream;
        for (int64_t r = r0; r <= r1 && r < rows; r++) mark_cell(t, l, r);
    }
    pthread_mutex_unlock(&t->lock);
}

static void mark_all(gpu_tier *t) {
    for (int i = 0; i < t->n_layers; i++)
        if (t->layers[i].stale)
            memset(t->layers[i].stale, 0xff, (size_t)t->n_gpu * (size_t)t->words * sizeof(uint64_t));
}

void gpu_tier_written_all(gpu_tier *t) {
    if (!t) return;
    pthread_mutex_lock(&t->lock);
    if (t->state == 1) mark_all(t);
    pthread_mutex_unlock(&t->lock);
}

/* The tier's budget in bytes; 0 = none. Sets *all for "every stream". */
static uint64_t budget_bytes(int *all, char *why, size_t n) {
    *all = 0;
    const char *e = getenv("APEX_GGML_GPU_KV_MB");
    if (e && *e) {
        char *end;
        const long long mb = strtoll(e, &end, 10);
        if (*end || mb < 0) {
            snprintf(why, n, "APEX_GGML_GPU_KV_MB='%s' is not a number of MiB", e);
            return 0;
        }
        return (uint64_t)mb << 20;
    }
    typedef int (*mem_info_fn)(size_t *, size_t *);
    mem_info_fn info = (mem_info_fn)dlsym(RTLD_DEFAULT, "cudaMemGetInfo");
    size_t free_b = 0, total = 0;
    if (info && info(&free_b, &total) == 0) {
        const size_t reserve = (size_t)1 << 30;
        return free_b > reserve ? free_b - reserve : 0;
    }
    *all = 1; /* no CUDA runtime here (an emulated device): every stream */
    return 0;
}

static int grow(void **p, size_t bytes) {
    void *q = realloc(*p, bytes ? bytes : 1);
    if (!q) return -1;
    *p = q;
    return 0;
}

/* Creates the paged context; state 1 or -1. Called under t->lock. */
static void tier_open(gpu_tier *t, const struct ggml_tensor *op) {
    const struct ggml_tensor *q = op->src[0], *k = op->src[1];
    char why[320] = "";
    t->state = -1;
    const struct ggml_tensor *k0 = t->n_layers ? t->layers[0].k : NULL;
    if (!k0) return;
    t->kv_size = k0->ne[1];
    t->n_stream = k0->ne[2];
    t->head_dim = (int32_t)k->ne[0];
    t->n_kv_heads = (int32_t)k->ne[2];
    t->n_q_heads = (int32_t)q->ne[2];
    t->kv_dtype = k0->type == GGML_TYPE_F16 ? APEX_DTYPE_F16 : APEX_DTYPE_F32;
    t->row_bytes = (size_t)k0->nb[1];
    int same = 1;
    for (int i = 0; i < t->n_layers; i++) {
        const struct ggml_tensor *a = t->layers[i].k, *b = t->layers[i].v;
        same = same && a && b;
        for (int j = 0; same && j < 2; j++) {
            const struct ggml_tensor *x = j ? b : a;
            same = x->type == k0->type && x->ne[0] == k0->ne[0] && x->ne[1] == t->kv_size &&
                   x->ne[2] == t->n_stream && x->nb[1] == k0->nb[1] &&
                   x->nb[2] == x->nb[1] * (size_t)t->kv_size && ggml_is_contiguous(x);
        }
    }
    t->bt = t->kv_size % 16 == 0 ? 16 : t->kv_size % 8 == 0 ? 8 : 0;
    int all = 0;
    uint64_t budget = 0;
    if (!same)
        snprintf(why, sizeof why, "the layers' KV tensors differ in shape or type");
    else if ((int64_t)t->n_kv_heads * t->head_dim != k0->ne[0])
        snprintf(why, sizeof why, "KV rows of %lld elements are not %d heads of %d", (long long)k0->ne[0],
                 t->n_kv_heads, t->head_dim);
    else if (!t->bt)
        snprintf(why, sizeof why, "kv_size %lld is not a multiple of 8", (long long)t->kv_size);
    else if (t->n_stream > TIER_MAX_STREAMS)
        snprintf(why, sizeof why, "%lld sequence slots, at most %d", (long long)t->n_stream, TIER_MAX_STREAMS);
    else
        budget = budget_bytes(&all, why, sizeof why);
    if (why[0]) {
        fprintf(stderr, "APEX: no GPU tier for this KV cache (%s): every sequence attends on the CPU\n", why);
        return;
    }
    t->bps = (int32_t)(t->kv_size / t->bt);
    const size_t block_bytes = 2 * t->row_bytes * (size_t)t->bt;
    const uint64_t per_stream = (uint64_t)t->n_layers * (uint64_t)t->bps * block_bytes;
    int64_t g = all ? t->n_stream : (int64_t)(budget / per_stream);
    if (g > t->n_stream) g = t->n_stream;
    const char *cap = getenv("APEX_GGML_GPU_SEQS");
    if (cap && *cap && atoll(cap) >= 0 && atoll(cap) < g) g = atoll(cap);
    if (g <= 0) {
        fprintf(stderr,
                "APEX: no GPU tier for this KV cache: one sequence's KV (%.1f MiB over %d layers) exceeds the "
                "budget (%.1f MiB; APEX_GGML_GPU_KV_MB): every sequence attends on the CPU\n",
                (double)per_stream / 1048576.0, t->n_layers, (double)budget / 1048576.0);
        return;
    }
    apex_config cfg;
    apex_status st = apex_config_init(&cfg);
    if (st == APEX_OK) {
        cfg.n_layers = t->n_layers;
        cfg.n_q_heads = t->n_q_heads;
        cfg.n_kv_heads = t->n_kv_heads;
        cfg.head_dim = t->head_dim;
        cfg.kv_dtype = t->kv_dtype;
        cfg.act_dtype = APEX_DTYPE_F32;
        cfg.block_tokens = t->bt;
        cfg.device_blocks = g * t->bps;
        cfg.host_blocks = 1;
        cfg.max_seqs = (int32_t)g;
        cfg.max_batch = (int32_t)g;
        cfg.max_seq_len = (int32_t)t->kv_size;
        cfg.n_threads = 1; /* the host tier is llama.cpp's tensor, attended by the backend */
        st = apex_context_create(&cfg, &t->ctx);
    }
    if (st == APEX_OK) st = apex_paged_claim(t->ctx, NULL);
    /* A context without a device (APEX_DEVICE=none, or auto and no GPU
     * answers) has no device tier to hold the slots. */
    void *base = NULL;
    int64_t dev_blocks = 0;
    if (st == APEX_OK && (apex_paged_layer_kv(t->ctx, 0, APEX_TIER_DEVICE, &base, &dev_blocks) != APEX_OK ||
                          dev_blocks < g * t->bps)) {
        fprintf(stderr, "APEX: no GPU tier for this KV cache (APEX's context has no device: APEX_DEVICE=%s): every "
                        "sequence attends on the CPU\n", getenv("APEX_DEVICE") ? getenv("APEX_DEVICE") : "auto");
        apex_context_destroy(t->ctx);
        t->ctx = NULL;
        return;
    }
    if (st != APEX_OK) {
        fprintf(stderr,
                "APEX: no GPU tier for this KV cache (APEX's context for %lld sequences, %.1f MiB: %s): every "
                "sequence attends on the CPU\n",
                (long long)g, (double)(per_stream * (uint64_t)g) / 1048576.0, apex_last_error());
        if (t->ctx) apex_context_destroy(t->ctx);
        t->ctx = NULL;
        return;
    }
    /* The scheduler's profile: the CPU part measured here once and cached
     * per hardware and geometry, the GPU part from a preset
     * (APEX_GPU_PRESET; "host" for the emulated device). The tier sees no
     * linear layers: hidden is q's row, ffn and vocab are estimates (they
     * price the step, which apex_sched_observe corrects; where the KV goes
     * does not depend on them). */
    apex_sched_options so;
    memset(&so, 0, sizeof so);
    so.hidden = t->n_q_heads * t->head_dim;
    so.ffn = 4 * so.hidden;
    so.vocab = 32000;
    if (apex_sched_enable(t->ctx, &so) != APEX_OK) {
        fprintf(stderr, "APEX: no GPU tier for this KV cache (APEX's scheduler: %s): every sequence attends on "
                        "the CPU\n", apex_last_error());
        apex_context_destroy(t->ctx);
        t->ctx = NULL;
        return;
    }
    t->n_gpu = (int32_t)g;
    t->words = (t->kv_size + 63) / 64;
    for (int i = 0; i < TIER_MAX_STREAMS; i++) t->slot_of[i] = t->stream_of[i] = -1, t->last_len[i] = 0, t->seen[i] = 0;
    t->first_li = 0;
    for (int i = 1; i < t->n_layers; i++)
        if (t->layers[i].il < t->layers[t->first_li].il) t->first_li = i;
    for (int i = 0; i < t->n_layers; i++) {
        t->layers[i].stale = malloc((size_t)g * (size_t)t->words * sizeof(uint64_t));
        if (!t->layers[i].stale) {
            fprintf(stderr, "APEX: no GPU tier for this KV cache (out of memory)\n");
            apex_context_destroy(t->ctx);
            t->ctx = NULL;
            return;
        }
    }
    t->state = 1;
    mark_all(t); /* the GPU copy starts empty */
    const char *dev = getenv("APEX_DEVICE");
    fprintf(stderr,
            "APEX: GPU tier (%s) holds the KV of %lld of %lld sequence slots (%.1f MiB, %d layers, blocks of %d "
            "tokens), placed each decode step by APEX's scheduler, and runs their decode attention; the other "
            "slots' KV stays in the pinned host pool and attends on the CPU\n",
            dev && *dev ? dev : "auto", (long long)g, (long long)t->n_stream,
            (double)(per_stream * (uint64_t)g) / 1048576.0, t->n_layers, t->bt);
    pthread_mutex_lock(&g_log_lock);
    FILE *log = place_log();
    if (log) {
        fprintf(log, "{\"tier\": {\"layers\": %d, \"slots\": %d, \"streams\": %lld, \"kv_size\": %lld}}\n",
                t->n_layers, t->n_gpu, (long long)t->n_stream, (long long)t->kv_size);
        fflush(log);
    }
    pthread_mutex_unlock(&g_log_lock);
}

/* Length L of a prefix mask row (cells [0, L) visible with 0, the rest -inf),
 * or -1 when the row is not one. */
static int64_t prefix_len(const uint16_t *m, int64_t n_kv) {
    int64_t L = 0;
    while (L < n_kv && (m[L] & 0x7fffu) == 0) L++;
    for (int64_t c = L; c < n_kv; c++)
        if (m[c] != F16_NEG_INF) return -1;
    return L;
}

static int scratch(gpu_tier *t, size_t rows, size_t seqs) {
    if (rows > t->cap_rows) {
        if (grow(&t->k_rows, rows * t->row_bytes) || grow(&t->v_rows, rows * t->row_bytes) ||
            grow((void **)&t->slots, rows * sizeof(int64_t)))
            return -1;
        t->cap_rows = rows;
    }
    if (seqs > t->cap_seqs) {
        const size_t qh = (size_t)t->n_q_heads * (size_t)t->head_dim * sizeof(float);
        if (grow((void **)&t->q, seqs * qh) || grow((void **)&t->out, seqs * qh) ||
            grow((void **)&t->qsl, (seqs + 1) * sizeof(int32_t)) || grow((void **)&t->lens, seqs * sizeof(int32_t)) ||
            grow((void **)&t->table, seqs * (size_t)t->bps * sizeof(int32_t)))
            return -1;
        t->cap_seqs = seqs;
    }
    return 0;
}

/* Gathers the stale cells [0, lens[i]) of streams streams[i], held in GPU
 * slots slots[i], of layer li (K and V rows from the host copy, as they
 * are) into the scratch rows; *n_rows gets how many. Their stale bits are
 * cleared (a failed store marks the slots stale again: restore_stale). */
static int gather_stale(gpu_tier *t, int li, const int64_t *streams, const int32_t *slots, const int32_t *lens,
                        int n, size_t *n_rows) {
    tier_layer *l = &t->layers[li];
    size_t rows = 0;
    *n_rows = 0;
    /* Word by word: a decode step has one stale cell per stream. */
    for (int i = 0; i < n; i++) {
        const uint64_t *w = l->stale + (size_t)slots[i] * t->words;
        for (int64_t x = 0; x * 64 < lens[i]; x++) {
            const int64_t rem = lens[i] - x * 64;
            const uint64_t bits = w[x] & (rem >= 64 ? ~0ull : (1ull << rem) - 1);
            rows += (size_t)__builtin_popcountll(bits);
        }
    }
    if (rows == 0) return 0;
    if (scratch(t, rows, 0)) return -1;
    size_t r = 0;
    for (int i = 0; i < n; i++) {
        const int64_t s = streams[i];
        uint64_t *w = l->stale + (size_t)slots[i] * t->words;
        for (int64_t x = 0; x * 64 < lens[i]; x++) {
            const int64_t rem = lens[i] - x * 64;
            uint64_t bits = w[x] & (rem >= 64 ? ~0ull : (1ull << rem) - 1);
            w[x] &= ~bits;
            for (; bits; bits &= bits - 1) {
                const int64_t c = x * 64 + __builtin_ctzll(bits);
                const size_t src = (size_t)(s * t->kv_size + c) * t->row_bytes;
                memcpy((char *)t->k_rows + r * t->row_bytes, (const char *)l->k->data + src, t->row_bytes);
                memcpy((char *)t->v_rows + r * t->row_bytes, (const char *)l->v->data + src, t->row_bytes);
                t->slots[r++] = (int64_t)slots[i] * t->kv_size + c;
            }
        }
    }
    *n_rows = rows;
    return 0;
}

/* After a failed store or attention: the planned streams' rows of the
 * layer are stale again (some may not be on the GPU). */
static void restore_stale(gpu_tier *t) {
    tier_layer *l = &t->layers[t->li];
    for (int i = 0; i < t->n; i++)
        memset(l->stale + (size_t)t->plan_slots[i] * t->words, 0xff, (size_t)t->words * sizeof(uint64_t));
}

static void tier_failed_once(void) {
    static int logged;
    if (!logged)
        fprintf(stderr, "APEX: the GPU tier failed (%s); its sequences attend on the CPU\n", apex_last_error());
    logged = 1;
}

/* Submits the attention planned by gpu_tier_plan (under t->lock): the
 * stale rows and the queries staged on this thread, the store and the
 * attention enqueued on the device by one apex_paged_submit; t->rc = 0,
 * or -1 with nothing in flight. A step's rows beyond one staging slot
 * (max_batch = n_gpu rows: a promoted stream's whole KV) are stored first
 * by the synchronous apex_paged_kv_write. */
static void submit_planned(gpu_tier *t) {
    const struct ggml_tensor *op = t->op, *q = op->src[0];
    const int n = t->n;
    const int layer = t->layers[t->li].il;
    const int64_t elems = (int64_t)t->n_kv_heads * t->head_dim;
    size_t rows = 0;
    t->rc = -1;
    SHIM_TRACE_BEGIN(APEX_TRACE_COPY, "GPU tier: gather stale rows", layer);
    int ok = scratch(t, 0, (size_t)n) == 0 &&
             gather_stale(t, t->li, t->streams, t->plan_slots, t->plan_lens, n, &rows) == 0;
    if (ok && rows > (size_t)t->n_gpu) {
        ok = apex_paged_kv_write(t->ctx, t->li, (int64_t)rows, t->slots, t->k_rows, elems, t->v_rows, elems,
                                 t->kv_dtype) == APEX_OK;
        rows = 0;
    }
    SHIM_TRACE_END();
    if (!ok) {
        restore_stale(t);
        tier_failed_once();
        return;
    }
    /* The GPU tier's attention, host side (apex.h's GPU_ATTN): its queries
     * staged and its work enqueued, on this thread now that no tier
     * thread does it beside the engine; the device's own time is in the
     * wait (WAIT). */
    SHIM_TRACE_BEGIN(APEX_TRACE_GPU_ATTN, "GPU tier: submit", layer);
    /* q as ggml's FLASH_ATTN_EXT reads it: rounded to f16 for an f16 cache. */
    const size_t hd = (size_t)t->head_dim;
    const int q16 = t->kv_dtype == APEX_DTYPE_F16;
    for (int i = 0; i < n; i++) {
        for (int h = 0; h < t->n_q_heads; h++) {
            const float *src = (const float *)((const char *)q->data + h * q->nb[2] + t->js[i] * q->nb[3]);
            const size_t row = ((size_t)i * t->n_q_heads + h) * hd;
            if (q16)
                shim_row_to_f16((uint16_t *)t->q + row, src, (int64_t)hd);
            else
                memcpy(t->q + row, src, hd * sizeof(float));
        }
        t->qsl[i] = i;
        for (int32_t b = 0; b < t->bps; b++) t->table[(size_t)i * t->bps + b] = t->plan_slots[i] * t->bps + b;
    }
    t->qsl[n] = n;
    apex_attn_opts o;
    memset(&o, 0, sizeof o);
    memcpy(&o.scale, (const float *)op->op_params + 0, sizeof(float));
    memcpy(&o.softcap, (const float *)op->op_params + 2, sizeof(float));
    o.q_dtype = q16 ? APEX_DTYPE_F16 : APEX_DTYPE_F32;
    o.out_dtype = APEX_DTYPE_F32;
    const apex_paged_step step = {
        .layer = t->li, .n_rows = (int64_t)rows, .slots = t->slots, .k = t->k_rows, .v = t->v_rows,
        .k_row_stride = elems, .v_row_stride = elems, .kv_src_dtype = t->kv_dtype,
        .n_seqs = n, .query_start_loc = t->qsl, .seq_lens = t->plan_lens, .block_table = t->table,
        .block_table_stride = t->bps, .q = t->q, .out = t->out, .opts = &o,
    };
    if (apex_paged_submit(t->ctx, &step) == APEX_OK) {
        t->submitted = 1;
        t->rc = 0;
    } else {
        restore_stale(t);
        tier_failed_once();
    }
    SHIM_TRACE_END();
}

/* One decode step's placement, at the first layer's decode attention:
 * the scheduler (apex_sched_place) gets every stream that decodes in this
 * op (its cells in use = its visible prefix, lens[j]; 0: not decoding or
 * not a prefix, which the tier cannot run) and every stream holding a slot,
 * in stream order (the priority), with the slots as the device's capacity.
 * A slot holder that decoded in the previous placement but not in this op
 * counts as decoding (a step split into two ubatches places twice); one
 * absent twice in a row is idle. The answer is carried out: a stream
 * spilled gives its slot back; a stream promoted takes the lowest free slot
 * with every row stale, so the lazy store copies its KV from the host copy
 * (the authoritative one) before its first attention there. Under t->lock. */
static void place_step(gpu_tier *t, int64_t s0, int64_t ns, const int32_t *lens) {
    int n = 0;
    const uint64_t P = t->steps + 1; /* this placement */
    for (int64_t s = 0; s < t->n_stream; s++) {
        const int32_t L = s >= s0 && s < s0 + ns ? lens[s - s0] : 0;
        if (L <= 0 && t->slot_of[s] < 0) continue;
        if (L > 0) t->last_len[s] = L, t->seen[s] = P;
        const int elsewhere = L <= 0 && t->seen[s] + 1 == P;
        t->items[n] = (apex_place_item){.id = s, .len = L > 0 ? L : t->last_len[s],
                                        .tier = t->slot_of[s] >= 0 ? APEX_TIER_DEVICE : APEX_TIER_HOST,
                                        .state = L > 0 || elsewhere ? APEX_PLACE_DECODING : APEX_PLACE_IDLE};
        t->item_stream[n] = (int32_t)s;
        t->item_here[n++] = L > 0;
    }
    const double now = now_s();
    if (t->steps > 0) apex_sched_observe(t->ctx, now - t->step_t0); /* refused if absurd: no harm */
    t->step_t0 = now;
    apex_place_plan plan;
    if (apex_sched_place(t->ctx, n, t->items, (int64_t)t->n_gpu * t->bps, t->n_gpu, t->placed, &plan) !=
        APEX_OK) {
        static int logged;
        if (!logged)
            fprintf(stderr, "APEX: the GPU tier's placement failed (%s); it keeps the last one\n",
                    apex_last_error());
        logged = 1;
        return;
    }
    int to_dev = 0, to_host = 0;
    for (int i = 0; i < n; i++) { /* spills first: their slots go to the promoted */
        const int32_t s = t->item_stream[i], k = t->slot_of[s];
        if (t->placed[i] != APEX_TIER_HOST || k < 0) continue;
        t->slot_of[s] = -1;
        t->stream_of[k] = -1;
        to_host++;
    }
    for (int i = 0; i < n; i++) {
        const int32_t s = t->item_stream[i];
        if (t->placed[i] != APEX_TIER_DEVICE || t->slot_of[s] >= 0) continue;
        int32_t k = 0;
        while (k < t->n_gpu && t->stream_of[k] >= 0) k++;
        if (k == t->n_gpu) break; /* cannot happen: apex_sched_place keeps to n_gpu */
        t->slot_of[s] = k;
        t->stream_of[k] = s;
        for (int li = 0; li < t->n_layers; li++)
            memset(t->layers[li].stale + (size_t)k * t->words, 0xff, (size_t)t->words * sizeof(uint64_t));
        to_dev++;
    }
    t->steps++;
    __atomic_add_fetch(&g_sched_steps, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&g_to_device, (uint64_t)to_dev, __ATOMIC_RELAXED);
    __atomic_add_fetch(&g_to_host, (uint64_t)to_host, __ATOMIC_RELAXED);
    /* No times in the log: two identical runs give identical logs. */
    pthread_mutex_lock(&g_log_lock);
    FILE *log = place_log();
    if (!log) {
        pthread_mutex_unlock(&g_log_lock);
        return;
    }
    fprintf(log, "{\"step\": %llu, \"streams\": [", (unsigned long long)t->steps);
    for (int i = 0; i < n; i++)
        fprintf(log, "%s[%d, %d, \"%s\", \"%s\"]", i ? ", " : "", t->item_stream[i], t->items[i].len,
                t->item_here[i] ? "decode" : t->items[i].state == APEX_PLACE_DECODING ? "elsewhere" : "idle",
                t->placed[i] == APEX_TIER_DEVICE ? "device" : "host");
    fprintf(log, "], \"to_device\": %d, \"to_host\": %d, \"slots\": [", to_dev, to_host);
    for (int k = 0; k < t->n_gpu; k++) fprintf(log, "%s%d", k ? ", " : "", t->stream_of[k]);
    fprintf(log, "]}\n");
    fflush(log);
    pthread_mutex_unlock(&g_log_lock);
}

int gpu_tier_plan(gpu_tier *t, const struct ggml_tensor *op, int64_t s0, unsigned char *gpu) {
    const struct ggml_tensor *q = op->src[0], *k = op->src[1], *v = op->src[2], *mask = op->src[3];
    const int64_t ns = q->ne[3];
    memset(gpu, 0, (size_t)ns);
    if (!t || q->ne[1] != 1) return 0; /* the tier runs decode queries */
    pthread_mutex_lock(&t->lock);
    const struct ggml_tensor *kr = k->view_src ? k->view_src : k, *vr = v->view_src ? v->view_src : v;
    if (t->state == 0) tier_open(t, op);
    tier_layer *l = t->state == 1 ? layer_of(t, kr) : NULL;
    t->n = 0;
    /* The op must read the tensors as llama.cpp's views do: rows nb[1]
     * apart, streams nb[2] apart, from stream s0, cell 0. */
    if (l && l->k == kr && l->v == vr && s0 >= 0 && s0 + ns <= t->n_stream && k->nb[1] == kr->nb[1] &&
        k->nb[3] == kr->nb[2] &&
        v->nb[1] == vr->nb[1] && v->nb[3] == vr->nb[2] &&
        k->nb[2] == (size_t)t->head_dim * ggml_type_size(kr->type) && v->nb[2] == k->nb[2] &&
        (const char *)k->data == (const char *)kr->data + (size_t)s0 * kr->nb[2] &&
        (const char *)v->data == (const char *)vr->data + (size_t)s0 * vr->nb[2] && k->ne[1] <= t->kv_size &&
        k->ne[0] == t->head_dim && q->ne[2] == t->n_q_heads) {
        const int64_t n_kv = k->ne[1];
        int32_t lens[TIER_MAX_STREAMS];
        for (int64_t j = 0; j < ns; j++) {
            int64_t L = n_kv;
            if (mask) {
                const int64_t ms = mask->ne[3] == 1 ? 0 : j;
                L = prefix_len((const uint16_t *)((const char *)mask->data + ms * mask->nb[3]), n_kv);
            }
            lens[j] = L > 0 ? (int32_t)L : 0;
        }
        /* Once per decode step (not per layer): the first layer places. */
        if (l == &t->layers[t->first_li]) place_step(t, s0, ns, lens);
        for (int64_t j = 0; j < ns; j++) {
            const int32_t slot = t->slot_of[s0 + j];
            if (lens[j] <= 0 || slot < 0) continue;
            t->streams[t->n] = s0 + j, t->plan_lens[t->n] = lens[j], t->js[t->n] = j, t->plan_slots[t->n] = slot;
            gpu[j] = 1;
            t->n++;
        }
        t->op = op;
        t->li = (int)(l - t->layers);
    }
    const int n = t->n;
    pthread_mutex_unlock(&t->lock);
    return n;
}

void gpu_tier_start(gpu_tier *t) {
    pthread_mutex_lock(&t->lock);
    submit_planned(t);
    pthread_mutex_unlock(&t->lock);
}

int gpu_tier_wait(gpu_tier *t) {
    pthread_mutex_lock(&t->lock);
    if (t->submitted) {
        t->submitted = 0;
        if (apex_paged_wait(t->ctx) == APEX_OK) {
            const struct ggml_tensor *op = t->op;
            const size_t hd = (size_t)t->head_dim;
            for (int i = 0; i < t->n; i++)
                for (int h = 0; h < t->n_q_heads; h++)
                    memcpy((char *)op->data + h * op->nb[1] + t->js[i] * op->nb[3],
                           t->out + ((size_t)i * t->n_q_heads + h) * hd, hd * sizeof(float));
        } else {
            t->rc = -1;
            restore_stale(t);
            tier_failed_once();
        }
    }
    const int rc = t->rc;
    pthread_mutex_unlock(&t->lock);
    return rc;
}
