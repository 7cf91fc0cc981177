/* consumer.c - a program built against an installed APEX (find_package or
 * pkg-config): one host-mode context, one sequence, one KV row, one
 * attention; prints the version and exits 0 when the output is the V row
 * (attention over a single token returns its value). */
#include <math.h>
#include <stdio.h>

#include <apex/apex.h>

int main(void) {
    apex_config cfg;
    apex_config_init(&cfg);
    cfg.n_layers = 1;
    cfg.n_q_heads = 2;
    cfg.n_kv_heads = 1;
    cfg.head_dim = 64;
    cfg.kv_dtype = APEX_DTYPE_F32;
    cfg.act_dtype = APEX_DTYPE_F32;
    cfg.host_blocks = 4;
    cfg.max_seqs = 1;
    cfg.max_batch = 1;
    cfg.max_seq_len = 64;
    cfg.n_threads = 1;
    cfg.device = APEX_DEVICE_NONE;
    apex_context *ctx;
    if (apex_context_create(&cfg, &ctx) != APEX_OK) {
        fprintf(stderr, "consumer: %s\n", apex_last_error());
        return 1;
    }
    float k[64], v[64], q[2 * 64], out[2 * 64];
    for (int i = 0; i < 64; i++) {
        k[i] = 0.01f * (float)i;
        v[i] = 1.0f + (float)i;
        q[i] = q[64 + i] = 0.5f;
    }
    int32_t seq = 0, pos;
    int bad = apex_seq_add(ctx, seq, APEX_TIER_HOST) || apex_seq_reserve(ctx, seq, 1, &pos) ||
              apex_kv_write(ctx, 0, 1, &seq, &pos, k, v, APEX_DTYPE_F32) ||
              apex_attention(ctx, 0, 1, &seq, q, out, NULL);
    if (bad) fprintf(stderr, "consumer: %s\n", apex_last_error());
    for (int i = 0; !bad && i < 2 * 64; i++) bad = fabsf(out[i] - v[i % 64]) > 1e-6f;
    apex_context_destroy(ctx);
    printf("consumer: libapex %s (ABI %d), attention %s\n", apex_version(), apex_abi_version(),
           bad ? "WRONG" : "ok");
    return bad;
}
