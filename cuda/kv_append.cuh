// kv_append.cuh - the KV scatter, shared by the append and prefill launchers.
#ifndef APEX_KV_APPEND_CUH
#define APEX_KV_APPEND_CUH

#include <cuda_runtime.h>

#include "cuda/apex_cuda.h"

namespace apexcu {
struct kv_append_params {
    const void *k;
    const void *v;
    int64_t k_stride;
    int64_t v_stride;
    const int64_t *slots;
    void *kv;
    size_t block_bytes;
    size_t v_offset;
    int n_kv_heads;
    int head_dim;
    int bt_shift;
};
}  // namespace apexcu

// Validates and enqueues; 0 or an error code as apex_cuda_kv_append_rows.
int apexcu_kv_append(const apex_cuda_kv_append *a, cudaStream_t stream);

#endif
