#include "csrc/host_mem.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>

#include "csrc/error.h"
#include "csrc/fault.h"

void *host_mem_alloc(const cpu_workers *w, size_t bytes) {
    if (bytes == 0) bytes = 1;
    if (fault_fail(FAULT_HOST_ALLOC)) {
        apex_fail(APEX_ERR_NO_MEMORY, "host KV pool: cannot map %zu bytes (injected ENOMEM)",
                  bytes);
        return NULL;
    }
    /* mmap, not malloc: page-aligned, returned to the OS on free, and a
     * request larger than the machine can back fails cleanly (ENOMEM)
     * instead of aborting inside an allocator. */
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        apex_fail(APEX_ERR_NO_MEMORY, "host KV pool: cannot map %zu bytes (%s)",
                  bytes, strerror(errno));
        return NULL;
    }
    /* Transparent huge pages: the CPU kernel streams scattered blocks, and
     * 4 KiB pages cost it a TLB miss per page (measured: ~20% bandwidth). */
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE);
#endif
    /* Bind to the worker cores' NUMA nodes before first touch. Failure is
     * harmless (single-node machine, or a container without mbind). */
    hwloc_nodeset_t ns = w ? cpu_workers_nodeset(w) : NULL;
    if (ns) {
        hwloc_set_area_membind(w->topo, p, bytes, ns, HWLOC_MEMBIND_BIND,
                               HWLOC_MEMBIND_BYNODESET);
        hwloc_bitmap_free(ns);
    }
    return p;
}

void host_mem_free(void *p, size_t bytes) {
    if (p) munmap(p, bytes ? bytes : 1);
}
