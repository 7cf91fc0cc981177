/* profiler.c - start-up measurements and the on-disk profile cache.
 *
 * CPU part: T_catt measured with the real kernel (cpu_attn_decode with a
 * real workspace) on a KV slab far larger than the last-level cache, for a
 * few (sequences, tokens) shapes at each thread count, fitted by least
 * squares to c0 + per_seq * seqs + per_token * tokens (per layer, times
 * n_layers). GPU part: this file measures nothing on a GPU; without one the
 * GPU curves and the link come from a named preset (the CUDA tier may
 * overwrite them with its own cuBLAS/kernel measurements before saving).
 * The emulated device ("host" preset) uses a memcpy stand-in for PCIe.
 */
#include "cpu_attn/cpu_attn.h"
#include "cpu_attn/kv_layout.h"
#include "csrc/sched/sched.h"
#include "csrc/env.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t rng_next(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* Solves the 3x3 normal equations of y ~ a + b*x1 + c*x2 (Cramer). */
static int lsq3(int n, const double *x1, const double *x2, const double *y, double out[3]) {
    double S[3][3] = {{0}}, r[3] = {0};
    for (int i = 0; i < n; i++) {
        double v[3] = {1, x1[i], x2[i]};
        for (int a = 0; a < 3; a++) {
            r[a] += v[a] * y[i];
            for (int b = 0; b < 3; b++) S[a][b] += v[a] * v[b];
        }
    }
    double det = S[0][0] * (S[1][1] * S[2][2] - S[1][2] * S[2][1]) -
                 S[0][1] * (S[1][0] * S[2][2] - S[1][2] * S[2][0]) +
                 S[0][2] * (S[1][0] * S[2][1] - S[1][1] * S[2][0]);
    if (fabs(det) < 1e-300) return -1;
    for (int k = 0; k < 3; k++) {
        double M[3][3];
        memcpy(M, S, sizeof M);
        for (int a = 0; a < 3; a++) M[a][k] = r[a];
        double dk = M[0][0] * (M[1][1] * M[2][2] - M[1][2] * M[2][1]) -
                    M[0][1] * (M[1][0] * M[2][2] - M[1][2] * M[2][0]) +
                    M[0][2] * (M[1][0] * M[2][1] - M[1][1] * M[2][0]);
        out[k] = dk / det;
    }
    return 0;
}

/* The KV type measured: kv_dtype, or by kv_bytes (f16, f32) if it is -1;
 * -1 if neither fits kv_bytes. */
static int measured_dtype(int32_t kv_bytes, int32_t kv_dtype) {
    if (kv_dtype == -1) return kv_bytes == 2 ? APEX_DTYPE_F16 : kv_bytes == 4 ? APEX_DTYPE_F32 : -1;
    if ((kv_dtype != APEX_DTYPE_F16 && kv_dtype != APEX_DTYPE_BF16 && kv_dtype != APEX_DTYPE_F32) ||
        (int32_t)apex_dtype_size((apex_dtype)kv_dtype) != kv_bytes)
        return -1;
    return kv_dtype;
}

/* Whether the KV measured is in the pair layout: asked for, and the
 * selected kernel reads it for this geometry. */
static int measured_pairs(const apex_model_geom *g, apex_dtype dt, int32_t kv_pairs) {
    const cpu_attn_geom cg = {g->n_q_heads, g->n_kv_heads, g->head_dim, 16, dt, 1};
    return kv_pairs && cpu_attn_pairs_ok(&cg);
}

sched_status apex_profile_measure_cpu(apex_profile *p, int32_t threads, double budget_s,
                                      int32_t kv_dtype, int32_t kv_pairs) {
    if (!p || threads <= 0)
        return sched_fail(SCHED_ERR_INVALID, "measure_cpu: bad arguments");
    const apex_model_geom *g = &p->geom;
    const int dti = measured_dtype(g->kv_bytes, kv_dtype);
    if (dti < 0)
        return sched_fail(SCHED_ERR_INVALID, "measure_cpu: KV type %d with kv_bytes %d unsupported",
                          kv_dtype, g->kv_bytes);
    const apex_dtype dt = (apex_dtype)dti;
    const cpu_attn_geom cg = {g->n_q_heads, g->n_kv_heads, g->head_dim, 16, dt,
                              measured_pairs(g, dt, kv_pairs)};
    /* shapes: (sequences, tokens each); slab sized for the largest */
    static const int shapes[][2] = {{1, 1024}, {1, 8192}, {8, 512}, {8, 2048},
                                    {32, 256}, {32, 1024}, {64, 128}};
    const int ns = (int)(sizeof shapes / sizeof shapes[0]);
    const int max_seqs = 64, max_len = 8192;
    int64_t max_tok = 32 * 1024;
    size_t block_bytes = apex_kv_block_bytes(cg.n_kv_heads, cg.block_tokens, cg.head_dim, cg.kv_dtype);
    int64_t n_blocks = max_tok / cg.block_tokens;
    size_t slab = block_bytes * (size_t)n_blocks;
    int32_t max_bt = max_len / cg.block_tokens;
    void *kv = malloc(slab);
    int32_t *table = malloc(sizeof(int32_t) * (size_t)max_seqs * (size_t)max_bt);
    int32_t *lens = malloc(sizeof(int32_t) * max_seqs);
    size_t qn = (size_t)max_seqs * cg.n_q_heads * cg.head_dim;
    float *q = malloc(qn * sizeof(float)), *out = malloc(qn * sizeof(float));
    cpu_attn_ws *ws = cpu_attn_ws_create(&cg, max_seqs, max_len, threads);
    sched_status st = SCHED_OK;
    if (!kv || !table || !lens || !q || !out || !ws) {
        st = sched_fail(SCHED_ERR_NO_MEMORY, "measure_cpu: out of memory (%zu-byte KV slab)", slab);
        goto done;
    }
    uint64_t seed = 0x9E3779B97F4A7C15ull;
    /* small random values, any sign: fp16 0x3000..0x33ff and bf16
     * 0x3e00..0x3e7f are 0.125..0.25, f32 as two fp16 halves ~1e-9 */
    uint16_t *h = kv;
    const uint16_t base = dt == APEX_DTYPE_BF16 ? 0x3e00 : 0x3000;
    const uint16_t mask = dt == APEX_DTYPE_BF16 ? 0x807f : 0x83ff;
    for (size_t i = 0; i < slab / 2; i++) h[i] = (uint16_t)(base | (rng_next(&seed) & mask));
    for (size_t i = 0; i < qn; i++) q[i] = (float)((int)(rng_next(&seed) % 200) - 100) * 1e-3f;
    int32_t tcounts[3] = {1, threads / 2, threads};
    int nt = 0;
    double t_start = now_s();
    for (int ti = 0; ti < 3; ti++) {
        int32_t T = tcounts[ti];
        if (T < 1 || (nt && T <= p->catt[nt - 1].threads)) continue;
        double x1[16], x2[16], y[16];
        int m = 0;
        for (int si = 0; si < ns; si++) {
            int S = shapes[si][0], len = shapes[si][1];
            if ((int64_t)S * len > max_tok) continue;
            int32_t bps = (len + cg.block_tokens - 1) / cg.block_tokens;
            /* block ids scattered over the slab, as a pool would hand out */
            for (int s = 0; s < S; s++) {
                lens[s] = len;
                for (int b = 0; b < bps; b++)
                    table[(size_t)s * max_bt + b] = (int32_t)(rng_next(&seed) % (uint64_t)n_blocks);
            }
            cpu_attn_batch b = {S, q, APEX_DTYPE_F32, out, APEX_DTYPE_F32, lens, table, max_bt,
                                kv, block_bytes, 1.0f / sqrtf((float)cg.head_dim), 0, 0};
            double best = 1e30;
            for (int rep = 0; rep < 3; rep++) {
                double t0 = now_s();
                if (cpu_attn_decode(&cg, &b, ws, T)) {
                    st = sched_fail(SCHED_ERR_INVALID, "measure_cpu: cpu_attn_decode failed");
                    goto done;
                }
                double dt = now_s() - t0;
                if (dt < best) best = dt;
            }
            x1[m] = S;
            x2[m] = (double)S * len;
            y[m] = best;
            m++;
            if (now_s() - t_start > budget_s && m >= 4) break;
        }
        double c[3];
        if (m < 3 || lsq3(m, x1, x2, y, c)) {
            st = sched_fail(SCHED_ERR_INVALID, "measure_cpu: too few measurements to fit");
            goto done;
        }
        apex_catt_fit *f = &p->catt[nt++];
        f->threads = T;
        /* one layer measured; a step runs n_layers of them. Clamp fit noise. */
        f->c0 = fmax(c[0], 0) * g->n_layers;
        f->per_seq = fmax(c[1], 0) * g->n_layers;
        f->per_token = fmax(c[2], 1e-15) * g->n_layers;
    }
    p->n_catt = nt;
    p->cpu_threads = threads;
done:
    cpu_attn_ws_destroy(ws);
    free(kv);
    free(table);
    free(lens);
    free(q);
    free(out);
    return st;
}

sched_status apex_profile_measure_memcpy(apex_link *out) {
    if (!out) return sched_fail(SCHED_ERR_INVALID, "measure_memcpy: NULL");
    size_t n = (size_t)64 << 20;
    char *a = malloc(n), *b = malloc(n);
    if (!a || !b) { free(a); free(b); return sched_fail(SCHED_ERR_NO_MEMORY, "measure_memcpy: out of memory"); }
    memset(a, 1, n);
    memset(b, 2, n);
    double best_big = 1e30, best_small = 1e30;
    for (int r = 0; r < 3; r++) {
        double t0 = now_s();
        memcpy(b, a, n);
        double dt = now_s() - t0;
        if (dt < best_big) best_big = dt;
        t0 = now_s();
        for (int k = 0; k < 64; k++) memcpy(b + k * 64, a + k * 4096, 64);
        dt = (now_s() - t0) / 64;
        if (dt < best_small) best_small = dt;
    }
    volatile char sink = b[n - 1];
    (void)sink;
    free(a);
    free(b);
    out->bw_Bps = n / best_big;
    out->lat_s = best_small;
    return SCHED_OK;
}

/* FNV-1a of the keys: the cache file name. */
static uint64_t fnv(const char *s, uint64_t h) {
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

static void mkdir_p(const char *dir) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s", dir);
    for (char *c = tmp + 1; *c; c++)
        if (*c == '/') { *c = 0; mkdir(tmp, 0755); *c = '/'; }
    mkdir(tmp, 0755);
}

sched_status apex_profile_obtain(const char *gpu_preset, const apex_model_geom *g,
                                 double weight_bytes, int32_t threads, int32_t kv_dtype,
                                 int32_t kv_pairs, const char *cache_dir, apex_profile *out,
                                 const char **how) {
    if (!g || !out) return sched_fail(SCHED_ERR_INVALID, "profile_obtain: NULL argument");
    char mkey[160];
    apex_model_key(g, mkey, sizeof mkey);
    apex_profile *p = calloc(1, sizeof *p);
    if (!p) return sched_fail(SCHED_ERR_NO_MEMORY, "profile_obtain: out of memory");
    sched_status s;
    const char *env = apex_env_get(APEX_ENV_PROFILE);
    if (env && *env) {
        if ((s = apex_profile_load(env, p))) goto out;
        if (strcmp(p->model_key, mkey)) {
            s = sched_fail(SCHED_ERR_MISMATCH,
                           "APEX_PROFILE '%s' is for model %s, this model is %s", env,
                           p->model_key, mkey);
            goto out;
        }
        if (how) *how = "APEX_PROFILE";
        *out = *p;
        goto out;
    }
    int host = !gpu_preset || !strcmp(gpu_preset, "host");
    const apex_hw_preset *hw = host ? apex_hw_preset_find("t4") : apex_hw_preset_find(gpu_preset);
    if (!hw) {
        s = sched_fail(SCHED_ERR_NOT_FOUND, "profile_obtain: unknown GPU preset '%s'", gpu_preset);
        goto out;
    }
    const int dti = measured_dtype(g->kv_bytes, kv_dtype);
    if (dti < 0) {
        s = sched_fail(SCHED_ERR_INVALID, "profile_obtain: KV type %d with kv_bytes %d unsupported",
                       kv_dtype, g->kv_bytes);
        goto out;
    }
    const apex_dtype dt = (apex_dtype)dti;
    const int pairs = measured_pairs(g, dt, kv_pairs);
    char hwkey[160];
    snprintf(hwkey, sizeof hwkey, "gpu=%s;cpu=%s;kv=%s-%s;threads=%d",
             host ? "host-emulated" : hw->name, cpu_attn_isa_name(cpu_attn_isa_selected()),
             apex_dtype_name(dt), pairs ? "pairs" : "rows", threads);
    char dir[3072], path[4096];
    if (cache_dir) snprintf(dir, sizeof dir, "%s", cache_dir);
    else if (getenv("XDG_CACHE_HOME") && *getenv("XDG_CACHE_HOME"))
        snprintf(dir, sizeof dir, "%s/apex", getenv("XDG_CACHE_HOME"));
    else snprintf(dir, sizeof dir, "%s/.cache/apex", getenv("HOME") ? getenv("HOME") : "/tmp");
    snprintf(path, sizeof path, "%s/profile-%016llx.json", dir,
             (unsigned long long)fnv(mkey, fnv(hwkey, 1469598103934665603ull)));
    if (apex_profile_load(path, p) == SCHED_OK && !strcmp(p->hw_key, hwkey) &&
        !strcmp(p->model_key, mkey)) {
        if (how) *how = "cache";
        *out = *p;
        s = SCHED_OK;
        goto out;
    }
    /* fresh: GPU part from the preset, CPU part measured */
    if ((s = apex_profile_from_preset(hw, g, weight_bytes, threads, p))) goto out;
    if ((s = apex_profile_measure_cpu(p, threads, 2.0, dt, pairs))) goto out;
    if (host) {
        apex_link l;
        if ((s = apex_profile_measure_memcpy(&l))) goto out;
        p->h2d = l;
        p->d2h = l;
    }
    snprintf(p->hw_key, sizeof p->hw_key, "%s", hwkey);
    snprintf(p->source, sizeof p->source,
             "measured: CPU attention (cpu_attn_decode, %s, %s KV in %s)%s; GPU parts: "
             "preset %s (roofline estimate)",
             cpu_attn_isa_name(cpu_attn_isa_selected()), apex_dtype_name(dt),
             pairs ? "the pair layout" : "rows",
             host ? ", link: memcpy stand-in (emulated device)" : "", hw->name);
    if ((s = apex_profile_validate(p))) goto out;
    mkdir_p(dir);
    if (apex_profile_save(p, path) == SCHED_OK) { if (how) *how = "measured, saved"; }
    else if (how) *how = "measured, not saved";
    *out = *p;
    s = SCHED_OK;
out:
    free(p);
    return s;
}
