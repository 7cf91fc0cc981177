/* bench.h - entry points of apex-bench's subcommands (argv[0] is the
 * subcommand's name). Each returns a process exit status. */
#ifndef APEX_BENCH_H
#define APEX_BENCH_H

int bench_attn_main(int argc, char **argv);
int bench_sched_main(int argc, char **argv);
int bench_pipeline_main(int argc, char **argv);
int bench_vs_vllm_main(int argc, char **argv); /* runs bench/vs_vllm.py */
int bench_soak_main(int argc, char **argv);
int bench_prefetch_model_main(int argc, char **argv);
int bench_vs_ggml_main(int argc, char **argv); /* with -DAPEX_LLAMA_CPP_DIR */

#endif
