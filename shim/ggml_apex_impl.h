/* ggml_apex_impl.h - what the ggml backend's files share (internal to
 * libggml-apex.so; see ggml_apex.h for the backend itself):
 *   ggml_apex.c         backend, device, registry; the APEX_GGML_* switches
 *   ggml_apex_ops.c     supports_op and compute of FLASH_ATTN_EXT, SET_ROWS
 *   ggml_apex_buffer.c  the KV buffer types APEX_Host / APEX_Hybrid
 *   ggml_apex_stats.c   the counters, the exit report
 * Every name here starts with shim_ (the backend defines none of libapex's). */
#ifndef APEX_GGML_APEX_IMPL_H
#define APEX_GGML_APEX_IMPL_H

#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "ggml-backend-impl.h"
#include "ggml-backend.h"
#include "ggml.h"

#include "apex/apex.h"
#include "shim/ggml_apex.h"
#include "shim/ggml_apex_tier.h"

/* ---- ggml_apex_stats.c: the counters, under shim_lock (which also guards
 * the log-once flags). */
extern pthread_mutex_t shim_lock;
extern apex_ggml_stats shim_stats;
/* Exported (also reachable by get_proc_address; see ggml_apex.h). */
__attribute__((visibility("default"))) void apex_ggml_stats_get(apex_ggml_stats *out);
__attribute__((visibility("default"))) int apex_ggml_step_summary(apex_step_summary *out, int reset);

/* ---- ggml_apex.c */
extern struct ggml_backend_device shim_dev;
/* Exact mode (default; APEX_GGML_EXACT=0: fp32 math) for APEX_Host KV, and
 * for APEX_Hybrid KV (fp32 unless APEX_GGML_EXACT=1). */
int shim_exact_mode(void);
int shim_exact_hybrid(void);
/* APEX_GGML_OPS / APEX_GGML_DISABLE: bit 1 attention, bit 2 KV writes. */
int shim_ops_mask(void);
int shim_env_on(const char *name);
/* 1 the first time for *flag (a log-once flag), 0 after, under shim_lock. */
int shim_first_time(int *flag);

/* ---- ggml_apex_ops.c */
/* The KV geometry APEX runs: NULL, or why not (into why). */
const char *shim_kv_geometry_why(enum ggml_type tk, enum ggml_type tv, int64_t dk, int64_t dv, char *why, size_t n);
int shim_exact_compat(int64_t head_dim, enum ggml_type t);
int shim_supports_set_rows(const struct ggml_tensor *op);
int shim_supports_fa(const struct ggml_tensor *op);
enum ggml_status shim_run_set_rows(struct ggml_tensor *op, int n_threads);
enum ggml_status shim_run_fa(struct ggml_tensor *op, int n_threads);
/* f32 -> f16 as SET_ROWS stores it (F16C where the CPU has it): the GPU
 * tier rounds its queries with it too. */
void shim_row_to_f16(uint16_t *h, const float *s, int64_t w);

/* ---- ggml_apex_buffer.c */
/* llama.cpp asked for the KV cache's buffer type (the patch's hook): an
 * unpatched build never does, and APEX says so when it takes over. */
extern int shim_kv_hook_asked;
/* 1 if t's memory is in APEX's host pool. */
int shim_in_pool(const struct ggml_tensor *t);
/* The GPU tier of t's APEX_Hybrid buffer, or NULL. */
gpu_tier *shim_tier_of(const struct ggml_tensor *t);
/* Bytes [off, off + size) of t were written on the host: the GPU tier of an
 * APEX_Hybrid buffer marks them stale. */
void shim_kv_written(const struct ggml_tensor *t, size_t off, size_t size);
/* The proc "ggml_backend_kv_cache_buffer_type" llama.cpp calls per layer. */
ggml_backend_buffer_type_t shim_kv_cache_buffer_type(ggml_backend_buffer_type_t buft, enum ggml_type type_k,
                                                     enum ggml_type type_v, int64_t n_embd_head_k,
                                                     int64_t n_embd_head_v, bool v_trans);

/* ---- small helpers */
static inline double shim_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static inline const struct ggml_tensor *shim_root_of(const struct ggml_tensor *t) {
    return t->view_src ? t->view_src : t;
}

static inline int shim_is_kv_cache(const struct ggml_tensor *t) {
    return strncmp(shim_root_of(t)->name, "cache_k_l", 9) == 0 || strncmp(shim_root_of(t)->name, "cache_v_l", 9) == 0;
}

/* The model layer of a KV tensor (llama.cpp's "cache_k_l<il>"), or -1. */
static inline int shim_kv_layer(const struct ggml_tensor *t) {
    int il;
    char kind;
    return sscanf(shim_root_of(t)->name, "cache_%c_l%d", &kind, &il) == 2 ? il : -1;
}

#endif
