/*
 * fuzz_paged.c - apex_paged.h under libFuzzer. The input picks a context
 * over engine memory (arbitrary bytes per layer, alignment, overlap, NULL
 * entries; host mode or the emulated device's tier), then claims and runs
 * writes by slot mapping (arbitrary slots, strides, dtypes, NaN/Inf) and
 * attention over arbitrary block tables, lengths and query layouts.
 * Checked: every failure has a message and leaves the engine memory and
 * the stats (but the error count) as they were; a create the input makes
 * invalid (misaligned, overlapping, too small) fails; a write the model
 * knows to be valid succeeds and invalid ones fail; the engine memory
 * holds exactly the rows written (host tier); attention over fully written
 * rows matches a double-precision reference.
 */
#include "cpu_attn/dtype_convert.h"
#include "cpu_attn/kv_layout.h"
#include "apex/apex_paged.h"
#include "fuzz_util.h"

enum { ARENA = 1 << 16, MAX_L = 2, MAX_ROWS = 8, MAX_SEQS = 4, MAX_LEN = 48 };

typedef struct {
    apex_context *ctx;
    apex_config c;
    uint8_t *arena;
    int64_t total, n_dev; /* blocks: all, device tier */
    int row, qrow, bt;
    float *kv;       /* [layer][slot][2][row] as stored */
    uint8_t *known;  /* [layer][slot] */
    uint64_t rng;
} model;

static float round_to(apex_dtype t, float x) {
    uint32_t tmp;
    apex_store_f32(&tmp, t, 0, x);
    return apex_load_f32(&tmp, t, 0);
}

static float *kv_at(model *m, int l, int64_t slot, int which) {
    return m->kv + (((size_t)l * (size_t)(m->total * m->bt) + (size_t)slot) * 2 + (size_t)which) *
                       (size_t)m->row;
}

/* A failure changed neither the engine memory nor the stats (but errors). */
typedef struct {
    apex_stats st;
    uint8_t *mem;
} snap;

static void take(model *m, snap *s) {
    apex_stats_get(m->ctx, &s->st);
    s->mem = malloc(ARENA);
    memcpy(s->mem, m->arena, ARENA);
}

static void after(model *m, snap *b, apex_status st) {
    FZ_STATUS(st);
    apex_stats now;
    apex_stats_get(m->ctx, &now);
    FZ_CHECK(now.errors == b->st.errors + (st != APEX_OK), "errors not counted");
    if (st != APEX_OK) {
        now.errors = b->st.errors;
        now.attention_seconds = b->st.attention_seconds;
        now.kv_write_seconds = b->st.kv_write_seconds;
        FZ_CHECK(!memcmp(&now, &b->st, sizeof now), "a failed call changed the stats");
        FZ_CHECK(!memcmp(b->mem, m->arena, ARENA), "a failed call changed engine memory");
    }
    free(b->mem);
}

static int64_t pick_slot(model *m, fz *f) {
    uint8_t k = fz_u8(f);
    if (k < 220) return (int64_t)(fz_u32(f) % (uint32_t)(m->total * m->bt));
    if (k < 240) return -1 - fz_below(f, 3); /* padding */
    return (int64_t)fz_u32(f) * (k & 1 ? 1 : -1) * 65536;
}

static void op_write(model *m, fz *f) {
    int32_t layer = fz_int(f, 0, m->c.n_layers - 1);
    int64_t n = fz_int(f, 0, MAX_ROWS);
    if (n > MAX_ROWS) n = MAX_ROWS; /* the arrays hold MAX_ROWS rows (no limit to check) */
    int64_t nrows = n >= 0 ? n : 1;
    apex_dtype dt = (apex_dtype)fz_int(f, 0, 2);
    int64_t ks = (int64_t)m->row + (fz_u8(f) > 200 ? fz_int(f, -3, 8) : 0);
    int64_t vs = (int64_t)m->row + (fz_u8(f) > 200 ? fz_int(f, -3, 8) : 0);
    int64_t slots[MAX_ROWS];
    for (int64_t i = 0; i < nrows; i++) slots[i] = pick_slot(m, f);
    int64_t maxs = ks > vs ? ks : vs;
    if (maxs < m->row) maxs = m->row;
    if (maxs > 4 * m->row) maxs = 4 * m->row; /* strides beyond this are refused below */
    size_t el = apex_dtype_valid(dt) ? apex_dtype_size(dt) : 4;
    size_t count = (size_t)nrows * (size_t)maxs;
    uint8_t *k = malloc(count * el + 1), *v = malloc(count * el + 1);
    for (size_t i = 0; apex_dtype_valid(dt) && i < count; i++) {
        apex_store_f32(k, dt, i, fz_randf(&m->rng));
        apex_store_f32(v, dt, i, fz_randf(&m->rng));
    }
    if (count && apex_dtype_valid(dt) && fz_u8(f) > 245) apex_store_f32(k, dt, fz_u32(f) % count, NAN);
    int valid = layer >= 0 && layer < m->c.n_layers && n >= 0 && apex_dtype_valid(dt) &&
                ks >= m->row && vs >= m->row;
    int sized = ks <= 4 * m->row && vs <= 4 * m->row; /* the buffers hold the rows */
    if (!sized && n > 0) { /* would read past the buffers: not a call to make */
        free(k);
        free(v);
        return;
    }
    for (int64_t i = 0; valid && i < n; i++) {
        if (slots[i] < 0) continue;
        valid = slots[i] / m->bt < m->total;
        for (int e = 0; valid && e < m->row; e++)
            valid = isfinite(apex_load_f32(k, dt, (size_t)(i * ks + e))) &&
                    isfinite(apex_load_f32(v, dt, (size_t)(i * vs + e)));
    }
    snap b;
    take(m, &b);
    apex_status st = apex_paged_kv_write(m->ctx, layer, n, slots, k, ks, v, vs, dt);
    after(m, &b, st);
    FZ_CHECK(valid == (st == APEX_OK), "paged_kv_write valid %d (layer %d n %lld dt %d strides %lld %lld row %d): %s", valid, layer, (long long)n, (int)dt, (long long)ks, (long long)vs, m->row, apex_status_name(st));
    for (int64_t i = 0; st == APEX_OK && i < n; i++) {
        if (slots[i] < 0) continue;
        float *kd = kv_at(m, layer, slots[i], 0), *vd = kv_at(m, layer, slots[i], 1);
        for (int e = 0; e < m->row; e++) {
            kd[e] = round_to(m->c.kv_dtype, apex_load_f32(k, dt, (size_t)(i * ks + e)));
            vd[e] = round_to(m->c.kv_dtype, apex_load_f32(v, dt, (size_t)(i * vs + e)));
        }
        m->known[(size_t)layer * (size_t)(m->total * m->bt) + (size_t)slots[i]] = 1;
    }
    free(k);
    free(v);
}

/* The host tier in engine memory holds exactly what the model wrote there. */
static void check_memory(model *m) {
    int D = m->c.head_dim, hk = m->c.n_kv_heads;
    size_t el = apex_dtype_size(m->c.kv_dtype);
    /* Row layout, or (host mode, bf16) the CPU pair layout: kv_layout.h. */
    apex_kv_layout lay = apex_kv_layout_of(hk, m->bt, D, el);
    lay.pairs = apex_context_kv_layout(m->ctx) == APEX_KV_PAIRS;
    for (int l = 0; l < m->c.n_layers; l++) {
        void *base;
        int64_t nb;
        FZ_CHECK(apex_paged_layer_kv(m->ctx, l, APEX_TIER_HOST, &base, &nb) == APEX_OK, "layer_kv");
        for (int64_t slot = m->n_dev * m->bt; slot < m->total * m->bt; slot++) {
            if (!m->known[(size_t)l * (size_t)(m->total * m->bt) + (size_t)slot]) continue;
            int64_t blk = slot / m->bt - m->n_dev, off = slot % m->bt;
            const uint8_t *b = (const uint8_t *)base + (size_t)blk * 2 * hk * m->bt * D * el;
            for (int w = 0; w < 2; w++)
                for (int h = 0; h < hk; h++)
                    for (int e = 0; e < D; e++) {
                        const size_t at = apex_kv_elem_offset(&lay, w, h, (int32_t)off, e, el);
                        float got = apex_load_f32(b + at, m->c.kv_dtype, 0);
                        FZ_CHECK(got == kv_at(m, l, slot, w)[h * D + e],
                                 "layer %d slot %lld: engine memory differs", l, (long long)slot);
                    }
        }
    }
}

static void op_attention(model *m, fz *f) {
    int32_t layer = fz_int(f, 0, m->c.n_layers - 1);
    int32_t n = fz_int(f, 0, MAX_SEQS);
    if (n > MAX_SEQS) n = MAX_SEQS; /* the arrays hold MAX_SEQS (+1) entries */
    int32_t ns = n >= 0 ? n : 1;
    int32_t qsl[MAX_SEQS + 1] = {0}, lens[MAX_SEQS], table[MAX_SEQS * 8];
    int32_t stride = 8;
    int by_construction = 1;
    for (int i = 0; i < ns; i++) {
        lens[i] = 1 + fz_below(f, MAX_LEN);
        int32_t ql = fz_below(f, 3) ? 1 : fz_below(f, lens[i] + 1);
        if (lens[i] > m->c.max_seq_len) lens[i] = m->c.max_seq_len;
        if (ql > lens[i]) ql = lens[i];
        qsl[i + 1] = qsl[i] + ql;
        for (int b = 0; b < 8; b++) table[i * 8 + b] = fz_below(f, (int32_t)(m->total < 255 ? m->total : 255));
    }
    if (fz_u8(f) > 220) { /* an arbitrary entry somewhere */
        by_construction = 0;
        int which = fz_below(f, 4);
        int32_t v = fz_int(f, -2, 64);
        if (which == 0) qsl[fz_below(f, ns + 1)] = v;
        else if (which == 1) lens[fz_below(f, ns)] = v;
        else if (which == 2) table[fz_below(f, ns * 8)] = v;
        else stride = fz_below(f, 9); /* rows of the table are 8 apart: no larger stride */
    }
    apex_attn_opts o = apex_attn_opts_default(m->ctx);
    if (fz_u8(f) & 1) {
        o.window = fz_u8(f) > 200 ? fz_int(f, 0, 40) : 0;
        o.softcap = fz_u8(f) > 200 ? 5.0f : 0.0f;
        o.q_dtype = (apex_dtype)fz_below(f, 3);
        o.out_dtype = (apex_dtype)fz_below(f, 3);
        if (o.window < 0) by_construction = 0;
    }
    /* Rows the buffers hold: the largest end any entry names. */
    int32_t rows = 0;
    for (int i = 0; i <= ns; i++) rows = qsl[i] > rows ? qsl[i] : rows;
    if (rows > MAX_SEQS * MAX_LEN) return; /* the call would read past q */
    size_t count = (size_t)rows * (size_t)m->qrow;
    uint8_t *q = malloc(count * 4 + 4), *out = malloc(count * 4 + 4);
    for (size_t i = 0; i < count; i++) apex_store_f32(q, o.q_dtype, i, fz_randf(&m->rng));
    snap b;
    take(m, &b);
    apex_status st = apex_paged_attention(m->ctx, layer, n, qsl, lens, table, stride, q, out, &o);
    after(m, &b, st);
    if (by_construction && n == ns && layer < m->c.n_layers && layer >= 0)
        FZ_CHECK(st == APEX_OK, "a valid paged attention failed");
    /* Reference for rows whose positions were all written. */
    int D = m->c.head_dim, group = m->c.n_q_heads / m->c.n_kv_heads;
    double scale = 1.0 / sqrt((double)D);
    for (int i = 0; st == APEX_OK && i < n; i++) {
        int32_t ql = qsl[i + 1] - qsl[i];
        for (int j = 0; j < ql; j++) {
            int32_t end = lens[i] - ql + j + 1;
            int32_t start = o.window > 0 && end > o.window ? end - o.window : 0;
            int all = 1;
            for (int p = start; p < end && all; p++) {
                int64_t slot = (int64_t)table[i * stride + p / m->bt] * m->bt + p % m->bt;
                all = m->known[(size_t)layer * (size_t)(m->total * m->bt) + (size_t)slot];
            }
            if (!all) continue;
            size_t r = (size_t)(qsl[i] + j);
            for (int h = 0; h < m->c.n_q_heads; h++) {
                int g = h / group;
                double w[MAX_LEN], mx = -INFINITY, sum = 0;
                for (int p = start; p < end; p++) {
                    int64_t slot = (int64_t)table[i * stride + p / m->bt] * m->bt + p % m->bt;
                    const float *kr = kv_at(m, layer, slot, 0) + g * D;
                    double dot = 0;
                    for (int e = 0; e < D; e++)
                        dot += (double)apex_load_f32(q, o.q_dtype, (r * m->c.n_q_heads + h) * D + e) * kr[e];
                    dot *= scale;
                    if (o.softcap > 0) dot = o.softcap * tanh(dot / o.softcap);
                    w[p] = dot;
                    mx = dot > mx ? dot : mx;
                }
                for (int p = start; p < end; p++) sum += (w[p] = exp(w[p] - mx));
                for (int e = 0; e < D; e++) {
                    double want = 0;
                    for (int p = start; p < end; p++) {
                        int64_t slot = (int64_t)table[i * stride + p / m->bt] * m->bt + p % m->bt;
                        want += w[p] / sum * kv_at(m, layer, slot, 1)[g * D + e];
                    }
                    float got = apex_load_f32(out, o.out_dtype, (r * m->c.n_q_heads + h) * D + e);
                    FZ_CHECK(fabs(got - want) <= 2e-2 + 1e-2 * fabs(want),
                             "seq %d row %d head %d elem %d: got %g want %g", i, j, h, e, got, want);
                }
            }
        }
    }
    free(q);
    free(out);
}

/* apex_paged_submit + apex_paged_wait over arbitrary rows and tables:
 * refused (device-tier only, one staging slot, bad input) with nothing
 * changed, or both succeed and the rows are stored as apex_paged_kv_write
 * stores them. */
static void op_submit(model *m, fz *f) {
    int32_t layer = fz_int(f, 0, m->c.n_layers - 1);
    int64_t n_rows = fz_int(f, 0, MAX_ROWS);
    if (n_rows > MAX_ROWS || n_rows < 0) n_rows = n_rows < 0 ? -1 : MAX_ROWS;
    int64_t slots[MAX_ROWS];
    float k[MAX_ROWS * 256], v[MAX_ROWS * 256]; /* rows of at most 2 heads x 128 */
    for (int64_t i = 0; i < (n_rows > 0 ? n_rows : 0); i++) {
        slots[i] = fz_u8(f) < 200 && m->n_dev ? (int64_t)(fz_u32(f) % (uint32_t)(m->n_dev * m->bt)) : pick_slot(m, f);
        for (int e = 0; e < m->row; e++) k[i * m->row + e] = fz_randf(&m->rng), v[i * m->row + e] = fz_randf(&m->rng);
    }
    if (n_rows > 0 && fz_u8(f) > 245) k[fz_u32(f) % (uint32_t)(n_rows * m->row)] = NAN;
    int32_t n = fz_int(f, 0, MAX_SEQS);
    if (n > MAX_SEQS) n = MAX_SEQS;
    int32_t ns = n >= 0 ? n : 1, qsl[MAX_SEQS + 1] = {0}, lens[MAX_SEQS], table[MAX_SEQS * 8];
    for (int i = 0; i < ns; i++) {
        lens[i] = 1 + fz_below(f, MAX_LEN);
        qsl[i + 1] = qsl[i] + (fz_below(f, 4) ? 1 : fz_below(f, 3));
        if (qsl[i + 1] - qsl[i] > lens[i]) qsl[i + 1] = qsl[i] + lens[i];
        for (int b = 0; b < 8; b++) {
            int64_t pool = fz_u8(f) < 230 && m->n_dev ? m->n_dev : m->total;
            table[i * 8 + b] = fz_below(f, (int32_t)(pool < 255 ? pool : 255));
        }
    }
    size_t count = (size_t)qsl[ns] * (size_t)m->qrow;
    float *q = malloc(count * 4 + 4), *out = malloc(count * 4 + 4);
    for (size_t i = 0; i < count; i++) q[i] = fz_randf(&m->rng);
    apex_paged_step sp = {
        .layer = layer, .n_rows = n_rows, .slots = slots, .k = k, .v = v, .k_row_stride = m->row,
        .v_row_stride = m->row, .kv_src_dtype = APEX_DTYPE_F32, .n_seqs = n, .query_start_loc = qsl,
        .seq_lens = lens, .block_table = table, .block_table_stride = 8, .q = q, .out = out,
    };
    snap b;
    take(m, &b);
    apex_status st = apex_paged_submit(m->ctx, &sp);
    after(m, &b, st);
    if (st == APEX_OK) {
        FZ_CHECK(apex_paged_submit(m->ctx, &sp) == APEX_ERR_INVALID_ARG, "a second submit in flight");
        FZ_CHECK(apex_paged_wait(m->ctx) == APEX_OK, "wait after a good submit: %s", apex_last_error());
        for (int64_t i = 0; i < n_rows; i++) {
            if (slots[i] < 0) continue;
            FZ_CHECK(slots[i] / m->bt < m->n_dev, "a host-tier row was submitted");
            float *kd = kv_at(m, layer, slots[i], 0), *vd = kv_at(m, layer, slots[i], 1);
            for (int e = 0; e < m->row; e++) {
                kd[e] = round_to(m->c.kv_dtype, k[i * m->row + e]);
                vd[e] = round_to(m->c.kv_dtype, v[i * m->row + e]);
            }
            m->known[(size_t)layer * (size_t)(m->total * m->bt) + (size_t)slots[i]] = 1;
        }
    }
    FZ_CHECK(apex_paged_wait(m->ctx) == APEX_ERR_INVALID_ARG, "nothing in flight after a wait");
    free(q);
    free(out);
}

/* Contexts (with their arena) are kept across inputs, keyed by config and
 * layout: a create costs ~7 ms of hwloc topology loading. A kept one is
 * claimed and has no state of its own but the KV bytes, which the model
 * treats as unknown until an input writes them. */
typedef struct {
    char key[320];
    apex_context *ctx;
    uint8_t *arena;
} cached;
enum { N_CACHE = 8 };
static cached cache[N_CACHE];
static int cache_next;

static const int32_t head_dims[] = {64, 128};
static const int32_t block_sizes[] = {8, 16};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz f = {data, size, 0};
    model m;
    memset(&m, 0, sizeof m);
    apex_config *c = &m.c;
    if (apex_config_init(c) != APEX_OK) return 0;
    int emulated = fz_u8(&f) & 1;
    c->n_layers = 1 + fz_below(&f, MAX_L);
    c->n_kv_heads = 1 + fz_below(&f, 2);
    c->n_q_heads = c->n_kv_heads * (1 + fz_below(&f, 2));
    c->head_dim = head_dims[fz_below(&f, 2)];
    c->kv_dtype = (apex_dtype)fz_below(&f, 3);
    c->act_dtype = APEX_DTYPE_F32;
    c->block_tokens = block_sizes[fz_below(&f, 2)];
    c->host_blocks = fz_below(&f, 12);
    c->device_blocks = emulated ? fz_below(&f, 8) : 0;
    c->max_seqs = 4;
    c->max_batch = 1 + fz_below(&f, 4);
    c->max_seq_len = MAX_LEN;
    c->n_threads = 1;
    c->device = emulated ? APEX_DEVICE_EMULATED : APEX_DEVICE_NONE;

    /* Engine memory: per layer an offset into the arena and one size. */
    size_t bb = 2 * (size_t)c->n_kv_heads * c->block_tokens * c->head_dim *
                (c->kv_dtype == APEX_DTYPE_F32 ? 4 : 2);
    size_t bpl = fz_u8(&f) > 230 ? fz_u32(&f) % (ARENA / 2) : bb * (size_t)(1 + fz_below(&f, 10));
    if (bpl * (size_t)c->n_layers > ARENA) bpl = ARENA / (size_t)c->n_layers;
    void *layers[MAX_L];
    size_t offs[MAX_L];
    int layout_ok = 1;
    for (int l = 0; l < c->n_layers; l++) {
        size_t off = (size_t)l * bpl;
        if (fz_u8(&f) > 220) off = (fz_u32(&f) % (ARENA - bpl + 1)) & ~(size_t)(fz_u8(&f) & 1 ? 63 : 0);
        offs[l] = off;
        if (off % APEX_PAGED_HOST_KV_ALIGN) layout_ok = 0;
    }
    int null_table = fz_u8(&f) == 255;
    char key[320];
    snprintf(key, sizeof key, "%d %d %d %d %d %d %lld %lld %d %d %zu %zu %zu %d", c->n_layers,
             c->n_q_heads, c->n_kv_heads, c->head_dim, (int)c->kv_dtype, c->block_tokens,
             (long long)c->host_blocks, (long long)c->device_blocks, c->max_batch, (int)c->device,
             bpl, offs[0], c->n_layers > 1 ? offs[1] : 0, null_table);
    cached *hit = NULL;
    for (int i = 0; i < N_CACHE; i++)
        if (cache[i].ctx && !strcmp(cache[i].key, key)) hit = &cache[i];
    m.arena = hit ? hit->arena : aligned_alloc(4096, ARENA);
    if (!hit) memset(m.arena, 0, ARENA);
    for (int l = 0; l < c->n_layers; l++) layers[l] = m.arena + offs[l];
    size_t fit = bpl / bb, want = c->host_blocks ? (size_t)c->host_blocks : fit;
    if (want < 1 || want > fit) layout_ok = 0;
    for (int l = 0; l < c->n_layers && layout_ok; l++)
        for (int k = 0; k < l; k++) {
            uintptr_t a = (uintptr_t)layers[l], b = (uintptr_t)layers[k];
            if (a < b + want * bb && b < a + want * bb) layout_ok = 0;
        }
    apex_context *ctx = (apex_context *)0x1;
    apex_status st = hit ? APEX_OK : apex_paged_context_create(c, null_table ? NULL : layers, bpl, &ctx);
    if (hit) ctx = hit->ctx;
    FZ_STATUS(st);
    if (st != APEX_OK) {
        FZ_CHECK(ctx == NULL, "failed create left *out set");
        for (size_t i = 0; i < ARENA; i++) FZ_CHECK(m.arena[i] == 0, "a failed create wrote engine memory");
        free(m.arena);
        return 0;
    }
    FZ_CHECK(layout_ok, "an invalid engine memory layout was accepted");
    m.ctx = ctx;
    if (!hit) {
        cached *slot = &cache[cache_next];
        cache_next = (cache_next + 1) % N_CACHE;
        if (slot->ctx) {
            apex_context_destroy(slot->ctx);
            free(slot->arena);
        }
        snprintf(slot->key, sizeof slot->key, "%s", key);
        slot->ctx = ctx;
        slot->arena = m.arena;
    }
    apex_config got;
    apex_context_config(ctx, &got);
    m.c = got;
    m.bt = got.block_tokens;
    m.row = got.n_kv_heads * got.head_dim;
    m.qrow = got.n_q_heads * got.head_dim;
    m.rng = 77;
    int64_t nb = 0;
    FZ_CHECK(apex_paged_claim(ctx, &nb) == APEX_OK, "claim");
    m.total = nb;
    m.n_dev = got.device_blocks;
    FZ_CHECK(nb == got.device_blocks + got.host_blocks, "claim count");
    int64_t nb2 = 0;
    FZ_CHECK(apex_paged_claim(ctx, &nb2) == APEX_OK && nb2 == nb, "second claim");
    FZ_CHECK(apex_seq_add(ctx, 0, APEX_TIER_AUTO) != APEX_OK, "seq_add after claim");
    size_t cells = (size_t)got.n_layers * (size_t)(m.total * m.bt);
    m.kv = calloc(cells * 2 * (size_t)m.row, sizeof(float));
    m.known = calloc(cells, 1);
    for (int op = 0; op < 32 && fz_more(&f); op++) {
        switch (fz_u8(&f) % 4) {
        case 0: op_write(&m, &f); break;
        case 1: op_attention(&m, &f); break;
        case 2: check_memory(&m); break;
        case 3: op_submit(&m, &f); break;
        }
    }
    check_memory(&m);
    apex_stats_reset(ctx); /* the context stays cached */
    free(m.kv);
    free(m.known);
    return 0;
}
