/*
 * metrics.h - APEX_METRICS_FILE: a Prometheus text-format file (the
 * node-exporter "textfile" convention), rewritten atomically (write to a
 * temporary file in the same directory, then rename) at most once a second.
 *
 * Engine-neutral: libapex (csrc/context.c feeds it from apex_stats) and,
 * through apex_metrics_file_* (apex_strided.h), the ggml backend
 * (shim/ggml_apex_metrics.c feeds it from apex_ggml_stats) fill one
 * apex_metrics and tick the sink. Metric names (all documented with
 * # HELP / # TYPE in the file):
 *   apex_attention_calls_total            counter  attention calls run by APEX
 *   apex_kv_rows_written_total            counter  tokens stored in the KV cache (rows, all layers)
 *   apex_sequence_attentions_total{tier}  counter  sequence-layer attentions per tier (gpu|host)
 *   apex_migrations_total{to}             counter  sequences moved between tiers
 *   apex_fallbacks_total                  counter  work APEX handed back or ran on a slower path
 *   apex_errors_total                     counter  calls that failed
 *   apex_attention_seconds_total          counter  wall time in attention
 *   apex_kv_blocks_used{tier}, apex_kv_blocks_free{tier}  gauges (libapex's block pools)
 *   apex_kv_bytes{tier}                   gauge    KV bytes held per tier
 *   apex_sequences{tier}                  gauge    sequences per tier
 * and, where the per-step summary exists (APEX_TRACE or APEX_TRACE_SUMMARY=1):
 *   apex_steps_total, apex_layer_steps_total   counters  decode steps, layer-steps
 *   apex_step_us_per_layer{part}          gauge    mean microseconds per layer-step since
 *       the start, part = engine|cpu_attn|gpu_attn|gpu_kernel|copy|wait|apex_overhead
 * A value of -1 in a gauge means "not known to this engine": its line is left
 * out (HELP/TYPE stay, so the names are always documented).
 */
#ifndef APEX_METRICS_H
#define APEX_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "apex/apex_strided.h"

/* The figures of one write: the public struct (apex_strided.h documents
 * the fields), which engine adapters fill for apex_metrics_file_write. */
typedef apex_metrics_values apex_metrics;

/* All gauges -1 (not known), counters 0, struct_size set. */
void apex_metrics_init(apex_metrics *m, const char *engine);

/* The file's text into buf (NUL-terminated). Returns its length, or -1 when
 * cap is too small (buf then holds nothing useful). */
int apex_metrics_render(const apex_metrics *m, char *buf, size_t cap);

/* Writes the file now: path.tmp.<pid> then rename over path, so a reader
 * sees the old file or the new one, never a part. APEX_ERR_* with a message
 * when the directory is not writable. */
apex_status apex_metrics_write(const char *path, const apex_metrics *m);

/* The file of one context (or one backend): its path and when it was last
 * written. */
typedef struct apex_metrics_sink {
    char path[512];          /* "" : no file                          */
    double last_write;       /* CLOCK_MONOTONIC seconds; 0: never      */
    int failed;              /* a write failed (reported once)         */
} apex_metrics_sink;

/* Sets the sink from APEX_METRICS_FILE ("%p" in it becomes the process id,
 * for engines with one process per worker). Only one sink per process may
 * take the file (a second one gets "" and one line on stderr saying which
 * has it), so two contexts never overwrite each other's file. Returns 1 when
 * the sink has a file. apex_metrics_sink_close gives the file back. */
int apex_metrics_sink_open(apex_metrics_sink *s, const char *who);
void apex_metrics_sink_close(apex_metrics_sink *s);

/* 1 when the sink has a file and a second has passed since its last write
 * (cheap: one clock read). */
int apex_metrics_due(const apex_metrics_sink *s);

/* Writes m to the sink's file if due (force: now, e.g. at exit). A failing
 * write gets one line on stderr, then is retried quietly at the next tick. */
void apex_metrics_tick(apex_metrics_sink *s, const apex_metrics *m, int force);

#endif
