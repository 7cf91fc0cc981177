/* apex-sim: simulate a serving engine on a hardware preset.
 *   apex-sim --preset t4-llama2-7b --workload reasoning --policy apex --json
 * Prints throughput, TTFT and TPOT percentiles, GPU busy fraction. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sim.h"

extern int32_t g_neo_out;
extern int32_t g_gpu_horizon;
static int g_target_user;

static void usage(FILE *f) {
    fprintf(f,
            "usage: apex-sim --preset HW-MODEL --workload W --policy P [options]\n"
            "  --preset     t4-llama2-7b, a10-llama2-7b, a10-llama3-8b, a100-40gb-llama3-8b,\n"
            "               h100-pcie-llama3-8b, ... (HW: t4 a10 a100-40gb h100-pcie h100-sxm)\n"
            "  --workload   chat | reasoning | summarize | neo-synthetic\n"
            "  --policy     vllm | fastdecode | neo | apex | all (these four) | neo-base\n"
            "  --requests N      requests to complete (default 400)\n"
            "  --clients N       closed loop with N clients (default 64)\n"
            "  --rate R          Poisson arrivals at R req/s instead of closed loop\n"
            "  --seed S          workload seed (default 1)\n"
            "  --tpot-target-ms MS  APEX's per-token latency target (a user SLO); 0 = none;\n"
            "                    default: 1.1 x the model's GPU-only step under preemption:\n"
            "                    full GPU pool at mean context + one mean-context recompute\n"
            "  --tpot-target MS  same as --tpot-target-ms\n"
            "  --gpu-horizon N   APEX: GPU admission/promotion headroom, tokens per GPU\n"
            "                    sequence (default: the scheduler's, 0)\n"
            "  --max-batch N     running sequences at most (default 256)\n"
            "  --prefill-budget N  prompt tokens per step (default 2048)\n"
            "  --neo-out L       neo-synthetic output scale (default 300)\n"
            "  --drift X         true CPU attention X times the profile's (default 1)\n"
            "  --host-cores N    host cores the CPU tier uses (default: the preset's)\n"
            "  --host-bw-gbs X   host's theoretical DRAM bandwidth in GB/s (default: the\n"
            "                    preset's); the CPU model draws min(cores x 12, 0.65 x X)\n"
            "  --gpu-kv-tokens N GPU KV pool in tokens (default: derived from GPU memory)\n"
            "  --host-kv-gib X   host KV pool in GiB, NEO's --swap-space (default: the preset's)\n"
            "  --json            one JSON object on stdout (an array of them for --policy all)\n");
}

/* Default latency target, derived from the model (never from a simulated
 * run): the step a GPU-only engine takes when it pays for its own
 * preemption -- its GPU pool full of this workload's sequences at their
 * mean context (prompt + output/2) AND one preempted sequence of that mean
 * context recomputed in the same step (chunk capped at the prefill budget)
 * -- times 1.1. The per-token latency a GPU-only engine delivers is that of
 * its decode steps plus the recompute and prefill steps its requests live
 * through; this is the latter step, the regular slow step of GPU-only
 * serving under memory pressure. Lengths are sampled from the workload's
 * distribution with a fixed seed (7), not from the run's requests. */
static double default_target(const sim_hw *h, const char *wname, int budget) {
    sim_rng r;
    rng_seed(&r, 7);
    double ctx = 0;
    for (int i = 0; i < 256; i++) {
        int32_t p, o;
        workload_lengths(wname, &r, &p, &o);
        ctx += p + o / 2.0;
    }
    ctx /= 256;
    double tokens = (double)h->gpu_blocks * h->block_tokens;
    double seqs = tokens / ctx;
    if (seqs < 1) seqs = 1;
    if (seqs > 256) { seqs = 256; tokens = seqs * ctx; }
    sched_work w = {0};
    w.gpu_seqs = seqs;
    w.gpu_tokens = tokens;
    w.prefill_tokens = ctx < budget ? ctx : budget;
    sched_pred pr;
    apex_model_predict(&h->belief, NULL, h->threads, SCHED_GPU_ONLY, &w, &pr);
    return 1.1 * pr.total_s;
}

static void print_json(const sim_hw *h, const char *wname, policy_kind k, const workload *wl,
                       double target, const sim_result *r) {
    printf("{\"preset\": \"%s\", \"workload\": \"%s\", \"policy\": \"%s\", "
           "\"arrivals\": \"%s\", \"requests\": %d, \"completed\": %d, "
           "\"throughput_tok_s\": %.3f, \"req_s\": %.4f, "
           "\"ttft_p50_ms\": %.2f, \"ttft_p99_ms\": %.2f, \"tpot_p50_ms\": %.3f, "
           "\"tpot_p99_ms\": %.3f, \"gpu_busy_frac\": %.4f, \"duration_s\": %.2f, "
           "\"steps\": %lld, \"mean_batch\": %.2f, \"mean_cpu_cohort\": %.2f, "
           "\"preemptions\": %lld, \"migrations_to_host\": %lld, \"migrations_to_gpu\": %lld, "
           "\"steps_gpu_only\": %lld, \"steps_overlap\": %lld, \"steps_pipeline\": %lld, "
           "\"steps_split\": %lld, "
           "\"tpot_target_ms\": %.3f, \"tpot_target_source\": \"%s\", \"gpu_kv_tokens\": %lld, \"host_kv_tokens\": %lld, "
           "\"correction_catt\": %.4f, \"correction_lin\": %.4f, "
           "\"host_cores\": %d, \"host_bw_gbs\": %.1f, \"steady_req_s\": %.4f, "
           "\"pred_over_true\": [%.3f, %.3f, %.3f, %.3f]}",
           h->name, wname, policy_name(k), wl->closed ? "closed" : "poisson", wl->n_requests,
           r->n_done, r->throughput_tok_s, r->req_s, r->ttft_p50_ms, r->ttft_p99_ms,
           r->tpot_p50_ms, r->tpot_p99_ms, r->gpu_busy_frac, r->duration_s,
           (long long)r->steps, r->mean_batch, r->mean_cpu_cohort, (long long)r->preemptions,
           (long long)r->to_host, (long long)r->to_gpu, (long long)r->strat_steps[0],
           (long long)r->strat_steps[1], (long long)r->strat_steps[2], (long long)r->strat_steps[3],
           k == POL_APEX ? target * 1e3 : 0.0,
           k != POL_APEX ? "none" : g_target_user ? "user" : "model: gpu-only step under preemption",
           (long long)(h->gpu_blocks * h->block_tokens),
           (long long)(h->host_blocks * h->block_tokens), r->corr_catt, r->corr_lin,
           h->hw->cpu_cores, h->hw->cpu_bw_Bps / 1e9, r->steady_req_s, r->pred_ratio[0], r->pred_ratio[1], r->pred_ratio[2], r->pred_ratio[3]);
}

int main(int argc, char **argv) {
    const char *preset = NULL, *wname = NULL, *pname = NULL;
    workload wl = {NULL, 1, 64, 0, 400, 1};
    double target_ms = -1, drift = 1, host_bw_gbs = 0, host_kv_gib = 0;
    sim_hw_opts ho = {0, 0, 0, 0};
    int json = 0, max_batch = 256, budget = 2048;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--json")) { json = 1; continue; }
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); return 0; }
        if (!v) { fprintf(stderr, "apex-sim: %s needs a value\n", a); usage(stderr); return 2; }
        i++;
        if (!strcmp(a, "--preset")) preset = v;
        else if (!strcmp(a, "--workload")) wname = v;
        else if (!strcmp(a, "--policy")) pname = v;
        else if (!strcmp(a, "--requests")) wl.n_requests = atoi(v);
        else if (!strcmp(a, "--clients")) { wl.clients = atoi(v); wl.closed = 1; }
        else if (!strcmp(a, "--rate")) { wl.rate = atof(v); wl.closed = 0; }
        else if (!strcmp(a, "--seed")) wl.seed = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--tpot-target") || !strcmp(a, "--tpot-target-ms")) target_ms = atof(v);
        else if (!strcmp(a, "--gpu-horizon")) g_gpu_horizon = atoi(v);
        else if (!strcmp(a, "--max-batch")) max_batch = atoi(v);
        else if (!strcmp(a, "--prefill-budget")) budget = atoi(v);
        else if (!strcmp(a, "--neo-out")) g_neo_out = atoi(v);
        else if (!strcmp(a, "--drift")) drift = atof(v);
        else if (!strcmp(a, "--host-cores")) ho.host_cores = atoi(v);
        else if (!strcmp(a, "--host-bw-gbs")) host_bw_gbs = atof(v);
        else if (!strcmp(a, "--gpu-kv-tokens")) ho.gpu_kv_tokens = atoll(v);
        else if (!strcmp(a, "--host-kv-gib")) host_kv_gib = atof(v);
        else { fprintf(stderr, "apex-sim: unknown option %s\n", a); usage(stderr); return 2; }
    }
    if (!preset || !wname || !pname) { usage(stderr); return 2; }
    if (wl.n_requests <= 0 || wl.clients <= 0 || (!wl.closed && wl.rate <= 0) ||
        max_batch <= 0 || budget <= 0 || g_neo_out <= 0 || drift <= 0 || g_gpu_horizon < -1 ||
        !(target_ms >= 0 || target_ms == -1) || ho.host_cores < 0 || !(host_bw_gbs >= 0) ||
        ho.gpu_kv_tokens < 0 || !(host_kv_gib >= 0)) {
        fprintf(stderr, "apex-sim: bad numeric option\n");
        return 2;
    }
    sim_rng tr;
    rng_seed(&tr, 1);
    int32_t p0, o0;
    if (workload_lengths(wname, &tr, &p0, &o0)) {
        fprintf(stderr, "apex-sim: unknown workload '%s'\n", wname);
        return 2;
    }
    wl.name = wname;
    sim_hw h;
    ho.host_bw_Bps = host_bw_gbs * 1e9;
    ho.host_kv_B = host_kv_gib * 1073741824.0;
    if (sim_hw_init(&h, preset, drift, &ho)) return 2;
    g_target_user = target_ms >= 0;
    double target = target_ms < 0 ? default_target(&h, wname, budget) : target_ms * 1e-3;
    policy_kind ks[POL_N];
    int nk = 0;
    if (!strcmp(pname, "all")) { for (int i = 0; i < POL_APEX + 1; i++) ks[nk++] = (policy_kind)i; }
    else {
        for (int i = 0; i < POL_N; i++)
            if (!strcmp(pname, policy_name((policy_kind)i))) ks[nk++] = (policy_kind)i;
        if (!nk) { fprintf(stderr, "apex-sim: unknown policy '%s'\n", pname); return 2; }
    }
    int rc = 0;
    for (int i = 0; i < nk; i++) {
        sim_result r;
        int s = sim_run(&h, ks[i], &wl, target, max_batch, budget, &r);
        if (s < 0) { fprintf(stderr, "apex-sim: out of memory\n"); return 1; }
        if (s > 0) rc = 1;
        if (json) { /* one JSON document: an object, or an array of them for several policies */
            if (nk > 1) fputs(i ? ",\n " : "[", stdout);
            print_json(&h, wname, ks[i], &wl, target, &r);
            if (nk == 1 || i == nk - 1) fputs(nk > 1 ? "]\n" : "\n", stdout);
        }
        else
            printf("%-14s %-14s %-10s tput %9.1f tok/s  ttft p50 %9.1f p99 %9.1f ms  "
                   "tpot p50 %7.1f p99 %7.1f ms  gpu %.2f  batch %.1f (cpu %.1f)\n",
                   h.name, wname, policy_name(ks[i]), r.throughput_tok_s, r.ttft_p50_ms,
                   r.ttft_p99_ms, r.tpot_p50_ms, r.tpot_p99_ms, r.gpu_busy_frac, r.mean_batch,
                   r.mean_cpu_cohort);
    }
    return rc;
}
