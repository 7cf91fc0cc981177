/*
 * apex_torch.c - APEX's paged entry points as torch ops, registered from C
 * through libtorch's stable C ABI (aoti_torch_*: C linkage, torch >= 2.7).
 * Loaded with torch.ops.load_library(); the ops live in namespace "apex".
 *
 * The stable headers are C++ (they include c10), so this file declares the
 * few functions it uses itself, with opaque handle types.
 *
 * Ops return an apex_status (0 = OK) instead of raising: a C kernel cannot
 * raise a torch error through the stable ABI (its C++ helpers throw
 * exceptions, which cannot cross C frames). The Python wrapper raises with
 * apex_last_error(), which is thread-local and the op runs on the caller's
 * thread.
 *
 * Tensors may be on the CPU (host mode) or on a CUDA device: CUDA rows are
 * staged through host memory on the current CUDA stream (apex_memcpy_async
 * with the engine's stream, then apex_stream_sync), because the paged calls
 * of this ABI version take host pointers (they reach device-tier blocks
 * themselves).
 */
#define _GNU_SOURCE /* RTLD_DEFAULT */
#include <dlfcn.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "apex/apex.h"
#include "apex/apex_paged.h"

/* ---- libtorch stable C ABI (torch/csrc/inductor/aoti_torch/c/shim.h) */
typedef int32_t AOTITorchError;
typedef struct AtenTensorOpaque *AtenTensorHandle;
typedef struct TorchLibraryOpaque *TorchLibraryHandle;
typedef uint64_t StableIValue;
AOTITorchError aoti_torch_library_init_def(const char *ns, const char *file, uint32_t line,
                                           TorchLibraryHandle *ret);
AOTITorchError aoti_torch_library_init_impl(const char *ns, const char *k, const char *file,
                                            uint32_t line, TorchLibraryHandle *ret);
AOTITorchError aoti_torch_library_def(TorchLibraryHandle self, const char *schema);
AOTITorchError aoti_torch_library_impl(TorchLibraryHandle self, const char *name,
                                       void (*fn)(StableIValue *, uint64_t, uint64_t));
AOTITorchError aoti_torch_delete_tensor_object(AtenTensorHandle t);
AOTITorchError aoti_torch_get_data_ptr(AtenTensorHandle t, void **ret);
AOTITorchError aoti_torch_get_dim(AtenTensorHandle t, int64_t *ret);
AOTITorchError aoti_torch_get_sizes(AtenTensorHandle t, int64_t **ret);
AOTITorchError aoti_torch_get_strides(AtenTensorHandle t, int64_t **ret);
AOTITorchError aoti_torch_get_dtype(AtenTensorHandle t, int32_t *ret);
AOTITorchError aoti_torch_get_device_type(AtenTensorHandle t, int32_t *ret);
AOTITorchError aoti_torch_get_device_index(AtenTensorHandle t, int32_t *ret);
AOTITorchError aoti_torch_is_contiguous(AtenTensorHandle t, bool *ret);
int32_t aoti_torch_device_type_cpu(void);
int32_t aoti_torch_device_type_cuda(void);
int32_t aoti_torch_dtype_float32(void);
int32_t aoti_torch_dtype_float16(void);
int32_t aoti_torch_dtype_bfloat16(void);
int32_t aoti_torch_dtype_int32(void);
int32_t aoti_torch_dtype_int64(void);

/* aoti_torch_get_current_cuda_stream lives in libtorch_cuda.so, absent from
 * CPU-only torch builds: looked up when a CUDA tensor first arrives, so the
 * shim loads everywhere. */
typedef AOTITorchError (*cuda_stream_fn)(int32_t device_index, void **ret);
static cuda_stream_fn cuda_stream_getter(void) {
    static cuda_stream_fn fn;
    if (!fn) {
        fn = (cuda_stream_fn)(uintptr_t)dlsym(RTLD_DEFAULT, "aoti_torch_get_current_cuda_stream");
        void *lib = fn ? NULL : dlopen("libtorch_cuda.so", RTLD_LAZY | RTLD_NOLOAD);
        if (lib) fn = (cuda_stream_fn)(uintptr_t)dlsym(lib, "aoti_torch_get_current_cuda_stream");
    }
    return fn;
}

/* ---- boxed-stack helpers: ints and doubles travel as their bit patterns */
static int64_t arg_int(const StableIValue *s, int i) {
    int64_t v;
    memcpy(&v, &s[i], sizeof v);
    return v;
}
static double arg_double(const StableIValue *s, int i) {
    double v;
    memcpy(&v, &s[i], sizeof v);
    return v;
}
static AtenTensorHandle arg_tensor(const StableIValue *s, int i) {
    return (AtenTensorHandle)(uintptr_t)s[i];
}
static void ret_int(StableIValue *s, int i, int64_t v) { memcpy(&s[i], &v, sizeof v); }

/* The boxed convention hands the kernel ownership of its tensor handles. */
static void drop_tensors(StableIValue *s, const int *idx, int n) {
    for (int i = 0; i < n; i++) aoti_torch_delete_tensor_object(arg_tensor(s, idx[i]));
}

static apex_context *ctx_of(int64_t h) { return (apex_context *)(uintptr_t)h; }

/* What the shim needs to know about one tensor argument. */
typedef struct tview {
    void *data;
    int64_t dim, *sizes, *strides, numel;
    int32_t dtype, device, device_index;
    bool contiguous;
} tview;

static int view_of(AtenTensorHandle t, tview *v) {
    if (aoti_torch_get_data_ptr(t, &v->data) || aoti_torch_get_dim(t, &v->dim) ||
        aoti_torch_get_sizes(t, &v->sizes) || aoti_torch_get_strides(t, &v->strides) ||
        aoti_torch_get_dtype(t, &v->dtype) || aoti_torch_get_device_type(t, &v->device) ||
        aoti_torch_get_device_index(t, &v->device_index) ||
        aoti_torch_is_contiguous(t, &v->contiguous))
        return -1;
    v->numel = 1;
    for (int64_t i = 0; i < v->dim; i++) v->numel *= v->sizes[i];
    return 0;
}

/* torch dtype -> apex_dtype, or -1. */
static int apex_dtype_of(int32_t torch_dtype) {
    if (torch_dtype == aoti_torch_dtype_float32()) return APEX_DTYPE_F32;
    if (torch_dtype == aoti_torch_dtype_float16()) return APEX_DTYPE_F16;
    if (torch_dtype == aoti_torch_dtype_bfloat16()) return APEX_DTYPE_BF16;
    return -1;
}
static size_t dtype_bytes(int d) { return d == APEX_DTYPE_F32 ? 4 : 2; }

/* Host copies of CUDA tensors, for the host-tier paths. */
typedef struct staging {
    apex_context *ctx;
    apex_stream stream;   /* the engine's current CUDA stream */
    int used;
} staging;

/* Copies bytes of device memory at src into a fresh host buffer (*out). */
static apex_status stage_down(staging *st, const void *src, size_t bytes, void **out) {
    *out = malloc(bytes ? bytes : 1);
    if (!*out) return APEX_ERR_NO_MEMORY;
    st->used = 1;
    return apex_memcpy_async(st->ctx, *out, src, bytes, st->stream);
}

static apex_status staging_open(staging *st, apex_context *ctx, const tview *t) {
    st->ctx = ctx;
    st->used = 0;
    st->stream = NULL;
    if (t->device != aoti_torch_device_type_cuda()) return APEX_OK;
    void *s = NULL;
    cuda_stream_fn get = cuda_stream_getter();
    if (!get || get(t->device_index, &s)) return APEX_ERR_INTERNAL;
    /* torch's default stream is NULL, which APEX refuses as "no stream";
     * cudaStreamLegacy (0x1) names that same legacy default stream. */
    st->stream = (apex_stream)(s ? s : (void *)(uintptr_t)0x1);
    return APEX_OK;
}

/* The config of apex::context_create / context_create_on (args 0..9). */
static apex_status config_of(const StableIValue *s, apex_config *c) {
    apex_status st = apex_config_init(c);
    if (st != APEX_OK) return st;
    c->n_layers = (int32_t)arg_int(s, 0);
    c->n_q_heads = (int32_t)arg_int(s, 1);
    c->n_kv_heads = (int32_t)arg_int(s, 2);
    c->head_dim = (int32_t)arg_int(s, 3);
    c->kv_dtype = c->act_dtype = (apex_dtype)arg_int(s, 4);
    c->block_tokens = (int32_t)arg_int(s, 5);
    c->device_blocks = arg_int(s, 6);
    c->host_blocks = arg_int(s, 7);
    c->max_batch = c->max_seqs = (int32_t)arg_int(s, 8);
    c->max_seq_len = (int32_t)arg_int(s, 9);
    return APEX_OK;
}

/* Claims every block for the engine; a context that cannot be claimed is
 * destroyed. Returns the handle, or -status. */
static int64_t claimed_handle(apex_status st, apex_context *ctx) {
    if (st == APEX_OK && (st = apex_paged_claim(ctx, NULL)) != APEX_OK) {
        apex_context_destroy(ctx);
        ctx = NULL;
    }
    return st == APEX_OK ? (int64_t)(uintptr_t)ctx : -(int64_t)st;
}

/* ---- apex::context_create: a host-mode-or-device context whose blocks the
 * engine owns (apex_paged_claim). Returns the handle, or -status. */
static void op_context_create(StableIValue *s, uint64_t nargs, uint64_t nout) {
    apex_config c;
    apex_status st = config_of(s, &c);
    apex_context *ctx = NULL;
    if (st == APEX_OK) st = apex_context_create(&c, &ctx);
    ret_int(s, 0, claimed_handle(st, ctx));
}

/* ---- apex::context_create_on(..., layer_ptrs int64[n_layers], bytes_per_layer):
 * the same, with the host tier in the engine's memory (apex_paged_context_
 * create): layer l's blocks at address layer_ptrs[l], a CPU tensor of
 * addresses the caller keeps alive (vLLM's per-layer KV tensors). */
static void op_context_create_on(StableIValue *s, uint64_t nargs, uint64_t nout) {
    apex_config c;
    apex_status st = config_of(s, &c);
    AtenTensorHandle hp = arg_tensor(s, 10);
    int64_t bytes = arg_int(s, 11);
    tview p;
    apex_context *ctx = NULL;
    if (st == APEX_OK) {
        if (view_of(hp, &p)) st = APEX_ERR_INTERNAL;
        else if (p.dim != 1 || p.dtype != aoti_torch_dtype_int64() || !p.contiguous ||
                 p.device != aoti_torch_device_type_cpu() || p.sizes[0] != c.n_layers ||
                 bytes < 0)
            st = APEX_ERR_INVALID_ARG;
    }
    if (st == APEX_OK) {
        void **kv = malloc((size_t)c.n_layers * sizeof *kv);
        if (!kv) st = APEX_ERR_NO_MEMORY;
        else {
            for (int32_t l = 0; l < c.n_layers; l++)
                kv[l] = (void *)(uintptr_t)((const int64_t *)p.data)[l];
            st = apex_paged_context_create(&c, (void *const *)kv, (size_t)bytes, &ctx);
            free(kv);
        }
    }
    aoti_torch_delete_tensor_object(hp);
    ret_int(s, 0, claimed_handle(st, ctx));
}

static void op_context_destroy(StableIValue *s, uint64_t nargs, uint64_t nout) {
    ret_int(s, 0, apex_context_destroy(ctx_of(arg_int(s, 0))));
}

/* ---- apex::stats -> (attention_calls, rows attended on the CPU,
 * kv rows written, errors, host blocks, host mode, host KV bytes APEX
 * allocated, host KV bytes in the engine's memory, rows attended on the
 * device, device blocks) */
static void op_stats(StableIValue *s, uint64_t nargs, uint64_t nout) {
    apex_context *ctx = ctx_of(arg_int(s, 0));
    apex_stats a;
    memset(&a, 0, sizeof a);
    apex_stats_get(ctx, &a);
    ret_int(s, 0, (int64_t)a.attention_calls);
    ret_int(s, 1, (int64_t)a.seqs_attended_host);
    ret_int(s, 2, (int64_t)a.kv_rows_written);
    ret_int(s, 3, (int64_t)a.errors);
    ret_int(s, 4, a.blocks_used[APEX_TIER_HOST] + a.blocks_free[APEX_TIER_HOST]);
    ret_int(s, 5, apex_context_host_mode(ctx));
    uint64_t own = 0, ext = 0;
    apex_paged_host_kv(ctx, &own, &ext, NULL);
    ret_int(s, 6, (int64_t)own);
    ret_int(s, 7, (int64_t)ext);
    ret_int(s, 8, (int64_t)a.seqs_attended_device);
    ret_int(s, 9, a.blocks_used[APEX_TIER_DEVICE] + a.blocks_free[APEX_TIER_DEVICE]);
}

/* ---- apex::copy_blocks(ctx, src int64[n], dst int64[n]) -> status: whole
 * blocks, all layers, between engine ids of either tier
 * (apex_paged_copy_blocks); CPU tensors. */
static void op_copy_blocks(StableIValue *s, uint64_t nargs, uint64_t nout) {
    tview a, b;
    apex_status st = APEX_OK;
    if (view_of(arg_tensor(s, 1), &a) || view_of(arg_tensor(s, 2), &b)) st = APEX_ERR_INTERNAL;
    else if (a.dim != 1 || b.dim != 1 || a.sizes[0] != b.sizes[0] ||
             a.dtype != aoti_torch_dtype_int64() || b.dtype != aoti_torch_dtype_int64() ||
             !a.contiguous || !b.contiguous || a.device != aoti_torch_device_type_cpu() ||
             b.device != aoti_torch_device_type_cpu())
        st = APEX_ERR_INVALID_ARG;
    else
        st = apex_paged_copy_blocks(ctx_of(arg_int(s, 0)), a.sizes[0], a.data, b.data);
    static const int owned[] = {1, 2};
    drop_tensors(s, owned, 2);
    ret_int(s, 0, st);
}

/* ---- apex::kv_write(ctx, layer, key[n, hk, d], value[n, hk, d],
 * slot_mapping int64[n]) -> status. Rows may be strided (slices of a fused
 * QKV tensor); each row's heads must be contiguous. */
static apex_status kv_write(apex_context *ctx, int32_t layer, AtenTensorHandle hk,
                            AtenTensorHandle hv, AtenTensorHandle hs) {
    tview k, v, sl;
    if (view_of(hk, &k) || view_of(hv, &v) || view_of(hs, &sl)) return APEX_ERR_INTERNAL;
    int dt = apex_dtype_of(k.dtype);
    if (dt < 0 || v.dtype != k.dtype || k.dim != 3 || v.dim != 3 || sl.dim != 1 ||
        sl.dtype != aoti_torch_dtype_int64() || k.sizes[0] != v.sizes[0] ||
        sl.sizes[0] < k.sizes[0] || k.strides[2] != 1 || v.strides[2] != 1 ||
        k.strides[1] != k.sizes[2] || v.strides[1] != v.sizes[2] || !sl.contiguous ||
        k.device != v.device || k.device != sl.device)
        return APEX_ERR_INVALID_ARG;
    int64_t n = k.sizes[0];
    staging st;
    apex_status rc = staging_open(&st, ctx, &k);
    if (rc) return rc;
    const void *kp = k.data, *vp = v.data, *sp = sl.data;
    void *hk_buf = NULL, *hv_buf = NULL, *hs_buf = NULL;
    int64_t ks = k.strides[0], vs = v.strides[0];
    if (st.stream) { /* whole strided spans, then the host path reads rows */
        size_t kb = (size_t)((n ? (n - 1) * ks : 0) + k.sizes[1] * k.sizes[2]) * dtype_bytes(dt);
        size_t vb = (size_t)((n ? (n - 1) * vs : 0) + v.sizes[1] * v.sizes[2]) * dtype_bytes(dt);
        if ((rc = stage_down(&st, kp, kb, &hk_buf)) || (rc = stage_down(&st, vp, vb, &hv_buf)) ||
            (rc = stage_down(&st, sp, (size_t)n * 8, &hs_buf)) ||
            (rc = apex_stream_sync(ctx, st.stream)))
            goto out;
        kp = hk_buf, vp = hv_buf, sp = hs_buf;
    }
    rc = apex_paged_kv_write(ctx, layer, n, sp, kp, ks, vp, vs, (apex_dtype)dt);
out:
    free(hk_buf);
    free(hv_buf);
    free(hs_buf);
    return rc;
}

static void op_kv_write(StableIValue *s, uint64_t nargs, uint64_t nout) {
    apex_status st = kv_write(ctx_of(arg_int(s, 0)), (int32_t)arg_int(s, 1), arg_tensor(s, 2),
                              arg_tensor(s, 3), arg_tensor(s, 4));
    static const int owned[] = {2, 3, 4};
    drop_tensors(s, owned, 3);
    ret_int(s, 0, st);
}

/* ---- apex::attention(ctx, layer, query[T, hq, d], query_start_loc
 * int32[n+1], seq_lens int32[n], block_table int32[n, m], out[T, hq, d],
 * scale, softcap, window) -> status. query and out contiguous. */
static apex_status attention(apex_context *ctx, int32_t layer, AtenTensorHandle hq,
                             AtenTensorHandle hqsl, AtenTensorHandle hlen, AtenTensorHandle hbt,
                             AtenTensorHandle hout, double scale, double softcap, int64_t window) {
    tview q, qsl, len, bt, out;
    if (view_of(hq, &q) || view_of(hqsl, &qsl) || view_of(hlen, &len) || view_of(hbt, &bt) ||
        view_of(hout, &out))
        return APEX_ERR_INTERNAL;
    int32_t i32 = aoti_torch_dtype_int32();
    int qd = apex_dtype_of(q.dtype), od = apex_dtype_of(out.dtype);
    if (qd < 0 || od < 0 || q.dim != 3 || out.dim != 3 || !q.contiguous || !out.contiguous ||
        out.numel != q.numel || qsl.dim != 1 || len.dim != 1 || bt.dim != 2 ||
        qsl.dtype != i32 || len.dtype != i32 || bt.dtype != i32 || !qsl.contiguous ||
        !len.contiguous || bt.strides[1] != 1 || qsl.sizes[0] != len.sizes[0] + 1 ||
        bt.sizes[0] < len.sizes[0] || q.device != out.device || q.device != qsl.device ||
        q.device != len.device || q.device != bt.device)
        return APEX_ERR_INVALID_ARG;
    int32_t n = (int32_t)len.sizes[0];
    apex_attn_opts o = apex_attn_opts_default(ctx);
    o.scale = (float)scale;
    o.softcap = (float)softcap;
    o.window = (int32_t)window;
    o.q_dtype = (apex_dtype)qd;
    o.out_dtype = (apex_dtype)od;
    staging st;
    apex_status rc = staging_open(&st, ctx, &q);
    if (rc) return rc;
    const void *qp = q.data, *qslp = qsl.data, *lenp = len.data, *btp = bt.data;
    void *outp = out.data;
    void *bufs[5] = {NULL, NULL, NULL, NULL, NULL};
    size_t out_bytes = (size_t)out.numel * dtype_bytes(od);
    if (st.stream) {
        size_t bt_bytes = (size_t)((n ? (n - 1) * bt.strides[0] : 0) + bt.sizes[1]) * 4;
        if ((rc = stage_down(&st, qp, (size_t)q.numel * dtype_bytes(qd), &bufs[0])) ||
            (rc = stage_down(&st, qslp, (size_t)(n + 1) * 4, &bufs[1])) ||
            (rc = stage_down(&st, lenp, (size_t)n * 4, &bufs[2])) ||
            (rc = stage_down(&st, btp, bt_bytes, &bufs[3])) ||
            (rc = apex_stream_sync(ctx, st.stream)))
            goto out;
        if (!(bufs[4] = malloc(out_bytes ? out_bytes : 1))) {
            rc = APEX_ERR_NO_MEMORY;
            goto out;
        }
        qp = bufs[0], qslp = bufs[1], lenp = bufs[2], btp = bufs[3], outp = bufs[4];
    }
    if (n > 0 && ((const int32_t *)qslp)[n] != q.sizes[0]) {
        rc = APEX_ERR_INVALID_ARG; /* the rows of q must be exactly the batch's queries */
        goto out;
    }
    rc = apex_paged_attention(ctx, layer, n, qslp, lenp, btp, (int32_t)bt.strides[0], qp, outp,
                              &o);
    if (rc == APEX_OK && st.stream) {
        rc = apex_memcpy_async(ctx, out.data, outp, out_bytes, st.stream);
        if (rc == APEX_OK) rc = apex_stream_sync(ctx, st.stream); /* outp is freed below */
    }
out:
    for (int i = 0; i < 5; i++) free(bufs[i]);
    return rc;
}

static void op_attention(StableIValue *s, uint64_t nargs, uint64_t nout) {
    apex_status st = attention(ctx_of(arg_int(s, 0)), (int32_t)arg_int(s, 1), arg_tensor(s, 2),
                               arg_tensor(s, 3), arg_tensor(s, 4), arg_tensor(s, 5),
                               arg_tensor(s, 6), arg_double(s, 7), arg_double(s, 8),
                               arg_int(s, 9));
    static const int owned[] = {2, 3, 4, 5, 6};
    drop_tensors(s, owned, 5);
    ret_int(s, 0, st);
}

/* ---- registration, when torch.ops.load_library() opens this file */
static const struct {
    const char *schema, *name;
    void (*fn)(StableIValue *, uint64_t, uint64_t);
} apex_ops[] = {
    {"context_create(int n_layers, int n_q_heads, int n_kv_heads, int head_dim, int kv_dtype, "
     "int block_tokens, int device_blocks, int host_blocks, int max_batch, int max_seq_len) "
     "-> int", "context_create", op_context_create},
    {"context_create_on(int n_layers, int n_q_heads, int n_kv_heads, int head_dim, "
     "int kv_dtype, int block_tokens, int device_blocks, int host_blocks, int max_batch, "
     "int max_seq_len, Tensor layer_ptrs, int bytes_per_layer) -> int", "context_create_on",
     op_context_create_on},
    {"context_destroy(int ctx) -> int", "context_destroy", op_context_destroy},
    {"stats(int ctx) -> (int, int, int, int, int, int, int, int, int, int)", "stats", op_stats},
    {"copy_blocks(int ctx, Tensor src, Tensor dst) -> int", "copy_blocks", op_copy_blocks},
    {"kv_write(int ctx, int layer, Tensor key, Tensor value, Tensor slot_mapping) -> int",
     "kv_write", op_kv_write},
    {"attention(int ctx, int layer, Tensor query, Tensor query_start_loc, Tensor seq_lens, "
     "Tensor block_table, Tensor(a!) out, float scale, float softcap, int window) -> int",
     "attention", op_attention},
};

/* The library objects live as long as the process (torch keeps the ops). */
static TorchLibraryHandle lib_def, lib_impl;

__attribute__((constructor)) static void apex_torch_register(void) {
    size_t n = sizeof apex_ops / sizeof apex_ops[0];
    if (aoti_torch_library_init_def("apex", __FILE__, __LINE__, &lib_def) ||
        aoti_torch_library_init_impl("apex", "CompositeExplicitAutograd", __FILE__, __LINE__,
                                     &lib_impl))
        return;
    for (size_t i = 0; i < n; i++)
        if (aoti_torch_library_def(lib_def, apex_ops[i].schema) ||
            aoti_torch_library_impl(lib_impl, apex_ops[i].name, apex_ops[i].fn))
            return;
}
