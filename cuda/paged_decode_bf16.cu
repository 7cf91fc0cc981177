// paged_decode_bf16.cu - the decode kernels for a bf16 KV cache.
#include "cuda/paged_decode.cuh"

template int apexcu_decode_launch<apexcu::bf16_t>(const apexcu::decode_params &, int, int, dim3,
                                                 cudaStream_t);
