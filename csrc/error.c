#include "csrc/error.h"

#include <stdarg.h>
#include <stdio.h>

/* One buffer per thread: no global state shared between contexts. */
static _Thread_local char last_error[512];

apex_status apex_fail(apex_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return s;
}

void apex_clear_error(void) { last_error[0] = '\0'; }

APEX_API const char *apex_last_error(void) { return last_error; }

APEX_API const char *apex_status_name(apex_status s) {
    switch (s) {
    case APEX_OK: return "APEX_OK";
    case APEX_ERR_INVALID_ARG: return "APEX_ERR_INVALID_ARG";
    case APEX_ERR_UNKNOWN_SEQ: return "APEX_ERR_UNKNOWN_SEQ";
    case APEX_ERR_SEQ_EXISTS: return "APEX_ERR_SEQ_EXISTS";
    case APEX_ERR_OUT_OF_RANGE: return "APEX_ERR_OUT_OF_RANGE";
    case APEX_ERR_OUT_OF_BLOCKS: return "APEX_ERR_OUT_OF_BLOCKS";
    case APEX_ERR_NO_MEMORY: return "APEX_ERR_NO_MEMORY";
    case APEX_ERR_UNSUPPORTED: return "APEX_ERR_UNSUPPORTED";
    case APEX_ERR_INTERNAL: return "APEX_ERR_INTERNAL";
    }
    return "APEX_ERR_UNKNOWN_STATUS";
}
