// paged_decode_f16.cu - the decode kernels for a f16 KV cache.
#include "cuda/paged_decode.cuh"

template int apexcu_decode_launch<apexcu::f16_t>(const apexcu::decode_params &, int, int, dim3,
                                                 cudaStream_t);
