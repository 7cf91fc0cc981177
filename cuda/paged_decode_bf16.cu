// paged_decode_bf16.cu - the decode kernels for a bf16 KV cache.
#include "cuda/paged_decode.cuh"

int apexcu_decode_launch_bf16(const apexcu::decode_params &p, int head_dim,
                               int gq, dim3 grid, cudaStream_t stream) {
    return apexcu::launch_decode_typed<apexcu::bf16_t>(p, head_dim, gq, grid, stream);
}
