/*
 * sched.h - APEX's performance model, profile and scheduler (internal API).
 *
 * Three layers:
 *   apex_profile   measured (or preset) component times: T_lin(rows),
 *                  T_gatt(tokens), T_catt(tokens, seqs, threads), T_pcie(bytes)
 *                  each direction, T_pref(tokens). JSON on disk, validated.
 *   model          closed-form step-time predictions for each strategy:
 *                  GPU-only, asynchronous overlap (one batch; the CPU cohort's
 *                  attention hides under the GPU cohort's attention only),
 *                  asymmetric pipelining (two sub-batches, the CPU cohort's
 *                  attention hides under the GPU's whole layer, at the price
 *                  of a second read of every weight), split cohort (two
 *                  sub-batches each carrying half the CPU cohort: the CPU
 *                  attends one half while the GPU runs the other half's
 *                  linear layers; the form for a CPU-bound step).
 *   scheduler      apex_sched_plan(): a pure, deterministic function of
 *                  (sequence states, profile, correction, config) -> plan.
 *                  O(n) per decision, no allocation: the caller provides the
 *                  plan's arrays.
 *
 * Times are seconds for one whole decode step (all layers) unless a name says
 * "layer". Every function returns a sched_status; on failure the thread-local
 * message sched_last_error() says what was wrong and outputs are unchanged.
 */
#ifndef APEX_SCHED_H
#define APEX_SCHED_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- status */

typedef enum sched_status {
    SCHED_OK = 0,
    SCHED_ERR_INVALID = 1,     /* null pointer, bad value, bad profile field */
    SCHED_ERR_PARSE = 2,       /* malformed JSON                              */
    SCHED_ERR_IO = 3,          /* file could not be read or written           */
    SCHED_ERR_NO_MEMORY = 4,
    SCHED_ERR_MISMATCH = 5,    /* profile is for other hardware or geometry   */
    SCHED_ERR_NOT_FOUND = 6    /* unknown preset name                         */
} sched_status;

const char *sched_last_error(void);
/* Sets the thread-local message (printf format) and returns s. */
sched_status sched_fail(sched_status s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* --------------------------------------------------------------- profile */

#define APEX_CURVE_MAX 32
#define APEX_CATT_MAX 8
#define APEX_PROFILE_VERSION 1

/* Piecewise-linear table y(x); x strictly increasing, y >= 0. Beyond the
 * last point it extrapolates with the last segment's slope (never below the
 * last value); below the first point it interpolates towards (0, y0). */
typedef struct apex_curve {
    int32_t n;
    double x[APEX_CURVE_MAX];
    double y[APEX_CURVE_MAX];
} apex_curve;

/* T_catt at one thread count: c0 + per_seq * seqs + per_token * tokens. */
typedef struct apex_catt_fit {
    int32_t threads;
    double c0, per_seq, per_token;
} apex_catt_fit;

typedef struct apex_link {
    double lat_s;   /* per transfer  */
    double bw_Bps;  /* bytes/second  */
} apex_link;

typedef struct apex_model_geom {
    int32_t n_layers, n_q_heads, n_kv_heads, head_dim;
    int32_t kv_bytes;   /* bytes per KV element (2 for f16/bf16) */
    int32_t act_bytes;  /* bytes per activation element          */
    int32_t hidden, ffn, vocab; /* linear-layer shapes (informational) */
} apex_model_geom;

typedef struct apex_profile {
    char hw_key[160];     /* hardware identity (GPU, CPU, threads, link) */
    char model_key[160];  /* geometry identity                            */
    char source[320];     /* "measured ..." or "preset X (roofline ...)"  */
    apex_model_geom geom;
    int32_t cpu_threads;  /* threads the CPU tier uses                    */
    double step_overhead_s; /* fixed per step: launches, sampling, sync    */
    double layer_sync_s;  /* per layer, per CPU join (event/flag wait)    */
    apex_curve lin;       /* x rows,   y s/step (all layers + head)       */
    apex_curve gatt;      /* x tokens, y s/step GPU decode attention      */
    apex_curve pref;      /* x tokens, y s for one prefill chunk           */
    int32_t n_catt;
    apex_catt_fit catt[APEX_CATT_MAX]; /* ascending threads; s/step     */
    apex_link h2d, d2h;
} apex_profile;

/* Checks every field; a clear message names the first bad one. Curves are
 * made monotone (running max) after the checks, so measurement noise does
 * not make the model non-monotone. */
sched_status apex_profile_validate(apex_profile *p);

/* JSON text <-> profile. _parse validates. _write returns the text in a
 * malloc'ed string (*out; caller frees). */
sched_status apex_profile_parse(const char *json, size_t len, apex_profile *out);
sched_status apex_profile_write(const apex_profile *p, char **out);
sched_status apex_profile_load(const char *path, apex_profile *out);
sched_status apex_profile_save(const apex_profile *p, const char *path);

/* Key of a geometry ("L32-q32-kv32-d128-kv2-act2-h4096-f11008-v32000"). */
void apex_model_key(const apex_model_geom *g, char *buf, size_t n);

/* Component evaluation (uncorrected). */
double apex_curve_eval(const apex_curve *c, double x);
double apex_t_lin(const apex_profile *p, double rows);
double apex_t_gatt(const apex_profile *p, double tokens);
double apex_t_catt(const apex_profile *p, double tokens, double seqs,
                   int32_t threads);
double apex_t_pref(const apex_profile *p, double tokens);
double apex_t_link(const apex_link *l, double bytes);

/* --------------------------------------------------------------- presets */

typedef struct apex_hw_preset {
    const char *name;       /* "t4", "a10", "a100-40gb", "h100-pcie", ... */
    const char *gpu;
    double gpu_mem_B;       /* datasheet memory                           */
    double gpu_bw_Bps;      /* datasheet memory bandwidth                 */
    double gpu_flops;       /* datasheet dense fp16 tensor FLOP/s         */
    int32_t pcie_gen;       /* 3, 4, 5                                    */
    double pcie_Bps;        /* x16 per direction, theoretical             */
    const char *cpu;        /* typical host CPU                           */
    int32_t cpu_cores;      /* cores given to one GPU's engine            */
    double cpu_bw_Bps;      /* theoretical DRAM bandwidth of that host    */
    double host_kv_B;       /* host memory granted to the KV pool         */
    const char *sources;
} apex_hw_preset;

/* Roofline assumptions applied to every preset (documented in docs/sched.md). */
#define APEX_ROOF_GPU_BW_EFF 0.80   /* achieved / datasheet memory bandwidth */
#define APEX_ROOF_GPU_FLOP_EFF 0.60 /* achieved / datasheet tensor FLOP/s   */
#define APEX_ROOF_CPU_BW_EFF 0.65   /* STREAM-like / theoretical DRAM        */
#define APEX_ROOF_PCIE_EFF 0.80     /* pinned async copies / theoretical     */

const apex_hw_preset *apex_hw_preset_find(const char *name);

/* Model geometries by name: "llama2-7b", "llama3-8b". */
sched_status apex_model_preset(const char *name, apex_model_geom *g,
                               double *weight_bytes);

/* A roofline profile of model g on preset hw with `threads` CPU threads. */
sched_status apex_profile_from_preset(const apex_hw_preset *hw,
                                      const apex_model_geom *g,
                                      double weight_bytes, int32_t threads,
                                      apex_profile *out);

/* ------------------------------------------------------- online correction */

enum { APEX_C_LIN = 0, APEX_C_GATT, APEX_C_CATT, APEX_C_PCIE, APEX_C_PREF,
       APEX_C_N };

/* Multiplicative per-component correction of the profile. Each update moves
 * a factor towards measured/predicted by an EMA whose step is bounded
 * (ratio clamped to [1/max_step, max_step] of the current factor) and the
 * factor itself to [min_factor, max_factor], so one outlier cannot swing it. */
typedef struct apex_correction {
    double f[APEX_C_N];
    uint32_t n_updates[APEX_C_N];
    double alpha;      /* EMA weight of a new sample (default 0.2)   */
    double max_step;   /* default 1.5                                */
    double min_factor, max_factor; /* default 0.2, 5                 */
} apex_correction;

void apex_correction_init(apex_correction *c);
/* One measurement of component k: predicted (uncorrected profile value for
 * the same work) and measured seconds. Ignores non-positive or non-finite. */
sched_status apex_correction_update(apex_correction *c, int k,
                                    double predicted_s, double measured_s);

/* ------------------------------------------------------------------ model */

typedef enum sched_strategy {
    SCHED_GPU_ONLY = 0,
    SCHED_OVERLAP = 1,   /* asynchronous overlap, one batch             */
    SCHED_PIPELINE = 2,  /* asymmetric pipelining, two sub-batches      */
    SCHED_SPLIT = 3,     /* split cohort: two sub-batches, each with half
                            the CPU cohort; sub-batch 0 also carries the
                            GPU cohort and prefill (overlap inside it)   */
    SCHED_N_STRATEGIES = 4
} sched_strategy;
const char *sched_strategy_name(sched_strategy s);

/* The work of one step. */
typedef struct sched_work {
    double gpu_seqs, gpu_tokens;   /* decode on the GPU tier            */
    double cpu_seqs, cpu_tokens;   /* decode on the CPU tier            */
    double prefill_tokens;         /* prompt tokens prefilled this step */
    double prefill_host_tokens;    /* of prefill_tokens, KV to the host  */
    double migrate_h2d_tokens, migrate_d2h_tokens; /* KV moved between tiers */
} sched_work;

typedef struct sched_pred {
    double total_s;                /* predicted step time                */
    double gpu_s;                  /* GPU stream busy time               */
    double cpu_s;                  /* CPU attention busy time            */
    double link_s;                 /* copy-engine busy time (max dir)    */
    double lin_s, gatt_s, catt_s, pref_s; /* corrected component times   */
} sched_pred;

/* Predicted time of `w` under strategy s (corr may be NULL). Monotone
 * non-decreasing in every work quantity. */
void apex_model_predict(const apex_profile *p, const apex_correction *corr,
                        int32_t threads, sched_strategy s,
                        const sched_work *w, sched_pred *out);
/* Bytes per token per layer of KV, and PCIe bytes per CPU-cohort sequence
 * per layer each direction. */
double apex_kv_bytes_per_token(const apex_model_geom *g); /* all layers */
double apex_cohort_d2h_bytes(const apex_model_geom *g);   /* one layer  */
double apex_cohort_h2d_bytes(const apex_model_geom *g);   /* one layer  */

/* -------------------------------------------------------------- scheduler */

typedef enum sched_tier { SCHED_TIER_NONE = -1, SCHED_TIER_GPU = 0,
                          SCHED_TIER_CPU = 1 } sched_tier;
typedef enum sched_phase { SCHED_WAITING = 0, SCHED_PREFILLING = 1,
                           SCHED_DECODING = 2 } sched_phase;

/* One sequence, as the engine sees it. The array passed to the scheduler is
 * in priority order (oldest request first); the scheduler never sorts. */
typedef struct sched_seq {
    int32_t phase;       /* sched_phase                                   */
    int32_t tier;        /* where its KV lives (NONE while waiting)       */
    int32_t ctx_len;     /* tokens in its KV cache now                    */
    int32_t prompt_left; /* prompt tokens still to prefill                */
    int32_t waited;      /* decode steps skipped in a row (fairness)      */
} sched_seq;

typedef struct sched_state {
    int32_t n_seqs;
    const sched_seq *seqs;
    int32_t block_tokens;
    int64_t gpu_blocks_free;  /* free blocks now, per tier */
    int64_t host_blocks_free;
    int64_t gpu_blocks_total;
} sched_state;

typedef struct sched_config {
    uint32_t strategies;     /* bit mask of allowed sched_strategy; 0 = all */
    double tpot_target_s;    /* per-token latency target; 0 = none          */
    int32_t max_batch;       /* running sequences at most                   */
    int32_t prefill_budget;  /* prompt tokens per step at most              */
    int32_t cpu_threads;     /* threads of the CPU tier (0: profile's)      */
    int32_t host_tier;       /* 0: never place KV on the host               */
    int32_t max_wait_steps;  /* a host sequence idles at most this many steps
                                in a row before it must run (fairness)      */
    double gpu_reserve_frac; /* GPU blocks kept free for growth at admission */
    int32_t ctx_horizon;     /* host admission: every cohort member's context
                                is projected this many tokens ahead, so the
                                cohort still fits when it has grown         */
    int32_t gpu_horizon;     /* GPU admission and promotion: every GPU
                                sequence is projected this many tokens ahead
                                and the pool must hold that growth too (0:
                                none), so the pool is not filled only to
                                evict as contexts grow                      */
} sched_config;
void sched_config_default(sched_config *c);

typedef enum sched_action {
    SCHED_ACT_IDLE = 0,     /* nothing this step                             */
    SCHED_ACT_DECODE_GPU,   /* decode, attention on the GPU                  */
    SCHED_ACT_DECODE_CPU,   /* decode, attention on the CPU (cohort member)  */
    SCHED_ACT_PREFILL_GPU,  /* prefill chunk[i] tokens; KV on the GPU tier   */
    SCHED_ACT_PREFILL_HOST, /* prefill chunk[i] tokens; KV on the host tier  */
    SCHED_ACT_TO_HOST,      /* move KV GPU -> host this step (no decode)     */
    SCHED_ACT_TO_GPU,       /* move KV host -> GPU this step (no decode)     */
    SCHED_ACT_PREEMPT       /* drop KV, back to waiting (recompute)          */
} sched_action;

typedef struct sched_plan {
    /* caller-provided, n_seqs entries each */
    int32_t *action;
    int32_t *chunk;
    int32_t capacity;
    /* results */
    sched_strategy strategy;
    int32_t n_gpu, n_cpu, n_prefill, n_admit, n_to_host, n_to_gpu, n_preempt;
    sched_work work;
    sched_pred pred;
    double pred_tok_s;       /* decode tokens per second of this step */
} sched_plan;

/* Scratch the scheduler needs, caller-owned: one per engine. */
typedef struct sched_scratch {
    int32_t capacity;
    int32_t *idx;            /* [capacity] */
    double *cum_tok;         /* [capacity + 1] */
} sched_scratch;
sched_status sched_scratch_init(sched_scratch *s, int32_t capacity);
void sched_scratch_free(sched_scratch *s);

sched_status apex_sched_plan(const sched_state *st, const apex_profile *p,
                             const apex_correction *corr,
                             const sched_config *cfg, sched_scratch *scratch,
                             sched_plan *plan);

/* ---------------------------------------------------------------- profiler */

/* Measures T_catt on this machine with cpu_attn_decode (a real workspace,
 * KV far larger than the last-level cache) for thread counts up to
 * `threads`, and least-squares fits (c0, per_seq, per_token) for each.
 * budget_s bounds the time spent. The KV is what the context's kernel
 * reads: kv_dtype (an apex_dtype; -1: f16 for kv_bytes 2, f32 for 4) in the
 * CPU pair layout if kv_pairs (cpu_attn/kv_layout.h; where the kernel
 * cannot read it, rows), since the kernels' speeds differ by dtype and
 * layout (bf16 pairs on AMX: 1.7x f16's in-cache speed on a Xeon). Fills p->catt,
 * p->n_catt. */
sched_status apex_profile_measure_cpu(apex_profile *p, int32_t threads, double budget_s,
                                      int32_t kv_dtype, int32_t kv_pairs);
/* Host memcpy bandwidth, the PCIe stand-in of the emulated device. */
sched_status apex_profile_measure_memcpy(apex_link *out);

/* The profile to use: APEX_PROFILE=<file> if set (must match geometry), else
 * the cache file cache_dir/profile-<key hash>.json when its keys match, else
 * a fresh one: CPU part measured (kv_dtype, kv_pairs as for
 * apex_profile_measure_cpu; both are in the hardware key with the kernel
 * variant and threads), GPU and PCIe parts from preset `gpu_preset` (no GPU
 * here), saved to the cache. cache_dir NULL = $XDG_CACHE_HOME/apex or
 * ~/.cache/apex. *how (may be NULL) says which path was taken. */
sched_status apex_profile_obtain(const char *gpu_preset, const apex_model_geom *g,
                                 double weight_bytes, int32_t threads, int32_t kv_dtype,
                                 int32_t kv_pairs, const char *cache_dir, apex_profile *out,
                                 const char **how);

#ifdef __cplusplus
}
#endif
#endif /* APEX_SCHED_H */
