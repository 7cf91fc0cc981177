// paged_decode_f32.cu - the decode kernels for a f32 KV cache.
#include "cuda/paged_decode.cuh"

int apexcu_decode_launch_f32(const apexcu::decode_params &p, int head_dim,
                              int gq, dim3 grid, cudaStream_t stream) {
    return apexcu::launch_decode_typed<apexcu::f32_t>(p, head_dim, gq, grid, stream);
}
