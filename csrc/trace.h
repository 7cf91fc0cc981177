/*
 * trace.h - the per-step tracer (apex.h, "trace"): Chrome trace-event spans
 * and the per-step summary, process-wide.
 *
 * Off (the default) costs one predictable branch per hook. With
 * APEX_TRACE=FILE every span is kept in a per-thread buffer (one writer, no
 * lock) and written as Chrome trace-event JSON at exit or apex_trace_flush;
 * APEX_TRACE_SUMMARY=1 (or apex_trace_enable) keeps only the summary.
 *
 * Spans nest per thread (begin/end). What the summary counts:
 *  - a CALL span at depth 0 is an engine's call into APEX: its wall time is
 *    APEX's, the gap since the previous such call the engine's. A call whose
 *    (layer, kind) was already seen in this step starts a new step; the gap
 *    before it is the between-step gap, not a layer's engine time.
 *  - CPU_ATTN, GPU_ATTN and COPY spans directly inside an engine call, or at
 *    depth 0 on any other thread (APEX's workers); WAIT only directly inside
 *    an engine call (what the engine's thread waits for).
 *  - APEX overhead: an engine call's wall time less its counted children.
 * Deeper spans (a libapex call made from inside a client's span) are shown,
 * not summed, so nothing is counted twice.
 */
#ifndef APEX_TRACE_H
#define APEX_TRACE_H

#include <stdint.h>

#include "apex/apex.h"

/* 0 off, 1 summary, 2 summary and events. Read once, at load. */
extern int trace_level_;

static inline int trace_on(void) { return __builtin_expect(__atomic_load_n(&trace_level_, __ATOMIC_RELAXED) != 0, 0); }

uint64_t trace_now_ns(void);
void trace_begin_(apex_trace_kind kind, const char *name, int32_t layer);
void trace_end_(void);
/* A span measured elsewhere (GPU event durations): on a named track of
 * its own, shown, and summed into `kind` (GPU_ATTN or COPY) only as
 * device time (apex_step_summary.gpu_kernel_us). */
void trace_device_span_(const char *track, const char *name, int32_t layer, uint64_t t0_ns, uint64_t dur_ns);

/* The hooks the runtime uses: nothing but a branch when off. `name` must
 * be a string with static storage (it is kept until the flush). */
#define TRACE_BEGIN(kind, name, layer)                             \
    do {                                                           \
        if (trace_on()) trace_begin_((kind), (name), (layer));     \
    } while (0)
#define TRACE_END()                    \
    do {                               \
        if (trace_on()) trace_end_();  \
    } while (0)

/* A span from here to the end of the enclosing scope, whatever the return
 * path (GNU C's cleanup attribute): one line at the top of a function. */
static inline void trace_scope_end_(const int *on) {
    if (*on) trace_end_();
}
#define TRACE_SCOPE(kind, name, layer)                                   \
    __attribute__((cleanup(trace_scope_end_), unused)) const int trace_scope_ = \
        trace_on() ? (trace_begin_((kind), (name), (layer)), 1) : 0

#endif
