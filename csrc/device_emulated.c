/*
 * device_emulated.c - the device of device.h in host memory.
 *
 * "Device memory" is host memory counted against a fixed capacity. Every
 * stream is a FIFO of commands; one device thread serves all streams,
 * running the head of any stream whose head is ready (a stream stuck on an
 * event or flag wait is skipped, the others go on), which gives CUDA's
 * ordering: in order within a stream, independent across streams. Kernels
 * run the CPU reference code on that thread.
 *
 * Locking: one mutex guards every queue, event and allocation list. The
 * device thread drops it while a command's body runs; the command stays at
 * the head of its stream until it has finished, so stream_sync and event
 * completion only ever observe finished work.
 *
 * Choices the runtime may rely on:
 *  - A NULL stream is refused (there is no legacy default stream).
 *  - stream_destroy and event_destroy return at once; the objects are
 *    released when the work that still refers to them has run.
 *  - mem_free does not synchronise: free only memory no pending work uses.
 *  - destroy discards work that has not started (so a stream blocked on a
 *    flag nobody will write cannot hang it), waits for the running command,
 *    and frees every stream, event and allocation still alive.
 *  - APEX_EMU_KERNEL_DELAY_US (read at create): microseconds the device
 *    thread sleeps before each kernel, to emulate a slow device.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cpu_attn/cpu_attn.h"
#include "cpu_attn/cpu_prefill.h"
#include "cpu_attn/dtype_convert.h"
#include "cpu_attn/kv_layout.h"
#include "csrc/device.h"
#include "csrc/error.h"
#include "csrc/fault.h"
#include "csrc/env.h"

#define EMU_ALIGN 256          /* device allocations, like cudaMalloc */
#define EMU_FLAG_POLL_NS 30000 /* flag writers notify nobody: poll this often */
#define EMU_MAGIC_DEV 0x41504558444556ull /* "APEXDEV" */
#define EMU_MAGIC_HOST 0x41504558484f53ull

/* ------------------------------------------------------------ types */

typedef enum cmd_kind {
    CMD_COPY,
    CMD_RECORD,
    CMD_WAIT_EVENT,
    CMD_WAIT_FLAG,
    CMD_DECODE,
    CMD_KV_APPEND,
    CMD_ROWS,
    CMD_PREFILL
} cmd_kind;

typedef struct cmd {
    struct cmd *next;         /* stream FIFO */
    struct cmd *next_pending; /* CMD_RECORD: the event's unfinished records */
    cmd_kind kind;
    union {
        struct {
            void *dst;
            const void *src;
            size_t bytes;
        } copy;
        struct {
            device_event *ev;
            uint64_t n; /* which record of ev */
        } event;
        struct {
            const uint32_t *flag;
            uint32_t value;
        } flag;
        apex_cuda_decode decode;
        apex_cuda_kv_append append;
        apex_cuda_prefill prefill;
        struct {
            apex_cuda_rows t[APEX_CUDA_MAX_ROW_TENSORS];
            int n_tensors;
            const int32_t *idx;
            int32_t n_rows;
            int gather;
        } rows;
    } u;
} cmd;

struct device_stream {
    cmd *head, *tail;
    int destroyed; /* by the user: freed by the device thread once empty */
    size_t index;  /* position in emu_device.streams */
};

struct device_event {
    uint64_t recorded;    /* records so far; record n waits for n */
    cmd *pending;         /* records enqueued but not yet reached */
    int refs;             /* queued commands naming this event */
    int destroyed;        /* by the user: freed when refs reaches 0 */
    device_event *prev, *next; /* every live event, freed at destroy */
};

/* Header in front of each allocation: O(1) free and a list for destroy. */
typedef struct alloc_hdr {
    uint64_t magic;
    size_t counted; /* bytes charged against capacity (0 for host memory) */
    struct alloc_hdr *prev, *next;
} alloc_hdr;

typedef struct emu_device {
    apex_device base; /* first: apex_device * converts to emu_device * */
    pthread_mutex_t mu;
    pthread_cond_t work_cv; /* device thread: new work or stop */
    pthread_cond_t done_cv; /* host threads: a command finished */
    pthread_t thread;
    int stop;

    device_stream **streams;
    size_t n_streams, cap_streams, rr; /* rr: round-robin start */
    device_event *events;
    alloc_hdr *allocs;

    size_t capacity, used;
    size_t registered; /* host ranges registered and not yet unregistered */
    size_t host_hdr; /* one page: keeps host allocations page-aligned */
    unsigned kernel_delay_us;
} emu_device;

static emu_device *emu(apex_device *d) { return (emu_device *)d; }

/* ------------------------------------------------------------ memory */

static void alloc_link(emu_device *d, alloc_hdr *h) {
    h->prev = NULL;
    h->next = d->allocs;
    if (d->allocs) d->allocs->prev = h;
    d->allocs = h;
}

static void alloc_unlink(emu_device *d, alloc_hdr *h) {
    if (h->prev) h->prev->next = h->next;
    else d->allocs = h->next;
    if (h->next) h->next->prev = h->prev;
}

static size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

static apex_status emu_mem_alloc(apex_device *dev, size_t bytes, void **out) {
    emu_device *d = emu(dev);
    if (!out) return apex_fail(APEX_ERR_INVALID_ARG, "emulated device: mem_alloc: out is NULL");
    *out = NULL;
    if (bytes > SIZE_MAX / 2)
        return apex_fail(APEX_ERR_NO_MEMORY, "emulated device: mem_alloc of %zu bytes", bytes);
    if (fault_fail(FAULT_DEVICE_ALLOC))
        return apex_fail(APEX_ERR_NO_MEMORY, "emulated device: mem_alloc of %zu bytes: "
                                             "cudaErrorMemoryAllocation (injected)", bytes);
    size_t counted = round_up(bytes ? bytes : 1, EMU_ALIGN);
    pthread_mutex_lock(&d->mu);
    size_t free_bytes = d->capacity - d->used;
    if (counted > free_bytes) {
        pthread_mutex_unlock(&d->mu);
        return apex_fail(APEX_ERR_NO_MEMORY,
                         "emulated device: out of memory allocating %zu bytes "
                         "(%zu of %zu bytes free)",
                         bytes, free_bytes, d->capacity);
    }
    d->used += counted; /* reserve first so concurrent allocs cannot overshoot */
    pthread_mutex_unlock(&d->mu);

    void *p = NULL;
    if (posix_memalign(&p, EMU_ALIGN, EMU_ALIGN + counted) != 0) {
        pthread_mutex_lock(&d->mu);
        d->used -= counted;
        pthread_mutex_unlock(&d->mu);
        return apex_fail(APEX_ERR_NO_MEMORY, "emulated device: host malloc of %zu bytes failed",
                         bytes);
    }
    alloc_hdr *h = p;
    h->magic = EMU_MAGIC_DEV;
    h->counted = counted;
    pthread_mutex_lock(&d->mu);
    alloc_link(d, h);
    pthread_mutex_unlock(&d->mu);
    *out = (char *)p + EMU_ALIGN;
    return APEX_OK;
}

/* Frees a block of either allocator. The magic catches a block handed to
 * the wrong free; other pointers are undefined behaviour, as with cudaFree. */
static void emu_free_any(emu_device *d, void *p, size_t hdr_bytes, uint64_t magic) {
    if (!p) return;
    alloc_hdr *h = (alloc_hdr *)((char *)p - hdr_bytes);
    pthread_mutex_lock(&d->mu);
    if (h->magic != magic) {
        pthread_mutex_unlock(&d->mu);
        return;
    }
    h->magic = 0;
    alloc_unlink(d, h);
    d->used -= h->counted;
    pthread_mutex_unlock(&d->mu);
    free(h);
}

static void emu_mem_free(apex_device *dev, void *p) {
    emu_free_any(emu(dev), p, EMU_ALIGN, EMU_MAGIC_DEV);
}

static size_t emu_mem_free_bytes(apex_device *dev) {
    emu_device *d = emu(dev);
    pthread_mutex_lock(&d->mu);
    size_t f = d->capacity - d->used;
    pthread_mutex_unlock(&d->mu);
    return f;
}

static apex_status emu_host_alloc(apex_device *dev, size_t bytes, void **out) {
    emu_device *d = emu(dev);
    if (!out) return apex_fail(APEX_ERR_INVALID_ARG, "emulated device: host_alloc: out is NULL");
    *out = NULL;
    if (fault_fail(FAULT_HOST_ALLOC))
        return apex_fail(APEX_ERR_NO_MEMORY, "emulated device: pinned host allocation of %zu "
                                             "bytes: cudaErrorMemoryAllocation (injected)", bytes);
    void *p = NULL;
    if (bytes > SIZE_MAX / 2 ||
        posix_memalign(&p, d->host_hdr, d->host_hdr + round_up(bytes ? bytes : 1, d->host_hdr)))
        return apex_fail(APEX_ERR_NO_MEMORY,
                         "emulated device: pinned host allocation of %zu bytes failed", bytes);
    alloc_hdr *h = p;
    h->magic = EMU_MAGIC_HOST;
    h->counted = 0;
    pthread_mutex_lock(&d->mu);
    alloc_link(d, h);
    pthread_mutex_unlock(&d->mu);
    *out = (char *)p + d->host_hdr;
    return APEX_OK;
}

static void emu_host_free(apex_device *dev, void *p) {
    emu_device *d = emu(dev);
    emu_free_any(d, p, d->host_hdr, EMU_MAGIC_HOST);
}

/* Host memory is already device-visible here: registering only checks the
 * arguments and counts, so the pinning path (and its failures) runs in CI. */
static apex_status emu_host_register(apex_device *dev, void *p, size_t bytes) {
    emu_device *d = emu(dev);
    if (!p || bytes == 0)
        return apex_fail(APEX_ERR_INVALID_ARG, "emulated device: host_register(%p, %zu)", p, bytes);
    if (fault_fail(FAULT_PIN))
        return apex_fail(APEX_ERR_INTERNAL, "emulated device: host_register of %zu bytes: "
                                            "cudaErrorHostMemoryAlreadyRegistered (injected)",
                         bytes);
    pthread_mutex_lock(&d->mu);
    d->registered++;
    pthread_mutex_unlock(&d->mu);
    return APEX_OK;
}

static void emu_host_unregister(apex_device *dev, void *p) {
    emu_device *d = emu(dev);
    if (!p) return;
    pthread_mutex_lock(&d->mu);
    if (d->registered > 0) d->registered--;
    pthread_mutex_unlock(&d->mu);
}

/* ------------------------------------------------ events (mutex held) */

static void event_free(emu_device *d, device_event *e) {
    if (e->prev) e->prev->next = e->next;
    else d->events = e->next;
    if (e->next) e->next->prev = e->prev;
    free(e);
}

static void event_unref(emu_device *d, device_event *e) {
    if (--e->refs == 0 && e->destroyed) event_free(d, e);
}

/* Record n of e has been reached (or n was never enqueued). */
static int event_reached(const device_event *e, uint64_t n) {
    for (const cmd *c = e->pending; c; c = c->next_pending)
        if (c->u.event.n == n) return 0;
    return 1;
}

static void event_drop_pending(device_event *e, const cmd *rec) {
    for (cmd **pp = &e->pending; *pp; pp = &(*pp)->next_pending)
        if (*pp == rec) {
            *pp = rec->next_pending;
            return;
        }
}

/* Releases what a command holds; it must no longer be in any queue. */
static void cmd_free(emu_device *d, cmd *c) {
    if (c->kind == CMD_RECORD) {
        event_drop_pending(c->u.event.ev, c);
        event_unref(d, c->u.event.ev);
    } else if (c->kind == CMD_WAIT_EVENT) {
        event_unref(d, c->u.event.ev);
    }
    free(c);
}

/* ------------------------------------------------------ device thread */

static void stream_pop(device_stream *s) {
    s->head = s->head->next;
    if (!s->head) s->tail = NULL;
}

static void stream_remove(emu_device *d, device_stream *s) {
    size_t i = s->index, last = d->n_streams - 1;
    d->streams[i] = d->streams[last];
    d->streams[i]->index = i;
    d->n_streams--;
    free(s);
}

static void run_kv_append(const apex_cuda_kv_append *a) {
    const int64_t per = (int64_t)a->n_kv_heads * a->head_dim;
    const int64_t ks = a->k_stride ? a->k_stride : per;
    const int64_t vs = a->v_stride ? a->v_stride : per;
    const size_t el = apex_dtype_size(a->kv_dtype);
    const apex_kv_layout l = apex_kv_layout_of(a->n_kv_heads, a->block_tokens, a->head_dim, el);
    for (int32_t r = 0; r < a->n_rows; r++) {
        const int64_t slot = a->slots[r];
        if (slot < 0) continue;
        const int32_t row = apex_kv_slot_row(slot, a->block_tokens);
        char *base = (char *)a->kv + (size_t)apex_kv_slot_block(slot, a->block_tokens) * a->block_bytes;
        for (int32_t h = 0; h < a->n_kv_heads; h++)
            for (int32_t e = 0; e < a->head_dim; e++) {
                const size_t x = (size_t)h * (size_t)a->head_dim + (size_t)e;
                /* element index of (h, row, e) from the K (or V) half's start */
                const size_t dst = apex_kv_offset(&l, 0, h, row) / el + (size_t)e;
                apex_store_f32(base, a->kv_dtype, dst,
                               apex_load_f32(a->k, a->src_dtype, (size_t)(r * ks) + x));
                apex_store_f32(base + l.half, a->kv_dtype, dst,
                               apex_load_f32(a->v, a->src_dtype, (size_t)(r * vs) + x));
            }
    }
}

static void run_rows(const cmd *c) {
    for (int32_t i = 0; i < c->u.rows.n_rows; i++) {
        const int32_t j = c->u.rows.idx[i];
        if (j < 0) continue; /* as the CUDA kernel: negative index skips */
        const size_t si = c->u.rows.gather ? (size_t)j : (size_t)i;
        const size_t di = c->u.rows.gather ? (size_t)i : (size_t)j;
        for (int k = 0; k < c->u.rows.n_tensors; k++) {
            const apex_cuda_rows *t = &c->u.rows.t[k];
            memmove((char *)t->dst + di * t->dst_stride, (const char *)t->src + si * t->src_stride,
                    t->row_bytes);
        }
    }
}

static void run_decode(const apex_cuda_decode *a) {
    const cpu_attn_geom g = {a->n_q_heads, a->n_kv_heads, a->head_dim, a->block_tokens,
                             a->kv_dtype, 0};
    const cpu_attn_batch b = {
        .n_seqs = a->n_seqs,
        .q = a->q,
        .q_dtype = a->q_dtype,
        .out = a->out,
        .out_dtype = a->out_dtype,
        .seq_lens = a->seq_lens,
        .block_table = a->block_table,
        .block_table_stride = a->block_table_stride,
        .kv = a->kv,
        .block_bytes = a->block_bytes,
        .scale = a->scale,
        .softcap = a->softcap,
        .window = a->window,
    };
    cpu_attn_reference(&g, &b);
}

static void run_prefill(const apex_cuda_prefill *a) {
    const cpu_prefill_batch b = {
        .n_seqs = a->n_seqs, .cu_seqlens = a->cu_seqlens, .n_q_heads = a->n_q_heads,
        .n_kv_heads = a->n_kv_heads, .head_dim = a->head_dim, .q = a->q, .k = a->k, .v = a->v,
        .q_stride = a->q_stride, .k_stride = a->k_stride, .v_stride = a->v_stride,
        .act_dtype = a->act_dtype, .out = a->out, .out_dtype = a->out_dtype, .scale = a->scale,
        .softcap = a->softcap, .window = a->window,
    };
    cpu_prefill_reference(&b);
    if (!a->kv) return;
    const apex_cuda_kv_append store = {
        .n_rows = a->n_tokens, .n_kv_heads = a->n_kv_heads, .head_dim = a->head_dim,
        .block_tokens = a->block_tokens, .k = a->k, .v = a->v, .k_stride = a->k_stride,
        .v_stride = a->v_stride, .src_dtype = a->act_dtype, .slots = a->slots, .kv = a->kv,
        .block_bytes = a->block_bytes, .kv_dtype = a->kv_dtype,
    };
    run_kv_append(&store);
}

/* Runs a work command's body; called without the mutex. */
static void run_cmd(emu_device *d, const cmd *c) {
    if (c->kind != CMD_COPY && d->kernel_delay_us) usleep(d->kernel_delay_us);
    switch (c->kind) {
    case CMD_COPY: memmove(c->u.copy.dst, c->u.copy.src, c->u.copy.bytes); break;
    case CMD_DECODE: run_decode(&c->u.decode); break;
    case CMD_KV_APPEND: run_kv_append(&c->u.append); break;
    case CMD_ROWS: run_rows(c); break;
    case CMD_PREFILL: run_prefill(&c->u.prefill); break;
    default: break;
    }
}

static int is_work(cmd_kind k) {
    return k == CMD_COPY || k == CMD_DECODE || k == CMD_KV_APPEND || k == CMD_ROWS ||
           k == CMD_PREFILL;
}

/* Retires the ready control commands (records, satisfied waits) at the head
 * of s. Returns 1 if any was retired; sets *on_flag if s is left blocked on
 * a flag. Mutex held. */
static int retire_control(emu_device *d, device_stream *s, int *on_flag) {
    int progressed = 0;
    while (s->head) {
        cmd *c = s->head;
        if (c->kind == CMD_WAIT_FLAG) {
            uint32_t now = __atomic_load_n(c->u.flag.flag, __ATOMIC_ACQUIRE);
            if ((int32_t)(now - c->u.flag.value) < 0) {
                *on_flag = 1;
                break;
            }
        } else if (c->kind == CMD_WAIT_EVENT) {
            if (!event_reached(c->u.event.ev, c->u.event.n)) break;
        } else if (is_work(c->kind)) {
            break; /* the caller runs it */
        }
        stream_pop(s);
        cmd_free(d, c); /* a record leaves its event's pending list here */
        progressed = 1;
    }
    return progressed;
}

static void *device_main(void *arg) {
    emu_device *d = arg;
    pthread_setname_np(pthread_self(), "apex-emu-dev");
    /* A GPU runs its work without taking the host's cores: SCHED_BATCH
     * keeps this thread's wake-up (every enqueue) from preempting the
     * enqueuing thread. Without it, on 2 cores with a spinning OpenMP
     * worker on the other, an enqueue of a few us cost 150 us: the engine
     * thread waited for the "device" to run. Best effort: if the policy
     * is refused the thread runs as before. */
    const struct sched_param batch = {0};
    (void)pthread_setschedparam(pthread_self(), SCHED_BATCH, &batch);
    pthread_mutex_lock(&d->mu);
    while (!d->stop) {
        int progressed = 0, on_flag = 0;
        device_stream *run = NULL;
        for (size_t k = 0; k < d->n_streams; k++) {
            device_stream *s = d->streams[(d->rr + k) % d->n_streams];
            progressed |= retire_control(d, s, &on_flag);
            if (s->head && is_work(s->head->kind)) {
                run = s;
                d->rr = (d->rr + k + 1) % d->n_streams; /* fairness: next scan starts after s */
                break;
            }
        }
        if (run) {
            cmd *c = run->head;
            pthread_mutex_unlock(&d->mu);
            run_cmd(d, c);
            pthread_mutex_lock(&d->mu);
            stream_pop(run);
            cmd_free(d, c);
            progressed = 1;
        }
        if (progressed) {
            /* reap streams the user destroyed that have drained */
            for (size_t i = 0; i < d->n_streams;)
                if (d->streams[i]->destroyed && !d->streams[i]->head)
                    stream_remove(d, d->streams[i]);
                else
                    i++;
            pthread_cond_broadcast(&d->done_cv);
            continue;
        }
        if (on_flag) {
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            ts.tv_nsec += EMU_FLAG_POLL_NS;
            if (ts.tv_nsec >= 1000000000L) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000L;
            }
            pthread_cond_timedwait(&d->work_cv, &d->mu, &ts);
        } else {
            pthread_cond_wait(&d->work_cv, &d->mu);
        }
    }
    pthread_mutex_unlock(&d->mu);
    return NULL;
}

/* ------------------------------------------------------------ enqueue */

static apex_status check_stream(device_stream *s, const char *what) {
    if (!s) return apex_fail(APEX_ERR_INVALID_ARG, "emulated device: %s: stream is NULL", what);
    return APEX_OK;
}

static cmd *cmd_new(cmd_kind kind) {
    cmd *c = calloc(1, sizeof *c);
    if (c) c->kind = kind;
    return c;
}

/* An injected failure of a call, as CUDA would report it. */
static apex_status injected(const char *what, const char *cuda_error) {
    return apex_fail(APEX_ERR_INTERNAL, "emulated device: %s: %s (injected)", what, cuda_error);
}

static apex_status no_cmd_memory(const char *what) {
    return apex_fail(APEX_ERR_NO_MEMORY, "emulated device: %s: out of host memory", what);
}

/* Appends c to s and wakes the device thread. Mutex held. */
static void enqueue_locked(emu_device *d, device_stream *s, cmd *c) {
    c->next = NULL;
    if (s->tail) s->tail->next = c;
    else s->head = c;
    s->tail = c;
    pthread_cond_signal(&d->work_cv);
}

static void enqueue(emu_device *d, device_stream *s, cmd *c) {
    pthread_mutex_lock(&d->mu);
    enqueue_locked(d, s, c);
    pthread_mutex_unlock(&d->mu);
}

/* ------------------------------------------------------------ streams */

static apex_status emu_stream_create(apex_device *dev, device_stream **out) {
    emu_device *d = emu(dev);
    if (!out) return apex_fail(APEX_ERR_INVALID_ARG, "emulated device: stream_create: out is NULL");
    *out = NULL;
    if (fault_fail(FAULT_EVENT)) return injected("stream_create", "cudaErrorMemoryAllocation");
    device_stream *s = calloc(1, sizeof *s);
    if (!s) return no_cmd_memory("stream_create");
    pthread_mutex_lock(&d->mu);
    if (d->n_streams == d->cap_streams) {
        size_t cap = d->cap_streams ? 2 * d->cap_streams : 8;
        device_stream **a = realloc(d->streams, cap * sizeof *a);
        if (!a) {
            pthread_mutex_unlock(&d->mu);
            free(s);
            return no_cmd_memory("stream_create");
        }
        d->streams = a;
        d->cap_streams = cap;
    }
    s->index = d->n_streams;
    d->streams[d->n_streams++] = s;
    pthread_mutex_unlock(&d->mu);
    *out = s;
    return APEX_OK;
}

static void emu_stream_destroy(apex_device *dev, device_stream *s) {
    emu_device *d = emu(dev);
    if (!s) return;
    pthread_mutex_lock(&d->mu);
    if (s->head) s->destroyed = 1; /* the device thread frees it once drained */
    else stream_remove(d, s);
    pthread_mutex_unlock(&d->mu);
}

static apex_status emu_stream_sync(apex_device *dev, device_stream *s) {
    emu_device *d = emu(dev);
    apex_status st = check_stream(s, "stream_sync");
    if (st) return st;
    pthread_mutex_lock(&d->mu);
    while (s->head) pthread_cond_wait(&d->done_cv, &d->mu);
    pthread_mutex_unlock(&d->mu);
    return APEX_OK;
}

/* ------------------------------------------------------------- events */

static apex_status emu_event_create(apex_device *dev, device_event **out) {
    emu_device *d = emu(dev);
    if (!out) return apex_fail(APEX_ERR_INVALID_ARG, "emulated device: event_create: out is NULL");
    if (fault_fail(FAULT_EVENT)) {
        *out = NULL;
        return injected("event_create", "cudaErrorMemoryAllocation");
    }
    device_event *e = calloc(1, sizeof *e);
    *out = e;
    if (!e) return no_cmd_memory("event_create");
    pthread_mutex_lock(&d->mu);
    e->next = d->events;
    if (d->events) d->events->prev = e;
    d->events = e;
    pthread_mutex_unlock(&d->mu);
    return APEX_OK;
}

static void emu_event_destroy(apex_device *dev, device_event *e) {
    emu_device *d = emu(dev);
    if (!e) return;
    pthread_mutex_lock(&d->mu);
    e->destroyed = 1;
    if (e->refs == 0) event_free(d, e); /* else the last command naming it frees it */
    pthread_mutex_unlock(&d->mu);
}

static apex_status emu_event_record(apex_device *dev, device_event *e, device_stream *s) {
    emu_device *d = emu(dev);
    apex_status st = check_stream(s, "event_record");
    if (st) return st;
    if (!e) return apex_fail(APEX_ERR_INVALID_ARG, "emulated device: event_record: event is NULL");
    if (fault_fail(FAULT_EVENT)) return injected("event_record", "cudaErrorLaunchFailure");
    cmd *c = cmd_new(CMD_RECORD);
    if (!c) return no_cmd_memory("event_record");
    c->u.event.ev = e;
    pthread_mutex_lock(&d->mu);
    c->u.event.n = ++e->recorded;
    c->next_pending = e->pending;
    e->pending = c;
    e->refs++;
    enqueue_locked(d, s, c);
    pthread_mutex_unlock(&d->mu);
    return APEX_OK;
}

static apex_status emu_event_wait(apex_device *dev, device_stream *s, device_event *e) {
    emu_device *d = emu(dev);
    apex_status st = check_stream(s, "event_wait");
    if (st) return st;
    if (!e) return apex_fail(APEX_ERR_INVALID_ARG, "emulated device: event_wait: event is NULL");
    if (fault_fail(FAULT_EVENT)) return injected("event_wait", "cudaErrorLaunchFailure");
    cmd *c = cmd_new(CMD_WAIT_EVENT);
    if (!c) return no_cmd_memory("event_wait");
    pthread_mutex_lock(&d->mu);
    const uint64_t n = e->recorded;
    if (event_reached(e, n)) { /* never recorded, or already reached: no-op */
        pthread_mutex_unlock(&d->mu);
        free(c);
        return APEX_OK;
    }
    c->u.event.ev = e;
    c->u.event.n = n;
    e->refs++;
    enqueue_locked(d, s, c);
    pthread_mutex_unlock(&d->mu);
    return APEX_OK;
}

static apex_status emu_event_sync(apex_device *dev, device_event *e) {
    emu_device *d = emu(dev);
    if (!e) return apex_fail(APEX_ERR_INVALID_ARG, "emulated device: event_sync: event is NULL");
    pthread_mutex_lock(&d->mu);
    const uint64_t n = e->recorded;
    while (!event_reached(e, n)) pthread_cond_wait(&d->done_cv, &d->mu);
    pthread_mutex_unlock(&d->mu);
    return APEX_OK;
}

static int emu_event_done(apex_device *dev, device_event *e) {
    emu_device *d = emu(dev);
    if (!e) return 1;
    pthread_mutex_lock(&d->mu);
    int done = e->pending == NULL;
    pthread_mutex_unlock(&d->mu);
    return done;
}

/* ------------------------------------------------------ copies, flags */

static apex_status emu_memcpy_async(apex_device *dev, void *dst, const void *src, size_t bytes,
                                    device_stream *s) {
    apex_status st = check_stream(s, "memcpy_async");
    if (st) return st;
    if (bytes == 0) return APEX_OK;
    if (!dst || !src)
        return apex_fail(APEX_ERR_INVALID_ARG,
                         "emulated device: memcpy_async of %zu bytes with a NULL %s", bytes,
                         dst ? "source" : "destination");
    if (fault_fail(FAULT_COPY)) return injected("memcpy_async", "cudaErrorLaunchFailure");
    cmd *c = cmd_new(CMD_COPY);
    if (!c) return no_cmd_memory("memcpy_async");
    c->u.copy.dst = dst;
    c->u.copy.src = src;
    c->u.copy.bytes = bytes;
    enqueue(emu(dev), s, c);
    return APEX_OK;
}

static apex_status emu_wait_flag(apex_device *dev, device_stream *s, const uint32_t *flag,
                                 uint32_t value) {
    apex_status st = check_stream(s, "wait_flag");
    if (st) return st;
    if (!flag || ((uintptr_t)flag & 3))
        return apex_fail(APEX_ERR_INVALID_ARG, "emulated device: wait_flag: flag %p is %s",
                         (const void *)flag, flag ? "not 4-byte aligned" : "NULL");
    if (fault_fail(FAULT_EVENT)) return injected("wait_flag", "CUDA_ERROR_LAUNCH_FAILED");
    cmd *c = cmd_new(CMD_WAIT_FLAG);
    if (!c) return no_cmd_memory("wait_flag");
    c->u.flag.flag = flag;
    c->u.flag.value = value;
    enqueue(emu(dev), s, c);
    return APEX_OK;
}

/* ------------------------------------------------------------ kernels */

/* The CUDA launchers' checks, so both devices refuse the same calls. */

static int dtype_ok(apex_dtype t) { return apex_dtype_valid((int)t); }

static int pow2(int32_t x) { return x >= 1 && (x & (x - 1)) == 0; }

static apex_status check_decode(const apex_cuda_decode *a) {
    if (!a) return apex_fail(APEX_ERR_INVALID_ARG, "emulated paged_decode: arguments are NULL");
    if (a->n_seqs < 0 || a->n_q_heads < 1 || a->n_kv_heads < 1 ||
        a->n_q_heads % a->n_kv_heads || a->block_table_stride < 0 || a->max_seq_len < 0)
        return apex_fail(APEX_ERR_INVALID_ARG,
                         "emulated paged_decode: bad geometry (n_seqs %d, q heads %d, kv heads "
                         "%d, table stride %d, max_seq_len %d)",
                         a->n_seqs, a->n_q_heads, a->n_kv_heads, a->block_table_stride,
                         a->max_seq_len);
    if (!dtype_ok(a->kv_dtype) || !dtype_ok(a->q_dtype) || !dtype_ok(a->out_dtype))
        return apex_fail(APEX_ERR_INVALID_ARG, "emulated paged_decode: bad dtype (kv %d, q %d, out %d)",
                         (int)a->kv_dtype, (int)a->q_dtype, (int)a->out_dtype);
    const int32_t hd = a->head_dim;
    if (hd != 64 && hd != 80 && hd != 96 && hd != 128 && hd != 256)
        return apex_fail(APEX_ERR_UNSUPPORTED, "emulated paged_decode: head_dim %d not supported",
                         hd);
    if (!pow2(a->block_tokens) || a->block_tokens > 256)
        return apex_fail(APEX_ERR_UNSUPPORTED,
                         "emulated paged_decode: block_tokens %d not a power of two in 1..256",
                         a->block_tokens);
    if (a->n_seqs == 0) return APEX_OK;
    if (!a->q || !a->out || !a->seq_lens || !a->block_table || !a->kv)
        return apex_fail(APEX_ERR_INVALID_ARG, "emulated paged_decode: a NULL array");
    const size_t need = apex_kv_block_bytes(a->n_kv_heads, a->block_tokens, hd, a->kv_dtype);
    if (a->block_bytes < need || a->block_bytes % 16 || ((uintptr_t)a->kv & 15))
        return apex_fail(APEX_ERR_INVALID_ARG,
                         "emulated paged_decode: block_bytes %zu (need >= %zu, multiple of 16) "
                         "or kv %p not 16-byte aligned",
                         a->block_bytes, need, a->kv);
    if (a->n_seqs > 65535)
        return apex_fail(APEX_ERR_UNSUPPORTED, "emulated paged_decode: %d sequences > 65535",
                         a->n_seqs);
    return APEX_OK;
}

static apex_status emu_paged_decode(apex_device *dev, const apex_cuda_decode *a,
                                    device_stream *s) {
    apex_status st = check_stream(s, "paged_decode");
    if (st || (st = check_decode(a))) return st;
    if (a->n_seqs == 0) return APEX_OK;
    if (fault_fail(FAULT_LAUNCH)) return injected("paged_decode", "cudaErrorLaunchFailure");
    cmd *c = cmd_new(CMD_DECODE);
    if (!c) return no_cmd_memory("paged_decode");
    c->u.decode = *a;
    enqueue(emu(dev), s, c);
    return APEX_OK;
}

static apex_status check_kv_append(const apex_cuda_kv_append *a) {
    if (!a) return apex_fail(APEX_ERR_INVALID_ARG, "emulated kv_append: arguments are NULL");
    if (a->n_rows < 0 || a->n_kv_heads < 1 || a->head_dim < 1 || a->k_stride < 0 ||
        a->v_stride < 0 || !pow2(a->block_tokens) || a->block_tokens > (1 << 30))
        return apex_fail(APEX_ERR_INVALID_ARG,
                         "emulated kv_append: bad geometry (rows %d, kv heads %d, head_dim %d, "
                         "strides %lld/%lld, block_tokens %d)",
                         a->n_rows, a->n_kv_heads, a->head_dim, (long long)a->k_stride,
                         (long long)a->v_stride, a->block_tokens);
    if (!dtype_ok(a->src_dtype) || !dtype_ok(a->kv_dtype))
        return apex_fail(APEX_ERR_INVALID_ARG, "emulated kv_append: bad dtype (src %d, kv %d)",
                         (int)a->src_dtype, (int)a->kv_dtype);
    if (a->n_rows == 0) return APEX_OK;
    if (!a->k || !a->v || !a->slots || !a->kv)
        return apex_fail(APEX_ERR_INVALID_ARG, "emulated kv_append: a NULL array");
    const size_t half =
        apex_kv_block_bytes(a->n_kv_heads, a->block_tokens, a->head_dim, a->kv_dtype) / 2;
    if (a->block_bytes < 2 * half)
        return apex_fail(APEX_ERR_INVALID_ARG,
                         "emulated kv_append: block_bytes %zu < %zu for the K and V halves",
                         a->block_bytes, 2 * half);
    return APEX_OK;
}

static apex_status emu_kv_append(apex_device *dev, const apex_cuda_kv_append *a,
                                 device_stream *s) {
    apex_status st = check_stream(s, "kv_append");
    if (st || (st = check_kv_append(a))) return st;
    if (a->n_rows == 0) return APEX_OK;
    if (fault_fail(FAULT_LAUNCH)) return injected("kv_append", "cudaErrorLaunchFailure");
    cmd *c = cmd_new(CMD_KV_APPEND);
    if (!c) return no_cmd_memory("kv_append");
    c->u.append = *a;
    enqueue(emu(dev), s, c);
    return APEX_OK;
}

static apex_status check_prefill(const apex_cuda_prefill *a) {
    if (!a) return apex_fail(APEX_ERR_INVALID_ARG, "emulated prefill: arguments are NULL");
    if (a->n_seqs < 0 || a->n_tokens < 0 || a->n_kv_heads < 1 || a->n_q_heads < 1 ||
        a->n_q_heads % a->n_kv_heads || a->q_stride < 0 || a->k_stride < 0 || a->v_stride < 0 ||
        a->window < 0 || !(a->scale > 0) || !(a->softcap >= 0))
        return apex_fail(APEX_ERR_INVALID_ARG,
                         "emulated prefill: bad geometry or options (seqs %d, tokens %d, heads "
                         "%d/%d, window %d, scale %g, softcap %g)",
                         a->n_seqs, a->n_tokens, a->n_q_heads, a->n_kv_heads, a->window,
                         (double)a->scale, (double)a->softcap);
    switch (a->head_dim) {
#define EMU_HEAD_DIM_CASE(d) case d:
    APEX_HEAD_DIMS(EMU_HEAD_DIM_CASE) break;
#undef EMU_HEAD_DIM_CASE
    default:
        return apex_fail(APEX_ERR_UNSUPPORTED, "emulated prefill: head_dim %d", a->head_dim);
    }
    if (!dtype_ok(a->act_dtype) || !dtype_ok(a->out_dtype) || (a->kv && !dtype_ok(a->kv_dtype)))
        return apex_fail(APEX_ERR_INVALID_ARG, "emulated prefill: bad dtype");
    if (a->n_tokens == 0) return APEX_OK;
    if (!a->cu_seqlens || !a->q || !a->k || !a->v || !a->out || (a->kv && !a->slots) ||
        (a->kv && !pow2(a->block_tokens)))
        return apex_fail(APEX_ERR_INVALID_ARG, "emulated prefill: a NULL array or bad block size");
    return APEX_OK;
}

static apex_status emu_prefill(apex_device *dev, const apex_cuda_prefill *a, device_stream *s) {
    apex_status st = check_stream(s, "prefill");
    if (st || (st = check_prefill(a))) return st;
    if (a->n_tokens == 0) return APEX_OK;
    if (fault_fail(FAULT_LAUNCH)) return injected("prefill", "cudaErrorLaunchFailure");
    cmd *c = cmd_new(CMD_PREFILL);
    if (!c) return no_cmd_memory("prefill");
    c->u.prefill = *a;
    enqueue(emu(dev), s, c);
    return APEX_OK;
}

static apex_status enqueue_rows(apex_device *dev, const apex_cuda_rows *t, int n_tensors,
                                const int32_t *idx, int32_t n_rows, device_stream *s,
                                int gather) {
    const char *what = gather ? "gather_rows" : "scatter_rows";
    apex_status st = check_stream(s, what);
    if (st) return st;
    if (!t || n_tensors < 1 || n_tensors > APEX_CUDA_MAX_ROW_TENSORS || n_rows < 0)
        return apex_fail(APEX_ERR_INVALID_ARG,
                         "emulated %s: %d tensors (1..%d), %d rows, tensors %p", what, n_tensors,
                         APEX_CUDA_MAX_ROW_TENSORS, n_rows, (const void *)t);
    if (n_rows == 0) return APEX_OK;
    if (!idx) return apex_fail(APEX_ERR_INVALID_ARG, "emulated %s: idx is NULL", what);
    for (int k = 0; k < n_tensors; k++)
        if (!t[k].src || !t[k].dst || t[k].row_bytes > t[k].src_stride ||
            t[k].row_bytes > t[k].dst_stride)
            return apex_fail(APEX_ERR_INVALID_ARG,
                             "emulated %s: tensor %d has a NULL pointer or row_bytes %zu above "
                             "its strides (%zu, %zu)",
                             what, k, t[k].row_bytes, t[k].src_stride, t[k].dst_stride);
    if (fault_fail(FAULT_LAUNCH)) return injected(what, "cudaErrorLaunchFailure");
    cmd *c = cmd_new(CMD_ROWS);
    if (!c) return no_cmd_memory(what);
    memcpy(c->u.rows.t, t, (size_t)n_tensors * sizeof *t);
    c->u.rows.n_tensors = n_tensors;
    c->u.rows.idx = idx;
    c->u.rows.n_rows = n_rows;
    c->u.rows.gather = gather;
    enqueue(emu(dev), s, c);
    return APEX_OK;
}

static apex_status emu_gather_rows(apex_device *dev, const apex_cuda_rows *t, int n_tensors,
                                   const int32_t *idx, int32_t n_rows, device_stream *s) {
    return enqueue_rows(dev, t, n_tensors, idx, n_rows, s, 1);
}

static apex_status emu_scatter_rows(apex_device *dev, const apex_cuda_rows *t, int n_tensors,
                                    const int32_t *idx, int32_t n_rows, device_stream *s) {
    return enqueue_rows(dev, t, n_tensors, idx, n_rows, s, 0);
}

/* ------------------------------------------------------ create/destroy */

static void emu_destroy(apex_device *dev) {
    emu_device *d = emu(dev);
    if (!d) return;
    pthread_mutex_lock(&d->mu);
    d->stop = 1;
    pthread_cond_signal(&d->work_cv);
    pthread_mutex_unlock(&d->mu);
    pthread_join(d->thread, NULL); /* the running command, if any, finishes */

    /* Alone now; the mutex is still taken so helpers keep their contract. */
    pthread_mutex_lock(&d->mu);
    for (size_t i = 0; i < d->n_streams; i++) {
        device_stream *s = d->streams[i];
        while (s->head) {
            cmd *c = s->head;
            stream_pop(s);
            cmd_free(d, c);
        }
        free(s);
    }
    free(d->streams);
    while (d->events) event_free(d, d->events);
    while (d->allocs) {
        alloc_hdr *h = d->allocs;
        alloc_unlink(d, h);
        free(h);
    }
    pthread_mutex_unlock(&d->mu);
    pthread_cond_destroy(&d->work_cv);
    pthread_cond_destroy(&d->done_cv);
    pthread_mutex_destroy(&d->mu);
    free(d);
}

static const device_iface emu_iface = {
    .name = "emulated",
    .destroy = emu_destroy,
    .mem_alloc = emu_mem_alloc,
    .mem_free = emu_mem_free,
    .mem_free_bytes = emu_mem_free_bytes,
    .host_alloc = emu_host_alloc,
    .host_free = emu_host_free,
    .host_register = emu_host_register,
    .host_unregister = emu_host_unregister,
    .stream_create = emu_stream_create,
    .stream_destroy = emu_stream_destroy,
    .stream_sync = emu_stream_sync,
    .event_create = emu_event_create,
    .event_destroy = emu_event_destroy,
    .event_record = emu_event_record,
    .event_wait = emu_event_wait,
    .event_sync = emu_event_sync,
    .event_done = emu_event_done,
    .memcpy_async = emu_memcpy_async,
    .wait_flag = emu_wait_flag,
    .paged_decode = emu_paged_decode,
    .kv_append = emu_kv_append,
    .gather_rows = emu_gather_rows,
    .scatter_rows = emu_scatter_rows,
    .prefill = emu_prefill,
};

/* APEX_EMU_KERNEL_DELAY_US: unset or empty = 0; anything else must be a
 * plain non-negative integer up to one second. */
static apex_status read_delay(unsigned *out) {
    *out = 0;
    const char *v = apex_env_get(APEX_ENV_EMU_KERNEL_DELAY_US);
    if (!v || !*v) return APEX_OK;
    char *end = NULL;
    errno = 0;
    unsigned long x = strtoul(v, &end, 10);
    if (errno || *end || v[0] == '-' || x > 1000000ul)
        return apex_fail(APEX_ERR_INVALID_ARG,
                         "APEX_EMU_KERNEL_DELAY_US='%s': want microseconds, 0..1000000", v);
    *out = (unsigned)x;
    return APEX_OK;
}

apex_status device_emulated_create(size_t capacity_bytes, apex_device **out) {
    if (!out) return apex_fail(APEX_ERR_INVALID_ARG, "device_emulated_create: out is NULL");
    *out = NULL;
    unsigned delay;
    apex_status st = read_delay(&delay);
    if (st) return st;
    emu_device *d = calloc(1, sizeof *d);
    if (!d) return apex_fail(APEX_ERR_NO_MEMORY, "device_emulated_create: out of host memory");
    d->base.iface = &emu_iface;
    d->capacity = capacity_bytes;
    d->kernel_delay_us = delay;
    long page = sysconf(_SC_PAGESIZE);
    d->host_hdr = page > (long)sizeof(alloc_hdr) ? (size_t)page : 4096;

    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC); /* the flag poll's timed wait */
    pthread_mutex_init(&d->mu, NULL);
    pthread_cond_init(&d->work_cv, &ca);
    pthread_cond_init(&d->done_cv, NULL);
    pthread_condattr_destroy(&ca);
    int rc = pthread_create(&d->thread, NULL, device_main, d);
    if (rc) {
        pthread_cond_destroy(&d->work_cv);
        pthread_cond_destroy(&d->done_cv);
        pthread_mutex_destroy(&d->mu);
        free(d);
        return apex_fail(APEX_ERR_NO_MEMORY, "device_emulated_create: cannot start the device "
                                             "thread (%s)", strerror(rc));
    }
    *out = &d->base;
    return APEX_OK;
}
