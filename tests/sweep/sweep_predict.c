/*
 * apex-sweep-predict - the performance model's prediction for the hybrid
 * sweep (tests/sweep/sweep.py): for each point, the hybrid step (APEX's
 * asynchronous-overlap form: one batch, the GPU tier's sequences and the CPU
 * cohort attending side by side) against native llama.cpp with only the
 * sequences that fit (GPU-only), from a profile measured on this machine:
 *   - CPU attention: apex_profile_measure_cpu (APEX's kernel timed here);
 *   - GPU attention: what the GPU tier measured in the point's hybrid run
 *     (the trace summary's GPU attention per layer, for B sequences);
 *   - linear layers: the native runs' measured steps (B and N sequences)
 *     less that GPU attention;
 *   - links: a host memcpy (apex_profile_measure_memcpy);
 *   - per-layer join: the model's own 10 us (layer_sync_s), no fitting.
 * Nothing is taken from a datasheet preset, nothing from the hybrid run's
 * step time.
 *
 *   apex-sweep-predict --geom L,HQ,HK,D --threads T
 *       --point B,N,CTX,FIT_MS,ALL_MS,GATT_US [--point ...]
 * CTX: mean attended tokens per sequence in the decode loop; FIT_MS, ALL_MS:
 * native ms/step with B and N sequences; GATT_US: the GPU tier's attention
 * per layer for its B sequences. JSON on stdout.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "csrc/sched/sched.h"

enum { MAX_POINTS = 64 };

typedef struct point {
    int b, n;
    double ctx, fit_ms, all_ms, gatt_us;
} point;

static int usage(const char *why) {
    fprintf(stderr, "apex-sweep-predict: %s\nusage: apex-sweep-predict --geom L,HQ,HK,D --threads T "
                    "--point B,N,CTX,FIT_MS,ALL_MS,GATT_US [--point ...]\n", why);
    return 2;
}

/* One point's profile: the measured CPU part and links, its GPU part. */
static sched_status point_profile(const apex_profile *cpu, const point *p, apex_profile *out) {
    *out = *cpu;
    const double L = cpu->geom.n_layers;
    const double tok_b = p->b * p->ctx, tok_n = p->n * p->ctx;
    const double gatt_b = L * p->gatt_us * 1e-6;       /* s/step, B sequences */
    const double gatt_n = gatt_b * tok_n / tok_b;      /* linear in tokens     */
    double lin_b = p->fit_ms * 1e-3 - gatt_b, lin_n = p->all_ms * 1e-3 - gatt_n;
    if (lin_b < 0) lin_b = 0;
    if (lin_n < lin_b) lin_n = lin_b;
    out->step_overhead_s = 0; /* in the measured linear part */
    out->lin = (apex_curve){.n = 2, .x = {p->b, p->n}, .y = {lin_b, lin_n}};
    out->gatt = (apex_curve){.n = 2, .x = {tok_b, tok_n}, .y = {gatt_b, gatt_n}};
    out->pref = out->lin; /* no prefill in the decode loop */
    snprintf(out->source, sizeof out->source,
             "measured: CPU kernel and memcpy here; GPU attention from the tier; linear from native runs");
    return apex_profile_validate(out);
}

int main(int argc, char **argv) {
    apex_model_geom g = {0};
    int threads = 0, np = 0;
    point pts[MAX_POINTS];
    for (int i = 1; i < argc; i++) {
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(argv[i], "--geom") && v) {
            if (sscanf(v, "%d,%d,%d,%d", &g.n_layers, &g.n_q_heads, &g.n_kv_heads, &g.head_dim) != 4)
                return usage("--geom takes L,HQ,HK,D");
            i++;
        } else if (!strcmp(argv[i], "--threads") && v) {
            threads = atoi(v), i++;
        } else if (!strcmp(argv[i], "--point") && v) {
            if (np == MAX_POINTS) return usage("too many points");
            point *p = &pts[np];
            if (sscanf(v, "%d,%d,%lf,%lf,%lf,%lf", &p->b, &p->n, &p->ctx, &p->fit_ms, &p->all_ms, &p->gatt_us) != 6 ||
                p->b < 1 || p->n <= p->b || !(p->ctx >= 1) || !(p->fit_ms > 0) || !(p->all_ms > 0) ||
                !(p->gatt_us > 0))
                return usage("--point takes B,N,CTX,FIT_MS,ALL_MS,GATT_US with 1 <= B < N and positive times");
            np++, i++;
        } else {
            return usage("unknown or incomplete argument");
        }
    }
    if (g.n_layers < 1 || g.n_q_heads < 1 || g.n_kv_heads < 1 || g.head_dim < 1 || g.n_q_heads % g.n_kv_heads)
        return usage("--geom is missing or bad");
    if (threads < 1 || np == 0) return usage("--threads and at least one --point are needed");
    g.kv_bytes = 2, g.act_bytes = 4;

    apex_profile cpu;
    memset(&cpu, 0, sizeof cpu);
    cpu.geom = g;
    cpu.cpu_threads = threads;
    cpu.layer_sync_s = 10e-6;
    snprintf(cpu.hw_key, sizeof cpu.hw_key, "this machine, %d threads", threads);
    apex_model_key(&g, cpu.model_key, sizeof cpu.model_key);
    sched_status st = apex_profile_measure_cpu(&cpu, threads, 3.0, -1, 0); /* f16 (kv_bytes 2), rows: llama.cpp's KV */
    if (!st) st = apex_profile_measure_memcpy(&cpu.h2d);
    cpu.d2h = cpu.h2d;
    if (st) {
        fprintf(stderr, "apex-sweep-predict: %s\n", sched_last_error());
        return 1;
    }
    printf("{\"geom\": [%d, %d, %d, %d], \"threads\": %d, \"catt\": [", g.n_layers, g.n_q_heads, g.n_kv_heads,
           g.head_dim, threads);
    for (int i = 0; i < cpu.n_catt; i++)
        printf("%s{\"threads\": %d, \"c0_s\": %.6g, \"per_seq_s\": %.6g, \"per_token_s\": %.6g}", i ? ", " : "",
               cpu.catt[i].threads, cpu.catt[i].c0, cpu.catt[i].per_seq, cpu.catt[i].per_token);
    printf("], \"link_Bps\": %.6g, \"link_lat_s\": %.6g, \"layer_sync_s\": %g, \"points\": [", cpu.h2d.bw_Bps,
           cpu.h2d.lat_s, cpu.layer_sync_s);
    for (int i = 0; i < np; i++) {
        const point *p = &pts[i];
        apex_profile prof;
        if (point_profile(&cpu, p, &prof)) {
            fprintf(stderr, "apex-sweep-predict: point %d: %s\n", i, sched_last_error());
            return 1;
        }
        const int c = p->n - p->b;
        sched_work hy = {.gpu_seqs = p->b, .gpu_tokens = p->b * p->ctx, .cpu_seqs = c, .cpu_tokens = c * p->ctx};
        sched_work fit = {.gpu_seqs = p->b, .gpu_tokens = p->b * p->ctx};
        sched_pred ph, pf;
        apex_model_predict(&prof, NULL, threads, SCHED_OVERLAP, &hy, &ph);
        apex_model_predict(&prof, NULL, threads, SCHED_GPU_ONLY, &fit, &pf);
        const double ratio = (p->n / ph.total_s) / (p->b / pf.total_s);
        printf("%s{\"b\": %d, \"n\": %d, \"ctx\": %.1f, \"pred_hybrid_ms\": %.4f, \"pred_fit_ms\": %.4f, "
               "\"pred_cpu_branch_ms\": %.4f, \"pred_gpu_attn_ms\": %.4f, \"pred_lin_ms\": %.4f, "
               "\"pred_ratio_vs_fit\": %.4f}",
               i ? ", " : "", p->b, p->n, p->ctx, ph.total_s * 1e3, pf.total_s * 1e3, ph.cpu_s * 1e3,
               ph.gatt_s * 1e3, ph.lin_s * 1e3, ratio);
    }
    printf("]}\n");
    return 0;
}
