/* ggml_apex_trace.c - see ggml_apex_trace.h. */
#include "shim/ggml_apex_trace.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

int shim_trace_on_;

static int env_set(const char *name) {
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

static void load(void) {
    if (!env_set("APEX_TRACE") && !env_set("APEX_TRACE_SUMMARY") && !env_set("APEX_STATS_FILE")) return;
    /* libapex read APEX_TRACE / APEX_TRACE_SUMMARY when it loaded; the exit
     * report alone asks for the summary. */
    if (apex_trace_enable(1) != APEX_OK) return;
    __atomic_store_n(&shim_trace_on_, 1, __ATOMIC_RELEASE);
}

void shim_trace_init(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, load);
}
