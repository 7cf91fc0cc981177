/*
 * ggml_apex_tier.h - the GPU tier of llama.cpp's KV cache (APEX_Hybrid).
 *
 * An APEX_Hybrid buffer holds llama.cpp's KV tensors ([n_embd, kv_size,
 * n_stream] per layer, one stream per sequence slot) in APEX's host pool, in
 * ggml's layout: that copy is the one llama.cpp's host-side operations (state
 * save/load, sequence copies, K-shift, buffer clears) and APEX's CPU kernel
 * use. The tier keeps, on the GPU, the KV of up to n_gpu streams (the slots
 * its budget holds), in APEX's block layout through libapex's paged ABI
 * (apex_paged.h), and runs their decode attention there; the other streams
 * attend on the CPU, from the host pool.
 *
 * Which streams hold the slots is APEX's scheduler's choice, made once per
 * decode step (at the first layer's decode attention) by apex_sched_place
 * fed from the tier's state: each stream's cells in use, whether it decodes
 * this step, its tier (docs/sched.md, "The scheduler in llama.cpp's GPU
 * tier"). A promoted stream gets a free slot with every row stale (the
 * host copy is authoritative); a spilled, idle or finished one gives its
 * slot back. Counted in gpu_tier_counters; APEX_GGML_PLACE_LOG=file logs
 * each step's decisions as JSON lines.
 *
 * The GPU copy follows the host copy lazily: every write into the buffer is
 * reported (gpu_tier_written*), marking the rows it touched stale, and an
 * attention first stores the stale rows it reads (apex_paged_kv_write).
 *
 * The tier's paged context (libapex.so.1, which libggml-apex.so links) is
 * made at the first attention; its device is APEX_DEVICE's (auto: CUDA when a GPU answers;
 * "emulated" runs the tier in host memory, for tests). Budget:
 * APEX_GGML_GPU_KV_MB (unset: the device's free memory less 1 GiB, or
 * every stream on an emulated device), and at most APEX_GGML_GPU_SEQS
 * sequence slots when set. The scheduler's profile: apex_sched_enable
 * (APEX_GPU_PRESET, "host" by default; APEX_PROFILE). Without a device, or with a budget smaller than
 * one stream, every stream stays on the CPU (one line says why).
 */
#ifndef APEX_GGML_APEX_TIER_H
#define APEX_GGML_APEX_TIER_H

#include <stddef.h>
#include <stdint.h>

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct gpu_tier gpu_tier;

gpu_tier *gpu_tier_new(void);
void gpu_tier_free(gpu_tier *t); /* NULL ok */

/* A KV tensor allocated in the buffer ("cache_k_l<il>" or "cache_v_l<il>");
 * other tensors are ignored. */
void gpu_tier_add_tensor(gpu_tier *t, const struct ggml_tensor *kv);

/* Bytes [off, off + size) of KV tensor root (a tensor given to add_tensor)
 * were written on the host: their rows are stale on the GPU. */
void gpu_tier_written(gpu_tier *t, const struct ggml_tensor *root, size_t off, size_t size);
/* The whole buffer was written (a clear). */
void gpu_tier_written_all(gpu_tier *t);

/* Process-wide: decode steps the scheduler placed, and migrations (a
 * stream given a GPU slot; a stream's slot taken away). */
void gpu_tier_counters(uint64_t *sched_steps, uint64_t *to_device, uint64_t *to_host);

/* FLASH_ATTN_EXT op reads streams [s0, s0 + ns) of its KV tensors (ns =
 * q->ne[3]). gpu_tier_plan picks the streams the GPU tier runs: the decode
 * queries (one token) of the streams it holds whose mask is a prefix (cells
 * [0, L) visible, the rest hidden); gpu[j] = 1 for those, 0 for the ones the
 * caller runs on the CPU. Returns how many it picked (0: none; then no
 * start/wait). gpu_tier_start submits them to the device from the caller's
 * thread (apex_paged_submit: their stale rows and the attention) and
 * returns while the device runs them; the caller attends the others on the
 * CPU meanwhile; gpu_tier_wait waits (apex_paged_wait) and writes their rows
 * of op's output: 0, or -1 when the tier failed and the caller must run the
 * picked streams too. */
int gpu_tier_plan(gpu_tier *t, const struct ggml_tensor *op, int64_t s0, unsigned char *gpu);
void gpu_tier_start(gpu_tier *t);
int gpu_tier_wait(gpu_tier *t);

#ifdef __cplusplus
}
#endif
#endif /* APEX_GGML_APEX_TIER_H */
