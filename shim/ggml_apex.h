/*
 * ggml_apex.h - the APEX ggml backend (libggml-apex.so).
 *
 * An ACCEL-type ggml device that llama.cpp adds to every context. It takes
 * over, in llama.cpp's graphs:
 *   SET_ROWS into a KV-cache tensor ("cache_k_l*", "cache_v_l*"): the KV writes;
 *   FLASH_ATTN_EXT: attention, on APEX's CPU kernel (cpu_attn_strided), which
 *                   reads llama.cpp's token-major KV in place.
 * Everything else stays where llama.cpp puts it. A geometry APEX does not
 * support (head_dim outside {64, 80, 96, 128, 256}, KV not f16/f32, ALiBi,
 * attention sinks) is declined with one line on stderr, and llama.cpp runs it
 * natively.
 *
 * KV memory: llama.cpp patched by setup_hooks/fetch_llama_cpp.sh asks the
 * registered backends for a KV-cache buffer type (proc address
 * "ggml_backend_kv_cache_buffer_type"); APEX answers for host-resident KV of
 * a model it runs, and the KV tensors then live in APEX's host pool (buffer
 * type "APEX_Host": host memory, ggml's token-major layout, is_host).
 *
 * In a CUDA build the KV of GPU layers gets "APEX_Hybrid" instead: the same
 * host pool plus APEX's GPU tier (ggml_apex_tier.h), which keeps the
 * sequences within its budget on the GPU and runs their decode attention
 * there; the others attend on the CPU kernel. APEX_GGML_GPU_TIER=0 leaves
 * GPU layers' KV to llama.cpp; APEX_GGML_HYBRID=1 uses APEX_Hybrid for
 * host-resident KV too (tests, with APEX_DEVICE=emulated).
 *
 * Loading: GGML_BACKEND_PATH=.../libggml-apex.so (ggml_backend_init), or
 * LD_PRELOAD=.../libapex-preload.so (a constructor registers the backend).
 * libggml-apex.so is a client of libapex.so.1, a dependency found through
 * its rpath (the APEX build it was built against; $ORIGIN/.. installed):
 * the kernel, host KV memory and metrics file of apex_strided.h, the GPU
 * tier's apex_paged.h, the tracer of apex.h.
 * Environment: APEX_GGML_DISABLE=1 declines everything; APEX_STATS_FILE=path
 * writes the counters as JSON at exit; APEX_GGML_QUIET=1 drops the exit line;
 * APEX_GGML_KV_POOL=0 leaves the KV memory to llama.cpp;
 * APEX_GGML_KV_POOL_MAX_MB caps the pool; APEX_METRICS_FILE=path keeps a
 * Prometheus text file of the counters (ggml_apex_metrics.c); APEX_CPUSET (the cores whose NUMA
 * nodes the pool binds to) and APEX_PIN_HOST_POOL=0 as for the core.
 */
#ifndef APEX_GGML_APEX_H
#define APEX_GGML_APEX_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define APEX_GGML_MAX_STREAMS 256

/* Process-wide counters of the APEX backend (all contexts). */
typedef struct apex_ggml_stats {
    uint64_t attention_calls;   /* FLASH_ATTN_EXT ops run by APEX            */
    uint64_t decode_attn;       /* (stream, layer) attentions of one token   */
    uint64_t prefill_tokens;    /* query tokens of multi-token attentions    */
    uint64_t kv_write_calls;    /* SET_ROWS ops into the KV cache            */
    uint64_t kv_rows_written;   /* rows stored                               */
    uint64_t declined;          /* ops APEX was offered and declined         */
    double attention_seconds;
    double kv_write_seconds;
    int32_t n_threads;          /* threads of the last attention             */
    int32_t max_stream;         /* highest stream slot attended, -1 if none  */
    /* Per stream slot (llama.cpp sequence slot): attentions run, and on
     * which tier (always the host tier/CPU in a CPU build). */
    uint64_t stream_attn[APEX_GGML_MAX_STREAMS];
    /* llama.cpp's KV cache in APEX's host pool (the "APEX_Host" buffer
     * type that llama.cpp, patched, asks the backends for): */
    uint64_t kv_bytes_apex;        /* KV bytes in the pool now               */
    uint64_t kv_bytes_apex_peak;   /* the most at any time                   */
    uint64_t kv_buffers_apex;      /* KV buffers in the pool now             */
    uint64_t kv_bytes_pinned;      /* of kv_bytes_apex, registered with CUDA */
    uint64_t kv_pool_failures;     /* KV allocations the pool refused        */
    uint64_t attention_kv_in_pool; /* attention ops whose K and V it held    */
    uint64_t kv_writes_in_pool;    /* KV write ops into it                   */
    /* The GPU tier of an APEX_Hybrid KV cache (a CUDA build; see
     * ggml_apex_tier.h): per stream slot, the attentions of stream_attn
     * that ran there, and their sum. */
    uint64_t stream_gpu[APEX_GGML_MAX_STREAMS];
    uint64_t gpu_attn;
    uint64_t kv_bytes_hybrid;      /* of kv_bytes_apex, in APEX_Hybrid buffers */
    /* APEX_GGML_TIER_CHECK=1: the largest |GPU tier - CPU kernel| seen on
     * an attention output element (the CPU kernel's results are used). */
    float tier_check_max_diff;
    uint64_t errors;               /* attention ops that failed              */
    uint64_t tier_fallbacks;       /* GPU-tier attentions rerun on the CPU   */
    /* The GPU tier's placement by APEX's scheduler (apex_sched_place): decode
     * steps it placed, streams given a GPU slot (their KV copied up from the
     * host pool), streams whose slot was taken away (spilled, idle or done). */
    uint64_t sched_steps;
    uint64_t migrations_to_device;
    uint64_t migrations_to_host;
} apex_ggml_stats;

/* Also reachable as ggml_backend_reg_get_proc_address(reg, name). */
typedef void (*apex_ggml_stats_get_t)(apex_ggml_stats *out);
#define APEX_GGML_STATS_GET "apex_ggml_stats_get"

/* libapex's per-step summary (apex.h) of this process, the backend's spans
 * included: 1 and *out (when out is not NULL), then a fresh start when
 * reset is not 0 (a driver measures only its decode loop); 0 when tracing
 * is off (APEX_TRACE, APEX_TRACE_SUMMARY=1 or APEX_STATS_FILE turn it on;
 * ggml_apex_trace.h). */
struct apex_step_summary;
typedef int (*apex_ggml_step_summary_t)(struct apex_step_summary *out, int reset);
#define APEX_GGML_STEP_SUMMARY "apex_ggml_step_summary"

#ifdef __cplusplus
}
#endif
#endif /* APEX_GGML_APEX_H */
