// cohort_copy.cu - gather the CPU cohort's q/k/v rows into contiguous
// staging, and scatter the CPU outputs back into the batch. Up to four
// tensors share one index list and one launch; each thread block copies one
// row of one tensor with the widest access its alignment allows.
#include "cuda/cuda_common.cuh"

namespace {

struct rows_params {
    apex_cuda_rows t[APEX_CUDA_MAX_ROW_TENSORS];
    const int32_t *idx;
    int gather; // 1: dst[i] = src[idx[i]]; 0: dst[idx[i]] = src[i]
};

template <typename W>
__device__ __forceinline__ void copy_words(char *dst, const char *src, size_t n) {
    W *d = (W *)dst;
    const W *s = (const W *)src;
    for (size_t i = threadIdx.x; i < n / sizeof(W); i += blockDim.x) d[i] = s[i];
}

__global__ void rows_kernel(const rows_params p) {
    const apex_cuda_rows &t = p.t[blockIdx.y];
    const int32_t i = blockIdx.x;
    const int32_t j = p.idx[i];
    if (j < 0) return;
    const size_t si = p.gather ? (size_t)j : (size_t)i;
    const size_t di = p.gather ? (size_t)i : (size_t)j;
    const char *src = (const char *)t.src + si * t.src_stride;
    char *dst = (char *)t.dst + di * t.dst_stride;
    const size_t n = t.row_bytes;
    const uintptr_t al = (uintptr_t)src | (uintptr_t)dst | n;
    if ((al & 15) == 0) copy_words<uint4>(dst, src, n);
    else if ((al & 3) == 0) copy_words<uint32_t>(dst, src, n);
    else copy_words<unsigned char>(dst, src, n);
}

int launch_rows(const apex_cuda_rows *t, int n_tensors, const int32_t *idx, int32_t n_rows,
                int gather, void *stream) {
    if (!t || n_tensors < 1 || n_tensors > APEX_CUDA_MAX_ROW_TENSORS || n_rows < 0)
        return APEX_CUDA_EINVAL;
    if (n_rows == 0) return 0;
    if (!idx) return APEX_CUDA_EINVAL;
    rows_params p;
    for (int k = 0; k < APEX_CUDA_MAX_ROW_TENSORS; k++) {
        if (k < n_tensors) {
            if (!t[k].src || !t[k].dst || t[k].row_bytes > t[k].src_stride ||
                t[k].row_bytes > t[k].dst_stride)
                return APEX_CUDA_EINVAL;
            p.t[k] = t[k];
        } else {
            p.t[k] = apex_cuda_rows{nullptr, nullptr, 0, 0, 0};
        }
    }
    p.idx = idx;
    p.gather = gather;
    rows_kernel<<<dim3((unsigned)n_rows, (unsigned)n_tensors), 128, 0, (cudaStream_t)stream>>>(p);
    return apexcu_last_launch_error();
}

}  // namespace

extern "C" int apex_cuda_gather_rows(const apex_cuda_rows *t, int n_tensors,
                                     const int32_t *idx, int32_t n_rows, void *stream) {
    return launch_rows(t, n_tensors, idx, n_rows, 1, stream);
}

extern "C" int apex_cuda_scatter_rows(const apex_cuda_rows *t, int n_tensors,
                                      const int32_t *idx, int32_t n_rows, void *stream) {
    return launch_rows(t, n_tensors, idx, n_rows, 0, stream);
}
