// paged_decode_f16.cu - the decode kernels for a f16 KV cache.
#include "cuda/paged_decode.cuh"

int apexcu_decode_launch_f16(const apexcu::decode_params &p, int head_dim,
                              int gq, dim3 grid, cudaStream_t stream) {
    return apexcu::launch_decode_typed<apexcu::f16_t>(p, head_dim, gq, grid, stream);
}
