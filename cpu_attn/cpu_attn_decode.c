/* cpu_attn_decode: splits the batch into work items (sequence, chunk of KV
 * blocks, range of KV heads) so that one long sequence still spreads over
 * every thread, runs the selected ISA's span kernel on each item, and merges
 * the partial (max, sum, acc) of chunked sequences by log-sum-exp.
 *
 * An item takes all KV heads of its chunk unless that leaves too few items
 * for the threads: a block's K (and V) heads are adjacent, so one thread
 * reading them all streams 2 runs of n_kv_heads panels per block instead of
 * jumping between scattered 4 KiB panels, which measured ~2x faster from
 * DRAM (TLB and hardware-prefetch restarts per panel). */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_attn/cpu_attn_impl.h"
#include "cpu_attn/kv_layout.h"

/* Fewer tokens than this per item cost more in merging and scheduling than
 * they gain in balance. */
#define MIN_CHUNK_TOKENS 256
/* Items per thread aimed for, so dynamic scheduling evens out ragged work
 * (at most; see items_per_thread). */
#define ITEMS_PER_THREAD 8

/* Each item starts with a stall: its first group of K/V is fetched before
 * anything hides it (later groups are prefetched during the one before).
 * With few sequences, equal chunks balance by themselves, and 2 items per
 * thread instead of 8 measured 20-25% faster at batch 1-4, ctx 2k-4k; many
 * sequences keep 8, so that ragged lengths even out. */
static int32_t items_per_thread(int32_t n_seqs, int32_t n_threads) {
    return n_seqs <= 2 * n_threads ? 2 : ITEMS_PER_THREAD;
}

/* The simulation below is O(items x threads); past this it is skipped. */
#define SIM_MAX_THREADS 64
/* Per-item cost in tokens for the simulation: an item's first group is
 * fetched with nothing to hide it. */
#define ITEM_COST_TOKENS 64

/* Finish time, in tokens, of dynamic scheduling (each thread takes the
 * next item when it is free, in item order) of items of the given token
 * counts over n_threads, each item costing ITEM_COST_TOKENS more. */
static int64_t sim_makespan(const int32_t *t0, const int32_t *t1, int32_t n, int32_t n_threads) {
    int64_t load[SIM_MAX_THREADS] = {0}, mx = 0;
    for (int32_t k = 0; k < n; k++) {
        int32_t j = 0;
        for (int32_t u = 1; u < n_threads; u++)
            if (load[u] < load[j]) j = u;
        load[j] += (int64_t)(t1[k] - t0[k]) + ITEM_COST_TOKENS;
        if (load[j] > mx) mx = load[j];
    }
    return mx;
}

struct cpu_attn_ws {
    cpu_attn_geom g;
    int32_t max_seqs, max_len, n_threads;
    size_t thread_floats;   /* per-thread scratch stride, in floats      */
    float *thread_scratch;  /* [n_threads][thread_floats]               */
    int32_t cap_chunks;     /* (sequence, chunk) pairs the plan may use  */
    size_t part_floats;     /* floats per chunk: m[HQ] l[HQ] acc[HQ][D]  */
    float *partials;        /* [cap_chunks][part_floats]                 */
    int32_t *chunk_seq;     /* [cap_chunks] sequence of each chunk       */
    int32_t *chunk_t0, *chunk_t1;
    int32_t *seq_first;     /* [max_seqs] first chunk of the sequence    */
    int32_t *seq_nchunks;   /* [max_seqs]                                */
};

static size_t round16(size_t n) { return (n + 15) & ~(size_t)15; }

static void *alloc64(size_t bytes) {
    bytes = (bytes + 63) & ~(size_t)63;
    return aligned_alloc(64, bytes ? bytes : 64);
}

cpu_attn_ws *cpu_attn_ws_create(const cpu_attn_geom *g, int32_t max_seqs, int32_t max_len,
                                int32_t n_threads) {
    if (!g || g->n_kv_heads <= 0 || g->n_q_heads <= 0 || g->head_dim <= 0 || max_seqs <= 0 ||
        n_threads <= 0)
        return NULL;
    cpu_attn_ws *ws = calloc(1, sizeof *ws);
    if (!ws) return NULL;
    ws->g = *g;
    ws->max_seqs = max_seqs;
    ws->max_len = max_len;
    ws->n_threads = n_threads;
    const size_t HQ = (size_t)g->n_q_heads, D = (size_t)g->head_dim;
    /* q[HQ][D], acc[HQ][D], m[HQ], l[HQ], then the kernel's own scratch. */
    ws->thread_floats = round16(HQ * D) * 2 + round16(HQ) * 2 +
                        round16(cpu_attn_scratch_floats((int32_t)HQ, (int32_t)D));
    /* A plan never needs more chunks than this: see plan(). */
    ws->cap_chunks = ITEMS_PER_THREAD * n_threads + 3 * max_seqs + 1;
    ws->part_floats = round16(HQ * (D + 2));
    ws->thread_scratch = alloc64((size_t)n_threads * ws->thread_floats * sizeof(float));
    ws->partials = alloc64((size_t)ws->cap_chunks * ws->part_floats * sizeof(float));
    ws->chunk_seq = malloc((size_t)ws->cap_chunks * sizeof(int32_t));
    ws->chunk_t0 = malloc((size_t)ws->cap_chunks * sizeof(int32_t));
    ws->chunk_t1 = malloc((size_t)ws->cap_chunks * sizeof(int32_t));
    ws->seq_first = malloc((size_t)max_seqs * sizeof(int32_t));
    ws->seq_nchunks = malloc((size_t)max_seqs * sizeof(int32_t));
    if (!ws->thread_scratch || !ws->partials || !ws->chunk_seq || !ws->chunk_t0 ||
        !ws->chunk_t1 || !ws->seq_first || !ws->seq_nchunks) {
        cpu_attn_ws_destroy(ws);
        return NULL;
    }
    return ws;
}

void cpu_attn_ws_destroy(cpu_attn_ws *ws) {
    if (!ws) return;
    free(ws->thread_scratch);
    free(ws->partials);
    free(ws->chunk_seq);
    free(ws->chunk_t0);
    free(ws->chunk_t1);
    free(ws->seq_first);
    free(ws->seq_nchunks);
    free(ws);
}

/* dst[i] = src[i] * mul, the type switch outside the loop (a switch per
 * element kept it scalar: half of a 16-token call's time). */
static void load_q(float *restrict dst, const void *restrict src, apex_dtype dt, size_t n,
                   float mul) {
    APEX_DISPATCH_KV_DTYPE(dt, T, {
        const T *x = src;
        for (size_t i = 0; i < n; i++) dst[i] = T_to_f32(x[i]) * mul;
    });
}

static int32_t seq_start(const cpu_attn_batch *b, int32_t len) {
    return b->window > 0 && len > b->window ? len - b->window : 0;
}

/* Cuts every sequence's attended range into chunks of `chunk` tokens
 * (rounded to blocks, spread evenly) into ws; returns the number of
 * chunks, or 0 if they would not fit cap_chunks. */
static int32_t cut(const cpu_attn_batch *b, cpu_attn_ws *ws, int32_t bt, int64_t chunk) {
    const int64_t cb = (chunk + bt - 1) / bt; /* blocks per chunk */
    int32_t n = 0;
    for (int32_t i = 0; i < b->n_seqs; i++) {
        const int32_t len = b->seq_lens[i], start = seq_start(b, len);
        const int32_t fb = start / bt, nb = (len - 1) / bt - fb + 1;
        const int32_t nch = (int32_t)((nb + cb - 1) / cb);
        if (n + nch > ws->cap_chunks) return 0;
        ws->seq_first[i] = n;
        ws->seq_nchunks[i] = nch;
        for (int32_t k = 0; k < nch; k++) {
            /* Spread the blocks evenly over the chunks. */
            int32_t b0 = fb + (int32_t)((int64_t)nb * k / nch);
            int32_t b1 = fb + (int32_t)((int64_t)nb * (k + 1) / nch);
            int32_t t0 = b0 * bt, t1 = b1 * bt;
            ws->chunk_seq[n] = i;
            ws->chunk_t0[n] = t0 > start ? t0 : start;
            ws->chunk_t1[n] = t1 < len ? t1 : len;
            n++;
        }
    }
    return n;
}

/* Cuts every sequence's attended range into chunks on block borders:
 * the fewest items whose dynamic schedule (simulated, sim_makespan) ends
 * within 1/16 of an even split, trying whole sequences, then 1, 2 and
 * items_per_thread() items per thread; failing that, or with more than
 * SIM_MAX_THREADS threads, total / (items_per_thread() * n_threads)
 * tokens each. Never fewer than MIN_CHUNK_TOKENS a chunk. Every item
 * costs a stall at its start and split sequences a merge, so with equal
 * lengths (batch 8 on 2 threads) whole sequences, 4 per thread, beat
 * 8 half-sequences per thread (vs-vllm, cold, ctx 1k: see
 * docs/cpu_kernel.md). *balanced: a simulated plan was taken (its items
 * need no further split over KV heads). Returns the number of chunks, or
 * -1 if the workspace is too small for this batch. */
static int32_t plan(const cpu_attn_geom *g, const cpu_attn_batch *b, cpu_attn_ws *ws,
                    int32_t n_threads, int *balanced) {
    const int32_t bt = g->block_tokens;
    *balanced = 0;
    if (b->n_seqs > ws->max_seqs) return -1;
    int64_t total = 0;
    for (int32_t i = 0; i < b->n_seqs; i++) total += b->seq_lens[i] - seq_start(b, b->seq_lens[i]);
    int64_t chunk = INT32_MAX;
    if (n_threads > 1) {
        const int32_t ipt = items_per_thread(b->n_seqs, n_threads);
        if (n_threads <= SIM_MAX_THREADS) {
            const int32_t per[4] = {0, 1, 2, ipt};
            for (int c = 0; c < 4; c++) {
                if (c > 1 && per[c] <= per[c - 1]) continue;
                int64_t ck = INT32_MAX;
                if (per[c]) {
                    const int64_t target = (int64_t)per[c] * n_threads;
                    ck = (total + target - 1) / target;
                    if (ck < MIN_CHUNK_TOKENS) ck = MIN_CHUNK_TOKENS;
                }
                const int32_t n = cut(b, ws, bt, ck);
                if (n >= n_threads &&
                    sim_makespan(ws->chunk_t0, ws->chunk_t1, n, n_threads) * 16 <=
                        (total + (int64_t)n * ITEM_COST_TOKENS) * 17 / n_threads) {
                    *balanced = 1;
                    return n;
                }
            }
        }
        int64_t target = (int64_t)ipt * n_threads;
        chunk = (total + target - 1) / target;
        if (chunk < MIN_CHUNK_TOKENS) chunk = MIN_CHUNK_TOKENS;
    }
    /* Chunk count per sequence <= tokens/chunk + 3 (partial blocks at both
     * ends, rounding), and sum(tokens) / chunk <= target, so the plan fits
     * cap_chunks; the doubling below only guards the arithmetic. */
    for (;;) {
        const int32_t n = cut(b, ws, bt, chunk);
        if (n > 0) return n;
        if (chunk >= INT32_MAX) return -1;
        chunk *= 2;
    }
}

int cpu_attn_decode(const cpu_attn_geom *g, const cpu_attn_batch *b, cpu_attn_ws *ws,
                    int32_t n_threads) {
    if (b->n_seqs <= 0) return 0;
    if (n_threads > ws->n_threads) n_threads = ws->n_threads;
    if (n_threads < 1) n_threads = 1;
    int balanced;
    const int32_t n_chunks = plan(g, b, ws, n_threads, &balanced);
    if (n_chunks < 0) return -1;

    const cpu_attn_kernel *kern = cpu_attn_kernel_get(cpu_attn_isa_selected());
    if (g->kv_pairs && !cpu_attn_pairs_ok(g)) return -1;
    void (*const span)(const cpu_attn_span *, float *, float *, float *, float *) =
        g->kv_pairs ? kern->span_pairs : kern->span;
    const int32_t H = g->n_kv_heads, HQ = g->n_q_heads, G = HQ / H, D = g->head_dim;
    const int32_t bt = g->block_tokens;
    const apex_kv_layout lay = apex_kv_layout_of(H, bt, D, apex_dtype_size(g->kv_dtype));
    const size_t osz = apex_dtype_size(b->out_dtype);
    /* KV heads per item: all, unless chunks alone leave threads idle. */
    int32_t splits = 1;
    const int32_t target = items_per_thread(b->n_seqs, n_threads) * n_threads;
    if (n_threads > 1 && !balanced && n_chunks < target) {
        splits = (target + n_chunks - 1) / n_chunks;
        if (splits > H) splits = H;
    }
    const int32_t hper = (H + splits - 1) / splits;
    splits = (H + hper - 1) / hper;
    const int32_t n_items = n_chunks * splits;
    /* q is scaled here unless the kernel scales the scores itself. */
    const int raw_q = kern->raw_q_bf16_kv && g->kv_dtype == APEX_DTYPE_BF16;
    const float qmul = raw_q ? 1.0f : b->scale;
    /* No sequence split: no merge, so the item loop needs no barrier of
     * its own (one wake-up fewer per call; a short call is a few us). */
    const int merge = n_chunks > b->n_seqs;

#pragma omp parallel num_threads(n_threads)
    {
        float *ts = ws->thread_scratch + (size_t)omp_get_thread_num() * ws->thread_floats;
        float *q = ts;
        float *acc = q + round16((size_t)HQ * D);
        float *m = acc + round16((size_t)HQ * D);
        float *l = m + round16((size_t)HQ);
        float *kscratch = l + round16((size_t)HQ);

#pragma omp for schedule(dynamic, 1) nowait
        for (int32_t it = 0; it < n_items; it++) {
            const int32_t c = it / splits, h0 = (it % splits) * hper, i = ws->chunk_seq[c];
            const int32_t nh = H - h0 < hper ? H - h0 : hper;
            const size_t nq = (size_t)nh * (size_t)G; /* q heads of this item */
            const size_t qbase = ((size_t)i * (size_t)HQ + (size_t)h0 * (size_t)G) * (size_t)D;
            const void *qsrc = (const uint8_t *)b->q + qbase * apex_dtype_size(b->q_dtype);
            if (kern->load) kern->load(q, qsrc, b->q_dtype, nq * (size_t)D, qmul);
            else load_q(q, qsrc, b->q_dtype, nq * (size_t)D, qmul);
            const cpu_attn_span sp = {
                .q = q,
                .q_scale = raw_q ? b->scale : 1.0f,
                .kv = b->kv,
                .blocks = b->block_table + (size_t)i * (size_t)b->block_table_stride,
                .block_bytes = b->block_bytes,
                .k_off = apex_kv_offset(&lay, 0, h0, 0),
                .v_off = apex_kv_offset(&lay, 1, h0, 0),
                .panel = lay.panel,
                .NH = nh, .G = G, .D = D, .bt = bt,
                .t0 = ws->chunk_t0[c], .t1 = ws->chunk_t1[c],
                .kv_dtype = g->kv_dtype,
                .softcap = b->softcap,
            };
            if (ws->seq_nchunks[i] == 1) {
                span(&sp, m, l, acc, kscratch);
                for (size_t j = 0; j < nq; j++)
                    kern->store((uint8_t *)b->out + (qbase + j * (size_t)D) * osz, b->out_dtype,
                                acc + j * (size_t)D, 1.0f / l[j], D);
            } else {
                /* Partials of chunk c: m[HQ], l[HQ], acc[HQ][D]. */
                float *p = ws->partials + (size_t)c * ws->part_floats;
                const size_t q0 = (size_t)h0 * (size_t)G;
                span(&sp, p + q0, p + HQ + q0, p + 2 * (size_t)HQ + q0 * (size_t)D, kscratch);
            }
        }

        /* Merge the chunks of split sequences: out = sum_c acc_c e^(m_c-M)
         * / sum_c l_c e^(m_c-M), M the largest m_c; after every item's
         * partials are written. merge is the same in every thread; the
         * parallel region's end is the last barrier. */
        if (merge) {
#pragma omp barrier
#pragma omp for schedule(dynamic, 4) nowait
            for (int32_t x = 0; x < b->n_seqs * HQ; x++) {
                const int32_t i = x / HQ, j = x % HQ, nch = ws->seq_nchunks[i];
                if (nch <= 1) continue;
                const float *p0 = ws->partials + (size_t)ws->seq_first[i] * ws->part_floats;
                float M = -INFINITY;
                for (int32_t k = 0; k < nch; k++) {
                    const float mk = p0[(size_t)k * ws->part_floats + (size_t)j];
                    if (mk > M) M = mk;
                }
                float L = 0.0f;
                memset(acc, 0, (size_t)D * sizeof(float));
                for (int32_t k = 0; k < nch; k++) {
                    const float *p = p0 + (size_t)k * ws->part_floats;
                    const float w = expf(p[j] - M);
                    L += w * p[HQ + j];
                    const float *pa = p + 2 * (size_t)HQ + (size_t)j * D;
                    for (int32_t d = 0; d < D; d++) acc[d] += w * pa[d];
                }
                const size_t obase = ((size_t)i * (size_t)HQ + (size_t)j) * (size_t)D;
                kern->store((uint8_t *)b->out + obase * osz, b->out_dtype, acc, 1.0f / L, D);
            }
        }
    }
    return 0;
}
