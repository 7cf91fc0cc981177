/* error.h - the thread-local "last error" behind apex_last_error(). */
#ifndef APEX_ERROR_H
#define APEX_ERROR_H

#include "apex/apex.h"

/* Records a printf-style message for this thread and returns s, so a
 * failing path reads `return apex_fail(APEX_ERR_..., "what was wrong");`. */
apex_status apex_fail(apex_status s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Clears this thread's message (successful calls do this). */
void apex_clear_error(void);

#endif
