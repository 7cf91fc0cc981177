/* env.h - the core's APEX_* environment, read in one place: one table of
 * the variables (name, type, default, what it does), one process-wide
 * snapshot of their values that the core reads instead of getenv.
 *
 * When it is read: the first apex_env_get of the process takes the
 * snapshot; apex_config_init takes a fresh one (the documented moment an
 * engine hands APEX its configuration, so an environment changed before it
 * counts), and so does apex_env_refresh (tests that setenv between steps).
 * A snapshot is never changed or freed once published, so a value pointer
 * stays valid for the life of the process (apex_config.cpu_set keeps one);
 * a retake that finds nothing changed keeps the current one.
 * Each consumer reads its variables at its own moment (the ISA once, at
 * the first kernel call; fault injection at the first check; the tracer
 * at load; the rest when a config, context, device or pipeline is made).
 *
 * An APEX_* name in the environment that neither the core nor one of the
 * other parts of APEX reads gets one warning line on stderr (a typo guard);
 * it never fails anything. Names under a prefix another part owns
 * (APEX_GGML_, APEX_VLLM_, ...) are left to that part. */
#ifndef APEX_ENV_H
#define APEX_ENV_H

/* X(id, type, default, doc): the core's variables; the name is APEX_<id>. */
#define APEX_ENV_VARS(X)                                                                         \
    X(HOST_BLOCKS, "int", "0", "host-tier blocks (0: sized from APEX_HOST_KV_GB)")              \
    X(DEVICE_BLOCKS, "int", "0", "device-tier blocks")                                          \
    X(THREADS, "int", "0", "CPU attention threads (0: one per worker core)")                    \
    X(BLOCK_TOKENS, "int", "16", "tokens per KV block")                                         \
    X(MAX_SEQS, "int", "256", "sequences a context holds")                                      \
    X(MAX_BATCH, "int", "256", "rows per attention call")                                       \
    X(MAX_SEQ_LEN, "int", "32768", "tokens per sequence")                                       \
    X(DEVICE, "auto|none|emulated|cuda", "auto", "the device a context opens")                  \
    X(CPUSET, "cpu list", "", "worker cores, e.g. 0-3,8 (default: the GPU's local cores)")      \
    X(HOST_KV_GB, "float", "2", "host-tier size over all layers when host_blocks is 0")         \
    X(ISA, "amxbf16|avx512bf16|avx512|avx2|scalar", "best", "CPU attention kernel (first call)")       \
    X(PIN_HOST_POOL, "0|1", "1", "0: do not cudaHostRegister the host pool")                    \
    X(HUGE_ENGINE_KV, "0|1", "0", "1: an engine's host KV onto huge pages at context creation") \
    X(KV_LAYOUT, "auto|rows", "auto", "host-mode bf16 KV: auto takes the CPU pair layout")      \
    X(EMU_DEVICE_MB, "int", "256", "memory of the emulated device")                             \
    X(EMU_KERNEL_DELAY_US, "int", "0", "emulated device: sleep per kernel (0..1000000)")        \
    X(STAGING_SLOTS, "int", "2*layers", "pipeline staging slots (2..64)")                       \
    X(GPU_PRESET, "name", "host", "roofline preset for apex_sched_enable without one")          \
    X(PROFILE, "path", "", "a saved scheduler profile to use instead of measuring")            \
    X(FAULT, "POINTS:N[:persist]", "", "fault injection (csrc/fault.h)")                        \
    X(FAULT_STALL_US, "int", "0", "fault injection: stall before each checked point")          \
    X(TRACE, "path (%p: pid)", "", "Chrome trace-event JSON written at exit")                   \
    X(TRACE_SUMMARY, "0|1", "0", "per-step summary without the event trace")                   \
    X(TRACE_MAX_EVENTS, "int", "2000000", "trace events kept")                                  \
    X(METRICS_FILE, "path (%p: pid)", "", "Prometheus text file, rewritten each second")

typedef enum apex_env_var {
#define APEX_ENV_ENUM_(id, ...) APEX_ENV_##id,
    APEX_ENV_VARS(APEX_ENV_ENUM_)
#undef APEX_ENV_ENUM_
    APEX_ENV_N
} apex_env_var;

typedef struct apex_env_info {
    const char *name; /* "APEX_THREADS" */
    const char *type, *def, *doc;
} apex_env_info;

/* The value of v in the current snapshot, as set (possibly ""); NULL when
 * unset. Thread-safe. */
const char *apex_env_get(apex_env_var v);

/* Takes a fresh snapshot of the environment and publishes it (warning
 * about unknown APEX_* names not seen in the previous one). Keeps the old
 * snapshot if memory runs out. Thread-safe. */
void apex_env_refresh(void);

/* Row v of the table; NULL past the end. */
const apex_env_info *apex_env_info_at(int v);

/* Whether name (the whole variable name) is one some part of APEX reads. */
int apex_env_known(const char *name);

/* The unknown APEX_* names of the current snapshot, space-separated ("" if
 * none). */
const char *apex_env_unknown(void);

#endif
