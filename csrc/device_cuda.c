/*
 * device_cuda.c - the device table (csrc/device.h) on a real GPU: CUDA
 * runtime memory, streams, events and copies, the kernels of apex_cuda.h,
 * and stream waits on host-written flags.
 *
 * Every entry point makes the device current for its own calls and restores
 * the caller's current device afterwards, so the engine's notion of "the
 * current GPU" never changes under it.
 */
#include <stdlib.h>

#include <cuda_runtime_api.h>

#include "csrc/device.h"
#include "csrc/error.h"
#include "cuda/apex_cuda.h"

typedef struct cuda_device {
    apex_device base;
    int ordinal;
} cuda_device;

/* A device_stream * is the cudaStream_t itself (never dereferenced), so an
 * engine passes its own stream to the apex_*_async calls as it is. */
static cudaStream_t cs(device_stream *s) { return (cudaStream_t)(void *)s; }

struct device_event {
    cudaEvent_t e;
};

static cuda_device *cdev(apex_device *d) { return (cuda_device *)d; }

/* Enter/leave: make the device current, then put the caller's back. */
static int enter(apex_device *d) {
    int prev = -1;
    if (cudaGetDevice(&prev) != cudaSuccess) {
        cudaGetLastError();
        prev = -1;
    }
    if (prev != cdev(d)->ordinal) cudaSetDevice(cdev(d)->ordinal);
    return prev;
}

static void leave(apex_device *d, int prev) {
    if (prev >= 0 && prev != cdev(d)->ordinal) cudaSetDevice(prev);
}

/* A launcher or runtime code as an apex_status with a message. */
static apex_status status_of(int rc, const char *what) {
    if (rc == 0) return APEX_OK;
    if (rc == APEX_CUDA_EINVAL)
        return apex_fail(APEX_ERR_INVALID_ARG, "cuda %s: %s", what, apex_cuda_error_string(rc));
    if (rc == APEX_CUDA_EUNSUPPORTED || rc == APEX_CUDA_ENODRIVER)
        return apex_fail(APEX_ERR_UNSUPPORTED, "cuda %s: %s", what, apex_cuda_error_string(rc));
    if (rc == cudaErrorMemoryAllocation)
        return apex_fail(APEX_ERR_NO_MEMORY, "cuda %s: %s", what, apex_cuda_error_string(rc));
    return apex_fail(APEX_ERR_INTERNAL, "cuda %s: error %d: %s", what, rc,
                     apex_cuda_error_string(rc));
}

static apex_status rt(cudaError_t e, const char *what) {
    if (e == cudaSuccess) return APEX_OK;
    cudaGetLastError(); /* clear a non-sticky error so later calls work */
    return status_of((int)e, what);
}

/* --------------------------------------------------------------- memory */

static void cu_destroy(apex_device *dev) { free(dev); }

static apex_status cu_mem_alloc(apex_device *dev, size_t bytes, void **out) {
    if (!out) return apex_fail(APEX_ERR_INVALID_ARG, "cuda mem_alloc: out is NULL");
    *out = NULL;
    int prev = enter(dev);
    apex_status st = rt(cudaMalloc(out, bytes ? bytes : 1), "mem_alloc");
    leave(dev, prev);
    if (st) *out = NULL;
    return st;
}

static void cu_mem_free(apex_device *dev, void *p) {
    if (!p) return;
    int prev = enter(dev);
    cudaFree(p);
    leave(dev, prev);
}

static size_t cu_mem_free_bytes(apex_device *dev) {
    size_t free_b = 0, total = 0;
    int prev = enter(dev);
    if (cudaMemGetInfo(&free_b, &total) != cudaSuccess) {
        cudaGetLastError();
        free_b = 0;
    }
    leave(dev, prev);
    return free_b;
}

/* Pinned, mapped (the kernels may read it in place) and portable (any
 * device's streams may copy from it). */
static apex_status cu_host_alloc(apex_device *dev, size_t bytes, void **out) {
    if (!out) return apex_fail(APEX_ERR_INVALID_ARG, "cuda host_alloc: out is NULL");
    *out = NULL;
    int prev = enter(dev);
    apex_status st = rt(cudaHostAlloc(out, bytes ? bytes : 1,
                                      cudaHostAllocMapped | cudaHostAllocPortable),
                        "host_alloc");
    leave(dev, prev);
    if (st) *out = NULL;
    return st;
}

static void cu_host_free(apex_device *dev, void *p) {
    if (!p) return;
    int prev = enter(dev);
    cudaFreeHost(p);
    leave(dev, prev);
}

static apex_status cu_host_register(apex_device *dev, void *p, size_t bytes) {
    int prev = enter(dev);
    apex_status st = rt(cudaHostRegister(p, bytes, cudaHostRegisterPortable), "host_register");
    leave(dev, prev);
    return st;
}

static void cu_host_unregister(apex_device *dev, void *p) {
    int prev = enter(dev);
    cudaHostUnregister(p);
    leave(dev, prev);
}

static apex_status cu_pci_bus_id(apex_device *dev, char *buf, int len) {
    return rt(cudaDeviceGetPCIBusId(buf, len, cdev(dev)->ordinal), "pci_bus_id");
}

/* ------------------------------------------------------ streams, events */

static apex_status cu_stream_create(apex_device *dev, device_stream **out) {
    if (!out) return apex_fail(APEX_ERR_INVALID_ARG, "cuda stream_create: out is NULL");
    *out = NULL;
    cudaStream_t st = NULL;
    int prev = enter(dev);
    apex_status r = rt(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "stream_create");
    leave(dev, prev);
    if (r) return r;
    *out = (device_stream *)(void *)st;
    return APEX_OK;
}

static void cu_stream_destroy(apex_device *dev, device_stream *s) {
    if (!s) return;
    int prev = enter(dev);
    cudaStreamDestroy(cs(s));
    leave(dev, prev);
}

static apex_status cu_stream_sync(apex_device *dev, device_stream *s) {
    if (!s) return apex_fail(APEX_ERR_INVALID_ARG, "cuda stream_sync: stream is NULL");
    return rt(cudaStreamSynchronize(cs(s)), "stream_sync");
}

static apex_status cu_event_create(apex_device *dev, device_event **out) {
    if (!out) return apex_fail(APEX_ERR_INVALID_ARG, "cuda event_create: out is NULL");
    *out = NULL;
    device_event *e = malloc(sizeof *e);
    if (!e) return apex_fail(APEX_ERR_NO_MEMORY, "cuda event_create: out of host memory");
    int prev = enter(dev);
    apex_status st = rt(cudaEventCreateWithFlags(&e->e, cudaEventDisableTiming), "event_create");
    leave(dev, prev);
    if (st) {
        free(e);
        return st;
    }
    *out = e;
    return APEX_OK;
}

/* An event with timing (the tracer's GPU spans); the pipeline's own events
 * disable it, which makes them cheaper. */
static apex_status cu_timer_create(apex_device *dev, device_event **out) {
    if (!out) return apex_fail(APEX_ERR_INVALID_ARG, "cuda timer_create: out is NULL");
    *out = NULL;
    device_event *e = malloc(sizeof *e);
    if (!e) return apex_fail(APEX_ERR_NO_MEMORY, "cuda timer_create: out of host memory");
    int prev = enter(dev);
    apex_status st = rt(cudaEventCreateWithFlags(&e->e, cudaEventDefault), "timer_create");
    leave(dev, prev);
    if (st) {
        free(e);
        return st;
    }
    *out = e;
    return APEX_OK;
}

static apex_status cu_event_elapsed_ms(apex_device *dev, device_event *a, device_event *b, float *ms) {
    if (!a || !b || !ms) return apex_fail(APEX_ERR_INVALID_ARG, "cuda event_elapsed_ms: NULL argument");
    return rt(cudaEventElapsedTime(ms, a->e, b->e), "event_elapsed_ms");
}

static void cu_event_destroy(apex_device *dev, device_event *e) {
    if (!e) return;
    int prev = enter(dev);
    cudaEventDestroy(e->e);
    leave(dev, prev);
    free(e);
}

static apex_status cu_event_record(apex_device *dev, device_event *e, device_stream *s) {
    if (!e || !s) return apex_fail(APEX_ERR_INVALID_ARG, "cuda event_record: NULL event or stream");
    return rt(cudaEventRecord(e->e, cs(s)), "event_record");
}

static apex_status cu_event_wait(apex_device *dev, device_stream *s, device_event *e) {
    if (!e || !s) return apex_fail(APEX_ERR_INVALID_ARG, "cuda event_wait: NULL event or stream");
    return rt(cudaStreamWaitEvent(cs(s), e->e, 0), "event_wait");
}

static apex_status cu_event_sync(apex_device *dev, device_event *e) {
    if (!e) return apex_fail(APEX_ERR_INVALID_ARG, "cuda event_sync: event is NULL");
    return rt(cudaEventSynchronize(e->e), "event_sync");
}

static int cu_event_done(apex_device *dev, device_event *e) {
    if (!e) return 1;
    cudaError_t r = cudaEventQuery(e->e);
    if (r == cudaErrorNotReady) return 0;
    if (r != cudaSuccess) cudaGetLastError(); /* an error never completes later */
    return 1;
}

/* ------------------------------------------------------- copies, flags */

static apex_status cu_memcpy_async(apex_device *dev, void *dst, const void *src, size_t bytes,
                                   device_stream *s) {
    if (!s) return apex_fail(APEX_ERR_INVALID_ARG, "cuda memcpy_async: stream is NULL");
    if (bytes == 0) return APEX_OK;
    if (!dst || !src)
        return apex_fail(APEX_ERR_INVALID_ARG, "cuda memcpy_async of %zu bytes with a NULL %s",
                         bytes, dst ? "source" : "destination");
    return rt(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, cs(s)), "memcpy_async");
}

static apex_status cu_wait_flag(apex_device *dev, device_stream *s, const uint32_t *flag,
                                uint32_t value) {
    if (!s) return apex_fail(APEX_ERR_INVALID_ARG, "cuda wait_flag: stream is NULL");
    int prev = enter(dev);
    int rc = apex_cuda_stream_wait_flag(cs(s), flag, value);
    leave(dev, prev);
    return status_of(rc, "wait_flag");
}

/* ------------------------------------------------------------ kernels */

static size_t cu_decode_workspace_bytes(apex_device *dev, int32_t max_seqs, int32_t n_q_heads,
                                        int32_t head_dim) {
    return apex_cuda_decode_workspace_bytes(max_seqs, n_q_heads, head_dim);
}

static apex_status cu_paged_decode(apex_device *dev, const apex_cuda_decode *a, device_stream *s) {
    if (!s) return apex_fail(APEX_ERR_INVALID_ARG, "cuda paged_decode: stream is NULL");
    int prev = enter(dev);
    int rc = apex_cuda_paged_decode(a, cs(s));
    leave(dev, prev);
    return status_of(rc, "paged_decode");
}

static apex_status cu_kv_append(apex_device *dev, const apex_cuda_kv_append *a, device_stream *s) {
    if (!s) return apex_fail(APEX_ERR_INVALID_ARG, "cuda kv_append: stream is NULL");
    int prev = enter(dev);
    int rc = apex_cuda_kv_append_rows(a, cs(s));
    leave(dev, prev);
    return status_of(rc, "kv_append");
}

static apex_status cu_gather_rows(apex_device *dev, const apex_cuda_rows *t, int n_tensors,
                                  const int32_t *idx, int32_t n_rows, device_stream *s) {
    if (!s) return apex_fail(APEX_ERR_INVALID_ARG, "cuda gather_rows: stream is NULL");
    int prev = enter(dev);
    int rc = apex_cuda_gather_rows(t, n_tensors, idx, n_rows, cs(s));
    leave(dev, prev);
    return status_of(rc, "gather_rows");
}

static apex_status cu_scatter_rows(apex_device *dev, const apex_cuda_rows *t, int n_tensors,
                                   const int32_t *idx, int32_t n_rows, device_stream *s) {
    if (!s) return apex_fail(APEX_ERR_INVALID_ARG, "cuda scatter_rows: stream is NULL");
    int prev = enter(dev);
    int rc = apex_cuda_scatter_rows(t, n_tensors, idx, n_rows, cs(s));
    leave(dev, prev);
    return status_of(rc, "scatter_rows");
}

static apex_status cu_prefill(apex_device *dev, const apex_cuda_prefill *a, device_stream *s) {
    if (!s) return apex_fail(APEX_ERR_INVALID_ARG, "cuda prefill: stream is NULL");
    int prev = enter(dev);
    int rc = apex_cuda_prefill_attention(a, cs(s));
    leave(dev, prev);
    return status_of(rc, "prefill");
}

static const device_iface cuda_iface = {
    .name = "cuda",
    .destroy = cu_destroy,
    .mem_alloc = cu_mem_alloc,
    .mem_free = cu_mem_free,
    .mem_free_bytes = cu_mem_free_bytes,
    .host_alloc = cu_host_alloc,
    .host_free = cu_host_free,
    .stream_create = cu_stream_create,
    .stream_destroy = cu_stream_destroy,
    .stream_sync = cu_stream_sync,
    .event_create = cu_event_create,
    .event_destroy = cu_event_destroy,
    .event_record = cu_event_record,
    .event_wait = cu_event_wait,
    .event_sync = cu_event_sync,
    .event_done = cu_event_done,
    .memcpy_async = cu_memcpy_async,
    .wait_flag = cu_wait_flag,
    .decode_workspace_bytes = cu_decode_workspace_bytes,
    .paged_decode = cu_paged_decode,
    .kv_append = cu_kv_append,
    .gather_rows = cu_gather_rows,
    .scatter_rows = cu_scatter_rows,
    .host_register = cu_host_register,
    .host_unregister = cu_host_unregister,
    .pci_bus_id = cu_pci_bus_id,
    .prefill = cu_prefill,
    .timer_create = cu_timer_create,
    .event_elapsed_ms = cu_event_elapsed_ms,
};

apex_status device_cuda_create(int ordinal, apex_device **out) {
    if (!out) return apex_fail(APEX_ERR_INVALID_ARG, "device_cuda_create: out is NULL");
    *out = NULL;
    const int n = apex_cuda_device_count();
    if (ordinal < 0 || ordinal >= n)
        return apex_fail(APEX_ERR_UNSUPPORTED, "CUDA device %d not available (%d usable, driver %s)",
                         ordinal, n, apex_cuda_driver_available() ? "loaded" : "not found");
    cuda_device *d = calloc(1, sizeof *d);
    if (!d) return apex_fail(APEX_ERR_NO_MEMORY, "device_cuda_create: out of host memory");
    d->base.iface = &cuda_iface;
    d->ordinal = ordinal;
    int prev = enter(&d->base);
    apex_status st = rt(cudaFree(NULL), "context initialisation"); /* creates the context */
    leave(&d->base, prev);
    if (st) {
        free(d);
        return st;
    }
    *out = &d->base;
    return APEX_OK;
}
