/* model_internal.h - the model's fast path, shared by model.c and sched.c. */
#ifndef APEX_SCHED_MODEL_INTERNAL_H
#define APEX_SCHED_MODEL_INTERNAL_H

#include "csrc/sched/sched.h"

typedef struct model_ctx {
    const apex_profile *p;
    double L;
    int32_t threads;
    double f[APEX_C_N];
    double d2h_per_seq, h2d_per_seq; /* s per cohort sequence per layer */
    double kv_tok_B;
} model_ctx;

/* Corrected component times of one step's work (s per step unless _l). */
typedef struct model_comp {
    double lin_b0;  /* linear over GPU cohort + prefill rows          */
    double lin_all; /* linear over every row (one batch)              */
    double lin_b1;  /* linear over the CPU cohort alone (second launch) */
    double gatt, pref, catt;
    double cpu_l;   /* CPU branch per layer incl. copies and sync     */
    /* split cohort: sub-batch 0 = GPU cohort + prefill + half the cohort,
     * sub-batch 1 = the other half (C/2 sequences, half the tokens each) */
    double lin_h0;  /* linear over G + P + C/2 rows                   */
    double lin_h1;  /* linear over max(C/2, 1) rows                   */
    double cpu_h_l; /* CPU branch per layer of one half               */
    double link;    /* copy-engine time of migrations / host prefill KV */
} model_comp;

void model_prepare(model_ctx *m, const apex_profile *p, const apex_correction *corr,
                   int32_t threads);
void model_components(const model_ctx *m, const sched_work *w, model_comp *c);
double model_total(const model_ctx *m, const model_comp *c, sched_strategy s,
                   double *gpu_busy);

#endif
