/* exec.c - the "true" hardware: times one step as a per-layer event
 * timeline of the GPU stream, the CPU worker pool and the two copy engines
 * (FIFO, shared by the cohort's q/k/v/out copies, migrations and host-bound
 * prefill KV). Component times come from the truth profile with per-step
 * multiplicative noise. Independent of the scheduler's closed-form model:
 * it orders the work as the engine would and lets the dependencies decide.
 *
 * The two-sub-batch mode (APEX's pipeline and split forms, fastdecode, neo)
 * runs each sub-batch as a chain per layer: [its linear layers (post of l-1
 * + pre of l)] -> [attention of l: its GPU part inline on the stream and its
 * CPU part d2h -> CPU -> h2d, in parallel] -> ..., with the in-order GPU
 * stream alternating between the sub-batches' work in issue order. An
 * engine whose one host thread both launches the GPU work and runs the CPU
 * attention (NEO's) pays launch_s of that thread per layer and sub-batch. */
#include <math.h>
#include <string.h>

#include "sim.h"

static double noisy(sim_rng *r, double v, double rel) {
    if (v <= 0 || rel <= 0) return v;
    double f = 1 + rel * rng_normal(r);
    if (f < 1 - 3 * rel) f = 1 - 3 * rel;
    if (f > 1 + 3 * rel) f = 1 + 3 * rel;
    return v * f;
}

static double mx(double a, double b) { return a > b ? a : b; }

typedef struct chain {
    double lin_l, gatt_l;     /* per layer, on the GPU                  */
    double cpu_l;             /* per layer CPU attention (0: GPU only)  */
    double d2h_B, h2d_B;      /* per layer copies of the cohort         */
    double ready;             /* when its previous stage finished       */
} chain;

void exec_step(const sim_hw *h, exec_mode m, const sched_work *w, const sub_batch *sb1,
               double launch_s, sim_rng *rn, step_out *o) {
    const apex_profile *p = &h->truth;
    const apex_model_geom *g = &p->geom;
    double L = g->n_layers, nz = h->noise;
    int32_t th = h->threads;
    double P = w->prefill_tokens;
    double pre_x = P > 0 ? mx(0, apex_t_pref(p, P) - apex_t_lin(p, P)) : 0;
    double gatt0 = apex_t_gatt(p, w->gpu_tokens);
    double gatt = noisy(rn, gatt0, nz);
    double pref = noisy(rn, pre_x, nz);
    double fg = gatt0 > 0 ? gatt / gatt0 : 1, fpr = pre_x > 0 ? pref / pre_x : 1;
    double fl = noisy(rn, 1, nz), fc = noisy(rn, 1, nz), fp = noisy(rn, 1, nz);
    double kvB = apex_kv_bytes_per_token(g);
    double d2hB = apex_cohort_d2h_bytes(g), h2dB = apex_cohort_h2d_bytes(g);
    /* background copies, spread over the layers */
    double bg_d2h_l = (w->migrate_d2h_tokens + w->prefill_host_tokens) * kvB / L;
    double bg_h2d_l = w->migrate_h2d_tokens * kvB / L;
    double d2h_free = 0, h2d_free = 0, gpu = 0, gpu_busy = 0;
    double lin_tot = 0, catt_tot = 0, pcie_tot = 0;
    memset(o, 0, sizeof *o);

    chain c[2];
    memset(c, 0, sizeof c);
    int nch = 1;
    double C = w->cpu_seqs, Ct = w->cpu_tokens;
    switch (m) {
    case EX_GPU_ONLY:
        c[0].lin_l = fl * apex_t_lin(p, w->gpu_seqs + P) / L;
        c[0].gatt_l = (gatt + pref) / L;
        break;
    case EX_OVERLAP: /* one chain, attention on both sides */
        c[0].lin_l = fl * apex_t_lin(p, w->gpu_seqs + C + P) / L;
        c[0].gatt_l = (gatt + pref) / L;
        c[0].cpu_l = C > 0 ? fc * apex_t_catt(p, Ct, C, th) / L : 0;
        c[0].d2h_B = C * d2hB;
        c[0].h2d_B = C * h2dB;
        break;
    case EX_TWO: { /* sub-batch 1 as given, sub-batch 0 the rest */
        nch = 2;
        sub_batch sb[2];
        sb[1] = *sb1;
        sb[0] = (sub_batch){w->gpu_seqs - sb1->gpu_seqs, w->gpu_tokens - sb1->gpu_tokens,
                            C - sb1->cpu_seqs, Ct - sb1->cpu_tokens,
                            P - sb1->prefill_tokens};
        for (int k = 0; k < 2; k++) {
            const sub_batch *b = &sb[k];
            double Pk = b->prefill_tokens;
            double px = Pk > 0 ? mx(0, apex_t_pref(p, Pk) - apex_t_lin(p, Pk)) : 0;
            double rows = b->gpu_seqs + b->cpu_seqs + Pk;
            c[k].lin_l = rows > 0 ? fl * apex_t_lin(p, rows) / L : 0;
            c[k].gatt_l = (fg * (b->gpu_seqs > 0 ? apex_t_gatt(p, b->gpu_tokens) : 0) +
                           fpr * px) / L;
            c[k].cpu_l = b->cpu_seqs > 0 ? fc * apex_t_catt(p, b->cpu_tokens, b->cpu_seqs, th) / L
                                         : 0;
            c[k].d2h_B = b->cpu_seqs * d2hB;
            c[k].h2d_B = b->cpu_seqs * h2dB;
        }
        break;
    }
    }
    double cpu_free = 0;
    for (int l = 0; l < (int)L; l++) {
        /* background copy traffic of this layer enters the queues first */
        if (bg_d2h_l > 0) d2h_free = mx(d2h_free, gpu) + fp * bg_d2h_l / p->d2h.bw_Bps;
        if (bg_h2d_l > 0) h2d_free = mx(h2d_free, gpu) + fp * bg_h2d_l / p->h2d.bw_Bps;
        for (int k = 0; k < nch; k++) {
            chain *ch = &c[k];
            if (ch->lin_l <= 0 && ch->cpu_l <= 0 && ch->gatt_l <= 0) continue;
            double st = mx(gpu, ch->ready); /* waits for its previous stage */

            lin_tot += ch->lin_l;
            gpu_busy += ch->lin_l + ch->gatt_l;
            /* the engine's host thread launches each stage (NEO: while the
             * other sub-batch's work runs), serial with its CPU attention */
            double lnch = nch == 2 ? launch_s : 0;
            if (ch->cpu_l <= 0) { /* all on the GPU */
                if (lnch > 0) cpu_free = mx(cpu_free, st) + lnch;
                gpu = st + ch->lin_l + ch->gatt_l;
                continue;
            }
            double qkv_done = st + ch->lin_l * (nch == 1 ? 0.3 : 1.0);
            double d0 = mx(d2h_free, qkv_done);
            double dt = fp * (p->d2h.lat_s + ch->d2h_B / p->d2h.bw_Bps);
            d2h_free = d0 + dt;
            double c0 = mx(cpu_free, d2h_free);
            cpu_free = c0 + ch->cpu_l + p->layer_sync_s + lnch;
            catt_tot += ch->cpu_l;
            double h0 = mx(h2d_free, cpu_free);
            double ht = fp * (p->h2d.lat_s + ch->h2d_B / p->h2d.bw_Bps);
            h2d_free = h0 + ht;
            pcie_tot += dt + ht;
            if (nch == 1) {
                /* overlap: GPU attention meanwhile; O projection and MLP
                 * (70% of the layer's linear work) wait for both branches */
                gpu = mx(qkv_done + ch->gatt_l, h2d_free) + ch->lin_l * 0.7;
            } else {
                /* two sub-batches: this stage was post(l-1) + pre(l); the
                 * chain's next stage waits for its attention output */
                gpu = qkv_done + ch->gatt_l;
                ch->ready = h2d_free;
            }
        }
    }
    for (int k = 0; k < nch; k++) gpu = mx(gpu, c[k].ready); /* last outputs */
    double t = p->step_overhead_s + mx(gpu, mx(d2h_free, h2d_free));
    o->t = t;
    o->gpu_busy = gpu_busy;
    o->lin = lin_tot;
    o->gatt = gatt;
    o->catt = catt_tot;
    o->pref = pref;
    o->pcie_layer = L > 0 ? pcie_tot / L : 0;
}
