/* Runtime ISA choice for the CPU attention kernel: once, from cpuid and the
 * OS's saved-state mask (XCR0), unless APEX_ISA forces a variant. */
#include <cpuid.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
/* arch_prctl's request for an extended state component, and AMX tile data's. */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#endif

#include "cpu_attn/cpu_attn_impl.h"
#include "cpu_attn/kv_layout.h"
#include "csrc/env.h"

typedef struct {
    int avx2;      /* AVX2 + FMA + F16C, OS saves YMM              */
    int avx512;    /* AVX-512 F/BW/VL/DQ, OS saves ZMM and k-regs   */
    int avx512bf16;
    int amxbf16;   /* AMX-TILE + AMX-BF16, tile state in XCR0, and the
                    * process's permission to use it (Linux asks for it) */
    int zmm_split; /* 512-bit ops issue as two 256-bit halves: AMD
                    * family 19h (Zen 4, the one with AVX-512)        */
} isa_caps;

static uint64_t xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

static isa_caps detect(void) {
    isa_caps c = {0, 0, 0, 0, 0};
    unsigned a, b, cx, d;
    if (!__get_cpuid(0, &a, &b, &cx, &d)) return c;
    const int amd = b == 0x68747541u && d == 0x69746e65u && cx == 0x444d4163u; /* "AuthenticAMD" */
    if (!__get_cpuid(1, &a, &b, &cx, &d)) return c;
    const unsigned base_family = (a >> 8) & 0xf;
    const unsigned family = base_family == 0xf ? base_family + ((a >> 20) & 0xff) : base_family;
    int fma = (cx >> 12) & 1, osxsave = (cx >> 27) & 1, avx = (cx >> 28) & 1;
    int f16c = (cx >> 29) & 1;
    if (!osxsave || !avx) return c;
    uint64_t xcr0 = xgetbv0();
    int os_ymm = (xcr0 & 0x6) == 0x6;      /* SSE + AVX state           */
    int os_zmm = (xcr0 & 0xe6) == 0xe6;    /* + opmask, ZMM_Hi256, Hi16 */
    unsigned a7, b7, c7, d7;
    if (!__get_cpuid_count(7, 0, &a7, &b7, &c7, &d7)) return c;
    int avx2 = (b7 >> 5) & 1;
    int f = (b7 >> 16) & 1, dq = (b7 >> 17) & 1, bw = (b7 >> 30) & 1, vl = (b7 >> 31) & 1;
    c.avx2 = os_ymm && avx2 && fma && f16c;
    c.avx512 = c.avx2 && os_zmm && f && dq && bw && vl;
    c.zmm_split = c.avx512 && amd && family == 0x19;
    if (c.avx512 && a7 >= 1) {
        unsigned a71 = 0, b71, c71, d71;
        __get_cpuid_count(7, 1, &a71, &b71, &c71, &d71);
        c.avx512bf16 = (a71 >> 5) & 1;
    }
    /* AMX: cpuid 7.0 edx bits 22 (BF16) and 24 (TILE), XCR0 bits 17-18
     * (tile config and data), and on Linux the permission for tile data,
     * asked for once for the process; without it the first tile
     * instruction traps. */
    if (c.avx512bf16 && ((d7 >> 22) & 1) && ((d7 >> 24) & 1) && (xcr0 & 0x60000) == 0x60000) {
#if defined(__linux__) && defined(SYS_arch_prctl)
        c.amxbf16 = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#endif
    }
    return c;
}

static pthread_once_t caps_once = PTHREAD_ONCE_INIT;
static isa_caps caps_cached;
static void caps_init(void) { caps_cached = detect(); }

static isa_caps caps(void) {
    pthread_once(&caps_once, caps_init);
    return caps_cached;
}

static int supported(cpu_attn_isa isa) {
    isa_caps c = caps();
    switch (isa) {
    case CPU_ATTN_ISA_SCALAR: return 1;
    case CPU_ATTN_ISA_AVX2: return c.avx2;
    case CPU_ATTN_ISA_AVX512: return c.avx512;
    case CPU_ATTN_ISA_AVX512BF16: return c.avx512 && c.avx512bf16;
    case CPU_ATTN_ISA_AMXBF16: return c.avx512 && c.avx512bf16 && c.amxbf16;
    }
    return 0;
}

int cpu_attn_have_avx512bf16(void) { return caps().avx512bf16; }

/* -1: cpuid's choice. */
static _Atomic int qk_ymm_forced = -1;

int cpu_attn_qk_ymm(void) {
    const int f = atomic_load_explicit(&qk_ymm_forced, memory_order_relaxed);
    return f >= 0 ? f : caps().zmm_split;
}

void cpu_attn_qk_ymm_force(int on) {
    atomic_store_explicit(&qk_ymm_forced, on < 0 ? -1 : on != 0, memory_order_relaxed);
}

/* -1: not decided yet. */
static _Atomic int selected = -1;

static cpu_attn_isa best(void) {
    if (supported(CPU_ATTN_ISA_AMXBF16)) return CPU_ATTN_ISA_AMXBF16;
    if (supported(CPU_ATTN_ISA_AVX512BF16)) return CPU_ATTN_ISA_AVX512BF16;
    if (supported(CPU_ATTN_ISA_AVX512)) return CPU_ATTN_ISA_AVX512;
    if (supported(CPU_ATTN_ISA_AVX2)) return CPU_ATTN_ISA_AVX2;
    return CPU_ATTN_ISA_SCALAR;
}

static cpu_attn_isa decide(void) {
    cpu_attn_isa pick = best();
    const char *env = apex_env_get(APEX_ENV_ISA);
    if (env && *env) {
        cpu_attn_isa want;
        if (!strcmp(env, "amxbf16")) want = CPU_ATTN_ISA_AMXBF16;
        else if (!strcmp(env, "avx512bf16")) want = CPU_ATTN_ISA_AVX512BF16;
        else if (!strcmp(env, "avx512")) want = CPU_ATTN_ISA_AVX512;
        else if (!strcmp(env, "avx2")) want = CPU_ATTN_ISA_AVX2;
        else if (!strcmp(env, "scalar")) want = CPU_ATTN_ISA_SCALAR;
        else {
            fprintf(stderr, "apex: APEX_ISA=%s is not amxbf16|avx512bf16|avx512|avx2|scalar; using %s\n", env,
                    cpu_attn_isa_name(pick));
            return pick;
        }
        if (supported(want)) return want;
        fprintf(stderr, "apex: APEX_ISA=%s but this CPU lacks it; using %s\n", env,
                cpu_attn_isa_name(pick));
    }
    return pick;
}

cpu_attn_isa cpu_attn_isa_selected(void) {
    int s = atomic_load_explicit(&selected, memory_order_acquire);
    if (s >= 0) return (cpu_attn_isa)s;
    int want = (int)decide(), expect = -1;
    /* First decision wins (a concurrent force or decide keeps its value). */
    if (!atomic_compare_exchange_strong(&selected, &expect, want)) return (cpu_attn_isa)expect;
    return (cpu_attn_isa)want;
}

const char *cpu_attn_isa_name(cpu_attn_isa isa) {
    switch (isa) {
    case CPU_ATTN_ISA_SCALAR: return "scalar";
    case CPU_ATTN_ISA_AVX2: return "avx2";
    case CPU_ATTN_ISA_AVX512: return "avx512";
    case CPU_ATTN_ISA_AVX512BF16: return "avx512bf16";
    case CPU_ATTN_ISA_AMXBF16: return "amxbf16";
    }
    return "unknown";
}

int cpu_attn_isa_force(cpu_attn_isa isa) {
    if (isa != CPU_ATTN_ISA_SCALAR && isa != CPU_ATTN_ISA_AVX2 && isa != CPU_ATTN_ISA_AVX512 &&
        isa != CPU_ATTN_ISA_AVX512BF16 && isa != CPU_ATTN_ISA_AMXBF16)
        return -1;
    if (!supported(isa)) return -1;
    atomic_store_explicit(&selected, (int)isa, memory_order_release);
    return 0;
}

const cpu_attn_kernel *cpu_attn_kernel_get(cpu_attn_isa isa) {
    switch (isa) {
    case CPU_ATTN_ISA_AMXBF16: return &cpu_attn_kernel_amxbf16;
    case CPU_ATTN_ISA_AVX512BF16: return &cpu_attn_kernel_avx512bf16;
    case CPU_ATTN_ISA_AVX512: return &cpu_attn_kernel_avx512;
    case CPU_ATTN_ISA_AVX2: return &cpu_attn_kernel_avx2;
    default: return &cpu_attn_kernel_scalar;
    }
}

int cpu_attn_pairs_ok(const cpu_attn_geom *g) {
    return g->kv_dtype == APEX_DTYPE_BF16 && g->block_tokens >= APEX_KV_PAIR_TILE &&
           cpu_attn_kernel_get(cpu_attn_isa_selected())->span_pairs != NULL;
}
