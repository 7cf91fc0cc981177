/*
 * dtype_traits.h - the one table of element types (apex_dtype) and what
 * follows from it: size, name, validity, scalar load/store as fp32, and the
 * dispatch macros that turn a run-time apex_dtype into a compile-time type
 * (APEX_DISPATCH_KV_DTYPE for C here, APEXCU_DISPATCH_DTYPE for the CUDA
 * templates in cuda/cuda_common.cuh).
 *
 * A new dtype is one row of APEX_DTYPES (plus its scalar conversions in
 * dtype_convert.h, its apexcu tag and conv<> in cuda_common.cuh, and what its
 * SIMD kernels need). It lives with the kernels (the lowest layer) so that
 * cpu_attn/, cuda/ and csrc/ all include it without a layer pointing up.
 */
#ifndef APEX_DTYPE_TRAITS_H
#define APEX_DTYPE_TRAITS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "apex/apex.h"
#include "cpu_attn/dtype_convert.h"

/* fp32 is stored as itself. */
static inline float apex_f32_identity(float x) { return x; }

/* X(enum, tag, storage type, to_f32, from_f32, ...): one row per apex_dtype.
 * tag names the type in messages ("f16") and, pasted, its CUDA tag type
 * (apexcu::f16_t). The trailing arguments are passed through to X (the
 * dispatch macros use them); callers with none pass a placeholder. */
#define APEX_DTYPES(X, ...)                                                                 \
    X(APEX_DTYPE_F32, f32, float, apex_f32_identity, apex_f32_identity, __VA_ARGS__)        \
    X(APEX_DTYPE_F16, f16, uint16_t, apex_f16_to_f32, apex_f32_to_f16, __VA_ARGS__)         \
    X(APEX_DTYPE_BF16, bf16, uint16_t, apex_bf16_to_f32, apex_f32_to_bf16, __VA_ARGS__)

/* Bytes of one element; 0 for a value that is not an apex_dtype. */
static inline size_t apex_dtype_size(apex_dtype t) {
#define APEX_DT_SIZE_(E, TAG, S, ...) case E: return sizeof(S);
    switch ((int)t) { APEX_DTYPES(APEX_DT_SIZE_, _) default: return 0; }
#undef APEX_DT_SIZE_
}

static inline int apex_dtype_valid(int t) {
#define APEX_DT_VALID_(E, ...) case E: return 1;
    switch (t) { APEX_DTYPES(APEX_DT_VALID_, _) default: return 0; }
#undef APEX_DT_VALID_
}

/* "f32", "f16", "bf16"; "?" for a value that is not an apex_dtype. */
static inline const char *apex_dtype_name(int t) {
#define APEX_DT_NAME_(E, TAG, ...) case E: return #TAG;
    switch (t) { APEX_DTYPES(APEX_DT_NAME_, _) default: return "?"; }
#undef APEX_DT_NAME_
}

/* Bit (1u << t) for every apex_dtype (apex_limits.kv_dtypes). */
static inline uint32_t apex_dtype_mask(void) {
#define APEX_DT_BIT_(E, ...) | (1u << (E))
    return 0u APEX_DTYPES(APEX_DT_BIT_, _);
#undef APEX_DT_BIT_
}

/* Runs the statements `...` with T the storage type of dt, T##_to_f32(x)
 * and T##_from_f32(v) its scalar conversions (const function pointers to
 * static inline functions, which the compiler inlines). A dt that is not an
 * apex_dtype runs nothing: callers check dt first (apex_dtype_valid). */
#define APEX_DISPATCH_CASE_(E, TAG, S, TO, FROM, T, ...)                                  \
    case E: {                                                                              \
        typedef S T;                                                                       \
        float (*const T##_to_f32)(S) = TO;                                                 \
        S (*const T##_from_f32)(float) = FROM;                                             \
        (void)sizeof(T);                                                                   \
        (void)T##_to_f32;                                                                  \
        (void)T##_from_f32;                                                                \
        __VA_ARGS__;                                                                       \
    } break;
#define APEX_DISPATCH_KV_DTYPE(dt, T, ...) APEX_DTYPE_SWITCH(dt, APEX_DISPATCH_CASE_, T, __VA_ARGS__)

/* The switch both dispatch macros are: CASE(row..., T, body) per row of
 * APEX_DTYPES, nothing for a value that is not an apex_dtype. */
#define APEX_DTYPE_SWITCH(dt, CASE, T, ...)                                                \
    do {                                                                                   \
        switch ((int)(dt)) {                                                               \
            APEX_DTYPES(CASE, T, __VA_ARGS__)                                              \
        default: break;                                                                    \
        }                                                                                  \
    } while (0)

/* Element i of an array of type t, as fp32. */
static inline float apex_load_f32(const void *p, apex_dtype t, size_t i) {
    float x = 0.0f;
    APEX_DISPATCH_KV_DTYPE(t, E, x = E_to_f32(((const E *)p)[i]));
    return x;
}

/* Stores v as element i of an array of type t. */
static inline void apex_store_f32(void *p, apex_dtype t, size_t i, float v) {
    APEX_DISPATCH_KV_DTYPE(t, E, ((E *)p)[i] = E_from_f32(v));
}

/* count elements of type st at src, as type dt at dst (a copy when equal). */
static inline void apex_dtype_convert(void *dst, apex_dtype dt, const void *src, apex_dtype st,
                                      size_t count) {
    if (dt == st) {
        memcpy(dst, src, count * apex_dtype_size(dt));
        return;
    }
    for (size_t i = 0; i < count; i++) apex_store_f32(dst, dt, i, apex_load_f32(src, st, i));
}

#endif /* APEX_DTYPE_TRAITS_H */
