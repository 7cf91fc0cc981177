/* sim.h - apex-sim: a discrete-event simulation of a serving engine on a
 * hardware profile. The engine advances step by step; each step a policy
 * decides (with the same sched_plan arrays APEX's scheduler fills), exec.c
 * times the step on the "true" hardware (a per-layer event timeline of the
 * GPU stream, the CPU workers and the two copy engines), and requests
 * arrive from a seeded workload. */
#ifndef APEX_SIM_H
#define APEX_SIM_H

#include <stdint.h>

#include "csrc/sched/sched.h"

/* ---------------------------------------------------------------- rng */
typedef struct sim_rng { uint64_t s; } sim_rng;
void rng_seed(sim_rng *r, uint64_t seed);
double rng_uniform(sim_rng *r);           /* [0, 1) */
double rng_exp(sim_rng *r, double rate);  /* exponential */
double rng_normal(sim_rng *r);

/* ----------------------------------------------------------- workload */
typedef struct workload {
    const char *name;
    int closed;          /* 1: closed loop with `clients`, 0: Poisson `rate` */
    int clients;
    double rate;         /* requests/s (Poisson)                          */
    int n_requests;
    uint64_t seed;
} workload;

typedef struct request {
    double arrival;
    int32_t prompt, output;          /* lengths                        */
    /* engine state */
    int32_t phase, tier, ctx, prompt_left, generated, waited, alloc_blocks;
    int32_t preemptions;
    double first_tok, finish;
    int done;
} request;

/* Draws request lengths for the named workload; 0, or -1 if unknown. */
int workload_lengths(const char *name, sim_rng *r, int32_t *prompt, int32_t *output);

/* ------------------------------------------------------------ hardware */
/* Host and engine settings that override the preset (0 = the preset's):
 * the host's cores and theoretical DRAM bandwidth feed the CPU model (the
 * same roofline as the presets: APEX_ROOF_CPU_BW_EFF of the bandwidth,
 * capped per core); gpu_kv_tokens replaces the GPU KV pool the engine
 * derives from memory (an engine setting, like vLLM's
 * num_gpu_blocks_override); host_kv_B replaces the preset's host KV pool. */
typedef struct sim_hw_opts {
    int32_t host_cores;
    double host_bw_Bps;
    int64_t gpu_kv_tokens;
    double host_kv_B;      /* host KV pool (NEO's --swap-space)           */
} sim_hw_opts;

typedef struct sim_hw {
    char name[64];
    const apex_hw_preset *hw; /* points at `host` below: copy a sim_hw only
                                 with sim_hw_init, never by assignment    */
    apex_hw_preset host;      /* the preset with sim_hw_opts applied      */
    apex_model_geom geom;
    double weight_bytes;
    apex_profile truth;    /* what the hardware does                       */
    apex_profile belief;   /* what the policies were told (truth * drift)  */
    int32_t block_tokens;
    int64_t gpu_blocks, host_blocks;
    int32_t threads;
    double noise;          /* relative per-step noise of each component    */
} sim_hw;

/* opts may be NULL (the preset as is). Returns 0, or -1 with a message on
 * stderr (unknown preset, an option out of range). */
int sim_hw_init(sim_hw *h, const char *preset, double drift_catt, const sim_hw_opts *opts);

/* ------------------------------------------------------------ policies */
/* The work of one sub-batch. */
typedef struct sub_batch {
    double gpu_seqs, gpu_tokens;   /* decodes attended on the GPU */
    double cpu_seqs, cpu_tokens;   /* decodes attended on the CPU */
    double prefill_tokens;
} sub_batch;

/* POL_NEO_BASE (NEO's GPU-only engine, the baseline of its published
 * gains) comes last: `--policy all` runs the first four. */
typedef enum { POL_VLLM, POL_FASTDECODE, POL_NEO, POL_APEX, POL_NEO_BASE, POL_N } policy_kind;

typedef struct policy {
    policy_kind kind;
    sched_config cfg;
    apex_correction corr;
    sched_scratch scratch;
    int use_correction;
    sub_batch sb1;         /* sub-batch 1 of the last plan (EX_TWO)       */
    double launch_s;       /* engine's host launch time per layer and
                              sub-batch in a pipelined step (exec_step)   */
} policy;

/* exec mode of a step: GPU only; one batch with asynchronous overlap; two
 * pipelined sub-batches (sub-batch 1 described by a sub_batch, sub-batch 0
 * is the rest of the step's work). */
typedef enum { EX_GPU_ONLY, EX_OVERLAP, EX_TWO } exec_mode;


typedef struct step_out {
    double t;            /* step time                                  */
    double gpu_busy;     /* GPU busy time in the step                  */
    /* measured component times (for the online correction) */
    double lin, gatt, catt, pref, pcie_layer;
} step_out;

/* Times a step of `w` in mode m on h's true hardware; sb1 (EX_TWO only) is
 * the part of w in sub-batch 1. launch_s (EX_TWO only): host-thread time per
 * layer and sub-batch the engine spends launching work, serial with its CPU
 * attention (0: none, APEX's C workers). */
void exec_step(const sim_hw *h, exec_mode m, const sched_work *w, const sub_batch *sb1,
               double launch_s, sim_rng *noise, step_out *o);

/* Fills plan (action, chunk, strategy) for the state; returns exec mode. */
exec_mode policy_plan(policy *pol, const sim_hw *h, const sched_state *st,
                      sched_plan *plan);
void policy_init(policy *pol, policy_kind k, const sim_hw *h, double tpot_target_s,
                 int max_batch, int prefill_budget, int capacity);
void policy_observe(policy *pol, const sim_hw *h, exec_mode m, const sched_work *w,
                    const step_out *o);
void policy_free(policy *pol);
/* NEO's lnch_T (swiftllm/perfpredictor.py): its engine's host-side launch
 * time per layer and sub-batch, profiled by NEO (profiler.py _profile_lnch,
 * avg_lnch_time) and fixed at 0.8 ms in the released code. */
#define SIM_NEO_LNCH_S 0.8e-3
/* The neo baseline (neo.c). */
exec_mode plan_neo(policy *pol, const sim_hw *h, const sched_state *st, sched_plan *pl);
/* NEO's GPU-only mode, swap-out preemption (neo.c). */
exec_mode plan_neo_base(policy *pol, const sched_state *st, sched_plan *pl);
/* Evicts GPU decoders from the newest until the growth of the rest fits:
 * to the host if swap and it has room (hfree), else preempted. Returns the
 * GPU blocks left free. */
int64_t relieve_gpu(const sched_state *st, sched_plan *pl, int swap, int64_t *hfree,
                    int *n_run);
const char *policy_name(policy_kind k);

/* ------------------------------------------------------------- engine */
typedef struct sim_result {
    int n_done;
    double duration_s, throughput_tok_s, req_s;
    double steady_req_s; /* NEO's throughput metric: completions per second
                            between the 30 % and the 70 % completion marks */
    double ttft_p50_ms, ttft_p99_ms, tpot_p50_ms, tpot_p99_ms;
    double gpu_busy_frac;
    double mean_batch, mean_cpu_cohort;
    int64_t steps, preemptions, to_host, to_gpu;
    int64_t strat_steps[SCHED_N_STRATEGIES];
    double pred_ratio[SCHED_N_STRATEGIES]; /* apex: mean predicted / true step time */
    double corr_catt, corr_lin;
} sim_result;

int sim_run(const sim_hw *h, policy_kind k, const workload *wl, double tpot_target_s,
            int max_batch, int prefill_budget, sim_result *res);

#endif
