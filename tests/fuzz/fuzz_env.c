/*
 * fuzz_env.c - APEX's environment variables under libFuzzer. The input is
 * a list of (variable, value) pairs; after setting them, apex_config_init
 * either succeeds with every field in its documented range or fails with
 * APEX_ERR_INVALID_ARG and a message naming a variable that was set. Host
 * tier sizing (APEX_HOST_KV_GB) always gives a block count in [1, 2^31),
 * and creating a context under that environment fails or succeeds cleanly
 * (APEX_EMU_DEVICE_MB, APEX_EMU_KERNEL_DELAY_US, APEX_STAGING_SLOTS,
 * APEX_PIN_HOST_POOL, APEX_CPUSET on the emulated device).
 */
#include <limits.h>

#include "fuzz_util.h"
#include "csrc/config.h"

static const char *const vars[] = {
    "APEX_HOST_BLOCKS", "APEX_DEVICE_BLOCKS", "APEX_THREADS",    "APEX_BLOCK_TOKENS",
    "APEX_MAX_SEQS",    "APEX_MAX_BATCH",     "APEX_MAX_SEQ_LEN", "APEX_DEVICE",
    "APEX_CPUSET",      "APEX_HOST_KV_GB",    "APEX_EMU_DEVICE_MB", "APEX_EMU_KERNEL_DELAY_US",
    "APEX_STAGING_SLOTS", "APEX_PIN_HOST_POOL",
};
enum { N_VARS = sizeof vars / sizeof vars[0] };

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz f = {data, size, 0};
    int set[N_VARS] = {0};
    int create = fz_u8(&f) % 16 == 0; /* a context costs ~7 ms: 1 input in 16 */
    while (fz_more(&f)) {
        int i = fz_below(&f, N_VARS);
        char val[48];
        size_t n = (size_t)fz_below(&f, (int32_t)sizeof val);
        for (size_t j = 0; j < n; j++) {
            char ch = (char)fz_u8(&f);
            val[j] = ch ? ch : '0';
        }
        val[n] = '\0';
        /* The context-creating variables only matter when create is set;
         * keep their values in a range that cannot ask for real memory. */
        if (i == 10) snprintf(val, sizeof val, "%d", fz_below(&f, 64));
        if (i == 11) snprintf(val, sizeof val, "%d", fz_below(&f, 3) == 0 ? -1 : fz_below(&f, 50));
        setenv(vars[i], val, 1);
        set[i] = 1;
    }
    apex_config c;
    apex_status st = apex_config_init(&c);
    FZ_STATUS(st);
    if (st == APEX_OK) {
        FZ_CHECK(c.host_blocks >= 0 && c.host_blocks <= INT32_MAX && c.device_blocks >= 0 &&
                     c.device_blocks <= INT32_MAX && c.n_threads >= 0 && c.n_threads <= 1024 &&
                     c.block_tokens >= 1 && c.max_seqs >= 1 && c.max_batch >= 1 &&
                     c.max_seq_len >= 1 && c.device >= APEX_DEVICE_AUTO &&
                     c.device <= APEX_DEVICE_CUDA,
                 "a field out of range after apex_config_init");
    } else {
        FZ_CHECK(st == APEX_ERR_INVALID_ARG, "status %s", apex_status_name(st));
        int named = 0;
        for (int i = 0; i < N_VARS; i++) named |= set[i] && strstr(apex_last_error(), vars[i]);
        FZ_CHECK(named, "message names no variable that was set: %s", apex_last_error());
    }
    /* Host tier sizing from APEX_HOST_KV_GB for a fixed geometry. */
    apex_config g = {.n_layers = 2, .n_q_heads = 4, .n_kv_heads = 2, .head_dim = 64,
                     .kv_dtype = APEX_DTYPE_F16, .block_tokens = 16};
    int64_t hb = apex_config_host_blocks(&g);
    FZ_CHECK(hb >= 1 && hb <= INT32_MAX, "host blocks %lld", (long long)hb);
    if (create && st == APEX_OK) {
        c.n_layers = 1;
        c.n_q_heads = c.n_kv_heads = 1;
        c.head_dim = 64;
        c.block_tokens = 16;
        c.host_blocks = 4;
        c.device_blocks = c.device_blocks % 8;
        c.max_seqs = c.max_batch = 2;
        c.max_seq_len = 64;
        c.n_threads = 1;
        c.device = APEX_DEVICE_EMULATED;
        apex_context *ctx = NULL;
        st = apex_context_create(&c, &ctx);
        FZ_STATUS(st);
        FZ_CHECK((st == APEX_OK) == (ctx != NULL), "create status and context disagree");
        apex_context_destroy(ctx);
    }
    for (int i = 0; i < N_VARS; i++) unsetenv(vars[i]);
    return 0;
}
