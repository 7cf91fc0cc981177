/* ggml_apex_metrics.h - APEX_METRICS_FILE for the ggml backend: a thread
 * that rewrites the Prometheus file (libapex's writer) once a second from the
 * backend's counters, and a last write at exit. */
#ifndef APEX_GGML_APEX_METRICS_H
#define APEX_GGML_APEX_METRICS_H

#include "shim/ggml_apex.h"

/* Starts the writer when APEX_METRICS_FILE is set (once per process): the
 * counters from stats_get, the per-step summary from summary_get (where it
 * exists). */
void ggml_apex_metrics_start(void (*stats_get)(apex_ggml_stats *out), apex_ggml_step_summary_t summary_get);
/* Stops it and writes the final figures; nothing when it never started. */
void ggml_apex_metrics_stop(void);

#endif
