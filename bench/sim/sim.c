/* sim.c - hardware set-up and the engine loop of apex-sim. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sim.h"

/* Engine memory policy (the same for every preset): the engine may use
 * this fraction of the GPU memory the driver reports; the weights and an
 * activation reserve come off the top; the rest is the GPU KV pool. */
#define SIM_GPU_MEM_FRAC 0.95
#define SIM_ACT_RESERVE_B 0.4e9

int sim_hw_init(sim_hw *h, const char *preset, double drift_catt, const sim_hw_opts *opts) {
    memset(h, 0, sizeof *h);
    snprintf(h->name, sizeof h->name, "%s", preset);
    static const char *models[] = {"llama2-7b", "llama3-8b"};
    const char *model = NULL;
    size_t pl = strlen(preset);
    for (int i = 0; i < 2; i++) {
        size_t ml = strlen(models[i]);
        if (pl > ml + 1 && !strcmp(preset + pl - ml, models[i]) && preset[pl - ml - 1] == '-') {
            model = models[i];
            char hwname[64];
            snprintf(hwname, sizeof hwname, "%.*s", (int)(pl - ml - 1), preset);
            const apex_hw_preset *base = apex_hw_preset_find(hwname);
            if (base) {
                h->host = *base;
                h->hw = &h->host;
            }
        }
    }
    if (!model || !h->hw) {
        fprintf(stderr, "apex-sim: unknown preset '%s' (HW-MODEL: HW in t4, a10, a100-40gb, "
                        "h100-pcie, h100-sxm; MODEL in llama2-7b, llama3-8b)\n", preset);
        return -1;
    }
    if (apex_model_preset(model, &h->geom, &h->weight_bytes)) return -1;
    if (opts) {
        if (opts->host_cores < 0 || opts->host_cores > 1024 || !(opts->host_bw_Bps >= 0) ||
            opts->host_bw_Bps > 1e14 || opts->gpu_kv_tokens < 0 || !(opts->host_kv_B >= 0) ||
            opts->host_kv_B > 1e14) {
            fprintf(stderr, "apex-sim: host cores must be 0..1024, host bandwidth 0..1e5 GB/s, "
                            "GPU KV tokens >= 0, host KV 0..1e5 GB\n");
            return -1;
        }
        if (opts->host_cores > 0) h->host.cpu_cores = opts->host_cores;
        if (opts->host_bw_Bps > 0) h->host.cpu_bw_Bps = opts->host_bw_Bps;
    }
    h->threads = h->hw->cpu_cores;
    if (apex_profile_from_preset(h->hw, &h->geom, h->weight_bytes, h->threads, &h->truth)) {
        fprintf(stderr, "apex-sim: %s\n", sched_last_error());
        return -1;
    }
    h->belief = h->truth;
    if (drift_catt > 0 && drift_catt != 1) /* the truth drifted from the profile */
        for (int i = 0; i < h->truth.n_catt; i++) {
            h->truth.catt[i].per_token *= drift_catt;
            h->truth.catt[i].per_seq *= drift_catt;
        }
    h->block_tokens = 16;
    double kvB = apex_kv_bytes_per_token(&h->geom) * h->block_tokens;
    double gpu_kv = SIM_GPU_MEM_FRAC * h->hw->gpu_mem_B - h->weight_bytes - SIM_ACT_RESERVE_B;
    h->gpu_blocks = gpu_kv > 0 ? (int64_t)(gpu_kv / kvB) : 0;
    if (opts && opts->gpu_kv_tokens > 0) h->gpu_blocks = opts->gpu_kv_tokens / h->block_tokens;
    if (opts && opts->host_kv_B > 0) h->host.host_kv_B = opts->host_kv_B;
    h->host_blocks = (int64_t)(h->hw->host_kv_B / kvB);
    h->noise = 0.03;
    return 0;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double *v, int n, double q) {
    if (n <= 0) return 0;
    qsort(v, (size_t)n, sizeof *v, cmp_d);
    double pos = q * (n - 1);
    int i = (int)floor(pos);
    if (i >= n - 1) return v[n - 1];
    return v[i] + (pos - i) * (v[i + 1] - v[i]);
}

static int64_t bfor(int64_t t, int32_t bt) { return (t + bt - 1) / bt; }

int sim_run(const sim_hw *h, policy_kind kind, const workload *wl, double tpot_target_s,
            int max_batch, int prefill_budget, sim_result *res) {
    memset(res, 0, sizeof *res);
    int N = wl->n_requests;
    request *rq = calloc((size_t)N, sizeof *rq);
    int32_t *active = malloc(sizeof(int32_t) * (size_t)N);
    sched_seq *seqs = malloc(sizeof(sched_seq) * (size_t)N);
    int32_t *act = malloc(sizeof(int32_t) * (size_t)N), *chk = malloc(sizeof(int32_t) * (size_t)N);
    if (!rq || !active || !seqs || !act || !chk) {
        free(rq); free(active); free(seqs); free(act); free(chk);
        return -1;
    }
    sim_rng wr, nr;
    rng_seed(&wr, wl->seed);
    rng_seed(&nr, wl->seed ^ 0xABCDEFull);
    int32_t bt = h->block_tokens;
    /* one request never needs more than the GPU pool (vLLM refuses such
     * a max_model_len); the same lengths for every policy */
    int64_t max_len = h->gpu_blocks * bt - 2 * bt;
    if (max_len > 8192) max_len = 8192;
    double t_arr = 0;
    for (int i = 0; i < N; i++) {
        workload_lengths(wl->name, &wr, &rq[i].prompt, &rq[i].output);
        if (rq[i].prompt + rq[i].output > max_len) {
            rq[i].output = (int32_t)(max_len - rq[i].prompt);
            if (rq[i].output < 1) { rq[i].output = 1; rq[i].prompt = (int32_t)max_len - 1; }
        }
        if (!wl->closed) { t_arr += rng_exp(&wr, wl->rate); rq[i].arrival = t_arr; }
        else rq[i].arrival = i < wl->clients ? 0 : INFINITY; /* set on a completion */
        rq[i].phase = SCHED_WAITING;
        rq[i].tier = SCHED_TIER_NONE;
        rq[i].prompt_left = rq[i].prompt;
    }
    policy pol;
    policy_init(&pol, kind, h, tpot_target_s, max_batch, prefill_budget, N);
    int64_t gfree = h->gpu_blocks, hfree = h->host_blocks;
    int next = 0, n_active = 0, n_done = 0, released = wl->closed ? wl->clients : N;
    double t = 0, busy = 0, sum_batch = 0, sum_cpu = 0;
    int64_t guard = 0;
    while (n_done < N) {
        /* arrivals (in order) become active */
        while (next < N && next < released && rq[next].arrival <= t) active[n_active++] = next++;
        if (n_active == 0) {
            if (next < N && next < released) { t = rq[next].arrival; continue; }
            break;
        }
        /* the scheduler sees every running request and the head of the queue */
        int ns = 0, waiting = 0;
        for (int a = 0; a < n_active; a++) {
            request *r = &rq[active[a]];
            if (r->phase == SCHED_WAITING && ++waiting > 64) continue;
            seqs[ns++] = (sched_seq){r->phase, r->tier, r->ctx, r->prompt_left, r->waited};
        }
        sched_state st = {ns, seqs, bt, gfree, hfree, h->gpu_blocks};
        sched_plan pl;
        memset(&pl, 0, sizeof pl);
        pl.action = act;
        pl.chunk = chk;
        pl.capacity = N;
        exec_mode m = policy_plan(&pol, h, &st, &pl);
        step_out o;
        exec_step(h, m, &pl.work, &pol.sb1, pol.launch_s, &nr, &o);
        if (!(o.t > 0)) o.t = h->truth.step_overhead_s;
        policy_observe(&pol, h, m, &pl.work, &o);
        t += o.t;
        busy += o.gpu_busy;
        res->steps++;
        res->strat_steps[pl.strategy]++;
        if (pl.pred.total_s > 0) res->pred_ratio[pl.strategy] += pl.pred.total_s / o.t;
        sum_batch += pl.work.gpu_seqs + pl.work.cpu_seqs;
        sum_cpu += pl.work.cpu_seqs;
        int progressed = pl.work.gpu_seqs + pl.work.cpu_seqs + pl.work.prefill_tokens > 0;
        /* apply the plan: entries map to the filtered list above. Blocks
         * are released first (migrations, preemptions), then taken. */
        {
            int ws2 = 0, k2 = 0;
            for (int a = 0; a < n_active; a++) {
                request *r = &rq[active[a]];
                if (r->phase == SCHED_WAITING && ++ws2 > 64) continue;
                int32_t action = act[k2++];
                if (action == SCHED_ACT_TO_HOST || action == SCHED_ACT_TO_GPU) {
                    int to_gpu = action == SCHED_ACT_TO_GPU;
                    int64_t nb = r->alloc_blocks;
                    int64_t *src = to_gpu ? &hfree : &gfree, *dst = to_gpu ? &gfree : &hfree;
                    if (*dst >= nb) {
                        *dst -= nb;
                        *src += nb;
                        r->tier = to_gpu ? SCHED_TIER_GPU : SCHED_TIER_CPU;
                        if (to_gpu) res->to_gpu++;
                        else res->to_host++;
                    }
                    r->waited++;
                    act[k2 - 1] = -1;
                } else if (action == SCHED_ACT_PREEMPT) {
                    int64_t *pool = r->tier == SCHED_TIER_GPU ? &gfree : &hfree;
                    *pool += r->alloc_blocks;
                    r->alloc_blocks = 0;
                    r->phase = SCHED_PREFILLING; /* keeps its slot in the filter */
                    r->tier = SCHED_TIER_NONE;
                    r->prompt_left = r->prompt + r->generated;
                    r->ctx = 0;
                    r->preemptions++;
                    res->preemptions++;
                    act[k2 - 1] = -2;
                }
            }
        }
        int wseen = 0, k = 0;
        int w_out = 0;
        for (int a = 0; a < n_active; a++) {
            int id = active[a];
            request *r = &rq[id];
            int32_t action = SCHED_ACT_IDLE, c = 0;
            if (r->phase == SCHED_WAITING && ++wseen > 64) {
                active[w_out++] = id;
                continue;
            }
            action = act[k];
            c = chk[k];
            k++;
            int64_t old_b = r->alloc_blocks;
            if (action == -2) { r->phase = SCHED_WAITING; action = -1; }
            switch (action) {
            case -1: break; /* applied above */
            case SCHED_ACT_DECODE_GPU:
            case SCHED_ACT_DECODE_CPU: {
                int64_t nb = bfor(r->ctx + 1, bt);
                if (nb > old_b) {
                    int64_t *pool = r->tier == SCHED_TIER_GPU ? &gfree : &hfree;
                    if (*pool < nb - old_b) { /* cannot grow: recompute later */
                        *pool += old_b;
                        r->alloc_blocks = 0;
                        r->phase = SCHED_WAITING;
                        r->tier = SCHED_TIER_NONE;
                        r->prompt_left = r->prompt + r->generated;
                        r->ctx = 0;
                        r->preemptions++;
                        res->preemptions++;
                        break;
                    }
                    *pool -= nb - old_b;
                    r->alloc_blocks = (int32_t)nb;
                }
                r->ctx++;
                r->generated++;
                r->waited = 0;
                break;
            }
            case SCHED_ACT_PREFILL_GPU:
            case SCHED_ACT_PREFILL_HOST: {
                if (r->phase == SCHED_WAITING) { /* admission: whole prompt */
                    int64_t nb = bfor(r->prompt_left + 1, bt);
                    r->tier = action == SCHED_ACT_PREFILL_GPU ? SCHED_TIER_GPU : SCHED_TIER_CPU;
                    int64_t *pool = r->tier == SCHED_TIER_GPU ? &gfree : &hfree;
                    if (*pool < nb) { r->tier = SCHED_TIER_NONE; break; }
                    *pool -= nb;
                    r->alloc_blocks = (int32_t)nb;
                    r->phase = SCHED_PREFILLING;
                }
                if (c > r->prompt_left) c = r->prompt_left;
                r->prompt_left -= c;
                r->ctx += c;
                if (r->prompt_left == 0) { /* the prefill emits a token */
                    r->phase = SCHED_DECODING;
                    r->generated++;
                    if (r->first_tok == 0) r->first_tok = t;
                }
                break;
            }
            default:
                if (r->phase == SCHED_DECODING) r->waited++;
                break;
            }
            if (r->phase == SCHED_DECODING && r->generated >= r->output) {
                int64_t *pool = r->tier == SCHED_TIER_GPU ? &gfree : &hfree;
                *pool += r->alloc_blocks;
                r->alloc_blocks = 0;
                r->finish = t;
                r->done = 1;
                n_done++;
                if (wl->closed && released < N) { rq[released].arrival = t; released++; }
                continue;
            }
            active[w_out++] = id;
        }
        n_active = w_out;
        /* a preempted request goes back in arrival order: the list stays
         * sorted because it never left it */
        if (!progressed) {
            if (++guard > 1000) {
                fprintf(stderr, "apex-sim: %s made no progress (stuck at t=%.1f s)\n",
                        policy_name(kind), t);
                break;
            }
        } else {
            guard = 0;
        }
        if (res->steps > 50000000) break;
    }
    /* metrics */
    double *ttft = malloc(sizeof(double) * (size_t)N), *tpot = malloc(sizeof(double) * (size_t)N);
    if (!ttft || !tpot) {
        free(ttft); free(tpot);
        policy_free(&pol);
        free(rq); free(active); free(seqs); free(act); free(chk);
        return -1;
    }
    int nt = 0, np = 0;
    double toks = 0, t_end = 0;
    for (int i = 0; i < N; i++) {
        request *r = &rq[i];
        if (!r->done) continue;
        toks += r->output;
        if (r->finish > t_end) t_end = r->finish;
        ttft[nt++] = (r->first_tok - r->arrival) * 1e3;
        if (r->output > 1) tpot[np++] = (r->finish - r->first_tok) / (r->output - 1) * 1e3;
    }
    res->n_done = n_done;
    res->duration_s = t_end;
    res->throughput_tok_s = t_end > 0 ? toks / t_end : 0;
    res->req_s = t_end > 0 ? n_done / t_end : 0;
    res->ttft_p50_ms = pct(ttft, nt, 0.5);
    res->ttft_p99_ms = pct(ttft, nt, 0.99);
    res->tpot_p50_ms = pct(tpot, np, 0.5);
    res->tpot_p99_ms = pct(tpot, np, 0.99);
    {   /* NEO's metric (its evaluation/illustrator.py): the completion rate
         * between the 30 % and 70 % completion marks, free of the start-up
         * and drain of a throughput run */
        int nf = 0;
        for (int i = 0; i < N; i++)
            if (rq[i].done) ttft[nf++] = rq[i].finish; /* ttft's percentiles are taken */
        qsort(ttft, (size_t)nf, sizeof *ttft, cmp_d);
        int lo = (int)(0.3 * nf), hi = (int)(0.7 * nf);
        if (hi > nf - 1) hi = nf - 1;
        res->steady_req_s = hi > lo && ttft[hi] > ttft[lo] ? (hi - lo) / (ttft[hi] - ttft[lo]) : 0;
    }
    res->gpu_busy_frac = t > 0 ? busy / t : 0;
    res->mean_batch = res->steps ? sum_batch / res->steps : 0;
    res->mean_cpu_cohort = res->steps ? sum_cpu / res->steps : 0;
    for (int k = 0; k < SCHED_N_STRATEGIES; k++)
        if (res->strat_steps[k] > 0) res->pred_ratio[k] /= (double)res->strat_steps[k];
    res->corr_catt = pol.corr.f[APEX_C_CATT];
    res->corr_lin = pol.corr.f[APEX_C_LIN];
    free(ttft); free(tpot);
    policy_free(&pol);
    free(rq); free(active); free(seqs); free(act); free(chk);
    return n_done == N ? 0 : 1;
}
