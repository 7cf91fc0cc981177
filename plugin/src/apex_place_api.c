/*
 * apex_place_api.c - apex_sched_place (apex_paged.h): the scheduler's
 * placement for an engine that owns its tables. The checks and the plan are
 * csrc/step_sched.c's (step_sched_place); this is the exported entry point.
 * It works on a claimed context: the state is the engine's, not APEX's
 * sequence tables.
 */
#include "apex/apex_paged.h"
#include "csrc/context.h"
#include "csrc/error.h"
#include "csrc/step_sched.h"

APEX_API apex_status apex_sched_place(apex_context *ctx, int32_t n, const apex_place_item *items,
                                      int64_t device_blocks, int32_t device_seqs,
                                      apex_tier *out_tier, apex_place_plan *plan) {
    if (!ctx) return apex_fail(APEX_ERR_INVALID_ARG, "apex_sched_place: context is NULL");
    apex_status st = step_sched_place(ctx, n, items, device_blocks, device_seqs, out_tier, plan);
    if (st != APEX_OK) ctx->stats.errors++;
    return st;
}
