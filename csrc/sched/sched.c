/* sched.c - apex_sched_plan: one scheduling decision.
 *
 * Passes over the sequences (given in priority order, oldest first):
 *  1. classify; count the GPU blocks this step's growth needs;
 *  2. if the GPU pool cannot hold the growth, move the lowest-priority GPU
 *     decoders to the host (or preempt them when the host is full or off);
 *  3. promote host decoders to the GPU while the GPU pool has spare blocks
 *     (keeping gpu_horizon tokens of growth per GPU sequence free);
 *  4. choose the strategy (GPU-only, overlap, pipeline, split) and the CPU
 *     cohort: for each allowed strategy the largest cohort meeting the
 *     latency target (binary search, the model is monotone) and, within it,
 *     the cohort maximising decode tokens/s (quasi-concave for k >= 1: a
 *     second binary search); all candidates run when idling some would only
 *     make the worst-off request's per-token latency longer;
 *  5. prefill: continue partial prompts, then admit waiting requests FCFS
 *     (an admission takes the blocks of its whole prompt, plus one)
 *     to the GPU tier when it has room (and growth headroom), else to the
 *     host tier when a prefix of the waiting queue raises the projected
 *     cohort's decode rate within the target, with the chunk shrunk to
 *     respect the latency target.
 * O(n + log n * strategies) model evaluations, no allocation.
 */
#include "csrc/sched/model_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void sched_config_default(sched_config *c) {
    memset(c, 0, sizeof *c);
    c->strategies = 0;
    c->tpot_target_s = 0;
    c->max_batch = 256;
    c->prefill_budget = 2048;
    c->cpu_threads = 0;
    c->host_tier = 1;
    c->max_wait_steps = 4;
    c->gpu_reserve_frac = 0.02;
    c->ctx_horizon = 512;
    c->gpu_horizon = 0;
}

sched_status sched_scratch_init(sched_scratch *s, int32_t capacity) {
    if (!s || capacity <= 0)
        return sched_fail(SCHED_ERR_INVALID, "sched_scratch_init: capacity must be > 0");
    s->idx = malloc(sizeof *s->idx * (size_t)capacity);
    s->cum_tok = malloc(sizeof *s->cum_tok * ((size_t)capacity + 1));
    if (!s->idx || !s->cum_tok) {
        free(s->idx);
        free(s->cum_tok);
        s->idx = NULL;
        s->cum_tok = NULL;
        return sched_fail(SCHED_ERR_NO_MEMORY, "sched_scratch_init: out of memory");
    }
    s->capacity = capacity;
    return SCHED_OK;
}

void sched_scratch_free(sched_scratch *s) {
    if (!s) return;
    free(s->idx);
    free(s->cum_tok);
    s->idx = NULL;
    s->cum_tok = NULL;
    s->capacity = 0;
}

static inline int64_t blocks_for(int64_t tokens, int32_t bt) { return (tokens + bt - 1) / bt; }

typedef struct eval_ctx {
    model_ctx m;
    sched_work base;       /* GPU cohort, prefill, migrations    */
    const double *cum_tok; /* cum_tok[k]: tokens of the first k cohort candidates */
    double target;
    int n_strat_ok[SCHED_N_STRATEGIES];
} eval_ctx;

/* Predicted time and decode rate with the first k candidates as cohort. */
static double eval_k(const eval_ctx *e, sched_strategy s, int k, double *rate) {
    sched_work w = e->base;
    w.cpu_seqs = k;
    w.cpu_tokens = e->cum_tok[k];
    model_comp c;
    model_components(&e->m, &w, &c);
    double t = model_total(&e->m, &c, s, NULL);
    if (rate) *rate = t > 0 ? (e->base.gpu_seqs + k) / t : 0;
    return t;
}

/* Best cohort size in [kmin, kmax] for strategy s; returns the rate. */
static double best_k(const eval_ctx *e, sched_strategy s, int kmin, int kmax, int *kbest,
                     double *tbest) {
    int hi = kmax;
    if (e->target > 0) { /* largest k with t(k) <= target (t is monotone in k) */
        double t = eval_k(e, s, kmin, NULL);
        if (t > e->target) hi = kmin;
        else {
            int lo = kmin; /* t(lo) <= target */
            while (lo < hi) {
                int mid = lo + (hi - lo + 1) / 2;
                if (eval_k(e, s, mid, NULL) <= e->target) lo = mid;
                else hi = mid - 1;
            }
            hi = lo;
        }
    }
    /* First k in [kmin, hi] with rate(k+1) <= rate(k). */
    int lo = kmin, h = hi;
    while (lo < h) {
        int mid = lo + (h - lo) / 2;
        double r0, r1;
        eval_k(e, s, mid, &r0);
        eval_k(e, s, mid + 1, &r1);
        if (r1 > r0 * (1 + 1e-9)) lo = mid + 1;
        else h = mid;
    }
    double r;
    *tbest = eval_k(e, s, lo, &r);
    /* With a latency target, a host decoder left out of the cohort idles:
     * run round-robin, its per-token latency is about t(k) * ceil(kmax/k).
     * If running every candidate is no slower for the worst-off request,
     * run them all, target or not (idling only adds latency then). */
    if (e->target > 0 && lo < kmax && lo > 0) {
        double ra, ta = eval_k(e, s, kmax, &ra);
        if (ta <= *tbest * ceil((double)kmax / lo)) {
            *tbest = ta;
            r = ra;
            lo = kmax;
        }
    }
    *kbest = lo;
    return r;
}

/* Decode rate (and step time) of the best hybrid strategy with a cohort of
 * `seqs` sequences holding `tok` tokens on top of e->base's GPU cohort
 * (decode only: no prefill, no migrations). GPU-only counts when seqs == 0. */
static double cohort_rate(const eval_ctx *e, uint32_t mask, double seqs, double tok,
                          double *t_out) {
    sched_work w;
    memset(&w, 0, sizeof w);
    w.gpu_seqs = e->base.gpu_seqs;
    w.gpu_tokens = e->base.gpu_tokens;
    w.cpu_seqs = seqs;
    w.cpu_tokens = tok;
    double best = -1, tb = 0;
    for (int s = 0; s < SCHED_N_STRATEGIES; s++) {
        if (!(mask & (1u << s)) || (s == SCHED_GPU_ONLY) != (seqs <= 0)) continue;
        model_comp cc;
        model_components(&e->m, &w, &cc);
        double t = model_total(&e->m, &cc, (sched_strategy)s, NULL);
        double r = t > 0 ? (w.gpu_seqs + w.cpu_seqs) / t : 0;
        if (r > best) { best = r; tb = t; }
    }
    if (t_out) *t_out = tb;
    return best;
}

/* How many of the waiting requests from index `from` on (FCFS) should go to
 * the host tier this step: the prefix of j of them (j = 1, 2, 4, ...) with
 * the best decode rate of the projected cohort -- host decoders now plus
 * host prefills in flight plus the j, every member's context projected
 * ctx_horizon tokens ahead -- if that rate beats the projected cohort
 * without them and the step stays within the latency target; else 0.
 * A prefix, not one request: a two-sub-batch form pays off only once the
 * cohort is big enough, so one more request alone may not. O(n) + O(log n)
 * model evaluations. */
static int host_admissions(const eval_ctx *e, const sched_config *cfg, uint32_t mask,
                           const sched_state *st, int from, int k_run, double run_tok,
                           double pend_n, double pend_tok, int64_t hfree, int slots) {
    double H = cfg->ctx_horizon > 0 ? cfg->ctx_horizon : 0;
    double n0 = k_run + pend_n, tok0 = run_tok + pend_tok + H * n0;
    double r_now = cohort_rate(e, mask, n0, tok0, NULL);
    int best_j = 0, j = 0, next = 1;
    double best_r = r_now * (1 + 1e-9), tok = tok0;
    int evaluated = 0;
    for (int i = from; i <= st->n_seqs; i++) {
        int stop = i == st->n_seqs || j >= slots;
        const sched_seq *q = stop ? NULL : &st->seqs[i];
        if (q && q->phase != SCHED_WAITING) continue;
        if (q) {
            int64_t nb = blocks_for(q->ctx_len + q->prompt_left + 1, st->block_tokens);
            if (nb > hfree) stop = 1;
            else {
                hfree -= nb;
                j++;
                tok += (double)q->ctx_len + q->prompt_left + 1 + H;
            }
        }
        /* evaluate at j = 1, 2, 4, ... and at the last j */
        if (j == 0 || evaluated == j || (!stop && j != next)) {
            if (stop) break;
            continue;
        }
        if (j == next) next *= 2;
        evaluated = j;
        double t, r = cohort_rate(e, mask, n0 + j, tok, &t);
        if (e->target > 0 && t > e->target) break; /* t grows with j */
        if (r > best_r) { best_r = r; best_j = j; }
        if (stop) break;
    }
    return best_j;
}

sched_status apex_sched_plan(const sched_state *st, const apex_profile *p,
                             const apex_correction *corr, const sched_config *cfg,
                             sched_scratch *scratch, sched_plan *plan) {
    if (!st || !p || !cfg || !scratch || !plan)
        return sched_fail(SCHED_ERR_INVALID, "sched_plan: NULL argument");
    int n = st->n_seqs;
    if (n < 0 || (n > 0 && !st->seqs) || st->block_tokens <= 0)
        return sched_fail(SCHED_ERR_INVALID, "sched_plan: bad state (n_seqs %d, block_tokens %d)",
                          n, st->block_tokens);
    if (n > plan->capacity || !plan->action || !plan->chunk)
        return sched_fail(SCHED_ERR_INVALID, "sched_plan: plan arrays hold %d, need %d",
                          plan->capacity, n);
    if (n > scratch->capacity)
        return sched_fail(SCHED_ERR_INVALID, "sched_plan: scratch holds %d, need %d",
                          scratch->capacity, n);
    if (!(cfg->tpot_target_s >= 0) || cfg->max_batch <= 0 || cfg->prefill_budget < 0)
        return sched_fail(SCHED_ERR_INVALID, "sched_plan: bad config");

    const int32_t bt = st->block_tokens;
    uint32_t mask = cfg->strategies ? cfg->strategies : (1u << SCHED_N_STRATEGIES) - 1;
    int32_t *act = plan->action, *chunk = plan->chunk;
    int64_t gfree = st->gpu_blocks_free, hfree = st->host_blocks_free;
    int64_t reserve = (int64_t)ceil(cfg->gpu_reserve_frac * (double)st->gpu_blocks_total);

    plan->n_gpu = plan->n_cpu = plan->n_prefill = plan->n_admit = 0;
    plan->n_to_host = plan->n_to_gpu = plan->n_preempt = 0;
    sched_work base;
    memset(&base, 0, sizeof base);

    /* 1. classify; growth needs of GPU-resident sequences */
    int64_t need = 0;
    int n_run = 0, n_host_dec = 0;
    for (int i = 0; i < n; i++) {
        const sched_seq *q = &st->seqs[i];
        act[i] = SCHED_ACT_IDLE;
        chunk[i] = 0;
        if (q->phase == SCHED_DECODING) {
            n_run++;
            if (q->tier == SCHED_TIER_GPU) {
                act[i] = SCHED_ACT_DECODE_GPU;
                if (q->ctx_len % bt == 0) need++;
            } else {
                n_host_dec++;
            }
        } else if (q->phase == SCHED_PREFILLING) {
            n_run++;
        }
    }
    /* 2. GPU pool pressure: evict from the back */
    for (int i = n - 1; i >= 0 && need > gfree; i--) {
        const sched_seq *q = &st->seqs[i];
        if (act[i] != SCHED_ACT_DECODE_GPU) continue;
        int64_t nb = blocks_for(q->ctx_len, bt);
        if (q->ctx_len % bt == 0) need--;
        gfree += nb;
        if (cfg->host_tier && hfree >= nb + 1) {
            act[i] = SCHED_ACT_TO_HOST;
            hfree -= nb;
            base.migrate_d2h_tokens += q->ctx_len;
            plan->n_to_host++;
        } else {
            act[i] = SCHED_ACT_PREEMPT;
            n_run--;
            plan->n_preempt++;
        }
    }
    gfree -= need;
    /* 3. promotions host -> GPU while there is spare room (oldest first) */
    int64_t n_gpu_dec = 0;
    for (int i = 0; i < n; i++) n_gpu_dec += act[i] == SCHED_ACT_DECODE_GPU;
    for (int i = 0; i < n && n_host_dec > 0; i++) {
        const sched_seq *q = &st->seqs[i];
        if (q->phase != SCHED_DECODING || q->tier != SCHED_TIER_CPU) continue;
        int64_t nb = blocks_for(q->ctx_len + 1, bt);
        /* the same growth headroom as a GPU admission (see step 5) */
        if (gfree - nb - blocks_for((int64_t)cfg->gpu_horizon * (n_gpu_dec + 1), bt) < reserve)
            break;
        n_gpu_dec++;
        act[i] = SCHED_ACT_TO_GPU;
        gfree -= nb;
        hfree += blocks_for(q->ctx_len, bt);
        base.migrate_h2d_tokens += q->ctx_len;
        plan->n_to_gpu++;
        n_host_dec--;
    }
    /* GPU cohort */
    for (int i = 0; i < n; i++)
        if (act[i] == SCHED_ACT_DECODE_GPU) {
            base.gpu_seqs += 1;
            base.gpu_tokens += st->seqs[i].ctx_len + 1;
        }
    /* 4. cohort candidates: overdue host sequences first, then the others */
    int nc = 0, forced = 0;
    int32_t *idx = scratch->idx;
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < n; i++) {
            const sched_seq *q = &st->seqs[i];
            if (q->phase != SCHED_DECODING || q->tier != SCHED_TIER_CPU ||
                act[i] != SCHED_ACT_IDLE)
                continue;
            int overdue = q->waited >= cfg->max_wait_steps;
            if ((pass == 0) != overdue) continue;
            idx[nc++] = i;
            if (pass == 0) forced++;
        }
    double *cum = scratch->cum_tok;
    cum[0] = 0;
    for (int k = 0; k < nc; k++) cum[k + 1] = cum[k] + st->seqs[idx[k]].ctx_len + 1;

    eval_ctx e;
    model_prepare(&e.m, p, corr, cfg->cpu_threads);
    e.base = base;
    e.cum_tok = cum;
    e.target = cfg->tpot_target_s;

    /* The prefill already in flight (partial prompts) is part of every
     * candidate's step; admissions are decided after the cohort. */
    int64_t budget = cfg->prefill_budget;
    double pend_n = 0, pend_tok = 0; /* host sequences still prefilling */
    for (int i = 0; i < n; i++) {
        const sched_seq *q = &st->seqs[i];
        if (q->phase == SCHED_PREFILLING && q->tier == SCHED_TIER_CPU) {
            pend_n += 1;
            pend_tok += (double)q->ctx_len + q->prompt_left + 1;
        }
    }
    for (int i = 0; i < n && budget > 0; i++) {
        const sched_seq *q = &st->seqs[i];
        if (q->phase != SCHED_PREFILLING || q->prompt_left <= 0) continue;
        int64_t c = q->prompt_left < budget ? q->prompt_left : budget;
        /* blocks for the whole prompt were taken at admission */
        if (q->tier == SCHED_TIER_GPU) {
            act[i] = SCHED_ACT_PREFILL_GPU;
        } else {
            act[i] = SCHED_ACT_PREFILL_HOST;
            e.base.prefill_host_tokens += (double)c;
        }
        chunk[i] = (int32_t)c;
        budget -= c;
        e.base.prefill_tokens += (double)c;
        plan->n_prefill++;
    }

    sched_strategy best_s = SCHED_GPU_ONLY;
    int best_kk = 0;
    double best_rate = -1, best_t = 0;
    for (int s = 0; s < SCHED_N_STRATEGIES; s++) {
        if (!(mask & (1u << s))) continue;
        int kk;
        double t, r;
        if (s == SCHED_GPU_ONLY) {
            if (forced > 0 && (mask & ~1u)) continue; /* overdue host seqs must run */
            kk = 0;
            t = eval_k(&e, SCHED_GPU_ONLY, 0, &r);
        } else {
            if (nc == 0) continue;
            /* k >= 1: a two-sub-batch form pays a fixed second launch that
             * only a larger cohort amortises, so k = 0 is no reference */
            r = best_k(&e, (sched_strategy)s, forced > 0 ? forced : 1, nc, &kk, &t);
            if (kk == 0) continue; /* identical to GPU-only */
        }
        if (r > best_rate * (1 + 1e-9)) { best_rate = r; best_s = (sched_strategy)s; best_kk = kk; best_t = t; }
    }
    if (best_rate < 0) { /* only hybrid strategies allowed and no cohort */
        best_s = SCHED_GPU_ONLY;
        best_kk = 0;
        best_t = eval_k(&e, SCHED_GPU_ONLY, 0, &best_rate);
    }
    for (int k = 0; k < best_kk; k++) act[idx[k]] = SCHED_ACT_DECODE_CPU;

    /* 5. admissions, FCFS, stop at the first that does not fit */
    int k_run = best_kk;
    int all_host_run = best_kk == nc;
    int32_t min_chunk = bt * 8;
    int host_quota = -1; /* host admissions that pay this step (-1: not yet computed) */
    int64_t n_gpu_res = (int64_t)base.gpu_seqs + plan->n_to_gpu; /* GPU residents */
    for (int i = 0; i < n && budget > 0; i++) {
        const sched_seq *q = &st->seqs[i];
        if (q->phase != SCHED_WAITING) continue;
        if (n_run >= cfg->max_batch) break;
        int64_t c = q->prompt_left < budget ? q->prompt_left : budget;
        if (c <= 0) break;
        int64_t need_gpu = blocks_for(q->ctx_len + q->prompt_left + 1, bt);
        /* growth headroom: every GPU sequence (this one included) is
         * projected gpu_horizon tokens ahead, so admissions do not fill the
         * pool only to evict (and later promote back) as contexts grow */
        int64_t grow = blocks_for((int64_t)cfg->gpu_horizon * (n_gpu_res + 1), bt);
        int to_gpu = gfree - need_gpu - grow >= reserve;
        if (!to_gpu) {
            /* host admission: the sequence joins the cohort next steps; it
             * must pay (the decode rate of the projected cohort rises) and
             * keep the step in target */
            if (!cfg->host_tier || !all_host_run) break;
            int64_t nb = blocks_for(q->ctx_len + q->prompt_left + 1, bt);
            if (nb > hfree) break;
            if (host_quota < 0)
                host_quota = host_admissions(&e, cfg, mask, st, i, k_run, cum[k_run], pend_n,
                                             pend_tok, hfree, cfg->max_batch - n_run);
            if (host_quota == 0) break;
            host_quota--;
            hfree -= nb;
            act[i] = SCHED_ACT_PREFILL_HOST;
            e.base.prefill_host_tokens += (double)c;
        } else {
            gfree -= need_gpu;
            act[i] = SCHED_ACT_PREFILL_GPU;
            n_gpu_res++;
        }
        chunk[i] = (int32_t)c;
        budget -= c;
        e.base.prefill_tokens += (double)c;
        plan->n_prefill++;
        plan->n_admit++;
        n_run++;
    }
    /* latency target: shrink the prefill chunks from the last one until the
     * step fits (each keeps at least min_chunk tokens, or drops out) */
    if (e.target > 0 && e.base.prefill_tokens > 0) {
        double t = eval_k(&e, best_s, best_kk, NULL);
        for (int i = n - 1; i >= 0 && t > e.target; i--) {
            if (chunk[i] <= 0) continue;
            int32_t lo = 0, hi = chunk[i];
            double p0 = e.base.prefill_tokens - chunk[i];
            double h0 = e.base.prefill_host_tokens -
                        (act[i] == SCHED_ACT_PREFILL_HOST ? chunk[i] : 0);
            while (lo < hi) { /* largest chunk with t <= target */
                int32_t mid = lo + (hi - lo + 1) / 2;
                e.base.prefill_tokens = p0 + mid;
                e.base.prefill_host_tokens = h0 + (act[i] == SCHED_ACT_PREFILL_HOST ? mid : 0);
                if (eval_k(&e, best_s, best_kk, NULL) <= e.target) lo = mid;
                else hi = mid - 1;
            }
            int32_t nc2 = lo < min_chunk ? (chunk[i] < min_chunk ? chunk[i] : min_chunk) : lo;
            chunk[i] = nc2;
            e.base.prefill_tokens = p0 + nc2;
            e.base.prefill_host_tokens = h0 + (act[i] == SCHED_ACT_PREFILL_HOST ? nc2 : 0);
            t = eval_k(&e, best_s, best_kk, NULL);
        }
    }
    if (best_s != SCHED_GPU_ONLY && best_kk == 0) best_s = SCHED_GPU_ONLY;

    /* results */
    sched_work w = e.base;
    w.cpu_seqs = best_kk;
    w.cpu_tokens = cum[0];
    for (int k = 0; k < best_kk; k++) w.cpu_tokens += st->seqs[idx[k]].ctx_len + 1;
    plan->strategy = best_s;
    plan->work = w;
    apex_model_predict(p, corr, cfg->cpu_threads, best_s, &w, &plan->pred);
    plan->n_gpu = (int32_t)w.gpu_seqs;
    plan->n_cpu = best_kk;
    plan->pred_tok_s = plan->pred.total_s > 0 ? (w.gpu_seqs + w.cpu_seqs) / plan->pred.total_s : 0;
    (void)best_t;
    return SCHED_OK;
}
