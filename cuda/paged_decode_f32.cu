// paged_decode_f32.cu - the decode kernels for a f32 KV cache.
#include "cuda/paged_decode.cuh"

template int apexcu_decode_launch<apexcu::f32_t>(const apexcu::decode_params &, int, int, dim3,
                                                 cudaStream_t);
