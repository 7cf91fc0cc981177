/* ggml_apex_trace.c - see ggml_apex_trace.h. */
#include "shim/ggml_apex_trace.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

shim_tracer shim_trace_;
int shim_trace_on_;

static int env_set(const char *name) {
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

static void load(void) {
    const int file = env_set("APEX_TRACE"), summary = env_set("APEX_TRACE_SUMMARY"),
              report = env_set("APEX_STATS_FILE");
    if (!file && !summary && !report) return;
    const char *path = getenv("APEX_LIB");
    if (!path || !*path) path = "libapex.so.1";
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    shim_tracer t;
    apex_status (*enable)(int) = NULL;
    memset(&t, 0, sizeof t);
    if (h) {
        *(void **)&t.begin = dlsym(h, "apex_trace_begin");
        *(void **)&t.end = dlsym(h, "apex_trace_end");
        *(void **)&t.thread_name = dlsym(h, "apex_trace_thread_name");
        *(void **)&t.summary = dlsym(h, "apex_step_summary_get");
        *(void **)&t.summary_reset = dlsym(h, "apex_step_summary_reset");
        *(void **)&enable = dlsym(h, "apex_trace_enable");
    }
    if (!t.begin || !t.end || !t.thread_name || !t.summary || !t.summary_reset || !enable) {
        fprintf(stderr, "APEX: no trace or step summary from the ggml backend: cannot load %s's tracer (%s; set "
                        "APEX_LIB to libapex.so.1's path)\n",
                path, h ? "an older libapex" : dlerror());
        return;
    }
    /* libapex read APEX_TRACE / APEX_TRACE_SUMMARY when it loaded; the exit
     * report alone asks for the summary. */
    if (enable(1) != APEX_OK) return;
    shim_trace_ = t;
    __atomic_store_n(&shim_trace_on_, 1, __ATOMIC_RELEASE);
}

void shim_trace_init(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, load);
}
