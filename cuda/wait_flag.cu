// wait_flag.cu - a stream waits on the device for a host-written flag.
// Preferred: the driver's stream memory operation (no GPU resources held).
// Fallback where the driver lacks it: a one-thread kernel polling the mapped
// flag with back-off, which holds one block slot of one SM while it waits.
#include "cuda/cuda_common.cuh"

namespace {

__global__ void wait_flag_kernel(const volatile uint32_t *flag, uint32_t value) {
    unsigned ns = 32;
    while ((int32_t)(*flag - value) < 0) {
#if __CUDA_ARCH__ >= 700
        __nanosleep(ns);
        if (ns < 4096) ns *= 2;
#endif
    }
    __threadfence_system();
}

}  // namespace

extern "C" int apex_cuda_stream_wait_flag(void *stream, const uint32_t *flag, uint32_t value) {
    if (!flag || ((uintptr_t)flag & 3)) return APEX_CUDA_EINVAL;
    int rc = apex_cuda_stream_wait_value32(stream, (void *)flag, value, APEX_CUDA_WAIT_GEQ);
    if (rc == 0) return 0;
    if (rc != APEX_CUDA_ENODRIVER && rc != 801 /* CUDA_ERROR_NOT_SUPPORTED */) return rc;
    wait_flag_kernel<<<1, 1, 0, (cudaStream_t)stream>>>(flag, value);
    return apexcu_last_launch_error();
}
