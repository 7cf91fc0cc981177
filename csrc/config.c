/* config.c - apex_config: defaults, the APEX_* environment applied at
 * apex_config_init (which retakes the snapshot of csrc/env.h), validation
 * of every field, host-tier sizing. */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_attn/kv_layout.h"
#include "csrc/error.h"
#include "csrc/config.h"
#include "apex/apex_paged.h" /* APEX_PAGED_HOST_KV_ALIGN */
#include "csrc/env.h"

#define DEFAULT_HOST_KV_GB 2.0

/* The geometry this build runs, from the one list of it (cpu_attn/kv_layout.h:
 * the CUDA launchers instantiate their kernels from the same list);
 * apex_limits_get hands it to engines. Each list ends at 0. */
#define LIST_ENTRY(x) x,
static const int32_t k_head_dims[] = {APEX_HEAD_DIMS(LIST_ENTRY) 0};
static const int32_t k_block_tokens[] = {APEX_BLOCK_TOKENS(LIST_ENTRY) 0};
#undef LIST_ENTRY
#define CHECK_HEAD_DIM(d) _Static_assert((d) <= APEX_MAX_HEAD_DIM, "APEX_MAX_HEAD_DIM too small");
APEX_HEAD_DIMS(CHECK_HEAD_DIM)
#undef CHECK_HEAD_DIM
#define CHECK_BLOCK_TOKENS(b) _Static_assert(((b) & ((b) - 1)) == 0, "block_tokens not a power of 2");
APEX_BLOCK_TOKENS(CHECK_BLOCK_TOKENS)
#undef CHECK_BLOCK_TOKENS
enum { MAX_LAYERS = 4096, MAX_KV_HEADS = 1024, MAX_Q_HEADS = 4096, MAX_SEQS = 1 << 20,
       MAX_SEQ_LEN = 1 << 24 };

static int in_list(const int32_t *l, int32_t v) {
    for (; *l; l++)
        if (*l == v) return 1;
    return 0;
}

static const char *list_text(const int32_t *l, char *buf, size_t n) {
    size_t at = 0;
    buf[0] = 0;
    for (int i = 0; l[i] && at < n; i++)
        at += (size_t)snprintf(buf + at, n - at, "%s%d", i ? ", " : "", l[i]);
    return buf;
}

APEX_API apex_status apex_limits_get(apex_limits *out) {
    if (!out) return apex_fail(APEX_ERR_INVALID_ARG, "apex_limits_get: out is NULL");
    apex_limits l = {.max_layers = MAX_LAYERS, .max_kv_heads = MAX_KV_HEADS,
                     .max_q_heads = MAX_Q_HEADS, .max_seqs = MAX_SEQS, .max_seq_len = MAX_SEQ_LEN,
                     .host_kv_align = APEX_PAGED_HOST_KV_ALIGN};
    _Static_assert(sizeof k_head_dims <= sizeof l.head_dims, "apex_limits.head_dims too small");
    _Static_assert(sizeof k_block_tokens <= sizeof l.block_tokens, "apex_limits.block_tokens too small");
    memcpy(l.head_dims, k_head_dims, sizeof k_head_dims);
    memcpy(l.block_tokens, k_block_tokens, sizeof k_block_tokens);
    l.kv_dtypes = l.act_dtypes = apex_dtype_mask();
    *out = l;
    return APEX_OK;
}

/* Reads integer variable var into *out if it is set; error if malformed. */
static apex_status env_int(apex_env_var var, int64_t lo, int64_t hi, int64_t *out,
                           int *found) {
    const char *s = apex_env_get(var);
    *found = 0;
    if (!s || !*s) return APEX_OK;
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || v < lo || v > hi)
        return apex_fail(APEX_ERR_INVALID_ARG, "%s='%s' is not an integer in [%lld, %lld]",
                         apex_env_info_at(var)->name, s, (long long)lo, (long long)hi);
    *out = v;
    *found = 1;
    return APEX_OK;
}

APEX_API apex_status apex_config_init(apex_config *cfg) {
    if (!cfg) return apex_fail(APEX_ERR_INVALID_ARG, "apex_config_init: cfg is NULL");
    apex_env_refresh(); /* the environment as it is now (csrc/env.h) */
    apex_config c = {
        .kv_dtype = APEX_DTYPE_F16,
        .act_dtype = APEX_DTYPE_F16,
        .block_tokens = 16,
        .device_blocks = 0,
        .host_blocks = 0,
        .max_seqs = 256,
        .max_batch = 256,
        .max_seq_len = 32768,
        .n_threads = 0,
        .cpu_set = NULL,
        .device = APEX_DEVICE_AUTO,
    };
    static const struct {
        apex_env_var var;
        int64_t lo, hi;
        size_t off;
        int is64;
    } vars[] = {
        {APEX_ENV_HOST_BLOCKS, 0, INT32_MAX, offsetof(apex_config, host_blocks), 1},
        {APEX_ENV_DEVICE_BLOCKS, 0, INT32_MAX, offsetof(apex_config, device_blocks), 1},
        {APEX_ENV_THREADS, 0, 1024, offsetof(apex_config, n_threads), 0},
        {APEX_ENV_BLOCK_TOKENS, 1, 4096, offsetof(apex_config, block_tokens), 0},
        {APEX_ENV_MAX_SEQS, 1, MAX_SEQS, offsetof(apex_config, max_seqs), 0},
        {APEX_ENV_MAX_BATCH, 1, MAX_SEQS, offsetof(apex_config, max_batch), 0},
        {APEX_ENV_MAX_SEQ_LEN, 1, MAX_SEQ_LEN, offsetof(apex_config, max_seq_len), 0},
    };
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
        int64_t v;
        int found;
        apex_status st = env_int(vars[i].var, vars[i].lo, vars[i].hi, &v, &found);
        if (st) return st;
        if (!found) continue;
        char *field = (char *)&c + vars[i].off;
        if (vars[i].is64) *(int64_t *)field = v;
        else *(int32_t *)field = (int32_t)v;
    }
    const char *dev = apex_env_get(APEX_ENV_DEVICE);
    if (dev && *dev) {
        static const char *names[] = {"auto", "none", "emulated", "cuda"};
        int found = 0;
        for (int i = 0; i < 4; i++)
            if (!strcmp(dev, names[i])) {
                c.device = (apex_device_kind)i;
                found = 1;
            }
        if (!found)
            return apex_fail(APEX_ERR_INVALID_ARG,
                             "APEX_DEVICE='%s' is not one of auto, none, emulated, cuda", dev);
    }
    const char *cpus = apex_env_get(APEX_ENV_CPUSET);
    if (cpus && *cpus) c.cpu_set = cpus;
    *cfg = c;
    apex_clear_error();
    return APEX_OK;
}

size_t apex_config_block_bytes(const apex_config *c) {
    return apex_kv_block_bytes(c->n_kv_heads, c->block_tokens, c->head_dim, c->kv_dtype);
}

int64_t apex_config_host_blocks(const apex_config *c) {
    if (c->host_blocks > 0) return c->host_blocks;
    double gb = DEFAULT_HOST_KV_GB;
    const char *s = apex_env_get(APEX_ENV_HOST_KV_GB);
    if (s && *s) {
        char *end;
        double v = strtod(s, &end);
        if (!*end && isfinite(v) && v > 0) gb = v;
    }
    double per_block = (double)apex_config_block_bytes(c) * c->n_layers;
    double n = floor(gb * 1073741824.0 / per_block);
    return n < 1 ? 1 : (n > INT32_MAX ? INT32_MAX : (int64_t)n);
}

apex_status apex_config_validate(const apex_config *c) {
    if (!c) return apex_fail(APEX_ERR_INVALID_ARG, "config is NULL");
    if (c->n_layers < 1 || c->n_layers > MAX_LAYERS)
        return apex_fail(APEX_ERR_INVALID_ARG, "n_layers %d out of range [1, %d]", c->n_layers,
                         MAX_LAYERS);
    if (c->n_kv_heads < 1 || c->n_kv_heads > MAX_KV_HEADS)
        return apex_fail(APEX_ERR_INVALID_ARG, "n_kv_heads %d out of range [1, %d]",
                         c->n_kv_heads, MAX_KV_HEADS);
    if (c->n_q_heads < 1 || c->n_q_heads > MAX_Q_HEADS || c->n_q_heads % c->n_kv_heads)
        return apex_fail(APEX_ERR_INVALID_ARG,
                         "n_q_heads %d must be a positive multiple of n_kv_heads %d",
                         c->n_q_heads, c->n_kv_heads);
    char list[64];
    if (!in_list(k_head_dims, c->head_dim))
        return apex_fail(APEX_ERR_UNSUPPORTED, "head_dim %d is not supported (%s)", c->head_dim,
                         list_text(k_head_dims, list, sizeof list));
    if (!apex_dtype_valid(c->kv_dtype) || !apex_dtype_valid(c->act_dtype))
        return apex_fail(APEX_ERR_INVALID_ARG, "kv_dtype %d / act_dtype %d: not an apex_dtype",
                         (int)c->kv_dtype, (int)c->act_dtype);
    if (!in_list(k_block_tokens, c->block_tokens))
        return apex_fail(APEX_ERR_UNSUPPORTED, "block_tokens %d is not supported (%s)",
                         c->block_tokens, list_text(k_block_tokens, list, sizeof list));
    if (c->device_blocks < 0 || c->device_blocks > INT32_MAX || c->host_blocks < 0 ||
        c->host_blocks > INT32_MAX)
        return apex_fail(APEX_ERR_INVALID_ARG,
                         "device_blocks %lld / host_blocks %lld out of range [0, 2^31)",
                         (long long)c->device_blocks, (long long)c->host_blocks);
    if (c->max_seqs < 1 || c->max_seqs > MAX_SEQS)
        return apex_fail(APEX_ERR_INVALID_ARG, "max_seqs %d out of range [1, 2^20]", c->max_seqs);
    if (c->max_batch < 1 || c->max_batch > c->max_seqs)
        return apex_fail(APEX_ERR_INVALID_ARG, "max_batch %d out of range [1, max_seqs %d]",
                         c->max_batch, c->max_seqs);
    if (c->max_seq_len < 1 || c->max_seq_len > MAX_SEQ_LEN)
        return apex_fail(APEX_ERR_INVALID_ARG, "max_seq_len %d out of range [1, 2^24]",
                         c->max_seq_len);
    if (c->device < APEX_DEVICE_AUTO || c->device > APEX_DEVICE_CUDA)
        return apex_fail(APEX_ERR_INVALID_ARG, "device %d is not an apex_device_kind",
                         (int)c->device);
    if (c->n_threads < 0 || c->n_threads > 1024)
        return apex_fail(APEX_ERR_INVALID_ARG, "n_threads %d out of range [0, 1024]",
                         c->n_threads);
    return APEX_OK;
}

apex_status apex_attn_opts_resolve(const apex_config *cfg, const char *fn,
                                   const apex_attn_opts *opts, apex_attn_opts *o) {
    *o = opts ? *opts
              : (apex_attn_opts){.q_dtype = cfg->act_dtype, .out_dtype = cfg->act_dtype};
    if (!apex_dtype_valid(o->q_dtype) || !apex_dtype_valid(o->out_dtype))
        return apex_fail(APEX_ERR_INVALID_ARG, "%s: q_dtype %d / out_dtype %d: not an apex_dtype",
                         fn, (int)o->q_dtype, (int)o->out_dtype);
    if (!isfinite(o->scale) || o->scale < 0 || !isfinite(o->softcap) || o->softcap < 0 ||
        o->window < 0)
        return apex_fail(APEX_ERR_INVALID_ARG,
                         "%s: scale %g, softcap %g and window %d must be finite and >= 0", fn,
                         o->scale, o->softcap, o->window);
    if (o->scale == 0) o->scale = 1.0f / sqrtf((float)cfg->head_dim);
    return APEX_OK;
}
