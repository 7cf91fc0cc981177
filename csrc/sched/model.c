/* model.c - step-time predictions for the four strategies.
 *
 * Per layer l of L (step-level profile values divided by L):
 *   lin_l(r)  linear layers over r rows     gatt_l   GPU decode attention
 *   pre_l     prefill's attention part      catt_l   CPU attention of the cohort
 *   cpu_l(C)  = d2h(cohort q,k,v) + catt_l + h2d(cohort out) + sync
 *
 *   GPU-only   step = o + L * (lin_l(G+P) + gatt_l + pre_l)
 *   overlap    step = o + L * (lin_l(G+C+P) + max(gatt_l + pre_l, cpu_l))
 *              one batch, so the CPU branch can hide only under the GPU
 *              branch's attention; linear layers read the weights once.
 *   two sub-batches (k = 0, 1), each a chain per layer [its linear layers]
 *   -> [its attention: GPU part and CPU part in parallel] -> next layer,
 *   the GPU stream alternating between the two chains' GPU work:
 *              step = o + L * max(GPU_l, CPU_l, chain0_l, chain1_l)
 *                GPU_l   = lin_l(b0) + att0_l + lin_l(b1) + att1_l  (GPU busy)
 *                CPU_l   = cpu0_l + cpu1_l                         (CPU busy)
 *                chaink_l = lin_l(bk) + max(attk_l, cpuk_l)  (a chain is serial)
 *     pipeline   (NEO's asymmetric form) b0 = G + P on the GPU, b1 = the whole
 *              cohort C on the CPU: the cohort's attention hides under
 *              sub-batch 0's whole layer, but its linear layers are a second
 *              launch of the same GEMMs (every weight read twice) and its own
 *              chain stays serial: = o + L * (lin_l(C) + max(b0_l, cpu_l(C))).
 *     split      b0 = G + P + C/2 (GPU attention and half the cohort's CPU
 *              attention in parallel), b1 = the other C/2: while the CPU
 *              attends one half, the GPU runs the other half's linear layers.
 *              The form for a CPU-bound step (the CPU stays busy; the
 *              cohort's linear layers hide under CPU attention), at the price
 *              of the second weight read. Halves are priced with C/2
 *              sequences and half the tokens each (lin over max(C/2, 1) rows),
 *              so the prediction stays monotone in C.
 * Migrations and host-bound prefill KV use the copy engines concurrently:
 * step = max(step, link busy time).
 */
#include "csrc/sched/model_internal.h"

#include <math.h>

const char *sched_strategy_name(sched_strategy s) {
    switch (s) {
    case SCHED_GPU_ONLY: return "gpu_only";
    case SCHED_OVERLAP: return "overlap";
    case SCHED_PIPELINE: return "pipeline";
    case SCHED_SPLIT: return "split";
    default: return "unknown";
    }
}

double apex_kv_bytes_per_token(const apex_model_geom *g) {
    return 2.0 * g->n_kv_heads * g->head_dim * g->kv_bytes * g->n_layers;
}
double apex_cohort_d2h_bytes(const apex_model_geom *g) {
    return (double)(g->n_q_heads + 2 * g->n_kv_heads) * g->head_dim * g->act_bytes;
}
double apex_cohort_h2d_bytes(const apex_model_geom *g) {
    return (double)g->n_q_heads * g->head_dim * g->act_bytes;
}

static inline double fac(const apex_correction *c, int k) { return c ? c->f[k] : 1.0; }

void model_prepare(model_ctx *m, const apex_profile *p, const apex_correction *corr,
                   int32_t threads) {
    m->p = p;
    m->L = p->geom.n_layers;
    m->threads = threads > 0 ? threads : p->cpu_threads;
    for (int k = 0; k < APEX_C_N; k++) m->f[k] = fac(corr, k);
    m->d2h_per_seq = apex_cohort_d2h_bytes(&p->geom) / p->d2h.bw_Bps;
    m->h2d_per_seq = apex_cohort_h2d_bytes(&p->geom) / p->h2d.bw_Bps;
    m->kv_tok_B = apex_kv_bytes_per_token(&p->geom);
}

void model_components(const model_ctx *m, const sched_work *w, model_comp *c) {
    const apex_profile *p = m->p;
    double L = m->L;
    double P = w->prefill_tokens > 0 ? w->prefill_tokens : 0;
    double pref_extra = 0;
    if (P > 0) {
        pref_extra = apex_t_pref(p, P) - apex_t_lin(p, P);
        if (pref_extra < 0) pref_extra = 0;
    }
    c->lin_b0 = m->f[APEX_C_LIN] * apex_t_lin(p, w->gpu_seqs + P);
    c->lin_all = m->f[APEX_C_LIN] * apex_t_lin(p, w->gpu_seqs + w->cpu_seqs + P);
    c->lin_b1 = m->f[APEX_C_LIN] * apex_t_lin(p, w->cpu_seqs);
    c->gatt = m->f[APEX_C_GATT] * apex_t_gatt(p, w->gpu_tokens);
    c->pref = m->f[APEX_C_PREF] * pref_extra;
    c->catt = m->f[APEX_C_CATT] * apex_t_catt(p, w->cpu_tokens, w->cpu_seqs, m->threads);
    double cpu_l = 0;
    if (w->cpu_seqs > 0) {
        double pcie = p->d2h.lat_s + p->h2d.lat_s +
                      w->cpu_seqs * (m->d2h_per_seq + m->h2d_per_seq);
        cpu_l = c->catt / L + m->f[APEX_C_PCIE] * pcie + p->layer_sync_s;
    }
    c->cpu_l = cpu_l;
    double h = w->cpu_seqs * 0.5;
    c->lin_h0 = m->f[APEX_C_LIN] * apex_t_lin(p, w->gpu_seqs + h + P);
    c->lin_h1 = h > 0 ? m->f[APEX_C_LIN] * apex_t_lin(p, h > 1 ? h : 1) : 0;
    double cpu_h = 0;
    if (h > 0) {
        double pcie = p->d2h.lat_s + p->h2d.lat_s + h * (m->d2h_per_seq + m->h2d_per_seq);
        cpu_h = m->f[APEX_C_CATT] * apex_t_catt(p, w->cpu_tokens * 0.5, h, m->threads) / L +
                m->f[APEX_C_PCIE] * pcie + p->layer_sync_s;
    }
    c->cpu_h_l = cpu_h;
    double kvB = m->kv_tok_B;
    double d2h = 0, h2d = 0;
    if (w->migrate_d2h_tokens + w->prefill_host_tokens > 0)
        d2h = apex_t_link(&p->d2h, (w->migrate_d2h_tokens + w->prefill_host_tokens) * kvB);
    if (w->migrate_h2d_tokens > 0) h2d = apex_t_link(&p->h2d, w->migrate_h2d_tokens * kvB);
    c->link = m->f[APEX_C_PCIE] * (d2h > h2d ? d2h : h2d);
}

static inline double dmax(double a, double b) { return a > b ? a : b; }

/* Per-layer period of two pipelined sub-batches (see the header comment). */
static double two_chain_l(double lin0, double att0, double cpu0, double lin1, double att1,
                          double cpu1) {
    double t = dmax(lin0 + att0 + lin1 + att1, cpu0 + cpu1);
    t = dmax(t, lin0 + dmax(att0, cpu0));
    return dmax(t, lin1 + dmax(att1, cpu1));
}

double model_total(const model_ctx *m, const model_comp *c, sched_strategy s,
                   double *gpu_busy) {
    double L = m->L, o = m->p->step_overhead_s, t, g;
    double att_l = (c->gatt + c->pref) / L;
    switch (s) {
    case SCHED_OVERLAP: {
        double lin_l = c->lin_all / L;
        double br = att_l > c->cpu_l ? att_l : c->cpu_l;
        t = o + L * (lin_l + br);
        g = c->lin_all + c->gatt + c->pref;
        break;
    }
    case SCHED_PIPELINE:
        t = o + L * two_chain_l(c->lin_b0 / L, att_l, 0, c->lin_b1 / L, 0, c->cpu_l);
        g = c->lin_b0 + c->lin_b1 + c->gatt + c->pref;
        break;
    case SCHED_SPLIT:
        t = o + L * two_chain_l(c->lin_h0 / L, att_l, c->cpu_h_l, c->lin_h1 / L, 0, c->cpu_h_l);
        g = c->lin_h0 + c->lin_h1 + c->gatt + c->pref;
        break;
    default: /* GPU-only: the cohort, if any, is not run */
        t = o + c->lin_b0 + c->gatt + c->pref;
        g = c->lin_b0 + c->gatt + c->pref;
        break;
    }
    if (c->link > t) t = c->link;
    if (gpu_busy) *gpu_busy = g;
    return t;
}

void apex_model_predict(const apex_profile *p, const apex_correction *corr,
                        int32_t threads, sched_strategy s, const sched_work *w,
                        sched_pred *out) {
    model_ctx m;
    model_comp c;
    sched_work ww = *w;
    if (s == SCHED_GPU_ONLY) { ww.cpu_seqs = 0; ww.cpu_tokens = 0; }
    model_prepare(&m, p, corr, threads);
    model_components(&m, &ww, &c);
    out->total_s = model_total(&m, &c, s, &out->gpu_s);
    out->cpu_s = (s == SCHED_SPLIT ? 2 * c.cpu_h_l : c.cpu_l) * m.L;
    out->link_s = c.link;
    out->lin_s = s == SCHED_OVERLAP    ? c.lin_all
                 : s == SCHED_PIPELINE ? c.lin_b0 + c.lin_b1
                 : s == SCHED_SPLIT    ? c.lin_h0 + c.lin_h1
                                       : c.lin_b0;
    out->gatt_s = c.gatt;
    out->catt_s = c.catt;
    out->pref_s = c.pref;
}

/* ------------------------------------------------------- online correction */

void apex_correction_init(apex_correction *c) {
    for (int k = 0; k < APEX_C_N; k++) { c->f[k] = 1.0; c->n_updates[k] = 0; }
    c->alpha = 0.2;
    c->max_step = 1.5;
    c->min_factor = 0.2;
    c->max_factor = 5.0;
}

sched_status apex_correction_update(apex_correction *c, int k, double predicted_s,
                                    double measured_s) {
    if (!c || k < 0 || k >= APEX_C_N)
        return sched_fail(SCHED_ERR_INVALID, "correction_update: bad component %d", k);
    if (!(predicted_s > 0) || !(measured_s > 0) || !isfinite(predicted_s) ||
        !isfinite(measured_s))
        return SCHED_OK; /* nothing to learn from */
    double target = measured_s / predicted_s; /* factor that would have been right */
    double cur = c->f[k];
    double lo = cur / c->max_step, hi = cur * c->max_step;
    if (target < lo) target = lo;  /* one outlier moves it by a bounded amount */
    if (target > hi) target = hi;
    double nf = (1 - c->alpha) * cur + c->alpha * target;
    if (nf < c->min_factor) nf = c->min_factor;
    if (nf > c->max_factor) nf = c->max_factor;
    c->f[k] = nf;
    c->n_updates[k]++;
    return SCHED_OK;
}
