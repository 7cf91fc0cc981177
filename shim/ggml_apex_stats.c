/* ggml_apex_stats.c - the backend's counters (apex_ggml_stats, one set
 * per process, under shim_lock), libapex's per-step summary as the backend
 * hands it out, and the report at exit: a line per run on stderr and, with
 * APEX_STATS_FILE, the counters as JSON. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include "apex/apex_strided.h"
#include "shim/ggml_apex_impl.h"
#include "shim/ggml_apex_tier.h"
#include "shim/ggml_apex_metrics.h"
#include "shim/ggml_apex_trace.h"

pthread_mutex_t shim_lock = PTHREAD_MUTEX_INITIALIZER;
apex_ggml_stats shim_stats = {.max_stream = -1};

void apex_ggml_stats_get(apex_ggml_stats *out) {
    pthread_mutex_lock(&shim_lock);
    *out = shim_stats;
    pthread_mutex_unlock(&shim_lock);
    gpu_tier_counters(&out->sched_steps, &out->migrations_to_device, &out->migrations_to_host);
}

/* libapex's per-step summary (the backend's spans with libapex's): see
 * ggml_apex.h. */
int apex_ggml_step_summary(apex_step_summary *out, int reset) {
    if (!shim_trace_active()) return 0;
    apex_step_summary s;
    const int ok = apex_step_summary_get(out ? out : &s) == APEX_OK;
    if (reset) apex_step_summary_reset();
    return ok;
}

/* At exit: where each sequence's attention ran, and the counters as JSON. */
__attribute__((destructor)) static void report(void) {
    ggml_apex_metrics_stop(); /* its last write: the final counters */
    apex_ggml_stats s;
    apex_ggml_stats_get(&s);
    const char *path = getenv("APEX_STATS_FILE");
    if (path && *path) {
        FILE *f = fopen(path, "w");
        if (f) {
            fprintf(f,
                    "{\"attention_calls\": %llu, \"decode_attn\": %llu, \"prefill_tokens\": %llu, "
                    "\"kv_write_calls\": %llu, \"kv_rows_written\": %llu, \"declined\": %llu, "
                    "\"attention_seconds\": %.6f, \"kv_write_seconds\": %.6f, \"n_threads\": %d, "
                    "\"isa\": \"%s\", \"tier\": \"%s\", \"gpu_attn\": %llu, \"tier_check_max_diff\": %g, "
                    "\"kv_bytes_hybrid\": %llu, \"kv_bytes_apex_peak\": %llu, "
                    "\"kv_pool_failures\": %llu, \"attention_kv_in_pool\": %llu, \"kv_writes_in_pool\": %llu, "
                    "\"stream_attn\": [",
                    (unsigned long long)s.attention_calls, (unsigned long long)s.decode_attn,
                    (unsigned long long)s.prefill_tokens, (unsigned long long)s.kv_write_calls,
                    (unsigned long long)s.kv_rows_written, (unsigned long long)s.declined,
                    s.attention_seconds, s.kv_write_seconds, s.n_threads, apex_strided_isa(),
                    s.gpu_attn ? "hybrid" : "host", (unsigned long long)s.gpu_attn, (double)s.tier_check_max_diff,
                    (unsigned long long)s.kv_bytes_hybrid,
                    (unsigned long long)s.kv_bytes_apex_peak, (unsigned long long)s.kv_pool_failures,
                    (unsigned long long)s.attention_kv_in_pool, (unsigned long long)s.kv_writes_in_pool);
            for (int i = 0; i <= s.max_stream && i < APEX_GGML_MAX_STREAMS; i++)
                fprintf(f, "%s%llu", i ? ", " : "", (unsigned long long)s.stream_attn[i]);
            fprintf(f, "], \"stream_gpu\": [");
            for (int i = 0; i <= s.max_stream && i < APEX_GGML_MAX_STREAMS; i++)
                fprintf(f, "%s%llu", i ? ", " : "", (unsigned long long)s.stream_gpu[i]);
            fprintf(f, "]");
            apex_step_summary ss;
            if (apex_ggml_step_summary(&ss, 0))
                fprintf(f,
                        ", \"step_summary\": {\"steps\": %llu, \"layer_steps\": %llu, \"engine_us_per_layer\": %.3f, "
                        "\"apex_us_per_layer\": %.3f, \"cpu_attn_us_per_layer\": %.3f, \"gpu_attn_us_per_layer\": %.3f, "
                        "\"gpu_kernel_us_per_layer\": %.3f, \"copy_us_per_layer\": %.3f, \"wait_us_per_layer\": %.3f, "
                        "\"apex_overhead_us_per_layer\": %.3f, \"step_gap_us\": %.3f}",
                        (unsigned long long)ss.steps, (unsigned long long)ss.layer_steps, ss.engine_us, ss.apex_us,
                        ss.cpu_attn_us, ss.gpu_attn_us, ss.gpu_kernel_us, ss.copy_us, ss.wait_us,
                        ss.apex_overhead_us, ss.step_gap_us);
            fprintf(f, "}\n");
            fclose(f);
        }
    }
    if (s.attention_calls == 0 || shim_env_on("APEX_GGML_QUIET")) return;
    fprintf(stderr, "APEX: %llu attention ops (%llu single-token sequence-layer attentions, %llu multi-token query rows) "
                    "in %.3f s, %llu KV rows written; %s (CPU kernel %s, %d threads):",
            (unsigned long long)s.attention_calls, (unsigned long long)s.decode_attn,
            (unsigned long long)s.prefill_tokens, s.attention_seconds, (unsigned long long)s.kv_rows_written,
            s.gpu_attn ? "GPU tier and host tier" : "every sequence on the host tier", apex_strided_isa(),
            s.n_threads);
    for (int i = 0; i <= s.max_stream && i < APEX_GGML_MAX_STREAMS; i++) {
        const unsigned long long g = s.stream_gpu[i], cpu = s.stream_attn[i] - s.stream_gpu[i];
        if (g && cpu) fprintf(stderr, " seq%d=GPU(%llu)+CPU(%llu)", i, g, cpu);
        else if (g) fprintf(stderr, " seq%d=GPU(%llu)", i, g);
        else fprintf(stderr, " seq%d=CPU(%llu)", i, cpu);
    }
    if (s.kv_bytes_apex_peak)
        fprintf(stderr, "; KV cache in APEX's host pool (up to %.1f MiB; %llu of %llu attention ops read it there)",
                (double)s.kv_bytes_apex_peak / (1024.0 * 1024.0), (unsigned long long)s.attention_kv_in_pool,
                (unsigned long long)s.attention_calls);
    else
        fprintf(stderr, "; KV cache in llama.cpp's own buffers");
    fprintf(stderr, "\n");
    apex_step_summary ss;
    if (apex_ggml_step_summary(&ss, 0) && ss.layer_steps)
        fprintf(stderr,
                "APEX: per layer per step (%llu steps): engine %.1f us, APEX %.1f us (CPU attention %.1f, copies %.1f, "
                "waits %.1f, overhead %.1f); GPU tier attention %.1f us beside it\n",
                (unsigned long long)ss.steps, ss.engine_us, ss.apex_us, ss.cpu_attn_us, ss.copy_us, ss.wait_us,
                ss.apex_overhead_us, ss.gpu_attn_us);
}
