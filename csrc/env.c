/* env.c - the snapshot of the core's APEX_* environment (env.h): taken
 * once, retaken by apex_config_init and apex_env_refresh, published by an
 * atomic pointer; old snapshots are kept (a reader may hold their strings),
 * like the strings setenv replaces. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "csrc/env.h"

extern char **environ;

static const apex_env_info k_vars[APEX_ENV_N] = {
#define APEX_ENV_ROW_(id, type, def, doc) {"APEX_" #id, type, def, doc},
    APEX_ENV_VARS(APEX_ENV_ROW_)
#undef APEX_ENV_ROW_
};

/* APEX_* variables the other parts read (engine adapters, tests, benches,
 * scripts), so the typo guard leaves them alone; and the prefixes whose
 * names belong to one part, which checks its own. */
static const char *const k_other[] = {
    "APEX_STATS_FILE",   "APEX_CACHE_DIR",
    "APEX_PRELOAD_LIB",  "APEX_TEST_DEVICE",   "APEX_ISA_EXPECT",     "APEX_FAULT_TRACE",
    "APEX_FAULT_SWEEP_FROM", "APEX_GPU_BUILD", "APEX_GPU_STAGE",      "APEX_GPU_VOCAB",
    "APEX_MODEL",        "APEX_MODEL_DIR",     "APEX_PYTHON",         "APEX_ROOT",
    "APEX_SOURCE_DIR",   "APEX_SIM_SRC",       "APEX_SKIP_VLLM",      "APEX_DEB_DIR",
    "APEX_CUDA",         "APEX_CUDA_ARCHS",    "APEX_SANITIZE",       "APEX_BUILD_TESTS",
    "APEX_FUZZ",
};
static const char *const k_prefixes[] = {
    "APEX_GGML_", "APEX_VLLM_", "APEX_TORCH_", "APEX_LLAMA_", "APEX_SWEEP_",
    "APEX_FUZZ_", "APEX_SOAK_",
};
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

typedef struct snap {
    const char *value[APEX_ENV_N]; /* NULL: unset */
    char *unknown;                  /* " NAME1 NAME2 " or "" */
    struct snap *prev;              /* kept, never freed */
} snap;

static snap g_empty = {.unknown = ""};
static _Atomic(snap *) g_cur = &g_empty;
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

int apex_env_known(const char *name) {
    for (int i = 0; i < APEX_ENV_N; i++)
        if (!strcmp(name, k_vars[i].name)) return 1;
    for (size_t i = 0; i < COUNT(k_other); i++)
        if (!strcmp(name, k_other[i])) return 1;
    for (size_t i = 0; i < COUNT(k_prefixes); i++)
        if (!strncmp(name, k_prefixes[i], strlen(k_prefixes[i]))) return 1;
    return 0;
}

/* " NAME " occurs in the list. */
static int listed(const char *list, const char *name, size_t n) {
    for (const char *p = list; (p = strstr(p, name)); p++)
        if (p > list && p[-1] == ' ' && p[n] == ' ') return 1;
    return 0;
}

/* The unknown APEX_* names of the environment as " A B " (malloc'd), each
 * warned about unless the previous snapshot had it too. */
static char *scan_unknown(const char *before) {
    size_t cap = 64, len = 1;
    char *out = malloc(cap);
    if (!out) return NULL;
    strcpy(out, " ");
    for (char **e = environ; e && *e; e++) {
        if (strncmp(*e, "APEX_", 5)) continue;
        const char *eq = strchr(*e, '=');
        size_t n = eq ? (size_t)(eq - *e) : strlen(*e);
        char name[128];
        if (n >= sizeof name) n = sizeof name - 1;
        memcpy(name, *e, n);
        name[n] = '\0';
        if (apex_env_known(name) || listed(out, name, n)) continue;
        if (len + n + 2 > cap) {
            cap = 2 * (len + n + 2);
            char *grown = realloc(out, cap);
            if (!grown) break;
            out = grown;
        }
        memcpy(out + len, name, n);
        len += n;
        out[len++] = ' ';
        out[len] = '\0';
        if (!listed(before, name, n))
            fprintf(stderr, "apex: %s is set but no part of APEX reads it (a typo?); ignored\n",
                    name);
    }
    if (len == 1) out[0] = '\0';
    return out;
}

static int same_str(const char *a, const char *b) {
    return a == b || (a && b && !strcmp(a, b));
}

/* Whether two snapshots hold the same values (a refresh that changes
 * nothing then keeps the old one: apex_config_init retakes it each call). */
static int same(const snap *a, const snap *b) {
    for (int i = 0; i < APEX_ENV_N; i++)
        if (!same_str(a->value[i], b->value[i])) return 0;
    return same_str(a->unknown, b->unknown);
}

/* Caller holds g_mu. */
static void take(void) {
    snap *cur = atomic_load(&g_cur);
    snap *s = calloc(1, sizeof *s);
    if (!s) return;
    for (int i = 0; i < APEX_ENV_N; i++) {
        const char *v = getenv(k_vars[i].name);
        if (v && !(s->value[i] = strdup(v))) goto fail;
    }
    if (!(s->unknown = scan_unknown(cur->unknown))) goto fail;
    if (cur != &g_empty && same(s, cur)) { /* nothing changed: keep the old one */
        free(s->unknown);
        goto fail;
    }
    s->prev = cur;
    atomic_store(&g_cur, s);
    return;
fail:
    for (int i = 0; i < APEX_ENV_N; i++) free((char *)s->value[i]);
    free(s);
}

static void first(void) {
    pthread_mutex_lock(&g_mu);
    take();
    pthread_mutex_unlock(&g_mu);
}

const char *apex_env_get(apex_env_var v) {
    pthread_once(&g_once, first);
    return (unsigned)v < APEX_ENV_N ? atomic_load(&g_cur)->value[v] : NULL;
}

void apex_env_refresh(void) {
    pthread_once(&g_once, first);
    pthread_mutex_lock(&g_mu);
    take();
    pthread_mutex_unlock(&g_mu);
}

const apex_env_info *apex_env_info_at(int v) {
    return v >= 0 && v < APEX_ENV_N ? &k_vars[v] : NULL;
}

const char *apex_env_unknown(void) {
    pthread_once(&g_once, first);
    return atomic_load(&g_cur)->unknown;
}
