/*
 * apex_strided_api.c - the entry points of apex_strided.h: attention over
 * an engine's strided KV in place (cpu_attn/cpu_attn_strided.h), host KV
 * memory (csrc/host_mem.h near csrc/cpu_workers.h's cores) and the metrics
 * file (csrc/metrics.h). Same rules as apex_api.c: every argument is
 * checked, with a message, before anything happens.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "apex/apex_strided.h"
#include "cpu_attn/cpu_attn_strided.h"
#include "csrc/cpu_workers.h"
#include "csrc/env.h"
#include "csrc/error.h"
#include "csrc/host_mem.h"
#include "csrc/metrics.h"

/* ------------------------------------------------------------- attention */

APEX_API apex_status apex_strided_desc_init(apex_strided_desc *d) {
    if (!d) return apex_fail(APEX_ERR_INVALID_ARG, "apex_strided_desc_init: d is NULL");
    memset(d, 0, sizeof *d);
    d->struct_size = (uint32_t)sizeof *d;
    d->version = APEX_STRIDED_DESC_VERSION;
    apex_clear_error();
    return APEX_OK;
}

static apex_status strided_check(const char *fn, const apex_strided_desc *d) {
    if (!d) return apex_fail(APEX_ERR_INVALID_ARG, "%s: d is NULL", fn);
    if (d->version != APEX_STRIDED_DESC_VERSION || d->struct_size != sizeof *d)
        return apex_fail(APEX_ERR_INVALID_ARG,
                         "%s: descriptor version %u, %u bytes; this libapex takes version %d, %zu bytes "
                         "(apex_strided_desc_init sets them)",
                         fn, d->version, d->struct_size, APEX_STRIDED_DESC_VERSION, sizeof *d);
    if (!d->q || !d->k || !d->v || !d->out)
        return apex_fail(APEX_ERR_INVALID_ARG, "%s: q, k, v or out is NULL", fn);
    if (d->head_dim <= 0 || d->head_dim > 512)
        return apex_fail(APEX_ERR_INVALID_ARG, "%s: head_dim %d outside (0, 512]", fn, d->head_dim);
    if (d->n_q_heads <= 0 || d->n_kv_heads <= 0 || d->n_q_heads % d->n_kv_heads != 0)
        return apex_fail(APEX_ERR_INVALID_ARG, "%s: %d query heads are not a positive multiple of %d KV heads",
                         fn, d->n_q_heads, d->n_kv_heads);
    if (d->n_tokens <= 0 || d->n_streams <= 0 || d->n_kv < 0)
        return apex_fail(APEX_ERR_INVALID_ARG, "%s: n_tokens %d, n_streams %d (both >= 1), n_kv %d (>= 0)", fn,
                         d->n_tokens, d->n_streams, d->n_kv);
    if (d->kv_dtype != APEX_DTYPE_F16 && d->kv_dtype != APEX_DTYPE_F32)
        return apex_fail(APEX_ERR_UNSUPPORTED, "%s: KV dtype %d; f16 and f32 are supported", fn, (int)d->kv_dtype);
    if (!(d->scale != 0.0f) || !isfinite(d->scale))
        return apex_fail(APEX_ERR_INVALID_ARG, "%s: scale %g (finite, not 0)", fn, (double)d->scale);
    if (!(d->softcap >= 0.0f) || !isfinite(d->softcap))
        return apex_fail(APEX_ERR_INVALID_ARG, "%s: softcap %g (finite, >= 0)", fn, (double)d->softcap);
    if (d->ggml_n_threads < 0 || d->ggml_streams < 0)
        return apex_fail(APEX_ERR_INVALID_ARG, "%s: ggml_n_threads %d, ggml_streams %d (>= 0)", fn,
                         d->ggml_n_threads, d->ggml_streams);
    if (d->ggml_compat && !cpu_attn_strided_compat_ok(d->head_dim, d->kv_dtype))
        return apex_fail(APEX_ERR_UNSUPPORTED,
                         "%s: exact mode needs f16 KV, head_dim a multiple of 64 and AVX-512 (head_dim %d, KV "
                         "dtype %d)",
                         fn, d->head_dim, (int)d->kv_dtype);
    return APEX_OK;
}

APEX_API apex_status apex_strided_check(const apex_strided_desc *d) {
    const apex_status st = strided_check("apex_strided_check", d);
    if (st == APEX_OK) apex_clear_error();
    return st;
}

APEX_API apex_status apex_strided_attention(const apex_strided_desc *d, int32_t n_threads) {
    static const char fn[] = "apex_strided_attention";
    apex_status st = strided_check(fn, d);
    if (st != APEX_OK) return st;
    if (n_threads < 0) return apex_fail(APEX_ERR_INVALID_ARG, "%s: n_threads %d (0 = the OpenMP default)", fn, n_threads);
    /* Checked above: the kernel fails now only to allocate its scratch. */
    if (cpu_attn_strided(d, n_threads) != 0)
        return apex_fail(APEX_ERR_NO_MEMORY, "%s: out of memory for the kernel's scratch", fn);
    apex_clear_error();
    return APEX_OK;
}

APEX_API int apex_strided_exact_ok(int32_t head_dim, apex_dtype kv_dtype) {
    return cpu_attn_strided_compat_ok(head_dim, kv_dtype);
}

APEX_API const char *apex_strided_isa(void) { return cpu_attn_strided_isa(); }

/* ------------------------------------------------------- host KV memory */

/* The worker cores (APEX_CPUSET), loaded once per process for the NUMA
 * binding; a failure is kept and reported again by apex_host_kv_nodes. */
static pthread_mutex_t g_workers_lock = PTHREAD_MUTEX_INITIALIZER;
static cpu_workers g_workers;
static int g_workers_state; /* 0 not yet, 1 loaded, -1 unavailable */
static char g_workers_why[256];

static const cpu_workers *host_kv_workers(void) {
    pthread_mutex_lock(&g_workers_lock);
    if (g_workers_state == 0) {
        const char *set = apex_env_get(APEX_ENV_CPUSET);
        if (cpu_workers_init(&g_workers, set && *set ? set : NULL, 0, NULL) == APEX_OK) {
            g_workers_state = 1;
        } else {
            g_workers_state = -1;
            snprintf(g_workers_why, sizeof g_workers_why, "%s", apex_last_error());
        }
    }
    const cpu_workers *w = g_workers_state == 1 ? &g_workers : NULL;
    pthread_mutex_unlock(&g_workers_lock);
    return w;
}

APEX_API apex_status apex_host_kv_alloc(size_t bytes, void **out) {
    if (!out) return apex_fail(APEX_ERR_INVALID_ARG, "apex_host_kv_alloc: out is NULL");
    *out = host_mem_alloc(host_kv_workers(), bytes);
    if (!*out) return APEX_ERR_NO_MEMORY; /* host_mem_alloc said why */
    apex_clear_error();
    return APEX_OK;
}

APEX_API apex_status apex_host_kv_free(void *p, size_t bytes) {
    host_mem_free(p, bytes);
    apex_clear_error();
    return APEX_OK;
}

APEX_API apex_status apex_host_kv_nodes(char *buf, size_t cap) {
    if (!buf || cap == 0) return apex_fail(APEX_ERR_INVALID_ARG, "apex_host_kv_nodes: buf is NULL or cap 0");
    buf[0] = '\0';
    const cpu_workers *w = host_kv_workers();
    if (!w) return apex_fail(APEX_ERR_INTERNAL, "%s", g_workers_why);
    hwloc_nodeset_t ns = cpu_workers_nodeset(w);
    if (ns) {
        char *list = NULL;
        if (hwloc_bitmap_list_asprintf(&list, ns) >= 0 && list) snprintf(buf, cap, "%s", list);
        free(list);
        hwloc_bitmap_free(ns);
    }
    apex_clear_error();
    return APEX_OK;
}

APEX_API apex_status apex_host_kv_pin(void *p, size_t bytes) {
    if (!p || bytes == 0) return apex_fail(APEX_ERR_INVALID_ARG, "apex_host_kv_pin: p is NULL or bytes 0");
    const apex_status st = host_mem_pin(p, bytes);
    if (st == APEX_OK) apex_clear_error();
    return st;
}

APEX_API apex_status apex_host_kv_unpin(void *p) {
    if (!p) return apex_fail(APEX_ERR_INVALID_ARG, "apex_host_kv_unpin: p is NULL");
    const apex_status st = host_mem_unpin(p);
    if (st == APEX_OK) apex_clear_error();
    return st;
}

/* ------------------------------------------------------- metrics file */

struct apex_metrics_file {
    apex_metrics_sink sink;
};

APEX_API apex_status apex_metrics_values_init(apex_metrics_values *m, const char *engine) {
    if (!m) return apex_fail(APEX_ERR_INVALID_ARG, "apex_metrics_values_init: m is NULL");
    apex_metrics_init(m, engine);
    apex_clear_error();
    return APEX_OK;
}

APEX_API apex_status apex_metrics_file_open(const char *who, apex_metrics_file **out) {
    if (!out) return apex_fail(APEX_ERR_INVALID_ARG, "apex_metrics_file_open: out is NULL");
    *out = NULL;
    if (!who || !*who) return apex_fail(APEX_ERR_INVALID_ARG, "apex_metrics_file_open: who is NULL or empty");
    apex_metrics_file *f = calloc(1, sizeof *f);
    if (!f) return apex_fail(APEX_ERR_NO_MEMORY, "apex_metrics_file_open: out of memory");
    if (!apex_metrics_sink_open(&f->sink, who)) {
        free(f); /* unset, or taken: not an error */
    } else {
        *out = f;
    }
    apex_clear_error();
    return APEX_OK;
}

APEX_API apex_status apex_metrics_file_write(apex_metrics_file *f, const apex_metrics_values *m, int force) {
    static const char fn[] = "apex_metrics_file_write";
    if (!f || !m) return apex_fail(APEX_ERR_INVALID_ARG, "%s: f or m is NULL", fn);
    if (m->struct_size != sizeof *m)
        return apex_fail(APEX_ERR_INVALID_ARG, "%s: values of %u bytes; this libapex takes %zu "
                         "(apex_metrics_values_init sets it)", fn, m->struct_size, sizeof *m);
    if (!m->engine || !*m->engine) return apex_fail(APEX_ERR_INVALID_ARG, "%s: engine is NULL or empty", fn);
    apex_metrics_tick(&f->sink, m, force);
    apex_clear_error();
    return APEX_OK;
}

APEX_API apex_status apex_metrics_file_close(apex_metrics_file *f) {
    if (f) {
        apex_metrics_sink_close(&f->sink);
        free(f);
    }
    apex_clear_error();
    return APEX_OK;
}
