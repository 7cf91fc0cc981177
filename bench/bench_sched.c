/* apex-bench sched: microseconds per scheduling decision (apex_sched_plan)
 * for 16/64/256/1024 sequences on a T4 + Llama-2-7B preset profile, with a
 * mixed state (GPU decoders, host decoders, prefilling, waiting) and a
 * latency target, so every pass of the scheduler runs. Baseline in the same
 * run: one O(n) pass over the same state (the floor any scheduler pays). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench/bench.h"
#include "csrc/sched/sched.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void make_state(int n, sched_seq *s, uint64_t seed) {
    for (int i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        int r = (int)(seed >> 33);
        sched_seq *q = &s[i];
        int kind = i < n / 4 ? 0 : i < (n * 3) / 4 ? 1 : i < (n * 7) / 8 ? 2 : 3;
        q->waited = r % 6;
        q->prompt_left = 0;
        if (kind == 0) { q->phase = SCHED_DECODING; q->tier = SCHED_TIER_GPU; q->ctx_len = 100 + r % 1500; }
        else if (kind == 1) { q->phase = SCHED_DECODING; q->tier = SCHED_TIER_CPU; q->ctx_len = 100 + r % 3000; }
        else if (kind == 2) { q->phase = SCHED_PREFILLING; q->tier = SCHED_TIER_GPU; q->ctx_len = 512; q->prompt_left = 200 + r % 800; }
        else { q->phase = SCHED_WAITING; q->tier = SCHED_TIER_NONE; q->ctx_len = 0; q->prompt_left = 64 + r % 512; }
    }
}

int bench_sched_main(int argc, char **argv) {
    int json = 0;
    double min_time = 0.2;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--json")) json = 1;
        else if (!strcmp(argv[i], "--quick")) min_time = 0.05;
        else { fprintf(stderr, "apex-bench sched: unknown option %s (--json, --quick)\n", argv[i]); return 2; }
    }
    const apex_hw_preset *hw = apex_hw_preset_find("t4");
    apex_model_geom g;
    double wb;
    apex_profile p;
    if (!hw || apex_model_preset("llama2-7b", &g, &wb) ||
        apex_profile_from_preset(hw, &g, wb, 8, &p)) {
        fprintf(stderr, "apex-bench sched: %s\n", sched_last_error());
        return 1;
    }
    apex_correction corr;
    apex_correction_init(&corr);
    sched_config cfg;
    sched_config_default(&cfg);
    cfg.cpu_threads = 8;
    cfg.max_batch = 4096;
    cfg.tpot_target_s = 0.09;
    static const int sizes[] = {16, 64, 256, 1024};
    if (json) printf("{\"bench\": \"sched\", \"profile\": \"preset t4 / llama2-7b\", \"results\": [");
    else printf("%8s %14s %14s %10s %8s\n", "seqs", "us/decision", "floor us", "strategy", "cohort");
    for (int si = 0; si < 4; si++) {
        int n = sizes[si];
        sched_seq *s = malloc(sizeof *s * (size_t)n);
        int32_t *act = malloc(sizeof *act * (size_t)n), *chk = malloc(sizeof *chk * (size_t)n);
        sched_scratch scr;
        if (!s || !act || !chk || sched_scratch_init(&scr, n)) {
            fprintf(stderr, "apex-bench sched: out of memory\n");
            free(s); free(act); free(chk);
            return 1;
        }
        make_state(n, s, 42 + (uint64_t)n);
        sched_state st = {n, s, 16, n / 8, 1 << 22, 4096};
        sched_plan pl;
        memset(&pl, 0, sizeof pl);
        pl.action = act;
        pl.chunk = chk;
        pl.capacity = n;
        long iters = 0;
        double t0 = now_s(), el;
        do {
            for (int r = 0; r < 64; r++) {
                if (apex_sched_plan(&st, &p, &corr, &cfg, &scr, &pl)) {
                    fprintf(stderr, "apex-bench sched: %s\n", sched_last_error());
                    return 1;
                }
            }
            iters += 64;
            el = now_s() - t0;
        } while (el < min_time);
        double us = el / iters * 1e6;
        /* floor: one pass summing the state (what reading it costs) */
        volatile double sink = 0;
        long fit = 0;
        t0 = now_s();
        do {
            for (int r = 0; r < 64; r++) {
                double a = 0;
                for (int i = 0; i < n; i++) a += s[i].ctx_len * (s[i].tier + 2) + s[i].prompt_left;
                sink += a;
            }
            fit += 64;
            el = now_s() - t0;
        } while (el < min_time / 4);
        double fus = el / fit * 1e6;
        if (json)
            printf("%s{\"seqs\": %d, \"us_per_decision\": %.3f, \"floor_us\": %.3f, "
                   "\"strategy\": \"%s\", \"cpu_cohort\": %d, \"gpu\": %d, \"admitted\": %d}",
                   si ? ", " : "", n, us, fus, sched_strategy_name(pl.strategy), pl.n_cpu,
                   pl.n_gpu, pl.n_admit);
        else
            printf("%8d %14.3f %14.3f %10s %8d\n", n, us, fus, sched_strategy_name(pl.strategy),
                   pl.n_cpu);
        sched_scratch_free(&scr);
        free(s); free(act); free(chk);
    }
    if (json) printf("], \"target_us_at_256\": 20}\n");
    return 0;
}
