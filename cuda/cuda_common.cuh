// cuda_common.cuh - device helpers shared by the APEX kernels: element
// types (one tag per row of cpu_attn/dtype_traits.h's table) and the
// dispatch from apex_dtype to them, fp16/bf16 <-> fp32 conversions that
// round exactly as cpu_attn/dtype_convert.h does, and 16-byte vector loads.
#ifndef APEX_CUDA_COMMON_CUH
#define APEX_CUDA_COMMON_CUH

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "cpu_attn/dtype_traits.h"
#include "cpu_attn/kv_layout.h"
#include "cuda/apex_cuda.h"

namespace apexcu {

// Storage tags: the kernels are templated on these, never on apex_dtype.
struct f32_t { typedef float raw; static const int size = 4; };
struct f16_t { typedef uint16_t raw; static const int size = 2; };
struct bf16_t { typedef uint16_t raw; static const int size = 2; };

__device__ __forceinline__ float bf16_bits_to_f32(uint32_t b) {
    return __uint_as_float(b << 16);
}

__device__ __forceinline__ uint16_t f32_to_bf16_bits(float f) {
    uint32_t x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

__device__ __forceinline__ float f16_bits_to_f32(uint16_t h) {
    return __half2float(__ushort_as_half(h));
}

__device__ __forceinline__ uint16_t f32_to_f16_bits(float f) {
    return __half_as_ushort(__float2half_rn(f));
}

template <typename T> struct conv;
template <> struct conv<f32_t> {
    static __device__ __forceinline__ float load(const void *p, size_t i) {
        return ((const float *)p)[i];
    }
    static __device__ __forceinline__ void store(void *p, size_t i, float v) {
        ((float *)p)[i] = v;
    }
};
template <> struct conv<f16_t> {
    static __device__ __forceinline__ float load(const void *p, size_t i) {
        return f16_bits_to_f32(((const uint16_t *)p)[i]);
    }
    static __device__ __forceinline__ void store(void *p, size_t i, float v) {
        ((uint16_t *)p)[i] = f32_to_f16_bits(v);
    }
};
template <> struct conv<bf16_t> {
    static __device__ __forceinline__ float load(const void *p, size_t i) {
        return bf16_bits_to_f32(((const uint16_t *)p)[i]);
    }
    static __device__ __forceinline__ void store(void *p, size_t i, float v) {
        ((uint16_t *)p)[i] = f32_to_bf16_bits(v);
    }
};

// Runs the statements `...` with T the storage tag (f32_t, ...) of the
// runtime type dt, the row of APEX_DTYPES whose tag is T's name: the one
// dispatch from apex_dtype to the kernel templates (host and device code).
// A dt that is not an apex_dtype runs nothing; launchers check dt first.
#define APEXCU_DISPATCH_CASE_(E, TAG, S, TO, FROM, T, ...)                      \
    case E: {                                                                  \
        typedef apexcu::TAG##_t T;                                             \
        (void)sizeof(T);                                                       \
        __VA_ARGS__;                                                           \
    } break;
#define APEXCU_DISPATCH_DTYPE(dt, T, ...)                                      \
    APEX_DTYPE_SWITCH(dt, APEXCU_DISPATCH_CASE_, T, __VA_ARGS__)

// Element i of an array of runtime type t (for q and outputs, read or
// written once per kernel, where a uniform switch costs nothing).
__device__ __forceinline__ float load_any(const void *p, int t, size_t i) {
    float x = 0.0f;
    APEXCU_DISPATCH_DTYPE(t, T, x = conv<T>::load(p, i));
    return x;
}

__device__ __forceinline__ void store_any(void *p, int t, size_t i, float v) {
    APEXCU_DISPATCH_DTYPE(t, T, conv<T>::store(p, i, v));
}

// 16 bytes of T unpacked to fp32: 8 elements of fp16/bf16 or 4 of fp32.
template <typename T> struct vec16;
template <> struct vec16<f32_t> {
    static const int n = 4;
    static __device__ __forceinline__ void unpack(const uint4 &u, float *o) {
        o[0] = __uint_as_float(u.x); o[1] = __uint_as_float(u.y);
        o[2] = __uint_as_float(u.z); o[3] = __uint_as_float(u.w);
    }
};
template <> struct vec16<f16_t> {
    static const int n = 8;
    static __device__ __forceinline__ void unpack(const uint4 &u, float *o) {
        const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            __half2 h = *reinterpret_cast<const __half2 *>(&w[i]);
            float2 f = __half22float2(h);
            o[2 * i] = f.x;
            o[2 * i + 1] = f.y;
        }
    }
};
template <> struct vec16<bf16_t> {
    static const int n = 8;
    static __device__ __forceinline__ void unpack(const uint4 &u, float *o) {
        const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            o[2 * i] = __uint_as_float(w[i] << 16);
            o[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        }
    }
};

// Streaming read: the KV cache is read once per step, keep it out of L1.
__device__ __forceinline__ uint4 ld_stream(const void *p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// exp2 of (x - m) that is 0, not NaN, when both are -inf.
__device__ __forceinline__ float exp2_diff(float x, float m) {
    return x == neg_inf() ? 0.0f : exp2f(x - m);
}

__host__ __device__ constexpr int pow2_ceil(int x) { return x <= 1 ? 1 : 2 * pow2_ceil((x + 1) / 2); }

}  // namespace apexcu

// Launch helpers shared by the .cu files (host side).
int apexcu_last_launch_error(void);
int apexcu_sm_count(void);

#endif
