/* apex-random-model: writes a Llama-architecture GGUF with random weights and
 * (by default) Llama-3.1-8B attention geometry, so APEX can be exercised at
 * real head counts / head size without shipping an 8B checkpoint. The
 * tokenizer is copied from any llama.cpp GGUF so prompts tokenize as there.
 *
 *   apex-random-model --vocab VOCAB.gguf --out OUT.gguf [--layers N]
 *       [--n-embd N] [--n-head N] [--n-head-kv N] [--n-ff N] [--ctx N]
 *       [--type q4_0|f16] [--seed N] [--write-vocab VOCAB_OUT.gguf]
 *
 * --write-vocab writes only the tokenizer.* keys (plus
 * general.architecture=llama, no tensors): a few-MB file that machines
 * without network access can use as --vocab.
 *
 * Tensors are streamed: metadata first, then each tensor generated, converted
 * and appended in chunks, so memory stays small whatever the geometry.
 * Bad input: one error line, exit 2; output goes to OUT.tmp and is renamed
 * only when complete. */
#include "ggml.h"
#include "gguf.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PROG "apex-random-model"
#define EXIT_BAD_INPUT 2
#define EXIT_IO 1

/* llama_ftype values (llama.h) for general.file_type. */
#define FTYPE_MOSTLY_F16 1u
#define FTYPE_MOSTLY_Q4_0 2u

/* Rows converted per chunk: bounds the f32 scratch to a few MB. */
#define CHUNK_ELEMS (1u << 20)

static const char *g_tmp_path; /* removed on any failure after creation */

/* Keep ggml/gguf's own multi-line diagnostics off stderr; the last error is
 * folded into our single error line instead. */
static char g_ggml_err[256];
static void quiet_log(enum ggml_log_level level, const char *text, void *ud) {
    (void)ud;
    if (level != GGML_LOG_LEVEL_ERROR && level != GGML_LOG_LEVEL_WARN) return;
    snprintf(g_ggml_err, sizeof g_ggml_err, "%s", text);
    size_t n = strlen(g_ggml_err);
    while (n && (g_ggml_err[n - 1] == '\n' || g_ggml_err[n - 1] == '\r')) g_ggml_err[--n] = 0;
}

static _Noreturn void die(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static _Noreturn void die(int code, const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, PROG ": error: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    if (g_tmp_path) remove(g_tmp_path);
    exit(code);
}

static void usage(void) {
    printf("usage: " PROG " --vocab VOCAB.gguf [--out OUT.gguf] [--write-vocab VOCAB_OUT.gguf]\n"
           "       [--layers N (4)] [--n-embd N (4096)] [--n-head N (32)] [--n-head-kv N (8)]\n"
           "       [--n-ff N (14336)] [--ctx N (131072)] [--type q4_0|f16 (q4_0)] [--seed N (1)]\n"
           "Writes a llama-architecture GGUF with random weights; tokenizer.* keys are\n"
           "copied from VOCAB.gguf (a model or a --write-vocab file).\n");
}

/* Whole-string unsigned parse with range check; anything else is bad input. */
static uint64_t parse_u64(const char *opt, const char *s, uint64_t lo, uint64_t hi) {
    if (!s || !*s || *s == '-' || *s == '+')
        die(EXIT_BAD_INPUT, "%s: expected a non-negative integer, got '%s'", opt, s ? s : "");
    errno = 0;
    char *end = NULL;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end || v < lo || v > hi)
        die(EXIT_BAD_INPUT, "%s: '%s' is not an integer in [%" PRIu64 ", %" PRIu64 "]", opt, s, lo, hi);
    return (uint64_t)v;
}

/* splitmix64: tiny, fast, and good enough that every bit is usable. */
static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Normal-ish sample with std 1: sum of four 16-bit uniforms (Irwin-Hall,
 * variance 4/12) rescaled. One RNG call per value keeps multi-GB models
 * quick; exact Gaussian tails don't matter for a smoke-test model. */
static float normalish(uint64_t *s) {
    uint64_t r = splitmix64(s);
    float sum = (float)(r & 0xFFFF) + (float)((r >> 16) & 0xFFFF) + (float)((r >> 32) & 0xFFFF) +
                (float)(r >> 48);
    /* each term: mean 32767.5, variance ~65536^2/12; the sum: 2*65535, 65536^2/3 */
    return (sum - 2.0f * 65535.0f) * (1.7320508f / 65536.0f);
}

struct tensor_spec {
    struct ggml_tensor *t;
    float std;     /* 0 => constant 1.0 (norm weights) */
    uint64_t seed; /* per-tensor stream so each tensor is reproducible alone */
};

static bool is_tokenizer_key(const char *k) { return strncmp(k, "tokenizer.", 10) == 0; }

/* Loads VOCAB (metadata only) and returns a fresh context holding just its
 * tokenizer.* keys; *n_vocab = length of tokenizer.ggml.tokens. */
static struct gguf_context *load_vocab(const char *path, uint32_t *n_vocab) {
    FILE *probe = fopen(path, "rb");
    if (!probe) die(EXIT_BAD_INPUT, "cannot open vocab file '%s': %s", path, strerror(errno));
    fclose(probe);

    struct gguf_init_params ip = {.no_alloc = true, .ctx = NULL};
    g_ggml_err[0] = 0;
    struct gguf_context *src = gguf_init_from_file(path, ip);
    if (!src)
        die(EXIT_BAD_INPUT, "'%s' is not a readable GGUF file%s%s", path, g_ggml_err[0] ? ": " : "",
            g_ggml_err);

    int64_t kid = gguf_find_key(src, "tokenizer.ggml.tokens");
    if (kid < 0 || gguf_get_kv_type(src, kid) != GGUF_TYPE_ARRAY ||
        gguf_get_arr_type(src, kid) != GGUF_TYPE_STRING || gguf_get_arr_n(src, kid) == 0) {
        gguf_free(src);
        die(EXIT_BAD_INPUT, "'%s' has no tokenizer.ggml.tokens string array", path);
    }
    size_t n = gguf_get_arr_n(src, kid);
    if (n > INT32_MAX) {
        gguf_free(src);
        die(EXIT_BAD_INPUT, "'%s': vocabulary of %zu tokens is too large", path, n);
    }
    *n_vocab = (uint32_t)n;

    /* gguf_set_kv copies every type (arrays included); then drop what is not
     * tokenizer.*, iterating backwards since removal shifts later ids. */
    struct gguf_context *dst = gguf_init_empty();
    gguf_set_kv(dst, src);
    gguf_free(src);
    for (int64_t i = gguf_get_n_kv(dst) - 1; i >= 0; --i) {
        const char *k = gguf_get_key(dst, i);
        if (!is_tokenizer_key(k)) gguf_remove_key(dst, k);
    }
    return dst;
}

static char *tmp_name(const char *out) {
    size_t n = strlen(out) + 5;
    char *p = malloc(n);
    if (!p) die(EXIT_IO, "out of memory");
    snprintf(p, n, "%s.tmp", out);
    return p;
}

static FILE *open_tmp(const char *out, char **tmp) {
    *tmp = tmp_name(out);
    FILE *f = fopen(*tmp, "wb");
    if (!f) die(EXIT_BAD_INPUT, "cannot create '%s': %s", *tmp, strerror(errno));
    g_tmp_path = *tmp;
    return f;
}

static void finish_file(FILE *f, char *tmp, const char *out) {
    if (fflush(f) != 0 || ferror(f)) die(EXIT_IO, "write to '%s' failed: %s", tmp, strerror(errno));
    if (fclose(f) != 0) die(EXIT_IO, "closing '%s' failed: %s", tmp, strerror(errno));
    if (rename(tmp, out) != 0) die(EXIT_IO, "rename '%s' -> '%s' failed: %s", tmp, out, strerror(errno));
    g_tmp_path = NULL;
    free(tmp);
}

static void write_all(FILE *f, const void *p, size_t n) {
    if (n && fwrite(p, 1, n, f) != n) die(EXIT_IO, "write to '%s' failed: %s", g_tmp_path, strerror(errno));
}

static void write_vocab_only(const struct gguf_context *tok, const char *out) {
    struct gguf_context *g = gguf_init_empty();
    gguf_set_val_str(g, "general.architecture", "llama");
    gguf_set_val_str(g, "general.name", "APEX vocab-only");
    gguf_set_kv(g, tok);
    char *tmp;
    FILE *f = open_tmp(out, &tmp);
    if (!gguf_write_to_file_ptr(g, f, false)) die(EXIT_IO, "writing '%s' failed: %s", tmp, g_ggml_err);
    finish_file(f, tmp, out);
    gguf_free(g);
}

/* Streams one tensor's data: random f32 rows in chunks, converted to the
 * tensor's type, then zero padding up to the GGUF alignment. */
static void write_tensor_data(FILE *f, const struct tensor_spec *ts, float *scratch, void *conv,
                              size_t align) {
    const struct ggml_tensor *t = ts->t;
    const int64_t n_per_row = t->ne[0];
    const int64_t n_rows = ggml_nrows(t);
    int64_t rows_per_chunk = (int64_t)(CHUNK_ELEMS / (size_t)n_per_row);
    if (rows_per_chunk < 1) rows_per_chunk = 1;
    uint64_t rng = ts->seed;

    for (int64_t r0 = 0; r0 < n_rows; r0 += rows_per_chunk) {
        const int64_t nr = n_rows - r0 < rows_per_chunk ? n_rows - r0 : rows_per_chunk;
        const int64_t n = nr * n_per_row;
        for (int64_t i = 0; i < n; ++i) scratch[i] = ts->std > 0 ? ts->std * normalish(&rng) : 1.0f;

        size_t bytes;
        const void *src;
        switch (t->type) {
            case GGML_TYPE_F32:
                src = scratch;
                bytes = (size_t)n * sizeof(float);
                break;
            case GGML_TYPE_F16:
                ggml_fp32_to_fp16_row(scratch, conv, n);
                src = conv;
                bytes = (size_t)n * sizeof(ggml_fp16_t);
                break;
            default:
                /* start = 0 each chunk: dst is a per-chunk buffer. */
                bytes = ggml_quantize_chunk(t->type, scratch, conv, 0, nr, n_per_row, NULL);
                src = conv;
                break;
        }
        write_all(f, src, bytes);
    }
    static const char zeros[64];
    size_t nb = ggml_nbytes(t), pad = (align - nb % align) % align;
    while (pad) {
        size_t k = pad < sizeof zeros ? pad : sizeof zeros;
        write_all(f, zeros, k);
        pad -= k;
    }
}

int main(int argc, char **argv) {
    const char *vocab = NULL, *out = NULL, *vocab_out = NULL, *type_s = "q4_0";
    uint64_t layers = 4, n_embd = 4096, n_head = 32, n_head_kv = 8, n_ff = 14336, ctx = 131072, seed = 1;

    for (int i = 1; i < argc; ++i) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage();
            return 0;
        }
        static const char *const known[] = {"--vocab", "--out", "--write-vocab", "--type", "--layers", "--n-embd",
                                            "--n-head", "--n-head-kv", "--n-ff", "--ctx", "--seed"};
        bool ok = false;
        for (size_t k = 0; k < sizeof known / sizeof *known; ++k) ok |= !strcmp(a, known[k]);
        if (!ok) die(EXIT_BAD_INPUT, "unknown option '%s' (see --help)", a);
        if (i + 1 >= argc) die(EXIT_BAD_INPUT, "%s: missing value", a);
        const char *v = argv[++i];
        if (!strcmp(a, "--vocab")) vocab = v;
        else if (!strcmp(a, "--out")) out = v;
        else if (!strcmp(a, "--write-vocab")) vocab_out = v;
        else if (!strcmp(a, "--type")) type_s = v;
        else if (!strcmp(a, "--layers")) layers = parse_u64(a, v, 1, 4096);
        else if (!strcmp(a, "--n-embd")) n_embd = parse_u64(a, v, 32, 1 << 20);
        else if (!strcmp(a, "--n-head")) n_head = parse_u64(a, v, 1, 1 << 16);
        else if (!strcmp(a, "--n-head-kv")) n_head_kv = parse_u64(a, v, 1, 1 << 16);
        else if (!strcmp(a, "--n-ff")) n_ff = parse_u64(a, v, 32, 1 << 22);
        else if (!strcmp(a, "--ctx")) ctx = parse_u64(a, v, 1, UINT32_MAX);
        else seed = parse_u64(a, v, 0, UINT64_MAX); /* --seed, the last known one */
    }
    if (!vocab) die(EXIT_BAD_INPUT, "--vocab is required (see --help)");
    if (!out && !vocab_out) die(EXIT_BAD_INPUT, "nothing to do: give --out and/or --write-vocab (see --help)");

    enum ggml_type wtype;
    uint32_t ftype;
    if (!strcmp(type_s, "q4_0")) {
        wtype = GGML_TYPE_Q4_0;
        ftype = FTYPE_MOSTLY_Q4_0;
    } else if (!strcmp(type_s, "f16")) {
        wtype = GGML_TYPE_F16;
        ftype = FTYPE_MOSTLY_F16;
    } else {
        die(EXIT_BAD_INPUT, "--type: expected q4_0 or f16, got '%s'", type_s);
    }

    /* Geometry checks llama.cpp would otherwise hit as asserts or garbage. */
    if (n_embd % n_head)
        die(EXIT_BAD_INPUT, "--n-embd %" PRIu64 " is not a multiple of --n-head %" PRIu64, n_embd, n_head);
    const uint64_t head_dim = n_embd / n_head;
    if (head_dim % 2) die(EXIT_BAD_INPUT, "head size %" PRIu64 " must be even (RoPE rotates pairs)", head_dim);
    if (n_head_kv > n_head || n_head % n_head_kv)
        die(EXIT_BAD_INPUT, "--n-head %" PRIu64 " is not a multiple of --n-head-kv %" PRIu64, n_head, n_head_kv);
    const int64_t blck = ggml_blck_size(wtype);
    if (n_embd % (uint64_t)blck || n_ff % (uint64_t)blck)
        die(EXIT_BAD_INPUT, "--n-embd and --n-ff must be multiples of %" PRId64 " for %s", blck, type_s);

    ggml_log_set(quiet_log, NULL);

    uint32_t n_vocab = 0;
    struct gguf_context *tok = load_vocab(vocab, &n_vocab);
    if (vocab_out) write_vocab_only(tok, vocab_out);
    if (!out) {
        gguf_free(tok);
        printf("%s: vocab-only, %u tokens\n", vocab_out, n_vocab);
        return 0;
    }

    struct gguf_context *g = gguf_init_empty();
    gguf_set_val_str(g, "general.architecture", "llama");
    gguf_set_val_str(g, "general.name", "APEX random-weight llama");
    gguf_set_val_u32(g, "general.file_type", ftype);
    gguf_set_val_u32(g, "llama.block_count", (uint32_t)layers);
    gguf_set_val_u32(g, "llama.context_length", (uint32_t)ctx);
    gguf_set_val_u32(g, "llama.embedding_length", (uint32_t)n_embd);
    gguf_set_val_u32(g, "llama.feed_forward_length", (uint32_t)n_ff);
    gguf_set_val_u32(g, "llama.attention.head_count", (uint32_t)n_head);
    gguf_set_val_u32(g, "llama.attention.head_count_kv", (uint32_t)n_head_kv);
    gguf_set_val_u32(g, "llama.rope.dimension_count", (uint32_t)head_dim);
    gguf_set_val_f32(g, "llama.rope.freq_base", 500000.0f);
    gguf_set_val_f32(g, "llama.attention.layer_norm_rms_epsilon", 1e-5f);
    gguf_set_val_u32(g, "llama.vocab_size", n_vocab);
    gguf_set_kv(g, tok);
    gguf_free(tok);

    /* Tensor descriptors only (no_alloc): data never lives in memory whole. */
    const size_t n_tensors = 3 + 9 * (size_t)layers;
    struct ggml_init_params gp = {
        .mem_size = ggml_tensor_overhead() * (n_tensors + 1), .mem_buffer = NULL, .no_alloc = true};
    struct ggml_context *meta = ggml_init(gp);
    if (!meta) die(EXIT_IO, "out of memory");
    struct tensor_spec *specs = calloc(n_tensors, sizeof *specs);
    if (!specs) die(EXIT_IO, "out of memory");

    /* std 0.02 (the usual Llama init) keeps every projection's output O(1)
     * after RMS norm, so nothing blows up across layers; norms are 1.0. */
    const float w_std = 0.02f;
    const int64_t E = (int64_t)n_embd, KV = (int64_t)(head_dim * n_head_kv), F = (int64_t)n_ff;
    size_t nt = 0;
#define ADD(name, ty, std_, ne0, ne1)                                                          \
    do {                                                                                       \
        struct ggml_tensor *t_ = (ne1) ? ggml_new_tensor_2d(meta, ty, ne0, ne1)                \
                                       : ggml_new_tensor_1d(meta, ty, ne0);                    \
        ggml_set_name(t_, name);                                                               \
        gguf_add_tensor(g, t_);                                                                \
        uint64_t s_ = seed * 0xD1B54A32D192ED03ull + nt;                                       \
        specs[nt++] = (struct tensor_spec){t_, std_, splitmix64(&s_)};                         \
    } while (0)

    char name[GGML_MAX_NAME];
    ADD("token_embd.weight", wtype, w_std, E, (int64_t)n_vocab);
    ADD("output_norm.weight", GGML_TYPE_F32, 0.0f, E, 0);
    ADD("output.weight", wtype, w_std, E, (int64_t)n_vocab);
    for (uint64_t l = 0; l < layers; ++l) {
#define LNAME(s) (snprintf(name, sizeof name, "blk.%" PRIu64 "." s, l), name)
        ADD(LNAME("attn_norm.weight"), GGML_TYPE_F32, 0.0f, E, 0);
        ADD(LNAME("attn_q.weight"), wtype, w_std, E, E);
        ADD(LNAME("attn_k.weight"), wtype, w_std, E, KV);
        ADD(LNAME("attn_v.weight"), wtype, w_std, E, KV);
        ADD(LNAME("attn_output.weight"), wtype, w_std, E, E);
        ADD(LNAME("ffn_norm.weight"), GGML_TYPE_F32, 0.0f, E, 0);
        ADD(LNAME("ffn_gate.weight"), wtype, w_std, E, F);
        ADD(LNAME("ffn_up.weight"), wtype, w_std, E, F);
        ADD(LNAME("ffn_down.weight"), wtype, w_std, F, E);
#undef LNAME
    }
#undef ADD

    char *tmp;
    FILE *f = open_tmp(out, &tmp);
    /* Metadata (ends padded to the alignment), then tensors in the order
     * added: gguf_add_tensor assigned offsets the same way. */
    if (!gguf_write_to_file_ptr(g, f, true)) die(EXIT_IO, "writing '%s' failed: %s", tmp, g_ggml_err);
    const size_t align = gguf_get_alignment(g);

    const size_t max_row = (size_t)(F > E ? F : E);
    const size_t scratch_n = CHUNK_ELEMS > max_row ? CHUNK_ELEMS : max_row;
    float *scratch = malloc(scratch_n * sizeof(float));
    void *conv = malloc(scratch_n * sizeof(float));
    if (!scratch || !conv) die(EXIT_IO, "out of memory");

    uint64_t total = 0;
    for (size_t i = 0; i < nt; ++i) {
        write_tensor_data(f, &specs[i], scratch, conv, align);
        total += ggml_nbytes(specs[i].t);
    }
    finish_file(f, tmp, out);

    printf("%s: llama, %" PRIu64 " layers, n_embd %" PRIu64 ", heads %" PRIu64 "/%" PRIu64
           " (head size %" PRIu64 "), n_ff %" PRIu64 ", ctx %" PRIu64 ", vocab %u, %s, %.1f MiB of tensors\n",
           out, layers, n_embd, n_head, n_head_kv, head_dim, n_ff, ctx, n_vocab, type_s,
           (double)total / (1024.0 * 1024.0));

    free(scratch);
    free(conv);
    free(specs);
    ggml_free(meta);
    gguf_free(g);
    ggml_quantize_free();
    return 0;
}
