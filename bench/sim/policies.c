/* policies.c - the four policies. `apex` calls the project's scheduler
 * (apex_sched_plan) and feeds its online correction; the three baselines are
 * written here from their papers' descriptions:
 *   vllm        GPU-only; FCFS admission while the KV pool has room (1%
 *               watermark); when a running sequence cannot grow, the
 *               lowest-priority running sequence is preempted (recompute).
 *   fastdecode  every decode's attention on the CPU (all KV in host memory),
 *               GPU linear layers, two sub-batches pipelined (FastDecode's
 *               CPU/GPU pipeline); FCFS admission up to the batch cap.
 *   neo         NEO's released scheduler, in neo.c.
 *   neo-base    NEO's engine in GPU-only mode (swap-out preemption), in neo.c.
 */
#include <math.h>
#include <string.h>

#include "sim.h"

/* apex-sim --gpu-horizon: APEX's GPU growth headroom; -1 = the default. */
int32_t g_gpu_horizon = -1;

const char *policy_name(policy_kind k) {
    static const char *n[] = {"vllm", "fastdecode", "neo", "apex", "neo-base"};
    return n[k];
}

void policy_init(policy *pol, policy_kind k, const sim_hw *h, double tpot_target_s,
                 int max_batch, int prefill_budget, int capacity) {
    memset(pol, 0, sizeof *pol);
    pol->kind = k;
    sched_config_default(&pol->cfg);
    pol->cfg.max_batch = max_batch;
    pol->cfg.prefill_budget = prefill_budget;
    pol->cfg.cpu_threads = h->threads;
    pol->cfg.tpot_target_s = k == POL_APEX ? tpot_target_s : 0;
    pol->cfg.gpu_reserve_frac = 0.01;
    if (k == POL_APEX && g_gpu_horizon >= 0) pol->cfg.gpu_horizon = g_gpu_horizon;
    apex_correction_init(&pol->corr);
    pol->use_correction = k == POL_APEX;
    pol->launch_s = k == POL_NEO ? SIM_NEO_LNCH_S : 0; /* NEO's engine is Python */
    sched_scratch_init(&pol->scratch, capacity);
}

void policy_free(policy *pol) { sched_scratch_free(&pol->scratch); }

static int64_t blocks_for(int64_t t, int32_t bt) { return (t + bt - 1) / bt; }

/* Common prefill / admission pass of the baselines: continue partial
 * prompts, then admit FCFS to `tier` while blocks and the budget allow. */
static void admit_fcfs(const sched_state *st, const sched_config *cfg, sched_plan *pl,
                       int tier, int64_t *gfree, int64_t *hfree, int64_t reserve, int n_run) {
    int64_t budget = cfg->prefill_budget;
    int32_t bt = st->block_tokens;
    for (int i = 0; i < st->n_seqs && budget > 0; i++) {
        const sched_seq *q = &st->seqs[i];
        if (q->phase != SCHED_PREFILLING || q->prompt_left <= 0) continue;
        int64_t c = q->prompt_left < budget ? q->prompt_left : budget;
        pl->action[i] = q->tier == SCHED_TIER_GPU ? SCHED_ACT_PREFILL_GPU : SCHED_ACT_PREFILL_HOST;
        pl->chunk[i] = (int32_t)c;
        budget -= c;
        pl->n_prefill++;
    }
    for (int i = 0; i < st->n_seqs && budget > 0; i++) {
        const sched_seq *q = &st->seqs[i];
        if (q->phase != SCHED_WAITING) continue;
        if (n_run >= cfg->max_batch) break;
        int64_t nb = blocks_for(q->ctx_len + q->prompt_left + 1, bt);
        int t = tier;
        if (tier == -2) /* GPU first, else host (neo) */
            t = *gfree - nb >= reserve ? SCHED_TIER_GPU : SCHED_TIER_CPU;
        if (t == SCHED_TIER_GPU) {
            if (*gfree - nb < reserve) break; /* queue */
            *gfree -= nb;
        } else {
            if (!hfree || nb > *hfree) break;
            *hfree -= nb;
        }
        int64_t c = q->prompt_left < budget ? q->prompt_left : budget;
        pl->action[i] = t == SCHED_TIER_GPU ? SCHED_ACT_PREFILL_GPU : SCHED_ACT_PREFILL_HOST;
        pl->chunk[i] = (int32_t)c;
        budget -= c;
        pl->n_prefill++;
        pl->n_admit++;
        n_run++;
    }
}

static void fill_work(const sched_state *st, sched_plan *pl) {
    sched_work *w = &pl->work;
    memset(w, 0, sizeof *w);
    pl->n_gpu = pl->n_cpu = 0;
    for (int i = 0; i < st->n_seqs; i++) {
        const sched_seq *q = &st->seqs[i];
        switch (pl->action[i]) {
        case SCHED_ACT_DECODE_GPU: w->gpu_seqs++; w->gpu_tokens += q->ctx_len + 1; pl->n_gpu++; break;
        case SCHED_ACT_DECODE_CPU: w->cpu_seqs++; w->cpu_tokens += q->ctx_len + 1; pl->n_cpu++; break;
        case SCHED_ACT_PREFILL_GPU: w->prefill_tokens += pl->chunk[i]; break;
        case SCHED_ACT_PREFILL_HOST:
            w->prefill_tokens += pl->chunk[i];
            w->prefill_host_tokens += pl->chunk[i];
            break;
        case SCHED_ACT_TO_HOST: w->migrate_d2h_tokens += q->ctx_len; break;
        case SCHED_ACT_TO_GPU: w->migrate_h2d_tokens += q->ctx_len; break;
        default: break;
        }
    }
}

/* Evicts GPU decoders from the back until growth fits; to the host (neo)
 * or preempted (vllm). Returns the remaining GPU free blocks. */
int64_t relieve_gpu(const sched_state *st, sched_plan *pl, int swap, int64_t *hfree,
                    int *n_run) {
    int32_t bt = st->block_tokens;
    int64_t need = 0, gfree = st->gpu_blocks_free;
    for (int i = 0; i < st->n_seqs; i++)
        if (pl->action[i] == SCHED_ACT_DECODE_GPU && st->seqs[i].ctx_len % bt == 0) need++;
    for (int i = st->n_seqs - 1; i >= 0 && need > gfree; i--) {
        const sched_seq *q = &st->seqs[i];
        if (pl->action[i] != SCHED_ACT_DECODE_GPU) continue;
        int64_t nb = blocks_for(q->ctx_len, bt);
        if (q->ctx_len % bt == 0) need--;
        gfree += nb;
        if (swap && *hfree >= nb + 1) {
            pl->action[i] = SCHED_ACT_TO_HOST;
            *hfree -= nb;
            pl->n_to_host++;
        } else {
            pl->action[i] = SCHED_ACT_PREEMPT;
            pl->n_preempt++;
            (*n_run)--;
        }
    }
    return gfree - need;
}

static exec_mode plan_vllm(policy *pol, const sched_state *st, sched_plan *pl) {
    int n_run = 0;
    for (int i = 0; i < st->n_seqs; i++) {
        const sched_seq *q = &st->seqs[i];
        pl->action[i] = q->phase == SCHED_DECODING ? SCHED_ACT_DECODE_GPU : SCHED_ACT_IDLE;
        pl->chunk[i] = 0;
        if (q->phase != SCHED_WAITING) n_run++;
    }
    int64_t gfree = relieve_gpu(st, pl, 0, NULL, &n_run);
    int64_t reserve = (int64_t)ceil(0.01 * st->gpu_blocks_total);
    admit_fcfs(st, &pol->cfg, pl, SCHED_TIER_GPU, &gfree, NULL, reserve, n_run);
    pl->strategy = SCHED_GPU_ONLY;
    return EX_GPU_ONLY;
}

/* Sub-batch 1 of the split forms: half the cohort's sequences (rounded
 * down) holding half its tokens (the engine balances the halves by length). */
static sub_batch half_cohort(const sched_work *w) {
    sub_batch b = {0, 0, 0, 0, 0};
    b.cpu_seqs = floor(w->cpu_seqs / 2);
    b.cpu_tokens = b.cpu_seqs > 0 ? w->cpu_tokens / 2 : 0;
    return b;
}

static exec_mode plan_fastdecode(policy *pol, const sched_state *st, sched_plan *pl) {
    int n_run = 0;
    for (int i = 0; i < st->n_seqs; i++) {
        const sched_seq *q = &st->seqs[i];
        pl->action[i] = q->phase == SCHED_DECODING ? SCHED_ACT_DECODE_CPU : SCHED_ACT_IDLE;
        pl->chunk[i] = 0;
        if (q->phase != SCHED_WAITING) n_run++;
    }
    int64_t gfree = 0, hfree = st->host_blocks_free;
    admit_fcfs(st, &pol->cfg, pl, SCHED_TIER_CPU, &gfree, &hfree, 0, n_run);
    pl->strategy = SCHED_SPLIT; /* two halves, both attended on the CPU */
    fill_work(st, pl);
    pol->sb1 = half_cohort(&pl->work);
    return EX_TWO;
}

exec_mode policy_plan(policy *pol, const sim_hw *h, const sched_state *st, sched_plan *pl) {
    pl->n_gpu = pl->n_cpu = pl->n_prefill = pl->n_admit = 0;
    pl->n_to_host = pl->n_to_gpu = pl->n_preempt = 0;
    exec_mode m;
    switch (pol->kind) {
    case POL_VLLM: m = plan_vllm(pol, st, pl); break;
    case POL_FASTDECODE: m = plan_fastdecode(pol, st, pl); break;
    case POL_NEO: m = plan_neo(pol, h, st, pl); break;
    case POL_NEO_BASE: m = plan_neo_base(pol, st, pl); break;
    default:
        if (apex_sched_plan(st, &h->belief, pol->use_correction ? &pol->corr : NULL,
                            &pol->cfg, &pol->scratch, pl) != SCHED_OK)
            return EX_GPU_ONLY;
        fill_work(st, pl);
        m = pl->strategy == SCHED_OVERLAP ? EX_OVERLAP
            : pl->strategy == SCHED_GPU_ONLY ? EX_GPU_ONLY : EX_TWO;
        if (pl->strategy == SCHED_PIPELINE)
            pol->sb1 = (sub_batch){0, 0, pl->work.cpu_seqs, pl->work.cpu_tokens, 0};
        else if (pl->strategy == SCHED_SPLIT)
            pol->sb1 = half_cohort(&pl->work);
        break;
    }
    fill_work(st, pl);
    return m;
}

/* Online correction: each measured component against the uncorrected
 * profile's prediction of the same work. */
void policy_observe(policy *pol, const sim_hw *h, exec_mode m, const sched_work *w,
                    const step_out *o) {
    if (!pol->use_correction) return;
    const apex_profile *p = &h->belief;
    const sub_batch *b = &pol->sb1;
    if (w->cpu_seqs > 0 && o->catt > 0) {
        double pc = apex_t_catt(p, w->cpu_tokens, w->cpu_seqs, h->threads);
        if (m == EX_TWO && b->cpu_seqs > 0 && b->cpu_seqs < w->cpu_seqs) /* two halves */
            pc = apex_t_catt(p, w->cpu_tokens - b->cpu_tokens, w->cpu_seqs - b->cpu_seqs,
                             h->threads) +
                 apex_t_catt(p, b->cpu_tokens, b->cpu_seqs, h->threads);
        apex_correction_update(&pol->corr, APEX_C_CATT, pc, o->catt);
    }
    if (w->gpu_tokens > 0)
        apex_correction_update(&pol->corr, APEX_C_GATT, apex_t_gatt(p, w->gpu_tokens), o->gatt);
    double lin_pred =
        m == EX_TWO
            ? apex_t_lin(p, w->gpu_seqs + w->cpu_seqs + w->prefill_tokens - b->gpu_seqs -
                                b->cpu_seqs - b->prefill_tokens) +
                  apex_t_lin(p, b->gpu_seqs + b->cpu_seqs + b->prefill_tokens)
            : apex_t_lin(p, w->gpu_seqs + w->prefill_tokens + (m == EX_OVERLAP ? w->cpu_seqs : 0));
    apex_correction_update(&pol->corr, APEX_C_LIN, lin_pred, o->lin);
}
