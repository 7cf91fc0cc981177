#include "csrc/step_sched.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_attn/dtype_convert.h"
#include "csrc/context.h"
#include "csrc/error.h"
#include "csrc/env.h"

/* A scheduler failure as an APEX status with its message. */
static apex_status from_sched(sched_status s, const char *what) {
    if (s == SCHED_OK) return APEX_OK;
    apex_status st = s == SCHED_ERR_NO_MEMORY ? APEX_ERR_NO_MEMORY
                     : s == SCHED_ERR_NOT_FOUND || s == SCHED_ERR_MISMATCH ||
                             s == SCHED_ERR_INVALID || s == SCHED_ERR_PARSE
                         ? APEX_ERR_INVALID_ARG
                         : APEX_ERR_INTERNAL;
    return apex_fail(st, "%s: %s", what, sched_last_error());
}

static void step_sched_destroy(step_sched *s) {
    sched_scratch_free(&s->scratch);
    free(s->seqs);
    free(s->action);
    free(s->chunk);
    free(s->waited);
    sched_scratch_free(&s->pscratch);
    free(s->pseqs);
    free(s->paction);
    free(s->pchunk);
    memset(s, 0, sizeof *s);
}

void step_sched_free(apex_context *ctx) {
    if (!ctx || !ctx->sched) return;
    step_sched_destroy(ctx->sched);
    free(ctx->sched);
    ctx->sched = NULL;
}

void step_sched_forget(apex_context *ctx, int32_t seq) {
    if (ctx->sched && ctx->sched->waited) ctx->sched->waited[seq] = 0;
}

apex_status step_sched_enable(apex_context *ctx, const apex_sched_options *o) {
    if (o->weight_bytes < 0 || o->hidden < 0 || o->ffn < 0 || o->vocab < 0 ||
        !(o->tpot_target_ms >= 0) || o->prefill_budget < 0)
        return apex_fail(APEX_ERR_INVALID_ARG, "apex_sched_enable: sizes, the latency target "
                                               "and the prefill budget must be >= 0");
    if (!ctx->sched && !(ctx->sched = calloc(1, sizeof *ctx->sched)))
        return apex_fail(APEX_ERR_NO_MEMORY, "apex_sched_enable: out of memory");
    step_sched *s = ctx->sched;
    step_sched fresh;
    memset(&fresh, 0, sizeof fresh);
    const char *preset = o->gpu_preset ? o->gpu_preset : apex_env_get(APEX_ENV_GPU_PRESET);
    if (!preset || !*preset) preset = "host";
    apex_model_geom g = {
        .n_layers = ctx->cfg.n_layers, .n_q_heads = ctx->cfg.n_q_heads,
        .n_kv_heads = ctx->cfg.n_kv_heads, .head_dim = ctx->cfg.head_dim,
        .kv_bytes = (int32_t)apex_dtype_size(ctx->cfg.kv_dtype),
        .act_bytes = (int32_t)apex_dtype_size(ctx->cfg.act_dtype),
        .hidden = o->hidden, .ffn = o->ffn, .vocab = o->vocab,
    };
    const char *how = NULL;
    apex_status st = from_sched(apex_profile_obtain(preset, &g, (double)o->weight_bytes,
                                                    ctx->workers.n_threads, ctx->cfg.kv_dtype,
                                                    ctx->geom.kv_pairs, NULL, &fresh.profile,
                                                    &how),
                                "apex_sched_enable: profile");
    if (st) return st;
    apex_correction_init(&fresh.corr);
    sched_config_default(&fresh.cfg);
    fresh.cfg.tpot_target_s = o->tpot_target_ms / 1e3;
    fresh.cfg.max_batch = ctx->cfg.max_batch;
    if (o->prefill_budget) fresh.cfg.prefill_budget = o->prefill_budget;
    fresh.cfg.cpu_threads = ctx->workers.n_threads;
    /* Room for every slot and as many waiting requests again. */
    fresh.capacity = 2 * ctx->cfg.max_seqs;
    fresh.seqs = calloc((size_t)fresh.capacity, sizeof *fresh.seqs);
    fresh.action = calloc((size_t)fresh.capacity, sizeof *fresh.action);
    fresh.chunk = calloc((size_t)fresh.capacity, sizeof *fresh.chunk);
    fresh.waited = calloc((size_t)ctx->cfg.max_seqs, sizeof *fresh.waited);
    if (!fresh.seqs || !fresh.action || !fresh.chunk || !fresh.waited ||
        sched_scratch_init(&fresh.scratch, fresh.capacity) != SCHED_OK) {
        step_sched_destroy(&fresh);
        return apex_fail(APEX_ERR_NO_MEMORY, "apex_sched_enable: out of memory");
    }
    fresh.enabled = 1;
    step_sched_destroy(s);
    *s = fresh;
    fprintf(stderr, "apex: scheduler on (%s profile: %s)\n", how ? how : "?", s->profile.source);
    return APEX_OK;
}

/* Seconds the CPU tier has spent in attention so far. */
static double catt_seconds(const apex_context *ctx) {
    return ctx->dev ? (double)__atomic_load_n(&ctx->pipe.catt_ns, __ATOMIC_RELAXED) * 1e-9
                    : ctx->stats.attention_seconds;
}

/* What CPU attention really took since the last plan corrects its model
 * (nothing when APEX ran none: the correction ignores a zero). */
static void correct_catt(apex_context *ctx) {
    step_sched *s = ctx->sched;
    if (s->have_last && s->last.catt_s > 0) {
        double measured = catt_seconds(ctx) - s->catt_mark_s;
        apex_correction_update(&s->corr, APEX_C_CATT, s->last.catt_s / s->corr.f[APEX_C_CATT],
                               measured);
    }
}

apex_status step_sched_step(apex_context *ctx, int32_t n, const apex_step_item *items,
                            apex_step_decision *out, apex_step_plan *plan) {
    step_sched *s = ctx->sched;
    if (!s || !s->enabled)
        return apex_fail(APEX_ERR_INVALID_ARG, "apex_sched_step: call apex_sched_enable first");
    if (n < 0 || n > s->capacity)
        return apex_fail(APEX_ERR_OUT_OF_RANGE, "apex_sched_step: %d items, at most %d", n,
                         s->capacity);
    if (n > 0 && (!items || !out))
        return apex_fail(APEX_ERR_INVALID_ARG, "apex_sched_step: items and out must not be NULL");
    /* Check everything before changing anything. */
    for (int32_t i = 0; i < n; i++) {
        if (items[i].prompt_left < 0)
            return apex_fail(APEX_ERR_INVALID_ARG, "apex_sched_step: item %d: prompt_left %d", i,
                             items[i].prompt_left);
        if (items[i].seq == -1) {
            if (items[i].prompt_left < 1)
                return apex_fail(APEX_ERR_INVALID_ARG,
                                 "apex_sched_step: item %d: a waiting request needs a prompt", i);
            continue;
        }
        if (!seq_table_get(&ctx->seqs, items[i].seq)) return APEX_ERR_UNKNOWN_SEQ;
        for (int32_t j = 0; j < i; j++)
            if (items[j].seq == items[i].seq)
                return apex_fail(APEX_ERR_INVALID_ARG, "apex_sched_step: sequence %d listed twice",
                                 items[i].seq);
    }
    correct_catt(ctx);
    for (int32_t i = 0; i < n; i++) {
        sched_seq *q = &s->seqs[i];
        if (items[i].seq < 0) {
            *q = (sched_seq){.phase = SCHED_WAITING, .tier = SCHED_TIER_NONE, .ctx_len = 0,
                             .prompt_left = items[i].prompt_left, .waited = 0};
            continue;
        }
        const seq_entry *e = &ctx->seqs.seqs[items[i].seq];
        *q = (sched_seq){
            .phase = items[i].prompt_left > 0 ? SCHED_PREFILLING : SCHED_DECODING,
            .tier = e->tier == APEX_TIER_DEVICE ? SCHED_TIER_GPU : SCHED_TIER_CPU,
            .ctx_len = e->len,
            .prompt_left = items[i].prompt_left,
            .waited = s->waited[items[i].seq],
        };
    }
    sched_state state = {
        .n_seqs = n, .seqs = s->seqs, .block_tokens = ctx->cfg.block_tokens,
        .gpu_blocks_free = ctx->pools[APEX_TIER_DEVICE].n_free,
        .host_blocks_free = ctx->pools[APEX_TIER_HOST].n_free,
        .gpu_blocks_total = ctx->pools[APEX_TIER_DEVICE].n_blocks,
    };
    sched_plan p = {.action = s->action, .chunk = s->chunk, .capacity = s->capacity};
    apex_status st = from_sched(apex_sched_plan(&state, &s->profile, &s->corr, &s->cfg,
                                                &s->scratch, &p),
                                "apex_sched_step");
    if (st) return st;
    int32_t moved[2] = {0, 0};
    for (int32_t i = 0; i < n; i++) {
        int32_t seq = items[i].seq;
        apex_step_decision d = {.action = APEX_STEP_IDLE, .chunk = 0, .tier = APEX_TIER_HOST};
        if (seq >= 0) d.tier = ctx->seqs.seqs[seq].tier;
        switch (s->action[i]) {
        case SCHED_ACT_DECODE_GPU:
        case SCHED_ACT_DECODE_CPU:
            d.action = APEX_STEP_DECODE;
            break;
        case SCHED_ACT_PREFILL_GPU:
        case SCHED_ACT_PREFILL_HOST:
            d.action = APEX_STEP_PREFILL;
            d.chunk = s->chunk[i];
            if (seq < 0)
                d.tier = s->action[i] == SCHED_ACT_PREFILL_GPU ? APEX_TIER_DEVICE : APEX_TIER_HOST;
            break;
        case SCHED_ACT_TO_HOST:
        case SCHED_ACT_TO_GPU: {
            apex_tier to = s->action[i] == SCHED_ACT_TO_GPU ? APEX_TIER_DEVICE : APEX_TIER_HOST;
            /* A move the pools cannot take now just waits a step. */
            if (seq >= 0 && context_migrate(ctx, seq, to) == APEX_OK) {
                moved[to]++;
                d.tier = to;
            }
            break;
        }
        case SCHED_ACT_PREEMPT:
            d.action = APEX_STEP_PREEMPT;
            break;
        default:
            break;
        }
        if (seq >= 0) s->waited[seq] = d.action == APEX_STEP_IDLE ? s->waited[seq] + 1 : 0;
        out[i] = d;
    }
    s->have_last = 1;
    s->last = p.pred;
    s->catt_mark_s = catt_seconds(ctx);
    if (plan)
        *plan = (apex_step_plan){
            .strategy = sched_strategy_name(p.strategy), .n_gpu = p.n_gpu, .n_cpu = p.n_cpu,
            .n_prefill = p.n_prefill, .n_admit = p.n_admit, .n_to_host = moved[APEX_TIER_HOST],
            .n_to_device = moved[APEX_TIER_DEVICE], .n_preempt = p.n_preempt,
            .predicted_step_ms = p.pred.total_s * 1e3,
        };
    return APEX_OK;
}

apex_status step_sched_observe(apex_context *ctx, double step_seconds) {
    step_sched *s = ctx->sched;
    if (!s || !s->enabled)
        return apex_fail(APEX_ERR_INVALID_ARG, "apex_sched_observe: scheduler not enabled");
    if (!(step_seconds > 0) || step_seconds > 3600)
        return apex_fail(APEX_ERR_INVALID_ARG, "apex_sched_observe: step time %g s", step_seconds);
    if (!s->have_last)
        return apex_fail(APEX_ERR_INVALID_ARG, "apex_sched_observe: no step was planned");
    /* The engine sees only the total: what it took beyond the other parts'
     * prediction is attributed to the linear layers (the engine's own work). */
    double rest = s->last.total_s - s->last.lin_s;
    double lin = step_seconds - rest;
    if (s->last.lin_s > 0 && lin > 0)
        apex_correction_update(&s->corr, APEX_C_LIN, s->last.lin_s / s->corr.f[APEX_C_LIN], lin);
    return APEX_OK;
}

/* Room for n items in the place arrays (grown, never shrunk). */
static apex_status place_room(step_sched *s, int32_t n) {
    if (n <= s->pcapacity) return APEX_OK;
    int32_t cap = s->pcapacity ? s->pcapacity : 16;
    while (cap < n) cap *= 2;
    sched_seq *q = calloc((size_t)cap, sizeof *q);
    int32_t *a = calloc((size_t)cap, sizeof *a), *c = calloc((size_t)cap, sizeof *c);
    sched_scratch sc;
    memset(&sc, 0, sizeof sc);
    if (!q || !a || !c || sched_scratch_init(&sc, cap) != SCHED_OK) {
        free(q), free(a), free(c);
        return apex_fail(APEX_ERR_NO_MEMORY, "apex_sched_place: out of memory for %d items", n);
    }
    sched_scratch_free(&s->pscratch);
    free(s->pseqs), free(s->paction), free(s->pchunk);
    s->pseqs = q, s->paction = a, s->pchunk = c, s->pscratch = sc, s->pcapacity = cap;
    return APEX_OK;
}

static int64_t blocks_of(int64_t len, int32_t bt) { return (len + bt - 1) / bt; }

apex_status step_sched_place(apex_context *ctx, int32_t n, const apex_place_item *items,
                             int64_t device_blocks, int32_t device_seqs, apex_tier *out_tier,
                             apex_place_plan *plan) {
    step_sched *s = ctx->sched;
    const int32_t bt = ctx->cfg.block_tokens;
    if (!s || !s->enabled)
        return apex_fail(APEX_ERR_INVALID_ARG, "apex_sched_place: call apex_sched_enable first");
    if (n < 0) return apex_fail(APEX_ERR_OUT_OF_RANGE, "apex_sched_place: %d items", n);
    if (n > 0 && (!items || !out_tier))
        return apex_fail(APEX_ERR_INVALID_ARG, "apex_sched_place: items and out_tier must not be NULL");
    if (device_blocks < 0 || device_seqs < 0)
        return apex_fail(APEX_ERR_INVALID_ARG,
                         "apex_sched_place: device_blocks %lld and device_seqs %d must be >= 0",
                         (long long)device_blocks, device_seqs);
    /* Check everything before changing anything. */
    int64_t dev_blocks = 0;
    int32_t dev_seqs = 0;
    for (int32_t i = 0; i < n; i++) {
        const apex_place_item *it = &items[i];
        if (it->tier != APEX_TIER_DEVICE && it->tier != APEX_TIER_HOST)
            return apex_fail(APEX_ERR_INVALID_ARG, "apex_sched_place: item %d: tier %d", i, (int)it->tier);
        if (it->state < APEX_PLACE_DECODING || it->state > APEX_PLACE_FINISHED)
            return apex_fail(APEX_ERR_INVALID_ARG, "apex_sched_place: item %d: state %d", i, it->state);
        if (it->len < 0 || it->len > ctx->cfg.max_seq_len)
            return apex_fail(APEX_ERR_INVALID_ARG, "apex_sched_place: item %d: len %d (0..%d)", i, it->len,
                             ctx->cfg.max_seq_len);
        for (int32_t j = 0; j < i; j++)
            if (items[j].id == it->id)
                return apex_fail(APEX_ERR_INVALID_ARG, "apex_sched_place: id %lld listed twice",
                                 (long long)it->id);
        if (it->tier == APEX_TIER_DEVICE) {
            dev_blocks += blocks_of(it->len, bt);
            dev_seqs++;
        }
    }
    if (dev_blocks > device_blocks || (device_seqs > 0 && dev_seqs > device_seqs))
        return apex_fail(APEX_ERR_INVALID_ARG,
                         "apex_sched_place: the device items hold %lld blocks in %d sequences, more than "
                         "the device's %lld blocks%s",
                         (long long)dev_blocks, dev_seqs, (long long)device_blocks,
                         device_seqs > 0 ? " or its sequence limit" : "");
    apex_status st = place_room(s, n > 0 ? n : 1);
    if (st) return st;
    correct_catt(ctx);
    /* The scheduler sees the decoders only: idle and finished items leave
     * the device, so their blocks count as free. */
    int32_t m = 0;
    int64_t used = 0;
    for (int32_t i = 0; i < n; i++) {
        if (items[i].state != APEX_PLACE_DECODING) continue;
        const int dev = items[i].tier == APEX_TIER_DEVICE;
        if (dev) used += blocks_of(items[i].len, bt);
        s->pseqs[m++] = (sched_seq){.phase = SCHED_DECODING, .tier = dev ? SCHED_TIER_GPU : SCHED_TIER_CPU,
                                    .ctx_len = items[i].len, .prompt_left = 0, .waited = 0};
    }
    sched_state state = {
        .n_seqs = m, .seqs = s->pseqs, .block_tokens = bt, .gpu_blocks_free = device_blocks - used,
        .host_blocks_free = INT64_MAX / 4, /* the host copy is the engine's: always room */
        .gpu_blocks_total = device_blocks,
    };
    sched_plan p = {.action = s->paction, .chunk = s->pchunk, .capacity = s->pcapacity};
    st = from_sched(apex_sched_plan(&state, &s->profile, &s->corr, &s->cfg, &s->pscratch, &p),
                    "apex_sched_place");
    if (st) return st;
    /* Decisions -> tiers. A promotion takes room in priority order, so the
     * sequence limit cuts the last ones the plan promoted. */
    int32_t on_dev = 0;
    for (int32_t k = 0; k < m; k++) on_dev += s->paction[k] == SCHED_ACT_DECODE_GPU;
    apex_place_plan r = {.strategy = sched_strategy_name(p.strategy)};
    for (int32_t i = 0, k = 0; i < n; i++) {
        apex_tier t = APEX_TIER_HOST;
        if (items[i].state == APEX_PLACE_DECODING) {
            const int32_t a = s->paction[k++];
            if (a == SCHED_ACT_DECODE_GPU) t = APEX_TIER_DEVICE;
            else if (a == SCHED_ACT_TO_GPU && (device_seqs == 0 || on_dev < device_seqs)) {
                t = APEX_TIER_DEVICE;
                on_dev++;
            } else if (a == SCHED_ACT_IDLE) {
                r.n_host_idle++; /* a host decoder outside the cohort */
            }
            if (t == APEX_TIER_DEVICE) r.n_device++;
            else r.n_host++;
        }
        if (t != items[i].tier) {
            if (t == APEX_TIER_DEVICE) r.n_to_device++;
            else r.n_to_host++;
        }
        out_tier[i] = t;
    }
    r.predicted_step_ms = p.pred.total_s * 1e3;
    s->have_last = 1;
    s->last = p.pred;
    s->catt_mark_s = catt_seconds(ctx);
    if (plan) *plan = r;
    return APEX_OK;
}
