/* profile.c - the profile: errors, validation, JSON, component evaluation. */
#include "csrc/sched/json.h"
#include "csrc/sched/sched.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---------------------------------------------------------------- errors */

static _Thread_local char g_err[512];

const char *sched_last_error(void) { return g_err; }

sched_status sched_fail(sched_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_err, sizeof g_err, fmt, ap);
    va_end(ap);
    return s;
}

/* -------------------------------------------------------------- evaluation */

double apex_curve_eval(const apex_curve *c, double x) {
    if (c->n <= 0) return 0;
    if (x <= c->x[0]) {
        if (c->x[0] <= 0) return c->y[0];
        double t = x <= 0 ? 0 : x / c->x[0];
        return c->y[0] * t; /* towards (0, 0): no work, no time */
    }
    int n = c->n;
    if (x >= c->x[n - 1]) {
        if (n == 1) return c->y[0] * x / c->x[0];
        double slope = (c->y[n - 1] - c->y[n - 2]) / (c->x[n - 1] - c->x[n - 2]);
        if (slope < 0) slope = 0;
        return c->y[n - 1] + slope * (x - c->x[n - 1]);
    }
    int lo = 0, hi = n - 1; /* x[lo] <= x < x[hi] */
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (c->x[mid] <= x) lo = mid;
        else hi = mid;
    }
    double t = (x - c->x[lo]) / (c->x[hi] - c->x[lo]);
    return c->y[lo] + t * (c->y[hi] - c->y[lo]);
}

double apex_t_lin(const apex_profile *p, double rows) {
    return rows <= 0 ? 0 : apex_curve_eval(&p->lin, rows);
}
double apex_t_gatt(const apex_profile *p, double tokens) {
    return tokens <= 0 ? 0 : apex_curve_eval(&p->gatt, tokens);
}
double apex_t_pref(const apex_profile *p, double tokens) {
    return tokens <= 0 ? 0 : apex_curve_eval(&p->pref, tokens);
}
double apex_t_link(const apex_link *l, double bytes) {
    return bytes <= 0 ? 0 : l->lat_s + bytes / l->bw_Bps;
}

double apex_t_catt(const apex_profile *p, double tokens, double seqs,
                   int32_t threads) {
    if (seqs <= 0 || tokens <= 0 || p->n_catt <= 0) return 0;
    /* The fit at the largest measured thread count <= threads; fewer
     * threads than the smallest measured: scale that fit's variable part. */
    const apex_catt_fit *f = &p->catt[0];
    double scale = 1;
    if (threads < f->threads && threads > 0) scale = (double)f->threads / threads;
    for (int i = 0; i < p->n_catt; i++)
        if (p->catt[i].threads <= threads) f = &p->catt[i];
    return f->c0 + scale * (f->per_seq * seqs + f->per_token * tokens);
}

void apex_model_key(const apex_model_geom *g, char *buf, size_t n) {
    snprintf(buf, n, "L%d-q%d-kv%d-d%d-kvb%d-act%d-h%d-f%d-v%d", g->n_layers,
             g->n_q_heads, g->n_kv_heads, g->head_dim, g->kv_bytes,
             g->act_bytes, g->hidden, g->ffn, g->vocab);
}

/* -------------------------------------------------------------- validation */

static sched_status check_curve(apex_curve *c, const char *name) {
    if (c->n < 2 || c->n > APEX_CURVE_MAX)
        return sched_fail(SCHED_ERR_INVALID,
                          "profile: curve '%s' needs 2..%d points, has %d",
                          name, APEX_CURVE_MAX, c->n);
    for (int i = 0; i < c->n; i++) {
        if (!isfinite(c->x[i]) || c->x[i] < 0)
            return sched_fail(SCHED_ERR_INVALID,
                              "profile: curve '%s' point %d: x must be finite and >= 0",
                              name, i);
        if (!isfinite(c->y[i]) || c->y[i] < 0)
            return sched_fail(SCHED_ERR_INVALID,
                              "profile: curve '%s' point %d: time %g s is negative or not finite",
                              name, i, c->y[i]);
        if (i && c->x[i] <= c->x[i - 1])
            return sched_fail(SCHED_ERR_INVALID,
                              "profile: curve '%s' point %d: x must increase strictly",
                              name, i);
    }
    return SCHED_OK;
}

static sched_status check_pos(double v, const char *name, int allow_zero) {
    if (!isfinite(v) || v < 0 || (!allow_zero && v == 0))
        return sched_fail(SCHED_ERR_INVALID, "profile: '%s' = %g must be %s",
                          name, v, allow_zero ? ">= 0" : "> 0");
    return SCHED_OK;
}

sched_status apex_profile_validate(apex_profile *p) {
    if (!p) return sched_fail(SCHED_ERR_INVALID, "profile: NULL");
    const apex_model_geom *g = &p->geom;
    if (g->n_layers <= 0 || g->n_q_heads <= 0 || g->n_kv_heads <= 0 ||
        g->head_dim <= 0 || g->n_q_heads % g->n_kv_heads ||
        (g->kv_bytes != 1 && g->kv_bytes != 2 && g->kv_bytes != 4) ||
        (g->act_bytes != 2 && g->act_bytes != 4))
        return sched_fail(SCHED_ERR_INVALID,
                          "profile: geometry is missing or invalid (layers %d, q heads %d, "
                          "kv heads %d, head_dim %d, kv_bytes %d, act_bytes %d)",
                          g->n_layers, g->n_q_heads, g->n_kv_heads, g->head_dim,
                          g->kv_bytes, g->act_bytes);
    if (p->cpu_threads <= 0)
        return sched_fail(SCHED_ERR_INVALID, "profile: 'cpu_threads' must be > 0");
    sched_status s;
    if ((s = check_pos(p->step_overhead_s, "step_overhead_s", 1)) ||
        (s = check_pos(p->layer_sync_s, "layer_sync_s", 1)) ||
        (s = check_curve(&p->lin, "lin")) || (s = check_curve(&p->gatt, "gatt")) ||
        (s = check_curve(&p->pref, "pref")) ||
        (s = check_pos(p->h2d.lat_s, "pcie.h2d.lat_s", 1)) ||
        (s = check_pos(p->h2d.bw_Bps, "pcie.h2d.bw_Bps", 0)) ||
        (s = check_pos(p->d2h.lat_s, "pcie.d2h.lat_s", 1)) ||
        (s = check_pos(p->d2h.bw_Bps, "pcie.d2h.bw_Bps", 0)))
        return s;
    if (p->n_catt < 1 || p->n_catt > APEX_CATT_MAX)
        return sched_fail(SCHED_ERR_INVALID, "profile: 'catt' needs 1..%d fits, has %d",
                          APEX_CATT_MAX, p->n_catt);
    for (int i = 0; i < p->n_catt; i++) {
        const apex_catt_fit *f = &p->catt[i];
        char nm[48];
        snprintf(nm, sizeof nm, "catt[%d]", i);
        if (f->threads <= 0 || (i && f->threads <= p->catt[i - 1].threads))
            return sched_fail(SCHED_ERR_INVALID,
                              "profile: %s.threads must be > 0 and increase", nm);
        if (!isfinite(f->c0) || !isfinite(f->per_seq) || !isfinite(f->per_token) ||
            f->c0 < 0 || f->per_seq < 0 || f->per_token <= 0)
            return sched_fail(SCHED_ERR_INVALID,
                              "profile: %s has a negative or non-finite time "
                              "(c0 %g, per_seq %g, per_token %g; per_token must be > 0)",
                              nm, f->c0, f->per_seq, f->per_token);
    }
    /* Noise must not make the model non-monotone. */
    apex_curve *cs[3] = {&p->lin, &p->gatt, &p->pref};
    for (int k = 0; k < 3; k++)
        for (int i = 1; i < cs[k]->n; i++)
            if (cs[k]->y[i] < cs[k]->y[i - 1]) cs[k]->y[i] = cs[k]->y[i - 1];
    return SCHED_OK;
}

/* -------------------------------------------------------------------- JSON */

static void w_curve(jbuf *b, const char *name, const char *xname, const apex_curve *c) {
    jb_printf(b, ",\n  \"%s\": {\"%s\": [", name, xname);
    for (int i = 0; i < c->n; i++) { if (i) jb_puts(b, ", "); jb_num(b, c->x[i]); }
    jb_puts(b, "],\n    \"s\": [");
    for (int i = 0; i < c->n; i++) { if (i) jb_puts(b, ", "); jb_num(b, c->y[i]); }
    jb_puts(b, "]}");
}

static void w_link(jbuf *b, const char *name, const apex_link *l) {
    jb_printf(b, "\"%s\": {\"lat_s\": ", name);
    jb_num(b, l->lat_s);
    jb_puts(b, ", \"bw_Bps\": ");
    jb_num(b, l->bw_Bps);
    jb_puts(b, "}");
}

sched_status apex_profile_write(const apex_profile *p, char **out) {
    if (!p || !out) return sched_fail(SCHED_ERR_INVALID, "profile_write: NULL argument");
    jbuf b = {0};
    jb_printf(&b, "{\n  \"apex_profile\": %d,\n  \"hw_key\": ", APEX_PROFILE_VERSION);
    jb_str(&b, p->hw_key);
    jb_puts(&b, ",\n  \"model_key\": ");
    jb_str(&b, p->model_key);
    jb_puts(&b, ",\n  \"source\": ");
    jb_str(&b, p->source);
    const apex_model_geom *g = &p->geom;
    jb_printf(&b, ",\n  \"geometry\": {\"n_layers\": %d, \"n_q_heads\": %d, \"n_kv_heads\": %d, "
              "\"head_dim\": %d, \"kv_bytes\": %d, \"act_bytes\": %d, \"hidden\": %d, "
              "\"ffn\": %d, \"vocab\": %d}",
              g->n_layers, g->n_q_heads, g->n_kv_heads, g->head_dim, g->kv_bytes,
              g->act_bytes, g->hidden, g->ffn, g->vocab);
    jb_printf(&b, ",\n  \"cpu_threads\": %d,\n  \"step_overhead_s\": ", p->cpu_threads);
    jb_num(&b, p->step_overhead_s);
    jb_puts(&b, ",\n  \"layer_sync_s\": ");
    jb_num(&b, p->layer_sync_s);
    w_curve(&b, "lin", "rows", &p->lin);
    w_curve(&b, "gatt", "tokens", &p->gatt);
    w_curve(&b, "pref", "tokens", &p->pref);
    jb_puts(&b, ",\n  \"catt\": [");
    for (int i = 0; i < p->n_catt; i++) {
        const apex_catt_fit *f = &p->catt[i];
        jb_printf(&b, "%s\n    {\"threads\": %d, \"c0_s\": ", i ? "," : "", f->threads);
        jb_num(&b, f->c0);
        jb_puts(&b, ", \"per_seq_s\": ");
        jb_num(&b, f->per_seq);
        jb_puts(&b, ", \"per_token_s\": ");
        jb_num(&b, f->per_token);
        jb_puts(&b, "}");
    }
    jb_puts(&b, "],\n  \"pcie\": {");
    w_link(&b, "h2d", &p->h2d);
    jb_puts(&b, ", ");
    w_link(&b, "d2h", &p->d2h);
    jb_puts(&b, "}\n}\n");
    if (b.oom) { free(b.p); return sched_fail(SCHED_ERR_NO_MEMORY, "profile_write: out of memory"); }
    *out = b.p;
    return SCHED_OK;
}

/* Field readers: each fails with the field's path in the message. */
static sched_status r_num(const jnode *o, const char *k, const char *ctx, double *v) {
    const jnode *n = json_get(o, k);
    if (!n) return sched_fail(SCHED_ERR_INVALID, "profile: missing field '%s%s'", ctx, k);
    if (n->type != J_NUM)
        return sched_fail(SCHED_ERR_INVALID, "profile: field '%s%s' must be a number", ctx, k);
    *v = n->num;
    return SCHED_OK;
}

static sched_status r_int(const jnode *o, const char *k, const char *ctx, int32_t *v) {
    double d;
    sched_status s = r_num(o, k, ctx, &d);
    if (s) return s;
    if (d != floor(d) || fabs(d) > 2e9)
        return sched_fail(SCHED_ERR_INVALID, "profile: field '%s%s' must be an integer", ctx, k);
    *v = (int32_t)d;
    return SCHED_OK;
}

static sched_status r_str(const jnode *o, const char *k, char *dst, size_t n) {
    const jnode *s = json_get(o, k);
    if (!s) return sched_fail(SCHED_ERR_INVALID, "profile: missing field '%s'", k);
    if (s->type != J_STR)
        return sched_fail(SCHED_ERR_INVALID, "profile: field '%s' must be a string", k);
    snprintf(dst, n, "%s", s->str);
    return SCHED_OK;
}

static sched_status r_curve(const jnode *root, const char *k, const char *xname, apex_curve *c) {
    const jnode *o = json_get(root, k);
    if (!o || o->type != J_OBJ)
        return sched_fail(SCHED_ERR_INVALID, "profile: missing object '%s'", k);
    const jnode *xs = json_get(o, xname), *ys = json_get(o, "s");
    if (!xs || xs->type != J_ARR || !ys || ys->type != J_ARR)
        return sched_fail(SCHED_ERR_INVALID, "profile: '%s' needs arrays '%s' and 's'", k, xname);
    if (xs->n != ys->n)
        return sched_fail(SCHED_ERR_INVALID, "profile: '%s': %d x values but %d times", k,
                          xs->n, ys->n);
    if (xs->n > APEX_CURVE_MAX || xs->n < 2)
        return sched_fail(SCHED_ERR_INVALID, "profile: '%s' needs 2..%d points, has %d", k,
                          APEX_CURVE_MAX, xs->n);
    c->n = xs->n;
    const jnode *a = xs->child, *b = ys->child;
    for (int i = 0; i < c->n; i++, a = a->next, b = b->next) {
        if (a->type != J_NUM || b->type != J_NUM)
            return sched_fail(SCHED_ERR_INVALID, "profile: '%s' point %d is not a number", k, i);
        c->x[i] = a->num;
        c->y[i] = b->num;
    }
    return SCHED_OK;
}

static sched_status from_json(const jnode *r, apex_profile *p) {
    sched_status s;
    int32_t ver;
    if (!r || r->type != J_OBJ) return sched_fail(SCHED_ERR_INVALID, "profile: not a JSON object");
    if ((s = r_int(r, "apex_profile", "", &ver))) return s;
    if (ver != APEX_PROFILE_VERSION)
        return sched_fail(SCHED_ERR_INVALID, "profile: version %d, expected %d", ver,
                          APEX_PROFILE_VERSION);
    if ((s = r_str(r, "hw_key", p->hw_key, sizeof p->hw_key)) ||
        (s = r_str(r, "model_key", p->model_key, sizeof p->model_key)) ||
        (s = r_str(r, "source", p->source, sizeof p->source)))
        return s;
    const jnode *g = json_get(r, "geometry");
    if (!g || g->type != J_OBJ) return sched_fail(SCHED_ERR_INVALID, "profile: missing object 'geometry'");
    apex_model_geom *m = &p->geom;
    if ((s = r_int(g, "n_layers", "geometry.", &m->n_layers)) ||
        (s = r_int(g, "n_q_heads", "geometry.", &m->n_q_heads)) ||
        (s = r_int(g, "n_kv_heads", "geometry.", &m->n_kv_heads)) ||
        (s = r_int(g, "head_dim", "geometry.", &m->head_dim)) ||
        (s = r_int(g, "kv_bytes", "geometry.", &m->kv_bytes)) ||
        (s = r_int(g, "act_bytes", "geometry.", &m->act_bytes)) ||
        (s = r_int(g, "hidden", "geometry.", &m->hidden)) ||
        (s = r_int(g, "ffn", "geometry.", &m->ffn)) ||
        (s = r_int(g, "vocab", "geometry.", &m->vocab)) ||
        (s = r_int(r, "cpu_threads", "", &p->cpu_threads)) ||
        (s = r_num(r, "step_overhead_s", "", &p->step_overhead_s)) ||
        (s = r_num(r, "layer_sync_s", "", &p->layer_sync_s)) ||
        (s = r_curve(r, "lin", "rows", &p->lin)) ||
        (s = r_curve(r, "gatt", "tokens", &p->gatt)) ||
        (s = r_curve(r, "pref", "tokens", &p->pref)))
        return s;
    const jnode *ca = json_get(r, "catt");
    if (!ca || ca->type != J_ARR) return sched_fail(SCHED_ERR_INVALID, "profile: missing array 'catt'");
    if (ca->n < 1 || ca->n > APEX_CATT_MAX)
        return sched_fail(SCHED_ERR_INVALID, "profile: 'catt' needs 1..%d fits, has %d",
                          APEX_CATT_MAX, ca->n);
    p->n_catt = ca->n;
    int i = 0;
    for (const jnode *f = ca->child; f; f = f->next, i++) {
        char ctx[32];
        snprintf(ctx, sizeof ctx, "catt[%d].", i);
        if ((s = r_int(f, "threads", ctx, &p->catt[i].threads)) ||
            (s = r_num(f, "c0_s", ctx, &p->catt[i].c0)) ||
            (s = r_num(f, "per_seq_s", ctx, &p->catt[i].per_seq)) ||
            (s = r_num(f, "per_token_s", ctx, &p->catt[i].per_token)))
            return s;
    }
    const jnode *pc = json_get(r, "pcie");
    if (!pc || pc->type != J_OBJ) return sched_fail(SCHED_ERR_INVALID, "profile: missing object 'pcie'");
    const jnode *h = json_get(pc, "h2d"), *d = json_get(pc, "d2h");
    if (!h || !d) return sched_fail(SCHED_ERR_INVALID, "profile: 'pcie' needs 'h2d' and 'd2h'");
    if ((s = r_num(h, "lat_s", "pcie.h2d.", &p->h2d.lat_s)) ||
        (s = r_num(h, "bw_Bps", "pcie.h2d.", &p->h2d.bw_Bps)) ||
        (s = r_num(d, "lat_s", "pcie.d2h.", &p->d2h.lat_s)) ||
        (s = r_num(d, "bw_Bps", "pcie.d2h.", &p->d2h.bw_Bps)))
        return s;
    return SCHED_OK;
}

sched_status apex_profile_parse(const char *json, size_t len, apex_profile *out) {
    if (!json || !out) return sched_fail(SCHED_ERR_INVALID, "profile_parse: NULL argument");
    char err[160];
    jnode *root = json_parse(json, len, err, sizeof err);
    if (!root) return sched_fail(SCHED_ERR_PARSE, "profile: malformed JSON: %s", err);
    apex_profile *tmp = calloc(1, sizeof *tmp);
    if (!tmp) { json_free(root); return sched_fail(SCHED_ERR_NO_MEMORY, "profile: out of memory"); }
    sched_status s = from_json(root, tmp);
    json_free(root);
    if (!s) s = apex_profile_validate(tmp);
    if (!s) *out = *tmp;
    free(tmp);
    return s;
}

sched_status apex_profile_load(const char *path, apex_profile *out) {
    if (!path || !out) return sched_fail(SCHED_ERR_INVALID, "profile_load: NULL argument");
    FILE *f = fopen(path, "rb");
    if (!f) return sched_fail(SCHED_ERR_IO, "profile: cannot open '%s': %s", path, strerror(errno));
    size_t cap = 1 << 14, len = 0;
    char *buf = malloc(cap);
    while (buf) {
        size_t r = fread(buf + len, 1, cap - len, f);
        len += r;
        if (len < cap) break;
        if (cap >= (1u << 24)) { free(buf); buf = NULL; break; } /* 16 MiB: not a profile */
        char *q = realloc(buf, cap * 2);
        if (!q) { free(buf); buf = NULL; break; }
        buf = q;
        cap *= 2;
    }
    int rerr = ferror(f);
    fclose(f);
    if (!buf) return sched_fail(SCHED_ERR_IO, "profile: '%s' too large or out of memory", path);
    if (rerr) { free(buf); return sched_fail(SCHED_ERR_IO, "profile: read error on '%s'", path); }
    sched_status s = apex_profile_parse(buf, len, out);
    free(buf);
    if (s) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", sched_last_error());
        return sched_fail(s, "%s (in '%s')", msg, path);
    }
    return SCHED_OK;
}

sched_status apex_profile_save(const apex_profile *p, const char *path) {
    if (!p || !path) return sched_fail(SCHED_ERR_INVALID, "profile_save: NULL argument");
    apex_profile chk = *p;
    sched_status s = apex_profile_validate(&chk);
    if (s) return s;
    char *text;
    if ((s = apex_profile_write(p, &text))) return s;
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp%ld", path, (long)getpid());
    FILE *f = fopen(tmp, "wb");
    if (!f) { free(text); return sched_fail(SCHED_ERR_IO, "profile: cannot write '%s': %s", tmp, strerror(errno)); }
    size_t l = strlen(text);
    int bad = fwrite(text, 1, l, f) != l;
    bad |= fclose(f) != 0;
    free(text);
    if (bad || rename(tmp, path)) {
        remove(tmp);
        return sched_fail(SCHED_ERR_IO, "profile: cannot write '%s'", path);
    }
    return SCHED_OK;
}
