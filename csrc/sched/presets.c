/* presets.c - published hardware and model geometries, and the roofline
 * profile built from them. Every number below is a datasheet or catalogue
 * value (sources in the table); the efficiencies applied on top are the
 * APEX_ROOF_* assumptions in sched.h, the same for every preset. */
#include "csrc/sched/sched.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#define GB 1e9
#define MIB (1024.0 * 1024.0)

/* gpu_mem_B is the memory the driver reports (nvidia-smi total), which is
 * what an engine budgets from; per-core DRAM bandwidth is capped at
 * APEX_CPU_CORE_BW (a core streams ~10-14 GB/s on Cascade Lake/Zen 2/3/SPR). */
#define APEX_CPU_CORE_BW (12 * GB)

static const apex_hw_preset presets[] = {
    {"t4", "NVIDIA T4 16GB", 15360 * MIB, 320 * GB, 65e12, 3, 15.75 * GB,
     "Intel Xeon Platinum 8259CL (AWS g4dn.4xlarge: 8 cores, 64 GiB)", 8,
     140.8 * GB, 32 * GB,
     "T4 datasheet (NVIDIA, 2019): 320 GB/s GDDR6, 65 TFLOPS fp16 tensor, PCIe 3.0 x16; "
     "AWS g4dn instance page; Intel ark 8259CL class: 6ch DDR4-2933 = 140.8 GB/s"},
    {"a10", "NVIDIA A10 24GB", 23028 * MIB, 600 * GB, 125e12, 4, 31.5 * GB,
     "AMD EPYC 7R32 (AWS g5.8xlarge: 16 cores, 128 GiB)", 16, 204.8 * GB, 64 * GB,
     "A10 datasheet (NVIDIA, 2021): 600 GB/s GDDR6, 125 TFLOPS fp16 tensor (dense), PCIe 4.0 x16; "
     "AWS g5 instance page; EPYC 7002: 8ch DDR4-3200 = 204.8 GB/s"},
    {"a100-40gb", "NVIDIA A100 40GB PCIe", 40960 * MIB, 1555 * GB, 312e12, 4, 31.5 * GB,
     "Intel Xeon (Cascade Lake) @2.2GHz (GCP a2-highgpu-1g: 6 cores, 85 GB)", 6, 140.8 * GB,
     40 * GB,
     "A100 datasheet (NVIDIA, 2020): 40GB HBM2 1555 GB/s, 312 TFLOPS fp16 tensor (dense), "
     "PCIe 4.0; GCP A2 machine types; Cascade Lake 6ch DDR4-2933 = 140.8 GB/s"},
    {"h100-pcie", "NVIDIA H100 PCIe 80GB", 81559 * MIB, 2000 * GB, 756e12, 5, 63 * GB,
     "Intel Xeon Platinum 8480+ (16 cores given to the GPU, 256 GB)", 16, 307.2 * GB, 128 * GB,
     "H100 datasheet (NVIDIA, 2023): PCIe 80GB 2.0 TB/s HBM2e, 756 TFLOPS fp16 tensor (dense), "
     "PCIe 5.0 x16; Intel ark 8480+: 8ch DDR5-4800 = 307.2 GB/s"},
    {"h100-sxm", "NVIDIA H100 SXM 80GB", 81559 * MIB, 3350 * GB, 989e12, 5, 63 * GB,
     "2x Intel Xeon Platinum 8480C (DGX H100; 14 cores and 1/4 socket per GPU)", 14,
     76.8 * GB, 200 * GB,
     "H100 datasheet (NVIDIA, 2023): SXM5 3.35 TB/s HBM3, 989 TFLOPS fp16 tensor (dense), "
     "PCIe 5.0 host link; DGX H100 user guide: 2x 8480C, 8 GPUs"},
};

const apex_hw_preset *apex_hw_preset_find(const char *name) {
    if (!name) return NULL;
    for (const apex_hw_preset *h = presets; h < presets + sizeof presets / sizeof presets[0]; h++)
        if (!strcmp(h->name, name)) return h;
    return NULL;
}

sched_status apex_model_preset(const char *name, apex_model_geom *g, double *weight_bytes) {
    if (!name || !g) return sched_fail(SCHED_ERR_INVALID, "model_preset: NULL argument");
    /* Hugging Face config.json of each model (meta-llama). */
    if (!strcmp(name, "llama2-7b")) {
        *g = (apex_model_geom){32, 32, 32, 128, 2, 2, 4096, 11008, 32000};
        if (weight_bytes) *weight_bytes = 6.738e9 * 2;
    } else if (!strcmp(name, "llama3-8b")) {
        *g = (apex_model_geom){32, 32, 8, 128, 2, 2, 4096, 14336, 128256};
        if (weight_bytes) *weight_bytes = 8.030e9 * 2;
    } else {
        return sched_fail(SCHED_ERR_NOT_FOUND,
                          "unknown model preset '%s' (llama2-7b, llama3-8b)", name);
    }
    return SCHED_OK;
}

/* Parameters of one decoder layer's linear layers, and of the LM head. */
static double layer_params(const apex_model_geom *g) {
    double h = g->hidden, qd = (double)g->n_q_heads * g->head_dim,
           kvd = (double)g->n_kv_heads * g->head_dim;
    return h * qd + 2 * h * kvd + qd * h + 3 * h * g->ffn;
}

static double preset_cpu_bw(const apex_hw_preset *hw, int32_t threads) {
    double sock = hw->cpu_bw_Bps * APEX_ROOF_CPU_BW_EFF;
    double cores = threads * APEX_CPU_CORE_BW;
    return cores < sock ? cores : sock;
}

sched_status apex_profile_from_preset(const apex_hw_preset *hw, const apex_model_geom *g,
                                      double weight_bytes, int32_t threads,
                                      apex_profile *out) {
    if (!hw || !g || !out) return sched_fail(SCHED_ERR_INVALID, "profile_from_preset: NULL argument");
    if (g->hidden <= 0 || g->ffn <= 0 || g->vocab <= 0 || g->n_layers <= 0)
        return sched_fail(SCHED_ERR_INVALID, "profile_from_preset: geometry lacks linear shapes");
    if (threads <= 0) threads = hw->cpu_cores;
    apex_profile p;
    memset(&p, 0, sizeof p);
    p.geom = *g;
    apex_model_key(g, p.model_key, sizeof p.model_key);
    snprintf(p.hw_key, sizeof p.hw_key, "preset:%s;threads=%d", hw->name, threads);
    snprintf(p.source, sizeof p.source,
             "preset %s: roofline estimate (bw eff %.2f, flop eff %.2f, cpu bw eff %.2f, "
             "pcie eff %.2f) from %s", hw->name, APEX_ROOF_GPU_BW_EFF, APEX_ROOF_GPU_FLOP_EFF,
             APEX_ROOF_CPU_BW_EFF, APEX_ROOF_PCIE_EFF, hw->gpu);
    p.cpu_threads = threads;
    p.step_overhead_s = 1.5e-3;  /* sampling, scheduling, launches outside layers */
    p.layer_sync_s = 10e-6;      /* one device-side wait on a host-written flag   */
    double bw = hw->gpu_bw_Bps * APEX_ROOF_GPU_BW_EFF;
    double fl = hw->gpu_flops * APEX_ROOF_GPU_FLOP_EFF;
    double lp = layer_params(g), hp = (double)g->hidden * g->vocab;
    double wb = g->act_bytes; /* weights in the activation type (fp16) */
    double per_layer_launch = 20e-6;
    (void)weight_bytes;
    /* T_lin: roofline of each layer's GEMMs and the head, all layers. */
    static const double rows[] = {1, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 768,
                                  1024, 1536, 2048, 3072, 4096, 8192};
    int nr = (int)(sizeof rows / sizeof rows[0]);
    p.lin.n = nr;
    for (int i = 0; i < nr; i++) {
        double r = rows[i];
        double tl = fmax(lp * wb / bw, 2 * r * lp / fl) + per_layer_launch;
        double th = fmax(hp * wb / bw, 2 * r * hp / fl);
        p.lin.x[i] = r;
        p.lin.y[i] = g->n_layers * tl + th;
    }
    /* T_gatt: paged decode attention streams each token's K and V once. */
    double kv_tok = apex_kv_bytes_per_token(g);
    static const double toks[] = {1, 1024, 16384, 262144, 4194304};
    p.gatt.n = 5;
    for (int i = 0; i < 5; i++) {
        p.gatt.x[i] = toks[i];
        p.gatt.y[i] = g->n_layers * 8e-6 + toks[i] * kv_tok / bw;
    }
    /* T_pref: linear over the chunk plus causal attention FLOPs. */
    static const double ptok[] = {1, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384};
    p.pref.n = 10;
    for (int i = 0; i < 10; i++) {
        double t = ptok[i];
        double att = g->n_layers * 2.0 * t * t * g->n_q_heads * g->head_dim / fl;
        p.pref.x[i] = t;
        p.pref.y[i] = apex_curve_eval(&p.lin, t) + att;
    }
    /* T_catt: KV streamed from DRAM at the bandwidth `threads` cores draw;
     * per (sequence, kv head, layer) a work item's fixed cost; per layer a
     * fork/join. Fits at 1, threads/2 and threads. */
    int32_t tc[3] = {1, threads / 2, threads};
    p.n_catt = 0;
    for (int i = 0; i < 3; i++) {
        if (tc[i] < 1 || (p.n_catt && tc[i] <= p.catt[p.n_catt - 1].threads)) continue;
        apex_catt_fit *f = &p.catt[p.n_catt++];
        double cbw = preset_cpu_bw(hw, tc[i]);
        f->threads = tc[i];
        f->c0 = g->n_layers * 8e-6;
        f->per_seq = g->n_layers * (double)g->n_kv_heads * 0.5e-6 / tc[i];
        f->per_token = kv_tok / cbw;
    }
    double link = hw->pcie_Bps * APEX_ROOF_PCIE_EFF;
    p.h2d = (apex_link){10e-6, link};
    p.d2h = (apex_link){10e-6, link};
    sched_status s = apex_profile_validate(&p);
    if (s) return s;
    *out = p;
    return SCHED_OK;
}
