/* prefetch_model.h - apex-bench prefetch-model's two halves: the plain
 * driver (bench_prefetch_model.c) and the AVX-512 span runs
 * (prefetch_model_span.c), split so that nothing runs AVX-512 code before
 * the CPU check. */
#ifndef APEX_BENCH_PREFETCH_MODEL_H
#define APEX_BENCH_PREFETCH_MODEL_H

#include <stddef.h>
#include <stdint.h>

/* The model's KV geometry: Llama-3.1-8B's (8 KV heads of 4 q heads,
 * head_dim 128), bf16, row layout, block 16. */
#define PM_H 8
#define PM_G 4
#define PM_D 128
#define PM_BT 16

/* Runs every sequence's span once (the AVX-512 span driver with synthetic
 * stages spending fma FMAs per 64-byte line), sequences spread over the
 * threads; block table stride ctx / PM_BT; pairs: the driver's schedule
 * for the pair layout (kv_layout.h; the stages read the same bytes);
 * scratch holds scratch_floats per thread. Returns seconds. */
double prefetch_model_run(const uint8_t *kv, const int32_t *table, int n_seqs, int ctx,
                          int threads, int fma, int pairs, float *scratch, size_t scratch_floats);

#endif
