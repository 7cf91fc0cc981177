/* neo.c - the `neo` baseline: NEO's load-aware scheduler (Jiang et al.,
 * "NEO: Saving GPU Memory Crisis with CPU Offloading for Online LLM
 * Inference", MLSys 2025), written from the algorithm of its released
 * SwiftLLM-based scheduler (swiftllm/server/scheduler.py: _get_next_batch_new
 * and _decide_mode_and_gen_batch). Per step:
 *   1. GPU decodes stay; when their KV outgrows the GPU pool the newest are
 *      swapped out to the host (they become CPU decodes).
 *   2. Otherwise CPU decodes at the head of the queue are swapped back in
 *      while the GPU pool stays under 95 % full.
 *   3. Waiting prompts are admitted FCFS, whole, within the batch budget
 *      and while the host KV (CPU decodes + host-bound prompts) stays within
 *      the host pool less a GPU pool -- a bound on every admission, the
 *      GPU-bound too: to the GPU while it has room and no earlier one of
 *      this step went to the host, else to the host (prefilled on the GPU,
 *      KV sent down).
 *   4. Sub-batch 0 holds every prefill and GPU decode. CPU decodes are dealt
 *      one by one (oldest first), the first to sub-batch 1, each next one to
 *      the sub-batch with more slack, where the slack of sub-batch j is
 *        linr(other).width + pref_j + gdec_j - (cdec_j + lnch)
 *      (its CPU attention must hide under the other sub-batch's linear layers
 *      and its own GPU attention). A decode that drives a slack negative is
 *      skipped, and so is every later one at least as long.
 *   5. Host-bound prefills are dropped from sub-batch 0 (last first) while
 *      the width stays >= 128 and both slacks stay >= 0; the sequential
 *      candidate (no CPU decodes) likewise drops them while its width
 *      stays >= 128.
 *   6. The step is pipelined if requests / (GPU time of sub-batch 0 + of
 *      sub-batch 1) beats requests / GPU time of the sequential candidate;
 *      else it runs sequentially and the CPU decodes wait.
 * NEO's per-layer predictor is read from the policy's profile: linr =
 * T_lin(width), pref = sum over the prompts of T_pref - T_lin (each prompt's
 * attention), gdec = T_gatt, cdec = T_catt (the kernel alone: NEO's cdec_T
 * excludes the q/k/v and output copies).
 * Its constants are the released ones (swiftllm/perfpredictor.py,
 * scheduler.py): linr_S_threshold 128, lnch_T 0.8 ms, swap-in below 95 %.
 * lnch_T is both what NEO's scheduler assumes and what its engine pays:
 * exec.c charges it to the host thread per layer and sub-batch of a
 * pipelined neo step (policy.launch_s), serial with the CPU attention.
 * Deviations: swapped-out decodes rejoin the CPU queue in arrival order (NEO
 * puts them at its front); a swap, in or out, costs the step of the
 * migration (the engine moves KV between steps; NEO swaps before the
 * forward, so its swapped-out decodes may decode on the CPU the same step);
 * the batch budget does not evict GPU decodes (the GPU pool binds first at
 * every preset). */
#include <math.h>
#include <string.h>

#include "sim.h"

#define NEO_WIDTH_MIN 128      /* NEO's linr_S_threshold                */
#define NEO_SWAP_IN_FRAC 0.95  /* swap in below this GPU pool occupancy */
#define NEO_LNCH_S SIM_NEO_LNCH_S /* NEO's lnch_T (sim.h)             */
/* temporary marks of a dealt CPU decode (replaced before returning) */
enum { NEO_CDEC_SB0 = -2, NEO_CDEC_SB1 = -1 };

typedef struct neo_pred {      /* per-layer times from the profile */
    const apex_profile *p;
    double L, lnch;
    int32_t threads;
} neo_pred;

typedef struct neo_sb {        /* one sub-batch's work */
    double x;                  /* requests                                */
    double s;                  /* width: prompt tokens + one per decode   */
    double pref_att;           /* prefill attention, summed per prompt    */
    double gdec_tok;           /* GPU decodes' context tokens             */
    double xc, nc;             /* CPU decodes; their context tokens       */
} neo_sb;

static double linr(const neo_pred *m, double s) { return s > 0 ? apex_t_lin(m->p, s) / m->L : 0; }

/* NEO's pref_T of one prompt: its attention alone (the profile's prefill of
 * `tok` tokens less its linear layers); a sub-batch's pref_T is the sum over
 * its prompts (structs.py BatchPerfData.add_pref adds get_pref_T(prompt_len)
 * per request; profiler.py _profile_pref times one prompt of each length). */
static double pref_att(const neo_pred *m, double tok) {
    return tok > 0 ? fmax(0, apex_t_pref(m->p, tok) - apex_t_lin(m->p, tok)) / m->L : 0;
}

static double gpu_att(const neo_pred *m, const neo_sb *b) {
    double gdec = b->gdec_tok > 0 ? apex_t_gatt(m->p, b->gdec_tok) / m->L : 0;
    return b->pref_att + gdec;
}

static double gpu_time(const neo_pred *m, const neo_sb *b) { return linr(m, b->s) + gpu_att(m, b); }

/* NEO's cpu_time = cdec_T + lnch_T. cdec_T is the CPU kernel's time alone:
 * NEO profiles it as the wall time of the pacpu call, started after the
 * q/k/v copy has landed (transformer_layer.py: cdec_s after
 * qkvtr_e.synchronize(), cdec_e after paged_attention_cpu returns), so the
 * copies are not in it. */
static double cpu_time(const neo_pred *m, const neo_sb *b) {
    double c = b->xc > 0 ? apex_t_catt(m->p, b->nc, b->xc, m->threads) / m->L : 0;
    return c + m->lnch;
}

/* The smaller of the two sub-batches' slacks. */
static double min_slack(const neo_pred *m, const neo_sb b[2]) {
    double r0 = linr(m, b[1].s) + gpu_att(m, &b[0]) - cpu_time(m, &b[0]);
    double r1 = linr(m, b[0].s) + gpu_att(m, &b[1]) - cpu_time(m, &b[1]);
    return r0 < r1 ? r0 : r1;
}

static double slack(const neo_pred *m, const neo_sb b[2], int j) {
    return linr(m, b[1 - j].s) + gpu_att(m, &b[j]) - cpu_time(m, &b[j]);
}

static void add_pref(const neo_pred *m, neo_sb *b, double tok) {
    b->x++;
    b->s += tok;
    b->pref_att += pref_att(m, tok);
}
static void sub_pref(const neo_pred *m, neo_sb *b, double tok) {
    b->x--;
    b->s -= tok;
    b->pref_att -= pref_att(m, tok);
}

static int64_t blocks_for(int64_t t, int32_t bt) { return (t + bt - 1) / bt; }

exec_mode plan_neo(policy *pol, const sim_hw *h, const sched_state *st, sched_plan *pl) {
    const apex_profile *p = &h->belief;
    const sched_config *cfg = &pol->cfg;
    int32_t bt = st->block_tokens;
    int n = st->n_seqs;
    neo_pred m = {p, p->geom.n_layers, NEO_LNCH_S, h->threads};

    /* 1. GPU decodes; the newest swapped out while their growth does not fit */
    int n_run = 0;
    for (int i = 0; i < n; i++) {
        const sched_seq *q = &st->seqs[i];
        pl->action[i] = q->phase == SCHED_DECODING && q->tier == SCHED_TIER_GPU
                            ? SCHED_ACT_DECODE_GPU : SCHED_ACT_IDLE;
        pl->chunk[i] = 0;
        if (q->phase != SCHED_WAITING) n_run++;
    }
    int64_t hfree = st->host_blocks_free;
    int64_t gfree = relieve_gpu(st, pl, 1, &hfree, &n_run); /* n_run: unused here */
    int64_t gtot = st->gpu_blocks_total;

    /* 2. swap in from the head of the CPU queue (not in a swap-out step) */
    if (pl->n_to_host == 0)
        for (int i = 0; i < n; i++) {
            const sched_seq *q = &st->seqs[i];
            if (q->phase != SCHED_DECODING || q->tier != SCHED_TIER_CPU) continue;
            int64_t nb = blocks_for(q->ctx_len + 1, bt);
            if ((double)(gtot - gfree + nb) > NEO_SWAP_IN_FRAC * (double)gtot) break;
            pl->action[i] = SCHED_ACT_TO_GPU;
            pl->n_to_gpu++;
            gfree -= nb;
            hfree += nb;
        }

    /* budgets: requests in the batch, and its width (NEO's max_tokens_in_batch) */
    int64_t seats = cfg->max_batch, width = cfg->prefill_budget;
    for (int i = 0; i < n; i++)
        if (pl->action[i] == SCHED_ACT_DECODE_GPU) { seats--; width--; }

    /* 3. prefills: a continuing one first (a prompt longer than the width
     * budget is chunked), then admissions, whole prompts, FCFS */
    int32_t *pref = pol->scratch.idx; /* admitted prefills, in order */
    int np = 0, to_host = 0;
    int64_t itm = 0;
    neo_sb b[2], seq;
    memset(b, 0, sizeof b);
    for (int i = 0; i < n; i++) {
        const sched_seq *q = &st->seqs[i];
        if (q->phase != SCHED_PREFILLING || q->prompt_left <= 0 || seats < 1 || width < 1) continue;
        int32_t c = q->prompt_left < width ? q->prompt_left : (int32_t)width;
        pl->action[i] = q->tier == SCHED_TIER_GPU ? SCHED_ACT_PREFILL_GPU : SCHED_ACT_PREFILL_HOST;
        pl->chunk[i] = c;
        add_pref(&m, &b[0], c);
        seats--;
        width -= c;
    }
    for (int i = 0; i < n; i++) {
        const sched_seq *q = &st->seqs[i];
        if (q->phase != SCHED_WAITING) continue;
        int64_t nb = blocks_for(q->ctx_len + q->prompt_left + 1, bt);
        int32_t c = q->prompt_left;
        if (c > cfg->prefill_budget && np == 0) c = (int32_t)width; /* never fits whole */
        if (seats < 1 || c < 1 || c > width) break;
        /* NEO bounds every admission, one bound for the GPU too: the
         * host-bound prompts' intermediate GPU blocks within a GPU pool, and
         * the host's KV (CPU decodes + host-bound prompts) within the host
         * pool less a GPU pool (scheduler.py _get_next_batch_new, step 4:
         * itm_block_needed, cpu_threshold, checked before the GPU-or-host
         * choice) */
        if (itm + nb > gtot || hfree - gtot < nb) break;
        int gpu = !to_host && gfree >= nb;
        if (gpu) gfree -= nb;
        else { hfree -= nb; itm += nb; to_host = 1; }
        pl->action[i] = gpu ? SCHED_ACT_PREFILL_GPU : SCHED_ACT_PREFILL_HOST;
        pl->chunk[i] = c;
        pref[np++] = i;
        add_pref(&m, &b[0], c);
        seats--;
        width -= c;
    }

    /* 4. sub-batch 0: every prefill and GPU decode */
    for (int i = 0; i < n; i++)
        if (pl->action[i] == SCHED_ACT_DECODE_GPU) {
            b[0].x++;
            b[0].s++;
            b[0].gdec_tok += st->seqs[i].ctx_len + 1;
        }
    seq = b[0];
    /* the sequential candidate drops host-bound prefills while wide enough */
    int np_seq = np;
    while (np_seq > 0 && pl->action[pref[np_seq - 1]] == SCHED_ACT_PREFILL_HOST &&
           seq.s - pl->chunk[pref[np_seq - 1]] >= NEO_WIDTH_MIN)
        sub_pref(&m, &seq, pl->chunk[pref[--np_seq]]);

    /* CPU decodes dealt between the sub-batches. With nothing on the GPU
     * (no prefill, no GPU decode) NEO's rule would stall them all until a
     * swap-in, which never comes for a context over 95 % of the pool; they
     * then run as NEO runs with no GPU pool: every one, without the slack
     * test. */
    int all_cpu = b[0].x == 0;
    int next = 1;
    double min_out = INFINITY;
    for (int i = 0; i < n; i++) {
        const sched_seq *q = &st->seqs[i];
        if (q->phase != SCHED_DECODING || q->tier != SCHED_TIER_CPU ||
            pl->action[i] != SCHED_ACT_IDLE)
            continue;
        if (seats < 1 || width < 1) break;
        double len = q->ctx_len + 1;
        if (len >= min_out) continue;
        neo_sb *t = &b[next];
        t->x++; t->s++; t->xc++; t->nc += len;
        double r0 = slack(&m, b, 0), r1 = slack(&m, b, 1);
        if (!all_cpu && (r0 < 0 || r1 < 0)) {
            t->x--; t->s--; t->xc--; t->nc -= len;
            min_out = len;
            continue;
        }
        pl->action[i] = next == 1 ? NEO_CDEC_SB1 : NEO_CDEC_SB0;
        seats--;
        width--;
        next = r1 > r0;
    }

    int pipe = all_cpu && b[1].x > 0, np_all = np;
    if (b[1].x > 0 && !all_cpu) {
        /* 5. drop host-bound prefills from sub-batch 0 while the CPU keeps up */
        while (np > 0 && pl->action[pref[np - 1]] == SCHED_ACT_PREFILL_HOST) {
            double c = pl->chunk[pref[np - 1]];
            sub_pref(&m, &b[0], c);
            if (b[0].s < NEO_WIDTH_MIN || min_slack(&m, b) < 0) { add_pref(&m, &b[0], c); break; }
            np--;
        }
        /* 6. pipelined if its rate beats the sequential candidate's */
        double t_seq = gpu_time(&m, &seq), t_pipe = gpu_time(&m, &b[0]) + gpu_time(&m, &b[1]);
        pipe = t_pipe > 0 && (t_seq <= 0 || seq.x / t_seq < (b[0].x + b[1].x) / t_pipe);
    }
    int launched = pipe ? np : np_seq; /* prefills run: the first `launched` */
    for (int k = launched; k < np_all; k++) {
        pl->action[pref[k]] = SCHED_ACT_IDLE;
        pl->chunk[pref[k]] = 0;
    }
    sub_batch s1 = {0, 0, 0, 0, 0};
    for (int i = 0; i < n; i++) {
        if (pl->action[i] != NEO_CDEC_SB1 && pl->action[i] != NEO_CDEC_SB0) continue;
        if (pipe && pl->action[i] == NEO_CDEC_SB1) {
            s1.cpu_seqs++;
            s1.cpu_tokens += st->seqs[i].ctx_len + 1;
        }
        pl->action[i] = pipe ? SCHED_ACT_DECODE_CPU : SCHED_ACT_IDLE;
    }
    pl->n_prefill = 0;
    pl->n_admit = 0;
    for (int i = 0; i < n; i++)
        if (pl->action[i] == SCHED_ACT_PREFILL_GPU || pl->action[i] == SCHED_ACT_PREFILL_HOST) {
            pl->n_prefill++;
            if (st->seqs[i].phase == SCHED_WAITING) pl->n_admit++;
        }
    pl->strategy = pipe ? SCHED_PIPELINE : SCHED_GPU_ONLY;
    pol->sb1 = s1;
    return pipe ? EX_TWO : EX_GPU_ONLY;
}

/* The `neo-base` baseline: NEO's own engine in its GPU-only mode, the
 * baseline of NEO's published throughput gains (evaluation/server.py starts
 * it with --always-use-gpu; scheduler.py get_next_batch then runs
 * _get_next_batch_old). Per step:
 *   1. GPU decodes stay; the newest are swapped out to host memory while
 *      their KV outgrows the GPU pool or they exceed the batch size
 *      (swapped, not recomputed: the KV crosses PCIe, priced by exec.c's
 *      copy engines).
 *   2. With nothing swapped out, waiting prompts are admitted FCFS, whole,
 *      while the pool (100 %), the batch size and the width budget
 *      (max_tokens_in_batch, GPU decodes included) allow; the decodes ride
 *      in the same batch.
 *   3. With sequences swapped out, no prompt is admitted; unless this step
 *      swapped out, the head of the swapped queue swaps back in while it
 *      fits the pool. Swapped-out sequences do not decode (no CPU attention
 *      in this mode).
 * Deviation as in `neo`: a swap-in spends its step migrating. */
exec_mode plan_neo_base(policy *pol, const sched_state *st, sched_plan *pl) {
    const sched_config *cfg = &pol->cfg;
    int32_t bt = st->block_tokens;
    int n = st->n_seqs, n_run = 0, n_gdec = 0;
    for (int i = 0; i < n; i++) {
        const sched_seq *q = &st->seqs[i];
        int gdec = q->phase == SCHED_DECODING && q->tier == SCHED_TIER_GPU;
        pl->action[i] = gdec ? SCHED_ACT_DECODE_GPU : SCHED_ACT_IDLE;
        pl->chunk[i] = 0;
        if (q->phase != SCHED_WAITING) n_run++;
    }
    int64_t hfree = st->host_blocks_free;
    int64_t gfree = relieve_gpu(st, pl, 1, &hfree, &n_run);
    /* the batch size binds too: the newest decodes beyond it swap out */
    for (int i = 0; i < n; i++) n_gdec += pl->action[i] == SCHED_ACT_DECODE_GPU;
    for (int i = n - 1; i >= 0 && n_gdec > cfg->max_batch; i--) {
        if (pl->action[i] != SCHED_ACT_DECODE_GPU) continue;
        int64_t nb = blocks_for(st->seqs[i].ctx_len, bt);
        if (hfree < nb + 1) break;
        pl->action[i] = SCHED_ACT_TO_HOST;
        pl->n_to_host++;
        hfree -= nb;
        gfree += nb;
        n_gdec--;
    }
    int swapped = pl->n_to_host > 0;
    for (int i = 0; i < n && !swapped; i++)
        swapped = st->seqs[i].phase == SCHED_DECODING && st->seqs[i].tier == SCHED_TIER_CPU;

    int64_t seats = cfg->max_batch - n_gdec, width = cfg->prefill_budget - n_gdec;
    if (!swapped) {
        /* 2. prompts ride with the decodes (a prompt over the width budget,
         * which NEO refuses, is chunked so the run can finish) */
        for (int i = 0; i < n; i++) {
            const sched_seq *q = &st->seqs[i];
            if (q->phase != SCHED_PREFILLING || q->prompt_left <= 0 || seats < 1 || width < 1)
                continue;
            int32_t c = q->prompt_left < width ? q->prompt_left : (int32_t)width;
            pl->action[i] = SCHED_ACT_PREFILL_GPU;
            pl->chunk[i] = c;
            seats--;
            width -= c;
            pl->n_prefill++;
        }
        for (int i = 0; i < n; i++) {
            const sched_seq *q = &st->seqs[i];
            if (q->phase != SCHED_WAITING) continue;
            int64_t nb = blocks_for(q->ctx_len + q->prompt_left + 1, bt);
            int32_t c = q->prompt_left;
            if (c > cfg->prefill_budget && width == cfg->prefill_budget - n_gdec)
                c = (int32_t)width; /* never fits whole */
            if (seats < 1 || c < 1 || c > width || gfree < nb) break; /* strict FCFS */
            pl->action[i] = SCHED_ACT_PREFILL_GPU;
            pl->chunk[i] = c;
            gfree -= nb;
            seats--;
            width -= c;
            pl->n_prefill++;
            pl->n_admit++;
        }
    } else if (pl->n_to_host == 0) {
        /* 3. swap in from the head while it fits */
        for (int i = 0; i < n; i++) {
            const sched_seq *q = &st->seqs[i];
            if (q->phase != SCHED_DECODING || q->tier != SCHED_TIER_CPU) continue;
            int64_t nb = blocks_for(q->ctx_len + 1, bt);
            if (seats < 1 || gfree < nb) break;
            pl->action[i] = SCHED_ACT_TO_GPU;
            pl->n_to_gpu++;
            gfree -= nb;
            seats--;
        }
    }
    pl->strategy = SCHED_GPU_ONLY;
    return EX_GPU_ONLY;
}
