/* json.c - see json.h. */
#include "csrc/sched/json.h"

#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct jp {
    const char *s, *end;
    int line;
    char *err;
    size_t errn;
    int depth;
} jp;

static void jp_err(jp *p, const char *what) {
    if (p->err && p->err[0] == 0)
        snprintf(p->err, p->errn, "line %d: %s", p->line, what);
}

static void skip_ws(jp *p) {
    while (p->s < p->end && (*p->s == ' ' || *p->s == '\t' || *p->s == '\n' ||
                             *p->s == '\r')) {
        if (*p->s == '\n') p->line++;
        p->s++;
    }
}

static jnode *node_new(jtype t) {
    jnode *n = calloc(1, sizeof *n);
    if (n) n->type = t;
    return n;
}

void json_free(jnode *n) {
    while (n) {
        jnode *next = n->next;
        json_free(n->child);
        free(n->str);
        free(n->key);
        free(n);
        n = next;
    }
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    c = (char)tolower((unsigned char)c);
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

/* Parses a string literal at p->s (which is '"'); returns malloc'ed UTF-8. */
static char *parse_string(jp *p) {
    p->s++;
    size_t cap = 32, len = 0;
    char *out = malloc(cap);
    if (!out) { jp_err(p, "out of memory"); return NULL; }
    for (;;) {
        if (p->s >= p->end) { jp_err(p, "unterminated string"); free(out); return NULL; }
        unsigned char c = (unsigned char)*p->s++;
        if (c == '"') break;
        if (c < 0x20) { jp_err(p, "control character in string"); free(out); return NULL; }
        unsigned cp = c;
        int raw = 1;
        if (c == '\\') {
            if (p->s >= p->end) { jp_err(p, "bad escape"); free(out); return NULL; }
            char e = *p->s++;
            raw = 0;
            switch (e) {
            case '"': cp = '"'; break;
            case '\\': cp = '\\'; break;
            case '/': cp = '/'; break;
            case 'b': cp = '\b'; break;
            case 'f': cp = '\f'; break;
            case 'n': cp = '\n'; break;
            case 'r': cp = '\r'; break;
            case 't': cp = '\t'; break;
            case 'u': {
                if (p->end - p->s < 4) { jp_err(p, "bad \\u escape"); free(out); return NULL; }
                cp = 0;
                for (int i = 0; i < 4; i++) {
                    int h = hexval(p->s[i]);
                    if (h < 0) { jp_err(p, "bad \\u escape"); free(out); return NULL; }
                    cp = cp * 16 + (unsigned)h;
                }
                p->s += 4;
                if (cp >= 0xD800 && cp <= 0xDFFF) cp = 0xFFFD; /* no surrogate pairs */
                break;
            }
            default: jp_err(p, "bad escape"); free(out); return NULL;
            }
        }
        char tmp[4];
        int k = 0;
        if (raw || cp < 0x80) tmp[k++] = (char)cp;
        else if (cp < 0x800) { tmp[k++] = (char)(0xC0 | (cp >> 6)); tmp[k++] = (char)(0x80 | (cp & 0x3F)); }
        else { tmp[k++] = (char)(0xE0 | (cp >> 12)); tmp[k++] = (char)(0x80 | ((cp >> 6) & 0x3F));
               tmp[k++] = (char)(0x80 | (cp & 0x3F)); }
        if (len + (size_t)k + 1 > cap) {
            cap *= 2;
            char *q = realloc(out, cap);
            if (!q) { jp_err(p, "out of memory"); free(out); return NULL; }
            out = q;
        }
        memcpy(out + len, tmp, (size_t)k);
        len += (size_t)k;
    }
    out[len] = 0;
    return out;
}

static jnode *parse_value(jp *p);

static jnode *parse_container(jp *p, int is_obj) {
    jnode *n = node_new(is_obj ? J_OBJ : J_ARR);
    if (!n) { jp_err(p, "out of memory"); return NULL; }
    if (++p->depth > 64) { jp_err(p, "nesting too deep"); free(n); return NULL; }
    p->s++;
    jnode **tail = &n->child;
    skip_ws(p);
    if (p->s < p->end && *p->s == (is_obj ? '}' : ']')) { p->s++; p->depth--; return n; }
    for (;;) {
        char *key = NULL;
        skip_ws(p);
        if (is_obj) {
            if (p->s >= p->end || *p->s != '"') { jp_err(p, "expected a member name"); goto fail; }
            key = parse_string(p);
            if (!key) goto fail;
            skip_ws(p);
            if (p->s >= p->end || *p->s != ':') { jp_err(p, "expected ':'"); free(key); goto fail; }
            p->s++;
        }
        jnode *v = parse_value(p);
        if (!v) { free(key); goto fail; }
        v->key = key;
        *tail = v;
        tail = &v->next;
        n->n++;
        skip_ws(p);
        if (p->s < p->end && *p->s == ',') { p->s++; continue; }
        if (p->s < p->end && *p->s == (is_obj ? '}' : ']')) { p->s++; break; }
        jp_err(p, is_obj ? "expected ',' or '}'" : "expected ',' or ']'");
        goto fail;
    }
    p->depth--;
    return n;
fail:
    json_free(n);
    return NULL;
}

static jnode *parse_value(jp *p) {
    skip_ws(p);
    if (p->s >= p->end) { jp_err(p, "unexpected end of input"); return NULL; }
    char c = *p->s;
    if (c == '{') return parse_container(p, 1);
    if (c == '[') return parse_container(p, 0);
    if (c == '"') {
        jnode *n = node_new(J_STR);
        if (!n) { jp_err(p, "out of memory"); return NULL; }
        n->str = parse_string(p);
        if (!n->str) { free(n); return NULL; }
        return n;
    }
    static const struct { const char *w; jtype t; double v; } lits[] = {
        {"true", J_BOOL, 1}, {"false", J_BOOL, 0}, {"null", J_NULL, 0}};
    for (int i = 0; i < 3; i++) {
        size_t l = strlen(lits[i].w);
        if ((size_t)(p->end - p->s) >= l && !memcmp(p->s, lits[i].w, l)) {
            jnode *n = node_new(lits[i].t);
            if (!n) { jp_err(p, "out of memory"); return NULL; }
            n->num = lits[i].v;
            p->s += l;
            return n;
        }
    }
    if (c == '-' || (c >= '0' && c <= '9')) {
        char buf[64];
        size_t k = 0;
        while (p->s + k < p->end && k < sizeof buf - 1 &&
               strchr("+-0123456789.eE", p->s[k]))
            k++;
        memcpy(buf, p->s, k);
        buf[k] = 0;
        char *e;
        double v = strtod(buf, &e);
        if (e != buf + k || k == 0) { jp_err(p, "bad number"); return NULL; }
        jnode *n = node_new(J_NUM);
        if (!n) { jp_err(p, "out of memory"); return NULL; }
        n->num = v;
        p->s += k;
        return n;
    }
    jp_err(p, "unexpected character");
    return NULL;
}

jnode *json_parse(const char *text, size_t len, char *err, size_t errn) {
    if (err && errn) err[0] = 0;
    jp p = {text, text + len, 1, err, errn, 0};
    jnode *root = parse_value(&p);
    if (!root) return NULL;
    skip_ws(&p);
    if (p.s != p.end) {
        jp_err(&p, "trailing characters after the value");
        json_free(root);
        return NULL;
    }
    return root;
}

const jnode *json_get(const jnode *obj, const char *key) {
    if (!obj || obj->type != J_OBJ) return NULL;
    for (const jnode *c = obj->child; c; c = c->next)
        if (c->key && !strcmp(c->key, key)) return c;
    return NULL;
}

/* ------------------------------------------------------------- writer */

static void jb_reserve(jbuf *b, size_t more) {
    if (b->oom) return;
    if (b->len + more + 1 <= b->cap) return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + more + 1) cap *= 2;
    char *q = realloc(b->p, cap);
    if (!q) { b->oom = 1; return; }
    b->p = q;
    b->cap = cap;
}

void jb_puts(jbuf *b, const char *s) {
    size_t l = strlen(s);
    jb_reserve(b, l);
    if (b->oom) return;
    memcpy(b->p + b->len, s, l + 1);
    b->len += l;
}

void jb_printf(jbuf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) { b->oom = 1; return; }
    jb_reserve(b, (size_t)n);
    if (b->oom) return;
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void jb_str(jbuf *b, const char *s) {
    jb_puts(b, "\"");
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"') jb_puts(b, "\\\"");
        else if (c == '\\') jb_puts(b, "\\\\");
        else if (c == '\n') jb_puts(b, "\\n");
        else if (c < 0x20) jb_printf(b, "\\u%04x", c);
        else { char t[2] = {(char)c, 0}; jb_puts(b, t); }
    }
    jb_puts(b, "\"");
}

void jb_num(jbuf *b, double v) {
    if (!isfinite(v)) { jb_puts(b, "null"); return; }
    jb_printf(b, "%.17g", v);
}
