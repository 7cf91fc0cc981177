// kv_append.cu - scatter new K/V rows into the block pool by slot, with
// dtype conversion. One thread block per row; consecutive threads take
// consecutive elements so both the activation read and the pool write are
// coalesced (a head's row is contiguous in both layouts).
#include "cuda/cuda_common.cuh"
#include "cuda/kv_append.cuh"

namespace {

template <typename S, typename T>
__global__ void kv_append_kernel(const apexcu::kv_append_params p) {
    const int64_t row = blockIdx.x;
    const int64_t slot = p.slots[row];
    if (slot < 0) return;
    const int64_t blk = slot >> p.bt_shift;
    const int off = (int)(slot & ((1 << p.bt_shift) - 1));
    const int per = p.n_kv_heads * p.head_dim;
    char *base = (char *)p.kv + blk * p.block_bytes;
    for (int e = threadIdx.x; e < 2 * per; e += blockDim.x) {
        const int which = e >= per; // 0 = K, 1 = V
        const int x = e - which * per;
        const int h = x / p.head_dim, d = x - h * p.head_dim;
        const float v = which ? apexcu::conv<S>::load(p.v, row * p.v_stride + x)
                              : apexcu::conv<S>::load(p.k, row * p.k_stride + x);
        const size_t idx = ((size_t)h * (1 << p.bt_shift) + off) * p.head_dim + d;
        apexcu::conv<T>::store(base + which * p.v_offset, idx, v);
    }
}

template <typename S>
int launch_dst(const apexcu::kv_append_params &p, int kv_dtype, int n, cudaStream_t s) {
    const int threads = 128;
    APEXCU_DISPATCH_DTYPE(kv_dtype, T, kv_append_kernel<S, T><<<n, threads, 0, s>>>(p));
    return apexcu_last_launch_error();
}

}  // namespace

int apexcu_kv_append(const apex_cuda_kv_append *a, cudaStream_t stream) {
    if (!a || a->n_rows < 0 || a->n_kv_heads < 1 || a->head_dim < 1 || a->k_stride < 0 ||
        a->v_stride < 0 || !apex_dtype_valid(a->src_dtype) || !apex_dtype_valid(a->kv_dtype))
        return APEX_CUDA_EINVAL;
    int shift = 0;
    while (shift < 30 && (1 << shift) < a->block_tokens) shift++;
    if (a->block_tokens < 1 || (1 << shift) != a->block_tokens) return APEX_CUDA_EINVAL;
    if (a->n_rows == 0) return 0;
    if (!a->k || !a->v || !a->slots || !a->kv) return APEX_CUDA_EINVAL;
    const apex_kv_layout lay = apex_kv_layout_of(a->n_kv_heads, a->block_tokens, a->head_dim,
                                                 apex_dtype_size(a->kv_dtype));
    if (a->block_bytes < lay.block) return APEX_CUDA_EINVAL;
    if (a->n_rows > 0x7fffffff) return APEX_CUDA_EUNSUPPORTED;

    apexcu::kv_append_params p;
    p.k = a->k;
    p.v = a->v;
    const int64_t dense = (int64_t)a->n_kv_heads * a->head_dim;
    p.k_stride = a->k_stride ? a->k_stride : dense;
    p.v_stride = a->v_stride ? a->v_stride : dense;
    p.slots = a->slots;
    p.kv = a->kv;
    p.block_bytes = a->block_bytes;
    p.v_offset = apex_kv_offset(&lay, 1, 0, 0);
    p.n_kv_heads = a->n_kv_heads;
    p.head_dim = a->head_dim;
    p.bt_shift = shift;
    int rc = APEX_CUDA_EINVAL;
    APEXCU_DISPATCH_DTYPE(a->src_dtype, S, rc = launch_dst<S>(p, a->kv_dtype, a->n_rows, stream));
    return rc;
}

extern "C" int apex_cuda_kv_append_rows(const apex_cuda_kv_append *a, void *stream) {
    return apexcu_kv_append(a, (cudaStream_t)stream);
}
