/*
 * ggml_apex_trace.h - the ggml backend as a client of libapex's tracer
 * (apex.h "trace"): no tracer of its own, libapex's records the backend's
 * spans with its own, so one timeline and one summary cover the process.
 *
 * Turned on once, when APEX_TRACE=FILE, APEX_TRACE_SUMMARY=1 or
 * APEX_STATS_FILE (the exit report carries the summary) is set; otherwise
 * every hook is one branch.
 */
#ifndef APEX_GGML_APEX_TRACE_H
#define APEX_GGML_APEX_TRACE_H

#include "apex/apex.h"

extern int shim_trace_on_; /* 1 once libapex's tracer is on for the backend */

static inline int shim_trace_active(void) {
    return __builtin_expect(__atomic_load_n(&shim_trace_on_, __ATOMIC_RELAXED), 0);
}

/* Turns the tracer on if the environment asks for it (once; thread-safe). */
void shim_trace_init(void);

#define SHIM_TRACE_BEGIN(kind, name, layer)                                 \
    do {                                                                    \
        if (shim_trace_active()) apex_trace_begin((kind), (name), (layer)); \
    } while (0)
#define SHIM_TRACE_END()                             \
    do {                                             \
        if (shim_trace_active()) apex_trace_end();    \
    } while (0)

#endif
