/* trace.c - the per-step tracer: see trace.h and apex.h ("trace"). */
#define _GNU_SOURCE /* gettid, pthread_getname_np */
#include "csrc/trace.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "csrc/error.h"
#include "csrc/env.h"

int trace_level_;

/* Kinds of recorded events beyond apex_trace_kind: the gaps between calls. */
enum { EV_ENGINE = 7, EV_STEP_GAP = 8, EV_DEVICE = 9, N_EV = 10 };
enum { CHUNK_EVENTS = 4096, MAX_DEPTH = 16, MAX_LAYERS = 4096, N_TRACKS = 8 };

typedef struct tev {
    uint64_t t0, dur;
    const char *name;
    int32_t layer;
    uint32_t step;
    uint8_t kind;
} tev;

typedef struct tchunk {
    struct tchunk *next; /* published with release */
    uint32_t n;          /* events written; published with release */
    tev ev[CHUNK_EVENTS];
} tchunk;

typedef struct open_span {
    uint64_t t0, child_ns;
    const char *name;
    int32_t layer;
    uint32_t step;
    uint8_t kind;
    uint8_t engine_call; /* a depth-0 CALL: the frame the summary charges */
} open_span;

typedef struct tthread {
    struct tthread *next;
    int tid;
    char name[32];
    tchunk *head, *tail; /* only this thread appends */
    int depth;
    open_span open[MAX_DEPTH];
} tthread;

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER; /* thread list, flush, tracks */
static tthread *g_threads;
static tthread *g_tracks[N_TRACKS]; /* device timelines, written under g_mu */
static int level(void) { return __atomic_load_n(&trace_level_, __ATOMIC_RELAXED); }
static uint64_t g_events, g_max_events, g_dropped;
static char g_path[4096];
static _Thread_local tthread *t_self;

/* The summary. Sums are atomics (any thread); the step state is the engine
 * thread's, under g_step_mu. */
enum { S_APEX, S_OVERHEAD, S_CPU, S_GPU, S_GPU_KERNEL, S_COPY, S_WAIT, S_ENGINE, S_STEP_GAP, N_SUM };
static uint64_t s_ns[N_SUM], s_calls, s_attn_calls;
static pthread_mutex_t g_step_mu = PTHREAD_MUTEX_INITIALIZER;
static uint32_t s_steps;   /* steps counted by the summary (reset with it) */
static uint32_t s_step_id; /* the timeline's step numbers (never reset)    */
static uint64_t s_last_end; /* end of the last engine call; 0: none yet */
static uint64_t s_seen[2][MAX_LAYERS / 64]; /* (kind, layer) seen this step */

uint64_t trace_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

__attribute__((constructor)) static void trace_init(void) {
    const char *p = apex_env_get(APEX_ENV_TRACE);
    const char *s = apex_env_get(APEX_ENV_TRACE_SUMMARY);
    const char *m = apex_env_get(APEX_ENV_TRACE_MAX_EVENTS);
    g_max_events = m && atoll(m) > 0 ? (uint64_t)atoll(m) : 2000000;
    if (p && *p) {
        snprintf(g_path, sizeof g_path, "%s", p);
        trace_level_ = 2;
    } else if (s && *s && strcmp(s, "0") != 0) {
        trace_level_ = 1;
    }
}

static tthread *new_thread_record(int tid, const char *name) {
    tthread *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->tid = tid;
    snprintf(t->name, sizeof t->name, "%s", name);
    pthread_mutex_lock(&g_mu);
    t->next = g_threads;
    g_threads = t;
    pthread_mutex_unlock(&g_mu);
    return t;
}

static tthread *self(void) {
    if (!t_self) {
        char name[32] = "thread";
        pthread_getname_np(pthread_self(), name, sizeof name);
        t_self = new_thread_record((int)gettid(), name);
    }
    return t_self;
}

/* Appends one event to t's buffer (t's own thread, or under g_mu). */
static void record(tthread *t, uint8_t kind, const char *name, int32_t layer, uint32_t step, uint64_t t0,
                   uint64_t dur) {
    if (level() < 2 || !t) return;
    if (__atomic_fetch_add(&g_events, 1, __ATOMIC_RELAXED) >= g_max_events) {
        __atomic_fetch_add(&g_dropped, 1, __ATOMIC_RELAXED);
        return;
    }
    tchunk *c = t->tail;
    if (!c || c->n == CHUNK_EVENTS) {
        tchunk *nc = calloc(1, sizeof *nc);
        if (!nc) {
            __atomic_fetch_add(&g_dropped, 1, __ATOMIC_RELAXED);
            return;
        }
        if (c) __atomic_store_n(&c->next, nc, __ATOMIC_RELEASE);
        else __atomic_store_n(&t->head, nc, __ATOMIC_RELEASE);
        t->tail = c = nc;
    }
    c->ev[c->n] = (tev){t0, dur, name, layer, step, kind};
    __atomic_store_n(&c->n, c->n + 1, __ATOMIC_RELEASE);
}

static void add(int which, uint64_t ns) { __atomic_fetch_add(&s_ns[which], ns, __ATOMIC_RELAXED); }

/* The start of an engine call: step accounting and the gap before it. */
static uint32_t engine_call_begin(tthread *t, apex_trace_kind kind, int32_t layer, uint64_t now) {
    pthread_mutex_lock(&g_step_mu);
    const int a = kind == APEX_TRACE_CALL_ATTN;
    int new_step = s_steps == 0;
    if (layer >= 0 && layer < MAX_LAYERS) {
        uint64_t *w = &s_seen[a][layer / 64];
        const uint64_t bit = 1ull << (layer % 64);
        if (*w & bit) {
            new_step = 1;
            memset(s_seen, 0, sizeof s_seen);
        }
        s_seen[a][layer / 64] |= bit;
    }
    if (new_step) s_steps++, __atomic_fetch_add(&s_step_id, 1, __ATOMIC_RELAXED);
    const uint32_t step = __atomic_load_n(&s_step_id, __ATOMIC_RELAXED);
    const uint64_t last = s_last_end;
    pthread_mutex_unlock(&g_step_mu);
    if (last && now > last) {
        add(new_step ? S_STEP_GAP : S_ENGINE, now - last);
        record(t, new_step ? EV_STEP_GAP : EV_ENGINE, new_step ? "between steps" : "engine", layer, step, last,
               now - last);
    }
    return step;
}

void trace_begin_(apex_trace_kind kind, const char *name, int32_t layer) {
    tthread *t = self();
    if (!t) return;
    const uint64_t now = trace_now_ns();
    if (t->depth >= MAX_DEPTH) {
        t->depth++; /* too deep: counted so that end() pairs, not recorded */
        return;
    }
    open_span *o = &t->open[t->depth];
    const int call = kind == APEX_TRACE_CALL || kind == APEX_TRACE_CALL_ATTN;
    o->engine_call = call && t->depth == 0;
    o->step = o->engine_call ? engine_call_begin(t, kind, layer, now) : __atomic_load_n(&s_step_id, __ATOMIC_RELAXED);
    o->t0 = now;
    o->child_ns = 0;
    o->name = name;
    o->layer = layer;
    o->kind = (uint8_t)kind;
    t->depth++;
}

void trace_end_(void) {
    tthread *t = t_self;
    if (!t || t->depth == 0) return;
    if (--t->depth >= MAX_DEPTH) return;
    const open_span *o = &t->open[t->depth];
    const uint64_t now = trace_now_ns(), dur = now > o->t0 ? now - o->t0 : 0;
    record(t, o->kind, o->name, o->layer, o->step, o->t0, dur);
    if (o->engine_call) {
        add(S_APEX, dur);
        add(S_OVERHEAD, dur > o->child_ns ? dur - o->child_ns : 0);
        __atomic_fetch_add(&s_calls, 1, __ATOMIC_RELAXED);
        if (o->kind == APEX_TRACE_CALL_ATTN) __atomic_fetch_add(&s_attn_calls, 1, __ATOMIC_RELAXED);
        pthread_mutex_lock(&g_step_mu);
        s_last_end = now;
        pthread_mutex_unlock(&g_step_mu);
        return;
    }
    /* Counted: directly inside an engine call, or outermost on a thread
     * that is not in one (APEX's workers). */
    open_span *parent = t->depth > 0 ? &t->open[t->depth - 1] : NULL;
    const int in_call = parent && parent->engine_call && t->depth == 1;
    if (!in_call && t->depth != 0) return;
    int which = -1;
    switch (o->kind) {
    case APEX_TRACE_CPU_ATTN: which = S_CPU; break;
    case APEX_TRACE_GPU_ATTN: which = S_GPU; break;
    case APEX_TRACE_COPY: which = S_COPY; break;
    case APEX_TRACE_WAIT: which = in_call ? S_WAIT : -1; break;
    default: break;
    }
    if (which < 0) return;
    add(which, dur);
    if (in_call) parent->child_ns += dur;
}

void trace_device_span_(const char *track, const char *name, int32_t layer, uint64_t t0_ns, uint64_t dur_ns) {
    if (!trace_on()) return;
    add(S_GPU_KERNEL, dur_ns);
    if (level() < 2) return;
    pthread_mutex_lock(&g_mu);
    tthread *t = NULL;
    for (int i = 0; i < N_TRACKS && !t; i++) {
        if (g_tracks[i] && strcmp(g_tracks[i]->name, track) == 0) t = g_tracks[i];
        else if (!g_tracks[i]) {
            /* Device tracks get thread ids no kernel thread has. */
            t = g_tracks[i] = calloc(1, sizeof *t);
            if (t) {
                t->tid = 0x40000000 + i;
                snprintf(t->name, sizeof t->name, "%s", track);
                t->next = g_threads;
                g_threads = t;
            }
        }
    }
    record(t, EV_DEVICE, name, layer, __atomic_load_n(&s_step_id, __ATOMIC_RELAXED), t0_ns, dur_ns);
    pthread_mutex_unlock(&g_mu);
}

/* ------------------------------------------------------------- the file */

static const char *const k_cat[N_EV] = {"call", "attn_call", "cpu_attn", "gpu_attn", "copy",
                                        "wait", "info", "engine", "step_gap", "gpu"};

static void json_str(FILE *f, const char *s) {
    fputc('"', f);
    for (; s && *s; s++) {
        if (*s == '"' || *s == '\\') fputc('\\', f);
        if ((unsigned char)*s < 0x20) fputc(' ', f);
        else fputc(*s, f);
    }
    fputc('"', f);
}

static void summary_json(FILE *f, const apex_step_summary *s) {
    fprintf(f,
            "{\"steps\": %llu, \"layer_steps\": %llu, \"calls\": %llu, \"engine_us\": %.3f, \"apex_us\": %.3f, "
            "\"cpu_attn_us\": %.3f, \"gpu_attn_us\": %.3f, \"gpu_kernel_us\": %.3f, \"copy_us\": %.3f, "
            "\"wait_us\": %.3f, \"apex_overhead_us\": %.3f, \"step_gap_us\": %.3f}",
            (unsigned long long)s->steps, (unsigned long long)s->layer_steps, (unsigned long long)s->calls,
            s->engine_us, s->apex_us, s->cpu_attn_us, s->gpu_attn_us, s->gpu_kernel_us, s->copy_us, s->wait_us,
            s->apex_overhead_us, s->step_gap_us);
}

static apex_status flush(void) {
    if (level() < 2) return APEX_OK;
    char path[sizeof g_path + 32];
    const char *pp = strstr(g_path, "%p");
    if (pp)
        snprintf(path, sizeof path, "%.*s%d%s", (int)(pp - g_path), g_path, (int)getpid(), pp + 2);
    else
        snprintf(path, sizeof path, "%s", g_path);
    FILE *f = fopen(path, "w");
    if (!f) return apex_fail(APEX_ERR_INVALID_ARG, "APEX_TRACE: cannot write '%s'", path);
    const int pid = (int)getpid();
    fprintf(f, "{\"traceEvents\": [\n{\"name\": \"process_name\", \"ph\": \"M\", \"pid\": %d, \"tid\": 0, "
               "\"args\": {\"name\": \"APEX (pid %d)\"}}",
            pid, pid);
    pthread_mutex_lock(&g_mu);
    for (const tthread *t = g_threads; t; t = t->next) {
        fprintf(f, ",\n{\"name\": \"thread_name\", \"ph\": \"M\", \"pid\": %d, \"tid\": %d, \"args\": {\"name\": ", pid,
                t->tid);
        json_str(f, t->name);
        fprintf(f, "}}");
        for (const tchunk *c = __atomic_load_n(&t->head, __ATOMIC_ACQUIRE); c;
             c = __atomic_load_n(&c->next, __ATOMIC_ACQUIRE)) {
            const uint32_t n = __atomic_load_n(&c->n, __ATOMIC_ACQUIRE);
            for (uint32_t i = 0; i < n; i++) {
                const tev *e = &c->ev[i];
                fputs(",\n{\"name\": ", f);
                json_str(f, e->name);
                fprintf(f,
                        ", \"cat\": \"%s\", \"ph\": \"X\", \"ts\": %.3f, \"dur\": %.3f, \"pid\": %d, \"tid\": %d, "
                        "\"args\": {\"layer\": %d, \"step\": %u}}",
                        e->kind < N_EV ? k_cat[e->kind] : "info", (double)e->t0 / 1000.0, (double)e->dur / 1000.0,
                        pid, t->tid, e->layer, e->step);
            }
        }
    }
    pthread_mutex_unlock(&g_mu);
    apex_step_summary s;
    apex_step_summary_get(&s);
    fprintf(f, "\n], \"displayTimeUnit\": \"ms\", \"otherData\": {\"apex_dropped_events\": %llu, \"apex_summary\": ",
            (unsigned long long)__atomic_load_n(&g_dropped, __ATOMIC_RELAXED));
    summary_json(f, &s);
    fprintf(f, "}}\n");
    const int bad = ferror(f);
    if (fclose(f) != 0 || bad) return apex_fail(APEX_ERR_INTERNAL, "APEX_TRACE: writing '%s' failed", path);
    return APEX_OK;
}

__attribute__((destructor)) static void trace_fini(void) {
    if (level() == 2 && flush() != APEX_OK) fprintf(stderr, "APEX: %s\n", apex_last_error());
}

/* ------------------------------------------------------------------ ABI */

APEX_API int apex_trace_level(void) { return level(); }

APEX_API apex_status apex_trace_enable(int lv) {
    if (lv < 1 || lv > 2)
        return apex_fail(APEX_ERR_INVALID_ARG, "apex_trace_enable: level %d is not 1 or 2", lv);
    if (lv == 2 && !g_path[0])
        return apex_fail(APEX_ERR_INVALID_ARG, "apex_trace_enable: level 2 needs APEX_TRACE=FILE");
    if (level() < lv) __atomic_store_n(&trace_level_, lv, __ATOMIC_RELAXED);
    return APEX_OK;
}

APEX_API void apex_trace_begin(apex_trace_kind kind, const char *name, int32_t layer) {
    if (trace_on() && (unsigned)kind <= APEX_TRACE_INFO) trace_begin_(kind, name ? name : "?", layer);
}

APEX_API void apex_trace_end(void) { TRACE_END(); }

APEX_API void apex_trace_thread_name(const char *name) {
    if (!trace_on() || !name) return;
    tthread *t = self();
    if (!t) return;
    pthread_mutex_lock(&g_mu); /* the flush may be reading it */
    snprintf(t->name, sizeof t->name, "%s", name);
    pthread_mutex_unlock(&g_mu);
}

APEX_API apex_status apex_trace_flush(void) { return flush(); }

APEX_API apex_status apex_step_summary_get(apex_step_summary *out) {
    if (!out) return apex_fail(APEX_ERR_INVALID_ARG, "apex_step_summary_get: out is NULL");
    memset(out, 0, sizeof *out);
    if (!trace_on())
        return apex_fail(APEX_ERR_UNSUPPORTED,
                         "apex_step_summary_get: tracing is off (APEX_TRACE=FILE or APEX_TRACE_SUMMARY=1)");
    uint64_t ns[N_SUM];
    for (int i = 0; i < N_SUM; i++) ns[i] = __atomic_load_n(&s_ns[i], __ATOMIC_RELAXED);
    out->calls = __atomic_load_n(&s_calls, __ATOMIC_RELAXED);
    out->layer_steps = __atomic_load_n(&s_attn_calls, __ATOMIC_RELAXED);
    pthread_mutex_lock(&g_step_mu);
    out->steps = s_steps;
    pthread_mutex_unlock(&g_step_mu);
    const double per = out->layer_steps ? 1e-3 / (double)out->layer_steps : 0.0;
    out->engine_us = (double)ns[S_ENGINE] * per;
    out->apex_us = (double)ns[S_APEX] * per;
    out->cpu_attn_us = (double)ns[S_CPU] * per;
    out->gpu_attn_us = (double)ns[S_GPU] * per;
    out->gpu_kernel_us = (double)ns[S_GPU_KERNEL] * per;
    out->copy_us = (double)ns[S_COPY] * per;
    out->wait_us = (double)ns[S_WAIT] * per;
    out->apex_overhead_us = (double)ns[S_OVERHEAD] * per;
    /* Gaps: one fewer than the steps (the first step has none before it). */
    out->step_gap_us = out->steps > 1 ? (double)ns[S_STEP_GAP] * 1e-3 / (double)(out->steps - 1) : 0.0;
    return APEX_OK;
}

APEX_API apex_status apex_step_summary_reset(void) {
    for (int i = 0; i < N_SUM; i++) __atomic_store_n(&s_ns[i], 0, __ATOMIC_RELAXED);
    __atomic_store_n(&s_calls, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&s_attn_calls, 0, __ATOMIC_RELAXED);
    pthread_mutex_lock(&g_step_mu);
    s_steps = 0;
    s_last_end = 0;
    memset(s_seen, 0, sizeof s_seen);
    pthread_mutex_unlock(&g_step_mu);
    return APEX_OK;
}
