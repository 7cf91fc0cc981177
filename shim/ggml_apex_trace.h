/*
 * ggml_apex_trace.h - the ggml backend as a client of libapex's tracer
 * (apex.h "trace"): no tracer of its own, libapex's (loaded from APEX_LIB,
 * default libapex.so.1) records the backend's spans with its own, so one
 * timeline and one summary cover the process.
 *
 * Loaded once, when APEX_TRACE=FILE, APEX_TRACE_SUMMARY=1 or APEX_STATS_FILE
 * (the exit report carries the summary) is set; otherwise every hook is one
 * branch. Without libapex the backend runs untraced (one line says so).
 */
#ifndef APEX_GGML_APEX_TRACE_H
#define APEX_GGML_APEX_TRACE_H

#include "apex/apex.h"

typedef struct shim_tracer {
    void (*begin)(apex_trace_kind kind, const char *name, int32_t layer);
    void (*end)(void);
    void (*thread_name)(const char *name);
    apex_status (*summary)(apex_step_summary *out);
    apex_status (*summary_reset)(void);
} shim_tracer;

extern shim_tracer shim_trace_;
extern int shim_trace_on_; /* 1 once libapex's tracer is loaded and on */

static inline int shim_trace_active(void) {
    return __builtin_expect(__atomic_load_n(&shim_trace_on_, __ATOMIC_RELAXED), 0);
}

/* Loads the tracer if the environment asks for it (once; thread-safe). */
void shim_trace_init(void);

#define SHIM_TRACE_BEGIN(kind, name, layer)                                   \
    do {                                                                      \
        if (shim_trace_active()) shim_trace_.begin((kind), (name), (layer)); \
    } while (0)
#define SHIM_TRACE_END()                                         \
    do {                                                         \
        if (shim_trace_active()) shim_trace_.end();               \
    } while (0)

#endif
