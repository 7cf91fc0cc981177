/* ggml_apex_metrics.c - see ggml_apex_metrics.h; the file is libapex's
 * (apex_metrics_file_*, apex_strided.h). A thread rather than a
 * write from graph_compute: an idle llama-server runs no graph, and its
 * "sequences per tier" must still fall to 0. The counters are read under
 * the backend's lock (stats_get), so the thread shares nothing else. */
#include "shim/ggml_apex_metrics.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "apex/apex_strided.h"

static pthread_mutex_t m_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t m_cond = PTHREAD_COND_INITIALIZER;
static pthread_t m_thread;
static int m_running, m_stop;
static apex_metrics_file *m_file;
static void (*m_stats_get)(apex_ggml_stats *out);
static apex_ggml_step_summary_t m_summary_get;
/* Per stream slot, the attention counts at the last write: a slot whose
 * count grew since is a sequence of that interval. */
static uint64_t m_prev_attn[APEX_GGML_MAX_STREAMS], m_prev_gpu[APEX_GGML_MAX_STREAMS];

static void write_now(void) {
    static apex_ggml_stats s; /* large (per-stream arrays): not on the stack; only this thread and stop use it */
    m_stats_get(&s);
    apex_metrics_values m;
    apex_metrics_values_init(&m, "llama.cpp");
    m.attention_calls = s.attention_calls;
    m.kv_rows_written = s.kv_rows_written;
    uint64_t all = 0;
    int64_t seqs[2] = {0, 0};
    for (int i = 0; i <= s.max_stream && i < APEX_GGML_MAX_STREAMS; i++) {
        all += s.stream_attn[i];
        if (s.stream_gpu[i] != m_prev_gpu[i]) seqs[APEX_TIER_DEVICE]++;
        else if (s.stream_attn[i] != m_prev_attn[i]) seqs[APEX_TIER_HOST]++;
        m_prev_attn[i] = s.stream_attn[i];
        m_prev_gpu[i] = s.stream_gpu[i];
    }
    m.seq_attentions[APEX_TIER_DEVICE] = s.gpu_attn;
    m.seq_attentions[APEX_TIER_HOST] = all - s.gpu_attn;
    /* The GPU tier places sequence slots by budget and never moves them. */
    m.migrations[APEX_TIER_DEVICE] = m.migrations[APEX_TIER_HOST] = 0;
    m.fallbacks = s.declined + s.tier_fallbacks;
    m.errors = s.errors + s.kv_pool_failures;
    m.attention_seconds = s.attention_seconds;
    m.kv_bytes[APEX_TIER_HOST] = (int64_t)s.kv_bytes_apex;
    m.seqs[APEX_TIER_DEVICE] = seqs[APEX_TIER_DEVICE];
    m.seqs[APEX_TIER_HOST] = seqs[APEX_TIER_HOST];
    m.has_step_summary = m_summary_get(&m.step, 0);
    apex_metrics_file_write(m_file, &m, 1);
}

static void *loop(void *arg) {
    (void)arg;
    pthread_mutex_lock(&m_lock);
    while (!m_stop) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += 1;
        while (!m_stop && pthread_cond_timedwait(&m_cond, &m_lock, &until) != ETIMEDOUT) {
        }
        if (m_stop) break;
        write_now();
    }
    pthread_mutex_unlock(&m_lock);
    return NULL;
}

void ggml_apex_metrics_start(void (*stats_get)(apex_ggml_stats *out), apex_ggml_step_summary_t summary_get) {
    pthread_mutex_lock(&m_lock);
    if (!m_running && !m_stop && !m_file && apex_metrics_file_open("the APEX ggml backend", &m_file) == APEX_OK &&
        m_file) {
        m_stats_get = stats_get;
        m_summary_get = summary_get;
        write_now(); /* the file exists from the start */
        if (pthread_create(&m_thread, NULL, loop, NULL) == 0)
            m_running = 1;
        else
            fprintf(stderr, "APEX: APEX_METRICS_FILE: cannot start the writer thread; written at exit only\n");
    }
    pthread_mutex_unlock(&m_lock);
}

void ggml_apex_metrics_stop(void) {
    pthread_mutex_lock(&m_lock);
    int running = m_running;
    m_stop = 1;
    pthread_cond_signal(&m_cond);
    pthread_mutex_unlock(&m_lock);
    if (running) pthread_join(m_thread, NULL);
    if (m_stats_get && m_file) {
        write_now();
        apex_metrics_file_close(m_file);
        m_file = NULL;
    }
}
