/*
 * driver_loader.c - the CUDA driver API, loaded at run time.
 *
 * APEX never links libcuda: binaries must start on machines without a GPU
 * driver. The few driver entry points the runtime API lacks (stream memory
 * operations, for stream waits on host-written flags) are found with
 * dlopen("libcuda.so.1") + dlsym once; when anything is missing the calls
 * report APEX_CUDA_ENODRIVER and the process stays in host mode.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include <cuda_runtime_api.h>

#include "cuda/apex_cuda.h"

/* Driver ABI types, declared here so that cuda.h is not needed. */
typedef int cu_result;
typedef void *cu_stream;
typedef unsigned long long cu_deviceptr;

typedef cu_result (*fn_init)(unsigned);
typedef cu_result (*fn_get_int)(int *);
typedef cu_result (*fn_wait32)(cu_stream, cu_deviceptr, uint32_t, unsigned);

static struct {
    void *lib;
    int ok;
    int version;
    int devices;
    fn_wait32 wait32;
    fn_wait32 write32; /* same signature: (stream, addr, value, flags) */
} drv;

static pthread_once_t drv_once = PTHREAD_ONCE_INIT;

/* dlsym returns an object pointer; copy it into a function pointer without
 * the conversion ISO C leaves undefined. */
static void *sym(const char *name) { return drv.lib ? dlsym(drv.lib, name) : NULL; }

#define LOAD_FN(dst, name)                                                    \
    do {                                                                      \
        void *p_ = sym(name);                                                 \
        memcpy(&(dst), &p_, sizeof(dst));                                     \
    } while (0)

static void drv_load(void) {
    drv.lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!drv.lib) return;
    fn_init init = NULL;
    fn_get_int count = NULL, version = NULL;
    LOAD_FN(init, "cuInit");
    LOAD_FN(count, "cuDeviceGetCount");
    LOAD_FN(version, "cuDriverGetVersion");
    if (!init || !count || init(0) != 0) return;
    int n = 0;
    if (count(&n) != 0 || n < 1) return;
    if (version && version(&drv.version) != 0) drv.version = 0;
    /* _v2 are the current ABI (driver >= 11.7); same signature as v1. */
    LOAD_FN(drv.wait32, "cuStreamWaitValue32_v2");
    if (!drv.wait32) LOAD_FN(drv.wait32, "cuStreamWaitValue32");
    LOAD_FN(drv.write32, "cuStreamWriteValue32_v2");
    if (!drv.write32) LOAD_FN(drv.write32, "cuStreamWriteValue32");
    /* The runtime must also accept the driver (version match). */
    int rt_n = 0;
    if (cudaGetDeviceCount(&rt_n) != cudaSuccess || rt_n < 1) {
        cudaGetLastError();
        return;
    }
    drv.devices = rt_n;
    drv.ok = 1;
}

int apex_cuda_driver_available(void) {
    pthread_once(&drv_once, drv_load);
    return drv.ok;
}

int apex_cuda_device_count(void) {
    return apex_cuda_driver_available() ? drv.devices : 0;
}

int apex_cuda_driver_version(void) {
    pthread_once(&drv_once, drv_load);
    return drv.version;
}

/* Driver results share their numbering with the runtime's for the common
 * failures, so they pass through as the "cudaError" code. */
int apex_cuda_stream_wait_value32(void *stream, void *addr, uint32_t value,
                                  unsigned flags) {
    if (!apex_cuda_driver_available() || !drv.wait32) return APEX_CUDA_ENODRIVER;
    if (!addr || ((uintptr_t)addr & 3)) return APEX_CUDA_EINVAL;
    return drv.wait32((cu_stream)stream, (cu_deviceptr)(uintptr_t)addr, value, flags);
}

int apex_cuda_stream_write_value32(void *stream, void *addr, uint32_t value) {
    if (!apex_cuda_driver_available() || !drv.write32) return APEX_CUDA_ENODRIVER;
    if (!addr || ((uintptr_t)addr & 3)) return APEX_CUDA_EINVAL;
    return drv.write32((cu_stream)stream, (cu_deviceptr)(uintptr_t)addr, value, 0);
}
