/* ggml_apex.c - the APEX ggml backend: see ggml_apex.h. This file: the
 * backend, the device and the registry entry ggml's interface asks for,
 * and the process-wide switches (APEX_GGML_*) the other files read. The
 * ops are in ggml_apex_ops.c, the KV buffer types in ggml_apex_buffer.c,
 * the counters and exit report in ggml_apex_stats.c.
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
 * the patch of integration/llama_cpp/) asks for a KV-cache buffer type
 * (ggml_apex_buffer.c). */
#include <dlfcn.h>
#include <omp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "shim/ggml_apex_impl.h"
#include "shim/ggml_apex_metrics.h"
#include "shim/ggml_apex_tier.h"
#include "shim/ggml_apex_trace.h"

#define EXPORT __attribute__((visibility("default")))

EXPORT ggml_backend_reg_t ggml_backend_init(void);
EXPORT ggml_backend_reg_t ggml_apex_reg(void);
EXPORT int ggml_apex_mark_preloaded(void);

static int g_registered_by_preload;
/* Exact mode (default): APEX reproduces ggml-cpu's attention arithmetic and
 * leaves to ggml-cpu the shapes where ggml-cpu itself switches to a
 * differently-rounded path. APEX_GGML_EXACT=0: fp32-exact math, every shape. */
static int g_exact = -1;

int shim_exact_mode(void) {
    if (g_exact < 0) {
        const char *e = getenv("APEX_GGML_EXACT");
        g_exact = !(e && strcmp(e, "0") == 0);
    }
    return g_exact;
}

/* KV in an APEX_Hybrid buffer (a GPU build): the engine's reference is its
 * GPU kernel, not ggml-cpu, so APEX's CPU side runs fp32 math unless
 * APEX_GGML_EXACT=1 asks for ggml-cpu's rounding; multi-token (>= 64)
 * attention stays with the GPU backend either way. */
int shim_exact_hybrid(void) {
    const char *e = getenv("APEX_GGML_EXACT");
    return e && strcmp(e, "1") == 0;
}

int shim_env_on(const char *name) {
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

/* 1 the first time for *flag (a log-once flag), 0 after, under shim_lock. */
int shim_first_time(int *flag) {
    pthread_mutex_lock(&shim_lock);
    const int first = !*flag;
    *flag = 1;
    pthread_mutex_unlock(&shim_lock);
    return first;
}

/* APEX_GGML_OPS: which ops APEX takes ("fa,kv" by default; "none");
 * APEX_GGML_DISABLE=1: none. Bit 1: attention, bit 2: KV writes. */
int shim_ops_mask(void) {
    static int ops = -1;
    if (ops < 0) {
        const char *e = getenv("APEX_GGML_OPS");
        int o = e ? (strstr(e, "fa") ? 1 : 0) | (strstr(e, "kv") ? 2 : 0) : 3;
        if (shim_env_on("APEX_GGML_DISABLE")) o = 0;
        ops = o;
    }
    return ops;
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
    if (op->op == GGML_OP_FLASH_ATTN_EXT || !shim_tier_of(op)) return 0;
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
    SHIM_TRACE_BEGIN(APEX_TRACE_COPY, "ggml-cpu op into hybrid KV", shim_kv_layer(op));
    const enum ggml_status st = ggml_backend_graph_compute(c->cpu, c->g1);
    shim_kv_written(op, 0, ggml_nbytes(op));
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
            st = (shim_ops_mask() & 2) && shim_supports_set_rows(node) ? shim_run_set_rows(node, c->n_threads) : run_hybrid_write(c, node);
            break;
        case GGML_OP_FLASH_ATTN_EXT:
            st = shim_run_fa(node, c->n_threads);
            break;
        default:
            if (shim_tier_of(node)) {
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
        if (node->op == GGML_OP_FLASH_ATTN_EXT) kind = APEX_TRACE_CALL_ATTN, layer = shim_kv_layer(node->src[1]);
        else if (node->op == GGML_OP_SET_ROWS && layer < 0) layer = shim_kv_layer(node);
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
    const int ops = shim_ops_mask();
    switch (op->op) {
    case GGML_OP_SET_ROWS: return ((ops & 2) && shim_supports_set_rows(op)) || supports_hybrid_write(op);
    case GGML_OP_FLASH_ATTN_EXT: return (ops & 1) && shim_supports_fa(op);
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


/* --------------------------------------------------------------- reg */

static struct ggml_backend_reg g_reg;
struct ggml_backend_device shim_dev;

static const char *reg_get_name(ggml_backend_reg_t r) { (void)r; return "APEX"; }
static size_t reg_dev_count(ggml_backend_reg_t r) { (void)r; return 1; }
static ggml_backend_dev_t reg_dev_get(ggml_backend_reg_t r, size_t i) {
    (void)r;
    return i == 0 ? &shim_dev : NULL;
}
static void *reg_proc(ggml_backend_reg_t r, const char *name) {
    (void)r;
    if (strcmp(name, "ggml_backend_set_n_threads") == 0) return (void *)set_n_threads;
    if (strcmp(name, APEX_GGML_STATS_GET) == 0) return (void *)apex_ggml_stats_get;
    if (strcmp(name, APEX_GGML_STEP_SUMMARY) == 0) return (void *)apex_ggml_step_summary;
    if (strcmp(name, "ggml_backend_kv_cache_buffer_type") == 0) return (void *)shim_kv_cache_buffer_type;
    return NULL;
}

static const struct ggml_backend_reg_i g_reg_iface = {
    .get_name = reg_get_name,
    .get_device_count = reg_dev_count,
    .get_device = reg_dev_get,
    .get_proc_address = reg_proc,
};

static void init_reg(void) {
    shim_dev.iface = g_dev_iface;
    shim_dev.reg = &g_reg;
    shim_dev.context = NULL;
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
