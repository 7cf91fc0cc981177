/*
 * apex-trace-cost - what the tracer costs, off and on, measured against its
 * own baseline in the same run.
 *
 * The tracer's level is fixed when libapex loads (APEX_TRACE,
 * APEX_TRACE_SUMMARY), so each measurement is a child process of this one
 * with the environment of its mode: off, summary (APEX_TRACE_SUMMARY=1),
 * events (APEX_TRACE=file). Modes alternate round by round (this machine is
 * noisy) and the medians are reported. Each child measures
 *   - a decode loop in host mode (apex_kv_write + apex_attention per layer,
 *     small shapes so APEX's own time is small and the hooks show): us per
 *     layer per step;
 *   - one span (apex_trace_begin + apex_trace_end, the adapters' hook):
 *     ns per span.
 *   apex-trace-cost [--rounds 7] [--steps 200]     JSON on stdout
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "apex/apex.h"

enum { L = 32, HQ = 8, HK = 2, D = 64, SEQS = 2, CTX = 128 };

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int child(int steps) {
    apex_config c;
    if (apex_config_init(&c)) return 1;
    c.n_layers = L, c.n_q_heads = HQ, c.n_kv_heads = HK, c.head_dim = D;
    c.kv_dtype = APEX_DTYPE_F16, c.act_dtype = APEX_DTYPE_F32;
    c.block_tokens = 16, c.host_blocks = SEQS * (CTX + steps + 16) / 16 + 8;
    c.max_seqs = SEQS, c.max_batch = SEQS, c.max_seq_len = CTX + steps + 16, c.n_threads = 1;
    c.device = APEX_DEVICE_NONE;
    apex_context *ctx;
    if (apex_context_create(&c, &ctx)) {
        fprintf(stderr, "apex-trace-cost: %s\n", apex_last_error());
        return 1;
    }
    static float k[SEQS * HK * D], q[SEQS * HQ * D], out[SEQS * HQ * D];
    for (int i = 0; i < SEQS * HK * D; i++) k[i] = (float)((i * 37) % 17) * 0.01f;
    for (int i = 0; i < SEQS * HQ * D; i++) q[i] = (float)((i * 11) % 13) * 0.01f;
    int32_t seqs[SEQS], pos[SEQS];
    for (int s = 0; s < SEQS; s++) {
        seqs[s] = s;
        apex_seq_add(ctx, s, APEX_TIER_HOST);
    }
    double t_loop = 0;
    for (int step = 0; step < CTX + steps; step++) {
        const double t0 = now_s();
        for (int s = 0; s < SEQS; s++) apex_seq_reserve(ctx, s, 1, &pos[s]);
        for (int l = 0; l < L; l++) {
            apex_kv_write(ctx, l, SEQS, seqs, pos, k, k, APEX_DTYPE_F32);
            apex_attention(ctx, l, SEQS, seqs, q, out, NULL);
        }
        if (step >= CTX) t_loop += now_s() - t0; /* the first CTX steps build the context */
    }
    apex_context_destroy(ctx);
    const int spans = 100000;
    const double t1 = now_s();
    for (int i = 0; i < spans; i++) {
        apex_trace_begin(APEX_TRACE_INFO, "cost probe", 0);
        apex_trace_end();
    }
    const double t_span = now_s() - t1;
    printf("%.6f %.3f\n", 1e6 * t_loop / ((double)steps * L), 1e9 * t_span / spans);
    return 0;
}

static int cmp(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int main(int argc, char **argv) {
    int rounds = 7, steps = 200;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--child") && i + 1 < argc) return child(atoi(argv[i + 1]));
        if (!strcmp(argv[i], "--rounds") && i + 1 < argc) rounds = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: apex-trace-cost [--rounds N] [--steps N]\n");
            return 2;
        }
    }
    if (rounds < 1 || rounds > 101 || steps < 1 || steps > 100000) {
        fprintf(stderr, "apex-trace-cost: --rounds 1..101, --steps 1..100000\n");
        return 2;
    }
    static const char *const names[3] = {"off", "summary", "events"};
    double loop[3][101], span[3][101];
    char tracefile[] = "/tmp/apex-trace-cost-XXXXXX";
    const int tfd = mkstemp(tracefile);
    if (tfd < 0) return 1;
    close(tfd);
    for (int r = 0; r < rounds; r++) {
        for (int m = 0; m < 3; m++) {
            int fds[2];
            if (pipe(fds)) return 1;
            const pid_t pid = fork();
            if (pid == 0) {
                dup2(fds[1], 1);
                close(fds[0]);
                unsetenv("APEX_TRACE");
                unsetenv("APEX_TRACE_SUMMARY");
                if (m == 1) setenv("APEX_TRACE_SUMMARY", "1", 1);
                if (m == 2) setenv("APEX_TRACE", tracefile, 1);
                char n[32];
                snprintf(n, sizeof n, "%d", steps);
                execl("/proc/self/exe", argv[0], "--child", n, (char *)NULL);
                _exit(127);
            }
            close(fds[1]);
            char buf[128] = "";
            const ssize_t got = read(fds[0], buf, sizeof buf - 1);
            close(fds[0]);
            int status = 0;
            waitpid(pid, &status, 0);
            if (got <= 0 || !WIFEXITED(status) || WEXITSTATUS(status) ||
                sscanf(buf, "%lf %lf", &loop[m][r], &span[m][r]) != 2) {
                fprintf(stderr, "apex-trace-cost: the %s child failed\n", names[m]);
                unlink(tracefile);
                return 1;
            }
            fprintf(stderr, "round %d %s: %.3f us per layer-step, %.1f ns per span\n", r + 1, names[m],
                    loop[m][r], span[m][r]);
        }
    }
    unlink(tracefile);
    double ml[3], ms[3];
    for (int m = 0; m < 3; m++) ml[m] = median(loop[m], rounds), ms[m] = median(span[m], rounds);
    printf("{\"bench\": \"trace_cost\", \"rounds\": %d, \"steps\": %d, \"layers\": %d, \"seqs\": %d, "
           "\"ctx\": %d, \"us_per_layer_step\": {\"off\": %.3f, \"summary\": %.3f, \"events\": %.3f}, "
           "\"ns_per_span\": {\"off\": %.2f, \"summary\": %.2f, \"events\": %.2f}, "
           "\"summary_cost_us_per_layer_step\": %.3f, \"events_cost_us_per_layer_step\": %.3f}\n",
           rounds, steps, L, SEQS, CTX, ml[0], ml[1], ml[2], ms[0], ms[1], ms[2], ml[1] - ml[0], ml[2] - ml[0]);
    return 0;
}
