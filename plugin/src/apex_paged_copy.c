/*
 * apex_paged_copy.c - apex_paged_copy_blocks (apex_paged.h): whole-block
 * copies between engine block ids, all layers, either tier to either tier.
 * An engine that moves a request between tiers (vLLM's scheduler with
 * APEX's placement) remaps the request's block ids and moves its KV here.
 * Synchronous like the other paged calls: it waits for the context's
 * earlier work, copies, and waits for the copies.
 */
#include <stdlib.h>

#include "apex/apex_paged.h"
#include "csrc/context.h"
#include "csrc/error.h"
#include "csrc/pipeline.h"

/* Checks every id before anything moves: in range, src != dst, each
 * destination once, and no destination also a source (the result would
 * depend on the copies' order). */
static apex_status copy_check(const apex_context *ctx, int64_t n, const int64_t *src,
                              const int64_t *dst) {
    static const char fn[] = "apex_paged_copy_blocks";
    if (ctx->owner != CTX_OWNER_ENGINE)
        return apex_fail(APEX_ERR_INVALID_ARG, "%s: the context's blocks are not claimed "
                                               "(apex_paged_claim)", fn);
    if (n < 0) return apex_fail(APEX_ERR_INVALID_ARG, "%s: n = %lld < 0", fn, (long long)n);
    if (n > 0 && (!src || !dst))
        return apex_fail(APEX_ERR_INVALID_ARG, "%s: src_ids or dst_ids is NULL", fn);
    const int64_t total =
        (int64_t)ctx->pools[APEX_TIER_DEVICE].n_blocks + ctx->pools[APEX_TIER_HOST].n_blocks;
    for (int64_t i = 0; i < n; i++) {
        if (src[i] < 0 || src[i] >= total || dst[i] < 0 || dst[i] >= total)
            return apex_fail(APEX_ERR_OUT_OF_RANGE,
                             "%s: copy %lld: block %lld -> %lld, ids must be in [0, %lld)", fn,
                             (long long)i, (long long)src[i], (long long)dst[i],
                             (long long)total);
        if (src[i] == dst[i])
            return apex_fail(APEX_ERR_INVALID_ARG, "%s: copy %lld: block %lld onto itself", fn,
                             (long long)i, (long long)src[i]);
    }
    if (n == 0) return APEX_OK;
    uint8_t *role = calloc((size_t)total, 1); /* bit 1: a source, bit 2: a destination */
    if (!role) return apex_fail(APEX_ERR_NO_MEMORY, "%s: no memory for %lld ids", fn,
                                (long long)total);
    apex_status st = APEX_OK;
    for (int64_t i = 0; i < n; i++) role[src[i]] |= 1;
    for (int64_t i = 0; i < n && st == APEX_OK; i++) {
        if (role[dst[i]] & 2)
            st = apex_fail(APEX_ERR_INVALID_ARG, "%s: block %lld is a destination twice", fn,
                           (long long)dst[i]);
        else if (role[dst[i]] & 1)
            st = apex_fail(APEX_ERR_INVALID_ARG,
                           "%s: block %lld is both a source and a destination", fn,
                           (long long)dst[i]);
        role[dst[i]] |= 2;
    }
    free(role);
    return st;
}

/* One direction's copies: host->host by the host, the rest on the device
 * (ordered after the context's queued work, see pipeline.h). */
static apex_status copy_direction(apex_context *ctx, apex_tier from, apex_tier to, int32_t m,
                                  const int32_t *s, const int32_t *d) {
    if (m == 0) return APEX_OK;
    if (from == APEX_TIER_HOST && to == APEX_TIER_HOST) {
        for (int32_t i = 0; i < m; i++) block_pool_copy(&ctx->pools[APEX_TIER_HOST], d[i], s[i]);
        return APEX_OK;
    }
    if (from == APEX_TIER_DEVICE && to == APEX_TIER_DEVICE) {
        for (int32_t i = 0; i < m; i++) {
            apex_status st = pipeline_copy_device_block(ctx, d[i], s[i]);
            if (st) return st;
        }
        return APEX_OK;
    }
    return pipeline_copy_between_tiers(ctx, from, s, d, m);
}

APEX_API apex_status apex_paged_copy_blocks(apex_context *ctx, int64_t n, const int64_t *src_ids,
                                            const int64_t *dst_ids) {
    if (!ctx) return apex_fail(APEX_ERR_INVALID_ARG, "apex_paged_copy_blocks: context is NULL");
    apex_status st = copy_check(ctx, n, src_ids, dst_ids);
    if (st || n == 0) {
        if (st) ctx->stats.errors++;
        return st;
    }
    if (n > INT32_MAX) n = INT32_MAX; /* unreachable: ids are distinct int32 blocks */
    /* Per direction (from * 2 + to), the tier-local blocks. */
    int32_t *buf = malloc((size_t)n * 8 * sizeof *buf);
    if (!buf) {
        ctx->stats.errors++;
        return apex_fail(APEX_ERR_NO_MEMORY, "apex_paged_copy_blocks: no memory for %lld copies",
                         (long long)n);
    }
    int32_t count[4] = {0, 0, 0, 0};
    const int64_t nd = ctx->pools[APEX_TIER_DEVICE].n_blocks;
    for (int64_t i = 0; i < n; i++) {
        const apex_tier f = src_ids[i] < nd ? APEX_TIER_DEVICE : APEX_TIER_HOST;
        const apex_tier t = dst_ids[i] < nd ? APEX_TIER_DEVICE : APEX_TIER_HOST;
        const int k = (int)f * 2 + (int)t;
        buf[(size_t)k * 2 * n + count[k]] = (int32_t)(f == APEX_TIER_DEVICE ? src_ids[i] : src_ids[i] - nd);
        buf[(size_t)k * 2 * n + n + count[k]] = (int32_t)(t == APEX_TIER_DEVICE ? dst_ids[i] : dst_ids[i] - nd);
        count[k]++;
    }
    /* Host blocks may still be read or written by queued work of an
     * earlier asynchronous call: everything settles first. */
    pipeline_sync(ctx);
    for (int k = 0; k < 4 && st == APEX_OK; k++)
        st = copy_direction(ctx, (apex_tier)(k / 2), (apex_tier)(k % 2), count[k],
                            buf + (size_t)k * 2 * n, buf + (size_t)k * 2 * n + n);
    pipeline_sync(ctx); /* the copies are in place when the call returns */
    free(buf);
    if (st) ctx->stats.errors++;
    return st;
}
