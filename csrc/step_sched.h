/*
 * step_sched.h - the scheduler inside the engine: builds the scheduler's
 * view of the context (sequences, tiers, free blocks), runs apex_sched_plan
 * (the same pure function apex-sim runs), carries out the migrations it
 * decides, and feeds measured times back into the online correction.
 * step_sched_place is the same plan for an engine that owns its tables
 * (apex_paged.h): the state comes from the engine's items, and the engine
 * moves the KV.
 */
#ifndef APEX_STEP_SCHED_H
#define APEX_STEP_SCHED_H

#include "apex/apex.h"
#include "apex/apex_paged.h"
#include "csrc/sched/sched.h"

typedef struct step_sched {
    int enabled;
    apex_profile profile;
    apex_correction corr;
    sched_config cfg;
    sched_scratch scratch;
    sched_seq *seqs;        /* [max_seqs + waiting capacity] */
    int32_t *action, *chunk;
    int32_t capacity;
    int32_t *waited;        /* [max_seqs]: idle steps in a row per slot */
    int have_last;          /* a plan was made and not yet observed     */
    sched_pred last;        /* its prediction                           */
    double catt_mark_s;     /* CPU attention seconds at that plan        */
    /* step_sched_place's arrays, grown to the largest n placed. */
    sched_seq *pseqs;
    int32_t *paction, *pchunk;
    sched_scratch pscratch;
    int32_t pcapacity;
} step_sched;

typedef struct apex_context apex_context;

apex_status step_sched_enable(apex_context *ctx, const apex_sched_options *o);
/* Frees ctx's scheduler (NULL or never enabled: nothing); the context's
 * owner calls it before context_destroy. */
void step_sched_free(apex_context *ctx);
/* A new request took slot seq: its idle-step count starts again. */
void step_sched_forget(apex_context *ctx, int32_t seq);
apex_status step_sched_step(apex_context *ctx, int32_t n, const apex_step_item *items,
                            apex_step_decision *out, apex_step_plan *plan);
apex_status step_sched_observe(apex_context *ctx, double step_seconds);
apex_status step_sched_place(apex_context *ctx, int32_t n, const apex_place_item *items,
                             int64_t device_blocks, int32_t device_seqs, apex_tier *out_tier,
                             apex_place_plan *plan);

#endif
