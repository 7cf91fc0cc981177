/* metrics.c - the APEX_METRICS_FILE writer (see metrics.h). */
#include "csrc/metrics.h"

#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "csrc/error.h"
#include "csrc/env.h"

static const char *const tier_label[2] = {"gpu", "host"}; /* [APEX_TIER_DEVICE], [APEX_TIER_HOST] */

void apex_metrics_init(apex_metrics *m, const char *engine) {
    memset(m, 0, sizeof *m);
    m->struct_size = (uint32_t)sizeof *m;
    m->engine = engine;
    for (int t = 0; t < 2; t++) m->blocks_used[t] = m->blocks_free[t] = m->kv_bytes[t] = m->seqs[t] = -1;
}

typedef struct out_buf {
    char *p;
    size_t cap, len;
    int overflow;
} out_buf;

static void put(out_buf *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(out_buf *o, const char *fmt, ...) {
    if (o->overflow) return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(o->p + o->len, o->cap - o->len, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= o->cap - o->len) {
        o->overflow = 1;
        return;
    }
    o->len += (size_t)n;
}

static void header(out_buf *o, const char *name, const char *type, const char *help) {
    put(o, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

int apex_metrics_render(const apex_metrics *m, char *buf, size_t cap) {
    if (!buf || cap == 0) return -1;
    out_buf o = {buf, cap, 0, 0};
    const char *e = m->engine ? m->engine : "unknown";

    header(&o, "apex_attention_calls_total", "counter", "Attention calls (ops) run by APEX.");
    put(&o, "apex_attention_calls_total{engine=\"%s\"} %llu\n", e, (unsigned long long)m->attention_calls);
    header(&o, "apex_kv_rows_written_total", "counter",
           "Tokens stored in the KV cache by APEX (rows, summed over layers).");
    put(&o, "apex_kv_rows_written_total{engine=\"%s\"} %llu\n", e, (unsigned long long)m->kv_rows_written);
    header(&o, "apex_sequence_attentions_total", "counter",
           "Sequence-layer attentions, by the tier whose KV they read (gpu: on the GPU, host: on the CPU kernel).");
    for (int t = 0; t < 2; t++)
        put(&o, "apex_sequence_attentions_total{engine=\"%s\",tier=\"%s\"} %llu\n", e, tier_label[t],
            (unsigned long long)m->seq_attentions[t]);
    header(&o, "apex_migrations_total", "counter", "Sequences whose KV APEX moved to the tier `to`.");
    for (int t = 0; t < 2; t++)
        put(&o, "apex_migrations_total{engine=\"%s\",to=\"%s\"} %llu\n", e, tier_label[t],
            (unsigned long long)m->migrations[t]);
    header(&o, "apex_fallbacks_total", "counter",
           "Work APEX handed back to the engine or ran on a slower path (declined ops, mixed-tier sequences "
           "gathered to the CPU, GPU-tier failures rerun on the CPU).");
    put(&o, "apex_fallbacks_total{engine=\"%s\"} %llu\n", e, (unsigned long long)m->fallbacks);
    header(&o, "apex_errors_total", "counter", "APEX calls that failed.");
    put(&o, "apex_errors_total{engine=\"%s\"} %llu\n", e, (unsigned long long)m->errors);
    header(&o, "apex_attention_seconds_total", "counter", "Wall time spent in APEX's attention.");
    put(&o, "apex_attention_seconds_total{engine=\"%s\"} %.6f\n", e, m->attention_seconds);

    struct {
        const char *name, *help;
        const int64_t *v;
    } gauges[] = {
        {"apex_kv_blocks_used", "KV blocks in use per tier (libapex's block pools).", m->blocks_used},
        {"apex_kv_blocks_free", "KV blocks free per tier (libapex's block pools).", m->blocks_free},
        {"apex_kv_bytes", "KV cache bytes APEX holds per tier.", m->kv_bytes},
        {"apex_sequences", "Sequences per tier (llama.cpp: sequence slots attended in the last second).", m->seqs},
    };
    for (size_t g = 0; g < sizeof gauges / sizeof gauges[0]; g++) {
        header(&o, gauges[g].name, "gauge", gauges[g].help);
        for (int t = 0; t < 2; t++)
            if (gauges[g].v[t] >= 0)
                put(&o, "%s{engine=\"%s\",tier=\"%s\"} %lld\n", gauges[g].name, e, tier_label[t],
                    (long long)gauges[g].v[t]);
    }
    if (m->has_step_summary) {
        const apex_step_summary *st = &m->step;
        header(&o, "apex_steps_total", "counter", "Decode steps APEX's tracer saw.");
        put(&o, "apex_steps_total{engine=\"%s\"} %llu\n", e, (unsigned long long)st->steps);
        header(&o, "apex_layer_steps_total", "counter", "Attention calls of the engine (layers x steps).");
        put(&o, "apex_layer_steps_total{engine=\"%s\"} %llu\n", e, (unsigned long long)st->layer_steps);
        header(&o, "apex_step_us_per_layer", "gauge",
               "Mean microseconds per layer-step since the start, by part (the trace's per-step summary).");
        const struct {
            const char *part;
            double us;
        } parts[] = {{"engine", st->engine_us},   {"cpu_attn", st->cpu_attn_us},
                     {"gpu_attn", st->gpu_attn_us}, {"gpu_kernel", st->gpu_kernel_us},
                     {"copy", st->copy_us},       {"wait", st->wait_us},
                     {"apex_overhead", st->apex_overhead_us}};
        for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++)
            put(&o, "apex_step_us_per_layer{engine=\"%s\",part=\"%s\"} %.3f\n", e, parts[i].part, parts[i].us);
    }
    return o.overflow ? -1 : (int)o.len;
}

apex_status apex_metrics_write(const char *path, const apex_metrics *m) {
    char text[8192];
    int n = apex_metrics_render(m, text, sizeof text);
    if (n < 0) return apex_fail(APEX_ERR_INTERNAL, "metrics text longer than %zu bytes", sizeof text);
    char tmp[600];
    if (snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid()) >= (int)sizeof tmp)
        return apex_fail(APEX_ERR_INVALID_ARG, "APEX_METRICS_FILE path too long");
    FILE *f = fopen(tmp, "w");
    if (!f) return apex_fail(APEX_ERR_INVALID_ARG, "cannot write %s: %s", tmp, strerror(errno));
    size_t w = fwrite(text, 1, (size_t)n, f);
    int closed = fclose(f);
    if (w != (size_t)n || closed != 0) {
        int err = errno;
        unlink(tmp);
        return apex_fail(APEX_ERR_INVALID_ARG, "cannot write %s: %s", tmp, strerror(err));
    }
    if (rename(tmp, path) != 0) {
        int err = errno;
        unlink(tmp);
        return apex_fail(APEX_ERR_INVALID_ARG, "cannot rename %s to %s: %s", tmp, path, strerror(err));
    }
    return APEX_OK;
}

static double mono_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The process's one metrics file: taken by the first sink that opens it. */
static atomic_int g_file_taken;
static char g_file_owner[64];

int apex_metrics_sink_open(apex_metrics_sink *s, const char *who) {
    memset(s, 0, sizeof *s);
    const char *env = apex_env_get(APEX_ENV_METRICS_FILE);
    if (!env || !*env) return 0;
    int expected = 0;
    if (!atomic_compare_exchange_strong(&g_file_taken, &expected, 1)) {
        fprintf(stderr, "APEX: APEX_METRICS_FILE is written by %s in this process; %s does not write it\n",
                g_file_owner, who);
        return 0;
    }
    snprintf(g_file_owner, sizeof g_file_owner, "%s", who);
    /* "%p" -> the process id. */
    size_t o = 0;
    for (const char *c = env; *c && o + 24 < sizeof s->path; c++) {
        if (c[0] == '%' && c[1] == 'p') {
            o += (size_t)snprintf(s->path + o, sizeof s->path - o, "%ld", (long)getpid());
            c++;
        } else {
            s->path[o++] = *c;
        }
    }
    s->path[o] = '\0';
    return 1;
}

void apex_metrics_sink_close(apex_metrics_sink *s) {
    if (s->path[0]) atomic_store(&g_file_taken, 0);
    s->path[0] = '\0';
}

int apex_metrics_due(const apex_metrics_sink *s) {
    return s->path[0] && mono_seconds() - s->last_write >= 1.0;
}

void apex_metrics_tick(apex_metrics_sink *s, const apex_metrics *m, int force) {
    if (!s->path[0]) return;
    double now = mono_seconds();
    if (!force && now - s->last_write < 1.0) return;
    s->last_write = now;
    if (apex_metrics_write(s->path, m) != APEX_OK) {
        if (!s->failed) fprintf(stderr, "APEX: APEX_METRICS_FILE: %s\n", apex_last_error());
        s->failed = 1;
    }
}
