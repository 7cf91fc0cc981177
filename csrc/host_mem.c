#include "csrc/host_mem.h"

#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "csrc/env.h"
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

#define HUGE_PAGE ((uintptr_t)2 << 20)
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25 /* Linux 6.1 uapi; older headers lack it */
#endif

size_t host_mem_huge(void *p, size_t bytes) {
    uintptr_t a = ((uintptr_t)p + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
    uintptr_t e = ((uintptr_t)p + bytes) & ~(HUGE_PAGE - 1);
    if (!p || e <= a) return 0;
#ifdef MADV_HUGEPAGE
    madvise((void *)a, e - a, MADV_HUGEPAGE);
#endif
    /* One call per 64 MiB: a refusal (EAGAIN: a page busy) costs only its
     * piece, and the count says how much took. */
    size_t done = 0;
    for (uintptr_t x = a; x < e; x += (uintptr_t)64 << 20) {
        size_t n = e - x < ((uintptr_t)64 << 20) ? (size_t)(e - x) : (size_t)64 << 20;
        if (madvise((void *)x, n, MADV_COLLAPSE) == 0) done += n;
        else if (errno == EINVAL) break; /* no MADV_COLLAPSE here */
    }
    return done;
}

void host_mem_free(void *p, size_t bytes) {
    if (p) munmap(p, bytes ? bytes : 1);
}

/* A CUDA runtime function, if the process already has the runtime (e.g. a
 * CUDA build of ggml); never loads it. */
static void *cuda_rt_sym(const char *name) {
    void *f = dlsym(RTLD_DEFAULT, name);
    static const char *const libs[] = {"libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0",
                                       "libcudart.so"};
    for (size_t i = 0; !f && i < sizeof libs / sizeof *libs; i++) {
        void *h = dlopen(libs[i], RTLD_NOW | RTLD_NOLOAD);
        if (h && !(f = dlsym(h, name))) dlclose(h);
    }
    return f;
}

/* A failed registration is not sticky in CUDA, but the engine's next
 * cudaGetLastError check would see it: clear it. */
static void cuda_rt_clear_error(void) {
    int (*last)(void) = (int (*)(void))cuda_rt_sym("cudaGetLastError");
    if (last) last();
}

apex_status host_mem_pin(void *p, size_t bytes) {
    const char *e = apex_env_get(APEX_ENV_PIN_HOST_POOL);
    if (e && strcmp(e, "0") == 0) return apex_fail(APEX_ERR_UNSUPPORTED, "APEX_PIN_HOST_POOL=0");
    int (*reg)(void *, size_t, unsigned int) = (int (*)(void *, size_t, unsigned int))cuda_rt_sym("cudaHostRegister");
    if (!reg) return apex_fail(APEX_ERR_UNSUPPORTED, "no CUDA runtime in this process");
    const int rc = reg(p, bytes, 1u /* cudaHostRegisterPortable */);
    if (rc != 0) {
        cuda_rt_clear_error();
        return apex_fail(APEX_ERR_INTERNAL,
                         "cudaHostRegister failed with CUDA error %d; copies to the GPU are slower", rc);
    }
    return APEX_OK;
}

apex_status host_mem_unpin(void *p) {
    int (*unreg)(void *) = (int (*)(void *))cuda_rt_sym("cudaHostUnregister");
    if (!unreg) return apex_fail(APEX_ERR_UNSUPPORTED, "no CUDA runtime in this process");
    const int rc = unreg(p);
    if (rc != 0) {
        cuda_rt_clear_error();
        return apex_fail(APEX_ERR_INTERNAL, "cudaHostUnregister failed with CUDA error %d", rc);
    }
    return APEX_OK;
}
