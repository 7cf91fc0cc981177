/* apex-llama-run: batched greedy generation through llama.cpp's C API, the
 * engine side of integration/harness. All prompts are parallel sequences of
 * one batch (one llama.cpp stream each): one prefill batch, then one decode
 * batch per step with one token of every sequence. Whether APEX is in the
 * process is decided outside (GGML_BACKEND_PATH / LD_PRELOAD); this program
 * loads backends the way llama.cpp's tools do and reports APEX's counters
 * when the APEX backend is registered.
 * After the last step it checks the two paths that move KV memory outside
 * the graph (with at least 3 prompts): sequence 0's state saved and loaded
 * into the last sequence's slot (ggml_backend_tensor_get/set), and sequence
 * 0 copied into the one before it (llama_memory_seq_cp across streams:
 * ggml_backend_tensor_copy); all three then decode the same token, and the
 * logits of the copies must equal sequence 0's ("kv_checks"). Then the
 * loaded copy drops its first 8 positions and shifts the rest back (K-shift:
 * an in-place ROPE on the cache) and decodes one more token: the argmax and
 * the sum of its logits (kshift_top, kshift_sum) let the harness compare the
 * runs with and without APEX.
 *
 *   apex-llama-run -m MODEL [-np 8] [-n 128] [-t THREADS] [--logit-steps 4]
 *                  [--logits-out FILE] [--fa on|off] [-ngl N] [-nkvo]
 *                  [--fill N] [--share-fill] [--stagger N] [--no-checks] [-v]
 * -ngl: layers on the GPU (a CUDA build; llama.cpp's default otherwise);
 * -nkvo: KV cache and attention on the host (llama.cpp's offload_kqv off);
 * --fill N: N tokens of filler text before each prompt (long contexts);
 * --share-fill: prefill the filler once (sequence 0) and copy it to the
 *   other sequences (llama_memory_seq_cp): long contexts for many sequences
 *   at the prefill cost of one; implies --no-checks;
 * --stagger N: prompt p stops after n - N * (np - 1 - p) tokens (at least
 *   1): the sequences finish one after another, the last one runs all n
 *   (its "tokens" row is the shortest first); implies --no-checks;
 * --no-checks: skip the KV checks after the last step.
 * Prints one JSON object on stdout. */
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ggml-backend.h"
#include "llama.h"
#include "apex/apex.h"
#include "shim/ggml_apex.h"

static const char *k_prompts[] = {
    "Write a short poem about the sea.",
    "Explain what a KV cache is in a language model.",
    "List three facts about the planet Mars.",
    "What is the capital of France, and why is it famous?",
    "Give me a recipe for a simple tomato soup.",
    "Describe how a CPU differs from a GPU.",
    "Tell a short story about a robot learning to paint.",
    "Why is the sky blue? Answer briefly.",
};
#define N_BUILTIN (int)(sizeof k_prompts / sizeof k_prompts[0])

static int g_verbose;

static void log_cb(enum ggml_log_level level, const char *text, void *ud) {
    (void)ud;
    if (g_verbose || level >= GGML_LOG_LEVEL_WARN) fputs(text, stderr);
}

static bool quiet_progress(float p, void *ud) {
    (void)p, (void)ud;
    return true;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void die(const char *msg) {
    fprintf(stderr, "apex-llama-run: %s\n", msg);
    exit(1);
}

/* Length of the valid UTF-8 sequence at s, or 0. */
static int utf8_len(const unsigned char *s) {
    const int n = s[0] >= 0xf0 && s[0] <= 0xf4 ? 4 : s[0] >= 0xe0 ? 3 : s[0] >= 0xc2 && s[0] <= 0xdf ? 2 : 0;
    if (n == 0 || (n == 3 && s[0] > 0xef)) return 0;
    for (int i = 1; i < n; i++)
        if ((s[i] & 0xc0) != 0x80) return 0;
    return n;
}

/* A JSON string; bytes that are not UTF-8 (a token may end inside a
 * character) become U+FFFD. */
static void json_str(FILE *f, const char *s) {
    fputc('"', f);
    while (*s) {
        const unsigned char c = (unsigned char)*s;
        if (c >= 0x80) {
            const int n = utf8_len((const unsigned char *)s);
            if (n) fwrite(s, 1, (size_t)n, f), s += n;
            else fputs("\\ufffd", f), s++;
            continue;
        }
        if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
        else if (c == '\n') fputs("\\n", f);
        else if (c == '\t') fputs("\\t", f);
        else if (c < 0x20) fprintf(f, "\\u%04x", c);
        else fputc(c, f);
        s++;
    }
    fputc('"', f);
}

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

int main(int argc, char **argv) {
    const char *model_path = NULL, *logits_out = NULL;
    int fa_on = 1, n_gpu_layers = -1000, no_kv_offload = 0, n_fill = 0, checks = 1, stagger = 0, share_fill = 0;
    int n_prompts = 8, n_gen = 128, n_threads = (int)sysconf(_SC_NPROCESSORS_ONLN), logit_steps = 4;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-m") && val) model_path = val, i++;
        else if (!strcmp(a, "-np") && val) n_prompts = atoi(val), i++;
        else if (!strcmp(a, "-n") && val) n_gen = atoi(val), i++;
        else if (!strcmp(a, "-t") && val) n_threads = atoi(val), i++;
        else if (!strcmp(a, "--logit-steps") && val) logit_steps = atoi(val), i++;
        else if (!strcmp(a, "--logits-out") && val) logits_out = val, i++;
        else if (!strcmp(a, "--fa") && val) fa_on = strcmp(val, "off") != 0, i++;
        else if (!strcmp(a, "-ngl") && val) n_gpu_layers = atoi(val), i++;
        else if (!strcmp(a, "-nkvo")) no_kv_offload = 1;
        else if (!strcmp(a, "--fill") && val) n_fill = atoi(val), i++;
        else if (!strcmp(a, "--share-fill")) share_fill = 1;
        else if (!strcmp(a, "--stagger") && val) stagger = atoi(val), i++;
        else if (!strcmp(a, "--no-checks")) checks = 0;
        else if (!strcmp(a, "-v")) g_verbose = 1;
        else {
            fprintf(stderr,
                    "usage: %s -m MODEL [-np N] [-n N] [-t N] [--logit-steps N] [--logits-out FILE] [--fa on|off] "
                    "[-ngl N] [-nkvo] [--fill N] [--share-fill] [--stagger N] [--no-checks] [-v]\n",
                    argv[0]);
            return 2;
        }
    }
    if (!model_path) die("no model (-m)");
    if (n_prompts < 1 || n_prompts > 256 || n_gen < 1 || n_threads < 1 || logit_steps < 0 || n_fill < 0 ||
        n_fill > 1 << 20 || stagger < 0)
        die("bad -np/-n/-t/--logit-steps/--fill/--stagger");
    /* The state/copy checks compare streams prefilled independently: after a
     * shared filler (--share-fill) llama.cpp's cross-stream copies differ
     * from sequence 0 by the same amount with and without APEX (seen, not
     * yet explained), so they are skipped there. */
    if (stagger || share_fill) checks = 0;
    if (logit_steps > n_gen) logit_steps = n_gen;

    llama_log_set(log_cb, NULL);
    ggml_backend_load_all(); /* as llama.cpp's tools do: honours GGML_BACKEND_PATH */
    llama_backend_init();

    struct llama_model_params mp = llama_model_default_params();
    mp.progress_callback = quiet_progress;
    if (n_gpu_layers != -1000) mp.n_gpu_layers = n_gpu_layers;
    struct llama_model *model = llama_model_load_from_file(model_path, mp);
    if (!model) die("failed to load the model (see the message above)");
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    /* --fill: a filler sentence's tokens, repeated to n_fill. */
    static const char filler[] = " The quick brown fox jumps over the lazy dog near the quiet river bank.";
    llama_token fill_toks[64];
    const int n_fill_toks = llama_tokenize(vocab, filler, (int32_t)strlen(filler), fill_toks, 64, false, false);
    if (n_fill > 0 && n_fill_toks <= 0) die("tokenizing the filler failed");

    /* Prompts in SmolLM2's chat format (ChatML), tokenized with specials. */
    llama_token **ptoks = calloc((size_t)n_prompts, sizeof *ptoks);
    int *plen = calloc((size_t)n_prompts, sizeof *plen), max_plen = 0, total_ptoks = 0;
    for (int p = 0; p < n_prompts; p++) {
        char text[1024];
        snprintf(text, sizeof text, "<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n",
                 k_prompts[p % N_BUILTIN]);
        ptoks[p] = malloc(((size_t)n_fill + 1024) * sizeof(llama_token));
        for (int i = 0; i < n_fill; i++) ptoks[p][i] = fill_toks[i % n_fill_toks];
        plen[p] = llama_tokenize(vocab, text, (int32_t)strlen(text), ptoks[p] + n_fill, 1024, n_fill == 0, true);
        if (plen[p] <= 0) die("tokenization failed");
        plen[p] += n_fill;
        if (plen[p] > max_plen) max_plen = plen[p];
        total_ptoks += plen[p];
    }

    struct llama_context_params cp = llama_context_default_params();
    const int ctx_seq = ((max_plen + n_gen + 255) / 256) * 256;
    cp.n_ctx = (uint32_t)(ctx_seq * n_prompts);
    cp.n_seq_max = (uint32_t)n_prompts;
    cp.n_batch = (uint32_t)(total_ptoks > n_prompts ? total_ptoks : n_prompts);
    cp.n_ubatch = cp.n_batch > 2048 ? 2048 : cp.n_batch; /* long prompts: bounded compute buffers */
    cp.offload_kqv = !no_kv_offload;
    cp.n_threads = cp.n_threads_batch = n_threads;
    cp.flash_attn_type = fa_on ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.kv_unified = false; /* one stream per sequence */
    cp.no_perf = true;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) die("failed to create the llama context");

    FILE *lf = NULL;
    if (logits_out && logit_steps > 0) {
        lf = fopen(logits_out, "wb");
        if (!lf) die(strerror(errno));
    }

    const int batch_cap = total_ptoks > n_prompts ? total_ptoks : n_prompts;
    struct llama_batch batch = llama_batch_init(batch_cap, 0, 1);
    int *logit_idx = malloc((size_t)n_prompts * sizeof(int));
    int *tokens = malloc((size_t)n_prompts * n_gen * sizeof(int));
    int *pos = malloc((size_t)n_prompts * sizeof(int));
    int *n_out = malloc((size_t)n_prompts * sizeof(int)); /* tokens prompt p generates */
    /* Each decode step's time: on a shared machine the low quantiles of
     * these move far less with other load than tok_s does. */
    double *step_s = malloc((size_t)n_gen * sizeof(double));
    int n_steps = 0;
    if (!logit_idx || !tokens || !pos || !n_out || !step_s) die("out of memory");
    for (int p = 0; p < n_prompts; p++) {
        const long long m = (long long)n_gen - (long long)stagger * (n_prompts - 1 - p);
        n_out[p] = m < 1 ? 1 : (int)m;
    }

    /* Prefill: every prompt in one batch, logits of each last token.
     * --share-fill: the filler (the same tokens in every sequence) is
     * prefilled once, in sequence 0, copied to the other sequences' streams
     * (llama_memory_seq_cp), and only the prompts follow it. */
    const double t0 = now_s();
    const int shared = share_fill && n_fill > 0 && n_prompts > 1 ? n_fill : 0;
    if (shared) {
        batch.n_tokens = 0;
        for (int i = 0; i < n_fill; i++) {
            const int b = batch.n_tokens++;
            batch.token[b] = ptoks[0][i];
            batch.pos[b] = i;
            batch.n_seq_id[b] = 1;
            batch.seq_id[b][0] = 0;
            batch.logits[b] = 0;
        }
        if (llama_decode(ctx, batch) != 0) die("llama_decode failed on the filler");
        for (int p = 1; p < n_prompts; p++) llama_memory_seq_cp(llama_get_memory(ctx), 0, p, -1, -1);
    }
    batch.n_tokens = 0;
    for (int p = 0; p < n_prompts; p++)
        for (int i = shared; i < plen[p]; i++) {
            const int b = batch.n_tokens++;
            batch.token[b] = ptoks[p][i];
            batch.pos[b] = i;
            batch.n_seq_id[b] = 1;
            batch.seq_id[b][0] = p;
            batch.logits[b] = i == plen[p] - 1;
            if (i == plen[p] - 1) logit_idx[p] = b;
        }
    if (llama_decode(ctx, batch) != 0) die("llama_decode failed on the prompts");
    const double t_prefill = now_s() - t0;
    for (int p = 0; p < n_prompts; p++) pos[p] = plen[p];

    /* APEX's per-step summary (when tracing is on) covers the decode loop. */
    apex_ggml_step_summary_t summary = NULL;
    ggml_backend_reg_t apex_reg = ggml_backend_reg_by_name("APEX");
    if (apex_reg)
        summary = (apex_ggml_step_summary_t)ggml_backend_reg_get_proc_address(apex_reg, APEX_GGML_STEP_SUMMARY);
    if (summary) summary(NULL, 1);
    const double t1 = now_s();
    for (int step = 0; step < n_gen; step++) {
        for (int p = 0; p < n_prompts; p++) {
            if (step >= n_out[p]) continue; /* finished (--stagger) */
            const float *lg = llama_get_logits_ith(ctx, logit_idx[p]);
            if (!lg) die("no logits");
            if (lf && step < logit_steps && fwrite(lg, sizeof(float), (size_t)n_vocab, lf) != (size_t)n_vocab)
                die("writing logits failed");
            tokens[p * n_gen + step] = argmax(lg, n_vocab);
        }
        if (step == n_gen - 1) break;
        batch.n_tokens = 0;
        for (int p = 0; p < n_prompts; p++) {
            if (step + 1 >= n_out[p]) continue; /* its last token is out */
            const int b = batch.n_tokens++;
            batch.token[b] = tokens[p * n_gen + step];
            batch.pos[b] = pos[p]++;
            batch.n_seq_id[b] = 1;
            batch.seq_id[b][0] = p;
            batch.logits[b] = 1;
            logit_idx[p] = b;
        }
        const double ts = now_s();
        if (llama_decode(ctx, batch) != 0) die("llama_decode failed while generating");
        step_s[n_steps++] = now_s() - ts;
    }
    const double t_gen = now_s() - t1;
    long long n_decoded = 0; /* tokens decoded after the prompts (--stagger: fewer) */
    for (int p = 0; p < n_prompts; p++) n_decoded += n_out[p] - 1;
    qsort(step_s, (size_t)n_steps, sizeof *step_s, cmp_double);
    /* Graphs llama.cpp reused instead of rebuilding (the decode loop reuses
     * one per step when nothing in its topology changed). */
    const int graphs_reused = llama_perf_context(ctx).n_reused;
    apex_step_summary sum;
    const int have_sum = summary && summary(&sum, 0);
    if (lf) fclose(lf);

    /* KV moved outside the graph: state save/load and a cross-stream copy. */
    double state_diff = -1, cp_diff = -1, kshift_sum = 0;
    int kshift_top = -1;
    size_t state_bytes = 0;
    if (checks && n_prompts >= 3) {
        const int sa = n_prompts - 1, sb = n_prompts - 2;
        llama_memory_t mem = llama_get_memory(ctx);
        state_bytes = llama_state_seq_get_size(ctx, 0);
        uint8_t *sbuf = malloc(state_bytes ? state_bytes : 1);
        if (!sbuf || llama_state_seq_get_data(ctx, sbuf, state_bytes, 0) != state_bytes)
            die("saving sequence 0's state failed");
        llama_memory_seq_rm(mem, sa, -1, -1);
        if (llama_state_seq_set_data(ctx, sbuf, state_bytes, sa) == 0) die("loading sequence 0's state failed");
        free(sbuf);
        llama_memory_seq_rm(mem, sb, -1, -1);
        llama_memory_seq_cp(mem, 0, sb, -1, -1);
        const llama_token tok = tokens[n_gen - 1];
        const int seqs[3] = {0, sb, sa};
        batch.n_tokens = 3;
        for (int b = 0; b < 3; b++) {
            batch.token[b] = tok;
            batch.pos[b] = pos[0];
            batch.n_seq_id[b] = 1;
            batch.seq_id[b][0] = seqs[b];
            batch.logits[b] = 1;
        }
        if (llama_decode(ctx, batch) != 0) die("llama_decode failed after the state/copy checks");
        const float *l0 = llama_get_logits_ith(ctx, 0), *lb = llama_get_logits_ith(ctx, 1),
                    *la = llama_get_logits_ith(ctx, 2);
        if (!l0 || !la || !lb) die("no logits");
        state_diff = cp_diff = 0;
        for (int i = 0; i < n_vocab; i++) {
            const double da = fabs((double)la[i] - l0[i]), db = fabs((double)lb[i] - l0[i]);
            if (!(da <= state_diff)) state_diff = da; /* NaN propagates */
            if (!(db <= cp_diff)) cp_diff = db;
        }
        if (llama_memory_can_shift(mem) && pos[0] > 16) {
            llama_memory_seq_rm(mem, sa, 0, 8);
            llama_memory_seq_add(mem, sa, 8, -1, -8);
            batch.n_tokens = 1;
            batch.token[0] = tok;
            batch.pos[0] = pos[0] + 1 - 8;
            batch.seq_id[0][0] = sa;
            if (llama_decode(ctx, batch) != 0) die("llama_decode failed after the K-shift");
            const float *lk = llama_get_logits_ith(ctx, 0);
            if (!lk) die("no logits");
            kshift_top = argmax(lk, n_vocab);
            for (int i = 0; i < n_vocab; i++) kshift_sum += lk[i];
        }
    }

    /* APEX's own counters, if the APEX backend is in this process. */
    apex_ggml_stats st;
    int have_apex = 0;
    ggml_backend_reg_t reg = ggml_backend_reg_by_name("APEX");
    if (reg) {
        apex_ggml_stats_get_t get = (apex_ggml_stats_get_t)ggml_backend_reg_get_proc_address(reg, APEX_GGML_STATS_GET);
        if (get) get(&st), have_apex = 1;
    }

    FILE *o = stdout;
    fprintf(o, "{\"engine\": \"llama.cpp\", \"model\": ");
    json_str(o, model_path);
    fprintf(o, ", \"prompts\": %d, \"tokens_per_prompt\": %d, \"n_threads\": %d, \"n_vocab\": %d, "
               "\"logit_steps\": %d, \"prefill_tokens\": %d, \"t_prefill\": %.6f, \"t_gen\": %.6f, "
               "\"tok_s\": %.3f, \"ms_per_step\": %.3f, \"n_gpu_layers\": %d, \"offload_kqv\": %s, "
               "\"fill_tokens\": %d, \"step_ms_min\": %.3f, \"step_ms_p10\": %.3f, \"step_ms_median\": %.3f, \"graphs_reused\": %d, ",
            n_prompts, n_gen, n_threads, n_vocab, logit_steps, total_ptoks, t_prefill, t_gen,
            (double)n_decoded / t_gen, n_gen > 1 ? 1e3 * t_gen / (n_gen - 1) : 0.0,
            n_gpu_layers == -1000 ? mp.n_gpu_layers : n_gpu_layers, no_kv_offload ? "false" : "true", n_fill,
            n_steps ? 1e3 * step_s[0] : 0.0, n_steps ? 1e3 * step_s[n_steps / 10] : 0.0,
            n_steps ? 1e3 * step_s[n_steps / 2] : 0.0, graphs_reused);
    if (state_diff >= 0)
        fprintf(o, "\"kv_checks\": {\"state_bytes\": %zu, \"state_load_max_diff\": %g, \"seq_cp_max_diff\": %g, "
                   "\"kshift_top\": %d, \"kshift_sum\": %.17g}, ",
                state_bytes, state_diff, cp_diff, kshift_top, kshift_sum);
    else
        fprintf(o, "\"kv_checks\": null, ");
    fprintf(o, "\"tokens\": [");
    for (int p = 0; p < n_prompts; p++) {
        fprintf(o, "%s[", p ? ", " : "");
        for (int i = 0; i < n_out[p]; i++) fprintf(o, "%s%d", i ? "," : "", tokens[p * n_gen + i]);
        fprintf(o, "]");
    }
    fprintf(o, "], \"texts\": [");
    for (int p = 0; p < n_prompts; p++) {
        char *text = calloc((size_t)n_gen * 64 + 1, 1);
        size_t len = 0;
        for (int i = 0; i < n_out[p]; i++) {
            const llama_token t = tokens[p * n_gen + i];
            if (llama_vocab_is_eog(vocab, t)) break;
            const int n = llama_token_to_piece(vocab, t, text + len, 63, 0, false);
            if (n > 0) len += (size_t)n;
        }
        text[len] = 0;
        fprintf(o, "%s", p ? ", " : "");
        json_str(o, text);
        free(text);
    }
    fprintf(o, "], \"prompt_texts\": [");
    for (int p = 0; p < n_prompts; p++) {
        fprintf(o, "%s", p ? ", " : "");
        json_str(o, k_prompts[p % N_BUILTIN]);
    }
    fprintf(o, "], \"apex\": ");
    if (have_apex) {
        fprintf(o, "{\"attention_calls\": %llu, \"decode_attn\": %llu, \"prefill_tokens\": %llu, "
                   "\"kv_rows_written\": %llu, \"declined\": %llu, \"attention_seconds\": %.6f, "
                   "\"kv_bytes_apex\": %llu, \"kv_buffers_apex\": %llu, \"kv_bytes_pinned\": %llu, "
                   "\"kv_pool_failures\": %llu, \"attention_kv_in_pool\": %llu, \"kv_writes_in_pool\": %llu, "
                   "\"kv_write_calls\": %llu, \"gpu_attn\": %llu, \"kv_bytes_hybrid\": %llu, "
                   "\"tier_check_max_diff\": %g, \"sched_steps\": %llu, \"migrations_to_device\": %llu, "
                   "\"migrations_to_host\": %llu, \"stream_attn\": [",
                (unsigned long long)st.attention_calls, (unsigned long long)st.decode_attn,
                (unsigned long long)st.prefill_tokens, (unsigned long long)st.kv_rows_written,
                (unsigned long long)st.declined, st.attention_seconds, (unsigned long long)st.kv_bytes_apex,
                (unsigned long long)st.kv_buffers_apex, (unsigned long long)st.kv_bytes_pinned,
                (unsigned long long)st.kv_pool_failures, (unsigned long long)st.attention_kv_in_pool,
                (unsigned long long)st.kv_writes_in_pool, (unsigned long long)st.kv_write_calls,
                (unsigned long long)st.gpu_attn, (unsigned long long)st.kv_bytes_hybrid,
                (double)st.tier_check_max_diff, (unsigned long long)st.sched_steps,
                (unsigned long long)st.migrations_to_device, (unsigned long long)st.migrations_to_host);
        for (int i = 0; i <= st.max_stream && i < APEX_GGML_MAX_STREAMS; i++)
            fprintf(o, "%s%llu", i ? ", " : "", (unsigned long long)st.stream_attn[i]);
        fprintf(o, "], \"stream_gpu\": [");
        for (int i = 0; i <= st.max_stream && i < APEX_GGML_MAX_STREAMS; i++)
            fprintf(o, "%s%llu", i ? ", " : "", (unsigned long long)st.stream_gpu[i]);
        fprintf(o, "]}");
    } else {
        fprintf(o, "null");
    }
    fprintf(o, ", \"apex_summary\": ");
    if (have_sum)
        fprintf(o, "{\"steps\": %llu, \"layer_steps\": %llu, \"engine_us_per_layer\": %.3f, "
                   "\"apex_us_per_layer\": %.3f, \"cpu_attn_us_per_layer\": %.3f, \"gpu_attn_us_per_layer\": %.3f, "
                   "\"gpu_kernel_us_per_layer\": %.3f, \"copy_us_per_layer\": %.3f, \"wait_us_per_layer\": %.3f, "
                   "\"apex_overhead_us_per_layer\": %.3f, \"step_gap_us\": %.3f}",
                (unsigned long long)sum.steps, (unsigned long long)sum.layer_steps, sum.engine_us, sum.apex_us,
                sum.cpu_attn_us, sum.gpu_attn_us, sum.gpu_kernel_us, sum.copy_us, sum.wait_us, sum.apex_overhead_us,
                sum.step_gap_us);
    else
        fprintf(o, "null");
    fprintf(o, "}\n");

    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    for (int p = 0; p < n_prompts; p++) free(ptoks[p]);
    free(ptoks), free(plen), free(logit_idx), free(tokens), free(pos), free(n_out), free(step_s);
    llama_backend_free();
    return 0;
}
