/*
 * device.h - the accelerator APEX drives, as a small table of functions
 * (one implementation per file, both here: device_emulated.c, device_cuda.c
 * for real GPUs). The runtime only ever talks to a device through this table,
 * so the same hybrid control flow runs on a GPU and on the emulated device.
 *
 * Semantics are CUDA's:
 *  - Work enqueued on one stream runs in order; different streams run
 *    independently. Every *_async and kernel call only enqueues and returns.
 *  - An event, once recorded on a stream, completes when the stream reaches
 *    it. event_wait makes a stream wait (on the device) for the event's most
 *    recent record as of the call; event_sync blocks the calling host thread.
 *    Waiting on a never-recorded event is a no-op.
 *  - wait_flag makes a stream wait until a 32-bit word in pinned host memory,
 *    written by a host thread, reaches value ((int32_t)(*flag - value) >= 0).
 *    This is how the engine's stream waits for CPU work without any host
 *    thread blocking.
 *  - Pointers passed to kernels and copies must stay valid until the work
 *    runs: the caller keeps argument arrays in device or pinned memory it
 *    owns. Argument structs themselves are copied at enqueue time.
 *  - memcpy_async copies between any two of device memory, pinned host memory
 *    and (for the emulated device) any host memory: unified addressing.
 * Every function returns APEX_OK or an error with apex_last_error() set; none
 * aborts.
 */
#ifndef APEX_DEVICE_H
#define APEX_DEVICE_H

#include <stddef.h>
#include <stdint.h>

#include "apex/apex.h"
#include "cuda/apex_cuda.h" /* kernel argument structs (plain C, no CUDA) */

typedef struct apex_device apex_device;
typedef struct device_stream device_stream; /* opaque per backend */
typedef struct device_event device_event;

typedef struct device_iface {
    const char *name; /* "cuda", "emulated" */
    void (*destroy)(apex_device *dev);

    /* Memory. mem_*: device memory (counted against the device's capacity).
     * host_*: pinned host memory the device can read and write. */
    apex_status (*mem_alloc)(apex_device *dev, size_t bytes, void **out);
    void (*mem_free)(apex_device *dev, void *p);
    size_t (*mem_free_bytes)(apex_device *dev);
    apex_status (*host_alloc)(apex_device *dev, size_t bytes, void **out);
    void (*host_free)(apex_device *dev, void *p);
    /* Optional (NULL: not needed): pin existing host memory for async
     * copies (the host KV pool), and undo it. */
    apex_status (*host_register)(apex_device *dev, void *p, size_t bytes);
    void (*host_unregister)(apex_device *dev, void *p);
    /* Optional: the device's PCI bus id ("0000:3b:00.0"), so APEX can put
     * its CPU workers and host pool on the cores and memory near it. */
    apex_status (*pci_bus_id)(apex_device *dev, char *buf, int len);

    /* Streams and events. */
    apex_status (*stream_create)(apex_device *dev, device_stream **out);
    void (*stream_destroy)(apex_device *dev, device_stream *s);
    apex_status (*stream_sync)(apex_device *dev, device_stream *s);
    apex_status (*event_create)(apex_device *dev, device_event **out);
    void (*event_destroy)(apex_device *dev, device_event *e);
    apex_status (*event_record)(apex_device *dev, device_event *e, device_stream *s);
    apex_status (*event_wait)(apex_device *dev, device_stream *s, device_event *e);
    apex_status (*event_sync)(apex_device *dev, device_event *e);
    /* 1 if every record of e so far has completed, else 0 (no blocking). */
    int (*event_done)(apex_device *dev, device_event *e);

    /* Copies and flags. */
    apex_status (*memcpy_async)(apex_device *dev, void *dst, const void *src, size_t bytes,
                                device_stream *s);
    apex_status (*wait_flag)(apex_device *dev, device_stream *s, const uint32_t *flag,
                             uint32_t value);

    /* Kernels: the contracts of cuda/apex_cuda.h. decode_workspace_bytes
     * sizes apex_cuda_decode.workspace for split-K (NULL or 0: none). */
    size_t (*decode_workspace_bytes)(apex_device *dev, int32_t max_seqs, int32_t n_q_heads,
                                     int32_t head_dim);
    apex_status (*paged_decode)(apex_device *dev, const apex_cuda_decode *a, device_stream *s);
    apex_status (*kv_append)(apex_device *dev, const apex_cuda_kv_append *a, device_stream *s);
    /* Causal prefill over packed fresh sequences, optionally storing their
     * K/V into a pool by slot (apex_cuda_prefill). */
    apex_status (*prefill)(apex_device *dev, const apex_cuda_prefill *a, device_stream *s);
    apex_status (*gather_rows)(apex_device *dev, const apex_cuda_rows *t, int n_tensors,
                               const int32_t *idx, int32_t n_rows, device_stream *s);
    apex_status (*scatter_rows)(apex_device *dev, const apex_cuda_rows *t, int n_tensors,
                                const int32_t *idx, int32_t n_rows, device_stream *s);

    /* Optional (NULL: none): an event that also records the device's time,
     * and the milliseconds between two such events once both completed
     * (the tracer's GPU durations, csrc/trace.h). */
    apex_status (*timer_create)(apex_device *dev, device_event **out);
    apex_status (*event_elapsed_ms)(apex_device *dev, device_event *start, device_event *end,
                                    float *ms);
} device_iface;

/* Every backend's device struct starts with this. */
struct apex_device {
    const device_iface *iface;
};

/* The emulated device: capacity_bytes of "device memory" in host memory;
 * its kernels run the CPU reference implementations on one device thread,
 * which serves every stream in order. */
apex_status device_emulated_create(size_t capacity_bytes, apex_device **out);

#ifdef APEX_HAVE_CUDA
/* The CUDA device `ordinal`; APEX_ERR_UNSUPPORTED if no driver/GPU. */
apex_status device_cuda_create(int ordinal, apex_device **out);
#endif

#endif /* APEX_DEVICE_H */
