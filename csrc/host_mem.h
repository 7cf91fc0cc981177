/*
 * host_mem.h - page-aligned host memory for the host KV tier, bound to the
 * NUMA nodes of the worker cores. Pages are committed on first touch, so a
 * large pool costs address space, not memory, until sequences use it.
 */
#ifndef APEX_HOST_MEM_H
#define APEX_HOST_MEM_H

#include <stddef.h>

#include "csrc/cpu_workers.h"

/* NULL (with apex_last_error set) if the mapping fails. */
void *host_mem_alloc(const cpu_workers *w, size_t bytes);
void host_mem_free(void *p, size_t bytes);

#endif
