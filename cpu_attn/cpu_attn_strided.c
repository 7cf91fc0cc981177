/* cpu_attn_strided.c - the strided kernel's driver (see
 * cpu_attn_strided.h): the variant for the call, the work split, the
 * threads, and the merge of split ranges.
 *
 * Work is split into units (stream, tile of query tokens, KV heads); a unit
 * holds every query head of its KV heads for every token of its tile, so each
 * K/V row is read and converted once for all of them (ggml-cpu re-reads it per
 * query head and per token). A unit streams only the rows its mask leaves
 * visible, and is cut into KV chunks when there are too few units for the
 * threads; chunk partials (max, sum, acc) are merged by log-sum-exp (in exact
 * mode only where ggml splits, merged as ggml merges).
 *
 * The variants, one file each: cpu_attn_strided_reference.c (definition and
 * scalar item), cpu_attn_strided_avx512.c (fp32 mode), cpu_attn_strided_exact.c
 * (ggml-cpu's arithmetic). */
#include "cpu_attn/cpu_attn_strided_impl.h"

static int use_avx512(void) {
#if HAVE_X86
    static int cached = -1;
    if (cached < 0) {
        const char *isa = getenv("APEX_ISA");
        const int forced = isa && (strcmp(isa, "scalar") == 0 || strcmp(isa, "avx2") == 0);
        cached = __builtin_cpu_supports("avx512f") && !forced;
    }
    return cached;
#else
    return 0;
#endif
}

const char *cpu_attn_strided_isa(void) { return use_avx512() ? "avx512" : "scalar"; }

static strided_item_fn pick(const cpu_attn_strided_desc *d) {
#if HAVE_X86
    if (d->ggml_compat) return cpu_attn_strided_item_exact;
    if (use_avx512() && d->head_dim % 16 == 0) return cpu_attn_strided_item_avx512;
#endif
    (void)d;
    return cpu_attn_strided_item_scalar;
}

/* Writes acc / l (0 where l is 0) for every query of unit u. */
static void write_out(const cpu_attn_strided_desc *d, const unit *u, const float *l, const float *acc) {
    const int32_t D = d->head_dim, G0 = d->n_q_heads / d->n_kv_heads, G = G0 * u->nh;
    for (int32_t g = 0; g < G; g++)
        for (int32_t t = 0; t < u->tt; t++) {
            const int32_t qi = g * u->tt + t;
            float *o = out_row(d, u->s, u->t0 + t, u->kvh * G0 + g);
            const float inv = l[qi] == 0.0f ? 0.0f : 1.0f / l[qi];
            for (int32_t i = 0; i < D; i++) o[i] = acc[(size_t)qi * D + i] * inv;
        }
}

/* ggml_flash_attn_ext_reduce_partials: chunks in order, skipping empty
 * ones, each folded in as ggml's compiled loop does it (the first product
 * fused: VKQ = fma(VKQ, scale_old, VKQ_c * scale_new), S likewise). */
static void merge_ggml(const item *items, const unit *u, const float *parts, size_t part_floats,
                       int32_t nq, int32_t nq_max, int32_t D, float *l, float *acc) {
    for (int32_t qi = 0; qi < nq; qi++) {
        float M = -INFINITY, S = 0.0f, *a = acc + (size_t)qi * D;
        memset(a, 0, (size_t)D * sizeof(float));
        for (int32_t c = 0; c < u->nsplit; c++) {
            const float *pp = parts + (size_t)items[u->first + c].part * part_floats;
            const float Mc = pp[qi], Sc = pp[nq_max + qi];
            if (Sc == 0.0f) continue;
            const float Mn = fmaxf(M, Mc), so = expf(M - Mn), sn = expf(Mc - Mn);
            const float *pa = pp + 2 * (size_t)nq_max + (size_t)qi * D;
            for (int32_t i = 0; i < D; i++) a[i] = fmaf(a[i], so, pa[i] * sn);
            S = fmaf(S, so, Sc * sn);
            M = Mn;
        }
        l[qi] = S;
    }
}

int cpu_attn_strided(const cpu_attn_strided_desc *d, int32_t n_threads) {
    if (cpu_attn_strided_check(d) != 0) return -1;
    const int32_t D = d->head_dim, G = d->n_q_heads / d->n_kv_heads;
    const int32_t nth = n_threads > 0 ? n_threads : omp_get_max_threads();
    const int32_t ntiles = (d->n_tokens + TILE_T - 1) / TILE_T;
    const int32_t tt_max = d->n_tokens < TILE_T ? d->n_tokens : TILE_T;
    const strided_item_fn fn = pick(d);
    /* KV heads per unit: on the fp32 SIMD path, adjacent heads whose rows
     * touch (ggml's cache) go together, up to all of them, so a group of
     * tokens is one contiguous run of memory instead of 128-256 B pieces a
     * row stride apart, which neither DRAM nor the hardware prefetcher
     * serve well (MHA ran at half the bandwidth). Bounded by the queries a
     * unit holds; prefill tiles already reuse each row tt times. */
    int32_t nh = 1;
#if HAVE_X86
    const size_t es = d->kv_dtype == APEX_DTYPE_F16 ? 2 : 4;
    if (fn == cpu_attn_strided_item_avx512 && d->k_nb_head == (size_t)D * es && d->v_nb_head == (size_t)D * es)
        for (nh = d->n_kv_heads; nh > 1; nh--)
            if (d->n_kv_heads % nh == 0 && nh * G * tt_max <= MAX_Q_UNIT) break;
#endif
    const int32_t nq_max = nh * G * (nh > 1 ? tt_max : TILE_T);
    const int32_t target = ITEMS_PER_THREAD * nth;
    const int32_t op_streams = d->ggml_streams > 0 ? d->ggml_streams : d->n_streams;
    const int ggml_split = d->ggml_compat && d->n_tokens == 1 && op_streams == 1 && d->n_kv >= 512;
    /* Exact mode cuts no unit's rows (ggml does not, outside its split-KV
     * decode), so with fewer units than the threads want (one sequence: a
     * unit per KV head, 3 for 2 threads) it cuts a unit's query heads
     * instead: qs parts, each a unit over a descriptor narrowed to its heads
     * (every query's arithmetic is its own: the bits do not change). */
    const int32_t nkv_units = d->n_streams * ntiles * (d->n_kv_heads / nh);
    int32_t qs = 1;
    if (d->ggml_compat && !ggml_split && nh == 1 && G > 1 && nkv_units < target) {
        qs = (target + nkv_units - 1) / nkv_units;
        if (qs > G) qs = G;
    }
    const int32_t nunits = nkv_units * qs;

    unit *units = malloc((size_t)nunits * sizeof *units);
    cpu_attn_strided_desc *narrow = qs > 1 ? malloc((size_t)nunits * sizeof *narrow) : NULL;
    if (!units || (qs > 1 && !narrow)) {
        free(units), free(narrow);
        return -1;
    }

    /* Visible range of each tile: the union over its tokens of [first, last]
     * finite mask entry; rows outside it are never read. */
    for (int32_t s = 0, ui = 0; s < d->n_streams; s++)
        for (int32_t ti = 0; ti < ntiles; ti++) {
            const int32_t t0 = ti * TILE_T;
            const int32_t tt = d->n_tokens - t0 < TILE_T ? d->n_tokens - t0 : TILE_T;
            int32_t lo = d->n_kv, hi = 0;
            if (!d->mask) {
                lo = 0, hi = d->n_kv;
            } else {
                for (int32_t t = t0; t < t0 + tt; t++) {
                    const uint16_t *mr = (const uint16_t *)((const char *)d->mask +
                                                            (size_t)s * d->mask_nb_stream +
                                                            (size_t)t * d->mask_nb_tok);
                    int32_t a = 0, b = d->n_kv;
                    while (a < b && mr[a] == F16_NEG_INF) a++;
                    while (b > a && mr[b - 1] == F16_NEG_INF) b--;
                    if (a < b) {
                        if (a < lo) lo = a;
                        if (b > hi) hi = b;
                    }
                }
                if (lo >= hi) lo = hi = 0;
            }
            for (int32_t h = 0; h < d->n_kv_heads; h += nh)
                for (int32_t p = 0; p < qs; p++, ui++) {
                    units[ui] = (unit){.s = s, .t0 = t0, .tt = tt, .kvh = h, .nh = nh, .lo = lo, .hi = hi, .d = d};
                    if (qs == 1) continue;
                    /* Query heads [g0, g1) of KV head h, as heads of a
                     * one-KV-head call. */
                    const int32_t g0 = p * G / qs, g1 = (p + 1) * G / qs;
                    cpu_attn_strided_desc *n = &narrow[ui];
                    *n = *d;
                    n->n_kv_heads = 1;
                    n->n_q_heads = g1 - g0;
                    n->q = (const float *)((const char *)d->q + (size_t)(h * G + g0) * d->q_nb_head);
                    n->out = (float *)((char *)d->out + (size_t)(h * G + g0) * d->out_nb_head);
                    n->k = (const char *)d->k + (size_t)h * d->k_nb_head;
                    n->v = (const char *)d->v + (size_t)h * d->v_nb_head;
                    units[ui].kvh = 0;
                    units[ui].d = n;
                }
        }

    /* Split units into chunks only when there are too few for the threads;
     * in exact mode only where ggml does (its split-KV decode), into its
     * chunks of gcs rows. */
    const int32_t gnth = d->ggml_n_threads > 0 ? d->ggml_n_threads : nth;
    const int32_t gcs = (d->n_kv + gnth - 1) / gnth;
    int32_t nitems = 0, nparts = 0;
    for (int32_t ui = 0; ui < nunits; ui++) {
        unit *u = &units[ui];
        const int32_t len = u->hi - u->lo;
        int32_t ns = 1;
        if (ggml_split) {
            ns = (d->n_kv + gcs - 1) / gcs;
        } else if (nunits < target && len > MIN_CHUNK && !d->ggml_compat) {
            ns = (target + nunits - 1) / nunits;
            if (ns > len / MIN_CHUNK) ns = len / MIN_CHUNK;
            if (ns < 1) ns = 1;
        }
        u->nsplit = ns;
        u->first = nitems;
        nitems += ns;
        if (ns > 1) nparts += ns;
    }

    item *items = malloc((size_t)nitems * sizeof *items);
    const size_t part_floats = (size_t)nq_max * (D + 2);
    float *parts = nparts ? malloc((size_t)nparts * part_floats * sizeof(float)) : NULL;
    const size_t scr_floats = scratch_floats(D, nq_max) + part_floats;
    float *scratch = malloc((size_t)nth * scr_floats * sizeof(float));
    if (!items || (nparts && !parts) || !scratch) {
        free(units), free(narrow), free(items), free(parts), free(scratch);
        return -1;
    }
    for (int32_t ui = 0, p = 0; ui < nunits; ui++) {
        const unit *u = &units[ui];
        const int32_t len = u->hi - u->lo;
        for (int32_t c = 0; c < u->nsplit; c++) {
            item *it = &items[u->first + c];
            it->u = ui;
            if (ggml_split) {
                /* ggml's chunk c, less the rows the mask hides (ggml skips
                 * them); an empty one leaves m = -inf, l = 0. */
                const int32_t c0 = c * gcs, c1 = c0 + gcs < d->n_kv ? c0 + gcs : d->n_kv;
                it->r0 = c0 > u->lo ? c0 : u->lo;
                it->r1 = c1 < u->hi ? c1 : u->hi;
                if (it->r1 < it->r0) it->r1 = it->r0;
            } else {
                it->r0 = u->lo + (int32_t)((int64_t)len * c / u->nsplit);
                it->r1 = u->lo + (int32_t)((int64_t)len * (c + 1) / u->nsplit);
            }
            it->part = u->nsplit > 1 ? p++ : -1;
        }
    }

#pragma omp parallel num_threads(nth)
    {
        float *scr = scratch + (size_t)omp_get_thread_num() * scr_floats;
        float *own = scr + scratch_floats(D, nq_max); /* m, l, acc of a direct item */
#pragma omp for schedule(dynamic, 1)
        for (int32_t i = 0; i < nitems; i++) {
            const item *it = &items[i];
            const unit *u = &units[it->u];
            float *dst = it->part >= 0 ? parts + (size_t)it->part * part_floats : own;
            float *m = dst, *l = dst + nq_max, *acc = dst + 2 * nq_max;
            fn(u->d, u, it->r0, it->r1, scr, m, l, acc);
            if (it->part < 0) write_out(u->d, u, l, acc);
        }
        /* Merge the chunks of split units by log-sum-exp. Without split
         * units (most decode calls) the loop, and its barrier, is skipped:
         * nparts is the same in every thread. */
        if (nparts > 0) {
#pragma omp for schedule(dynamic, 1)
            for (int32_t ui = 0; ui < nunits; ui++) {
                const unit *u = &units[ui];
                if (u->nsplit <= 1) continue;
                const int32_t nq = nh * (u->d->n_q_heads / u->d->n_kv_heads) * u->tt;
                float *m = own, *l = own + nq_max, *acc = own + 2 * nq_max;
                if (ggml_split) {
                    merge_ggml(items, u, parts, part_floats, nq, nq_max, D, l, acc);
                    write_out(u->d, u, l, acc);
                    continue;
                }
                for (int32_t qi = 0; qi < nq; qi++) {
                    float mx = -INFINITY;
                    for (int32_t c = 0; c < u->nsplit; c++) {
                        const float *pp = parts + (size_t)items[u->first + c].part * part_floats;
                        if (pp[qi] > mx) mx = pp[qi];
                    }
                    m[qi] = mx;
                    l[qi] = 0.0f;
                    float *a = acc + (size_t)qi * D;
                    memset(a, 0, (size_t)D * sizeof(float));
                    if (mx == -INFINITY) continue;
                    for (int32_t c = 0; c < u->nsplit; c++) {
                        const float *pp = parts + (size_t)items[u->first + c].part * part_floats;
                        if (pp[qi] == -INFINITY) continue;
                        const float w = expf(pp[qi] - mx);
                        l[qi] += w * pp[nq_max + qi];
                        const float *pa = pp + 2 * nq_max + (size_t)qi * D;
                        for (int32_t i2 = 0; i2 < D; i2++) a[i2] += w * pa[i2];
                    }
                }
                write_out(u->d, u, l, acc);
            }
        }
    }
    free(units), free(narrow), free(items), free(parts), free(scratch);
    return 0;
}
