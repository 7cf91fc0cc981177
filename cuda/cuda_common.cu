// cuda_common.cu - host helpers shared by the launchers.
#include "cuda/cuda_common.cuh"

// Checks the launch just enqueued on this thread. Only configuration errors
// surface here; a fault inside a kernel is reported by a later sync.
int apexcu_last_launch_error(void) {
    cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? 0 : (int)e;
}

// Multiprocessors of the current device, cached per device ordinal (the
// attribute query is cheap, the cache keeps it off every launch).
int apexcu_sm_count(void) {
    static int cache[64];
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) {
        cudaGetLastError();
        return 1;
    }
    if (dev >= 0 && dev < 64) {
        int c = __atomic_load_n(&cache[dev], __ATOMIC_RELAXED);
        if (c > 0) return c;
    }
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n < 1) {
        cudaGetLastError();
        return 1;
    }
    if (dev >= 0 && dev < 64) __atomic_store_n(&cache[dev], n, __ATOMIC_RELAXED);
    return n;
}

extern "C" const char *apex_cuda_error_string(int code) {
    switch (code) {
    case 0: return "no error";
    case APEX_CUDA_EINVAL: return "invalid argument (geometry, null or misaligned pointer)";
    case APEX_CUDA_EUNSUPPORTED: return "unsupported geometry or dtype";
    case APEX_CUDA_ENODRIVER: return "CUDA driver (libcuda.so.1) or the needed entry point is unavailable";
    default: break;
    }
    if (code > 0) return cudaGetErrorString((cudaError_t)code);
    return "unknown APEX CUDA error";
}
