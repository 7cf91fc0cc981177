/*
 * host_mem.h - page-aligned host memory for the host KV tier, bound to the
 * NUMA nodes of the worker cores. Pages are committed on first touch, so a
 * large pool costs address space, not memory, until sequences use it.
 * Also pinning such memory for a CUDA runtime the process already has.
 */
#ifndef APEX_HOST_MEM_H
#define APEX_HOST_MEM_H

#include <stddef.h>

#include "csrc/cpu_workers.h"

/* NULL (with apex_last_error set) if the mapping fails. */
void *host_mem_alloc(const cpu_workers *w, size_t bytes);
void host_mem_free(void *p, size_t bytes);

/* Asks the kernel to back the whole 2 MiB pages inside [p, p + bytes) -
 * memory an engine allocated (vLLM's KV tensors: 4 KiB pages) - with
 * transparent huge pages, now (MADV_COLLAPSE, Linux 6.1+: copies what is
 * resident) and later (MADV_HUGEPAGE). Returns the bytes collapsed; 0 where
 * the kernel declines (older kernel, THP "never", pinned or busy pages,
 * no memory): the contents never change, only their backing. */
size_t host_mem_huge(void *p, size_t bytes);

/* Registers [p, p + bytes) with the CUDA runtime the process already has
 * (found by symbol, never loaded: for clients such as the ggml backend whose
 * engine brings its own). APEX_OK, or why not: APEX_ERR_UNSUPPORTED (no
 * runtime, APEX_PIN_HOST_POOL=0), APEX_ERR_INTERNAL (the runtime refused;
 * its sticky-looking last error is cleared). A context pins through its
 * device instead (csrc/context.c). */
apex_status host_mem_pin(void *p, size_t bytes);
apex_status host_mem_unpin(void *p);

#endif
